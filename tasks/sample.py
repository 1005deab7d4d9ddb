"""Prefect task for ``imagegen sample``: a thin wrapper around :func:`imagegen.sample.sample`."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from imagegen.sample import SampleRequest, sample as sample_request


@task(name="sample", tags=["gpu"], cache_policy=NO_CACHE)
def sample(request: SampleRequest, data_root: str) -> dict[str, Any]:
    """Generate the request's images; returns the summary (paths and parameters, no images)."""
    return sample_request(request, data_root)

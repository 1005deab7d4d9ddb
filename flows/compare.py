"""The A/B comparison's report as a flow: the win rate with its interval, published as artifacts
through :mod:`flows.publish` (the serving and voting are ``imagegen compare``'s, outside Prefect)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.publish import publish_pages
from imagegen.compare import compare_pages


@flow(name="compare-report")
def compare_report_flow(report: dict[str, Any]) -> dict[str, Any]:
    publish_pages(compare_pages(report))
    return report

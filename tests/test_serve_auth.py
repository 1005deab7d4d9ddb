"""``imagegen serve`` with Prefect's basic auth: without credentials the API refuses, the worker
and its flow runs (which hold them) run a flow.  The flow is the tiny curate test_faults.py's
reference computed (conftest ``tiny_curate``) in that root: its stages are found done, the flow run
still reports every task and its state through the authenticated API."""

from __future__ import annotations

import httpx
import pytest

from imagegen import serve as S
from imagegen.faultinject import TINY_CURATE, dataset_digests

pytestmark = pytest.mark.slow


def test_basic_auth_refuses_anonymous_requests_and_the_worker_runs_a_flow(tiny_curate, tmp_path, monkeypatch):
    from imagegen.curate import CurateConfig
    from imagegen.presets import CURATE_PRESETS, build_config

    monkeypatch.setenv(S.SERVER_AUTH, "imagegen:s3cret-for-this-test")
    monkeypatch.delenv(S.CLIENT_AUTH, raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    root, reference, digests = tiny_curate
    home = tmp_path / "home"
    served = S.bring_up(root, port=S.free_port(), home=home, worker_log=home / "worker.log",
                        worker_env={"PREFECT_WORKER_QUERY_SECONDS": "2", "OMP_NUM_THREADS": "1",
                                    "PREFECT_LOGGING_LEVEL": "INFO"})  # its timeline in worker.log
    try:
        api = served.api_url
        assert httpx.get(f"{api}/health", timeout=10).status_code == 200  # probes stay open
        anon = httpx.post(f"{api}/deployments/filter", json={}, timeout=10)
        assert anon.status_code == 401
        wrong = httpx.post(f"{api}/deployments/filter", json={}, auth=("imagegen", "guess"), timeout=10)
        assert wrong.status_code == 401
        ok = httpx.post(f"{api}/deployments/filter", json={}, auth=("imagegen", "s3cret-for-this-test"), timeout=10)
        assert ok.status_code == 200 and {d["name"] for d in ok.json()} >= {"curate"}

        cfg = build_config(CurateConfig, CURATE_PRESETS, "smoke", TINY_CURATE)
        with S.client(api) as c:
            dep = c.read_deployment_by_name("curate/curate")
            created = c.create_flow_run_from_deployment(
                dep.id, parameters={"config": cfg.model_dump(mode="json"), "data_root": str(root)})
        run = S.wait_for_flow_run(api, created.id, timeout=900)
        assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{served.worker.tail(60)}"
        assert dataset_digests(reference["path"]) == digests  # the same request: the same dataset, untouched
    finally:
        served.stop()

"""Shared fixtures.  Environment is isolated before Prefect is imported anywhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="imagegen-tests-"))
# Under pytest-xdist (the CI command: -n 2) each worker is a session of its own, with its own Prefect server,
# home and result storage: a worker inherits the controller's environment, where setdefault would keep the
# controller's paths and two workers would read each other's cached task results.
_set = os.environ.__setitem__ if os.environ.get("PYTEST_XDIST_WORKER") else os.environ.setdefault
_set("PREFECT_HOME", str(_SESSION_TMP / "prefect-home"))
_set("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(_SESSION_TMP / "prefect-results"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (temporary SQLite database) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """torch on one thread for the whole session, set before any module fixture trains or samples
    (two cores are shared by pytest, servers and subprocesses: intra-op threads only contend, and
    small tensor ops were measured 10-40x slower with two).  The one place that sets it: test
    files request it by name at most."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def pipeline_root(session_tmp) -> Path:
    """The data root of the tiny pipeline runs of test_pipeline.py, test_orchestration.py and
    test_browser.py, and the default one of ``live_prefect``'s worker.  Stages and runs are
    content-addressed (and the curate tasks' Prefect cache keys name the root), so a request that one
    of them computed is found done by the others: each tiny pipeline is computed once per session."""
    return (session_tmp / "live-data").resolve()


@pytest.fixture(scope="session")
def live_prefect(session_tmp, pipeline_root):
    """A real ``prefect server start`` on a free loopback port with its own PREFECT_HOME (SQLite), the
    work pool, the ``gpu`` concurrency limit, every deployment of prefect.yaml and a process worker,
    brought up by the functions of ``imagegen serve``.  Flow runs that name no data root use
    ``pipeline_root``; the server, deploy and worker logs are under ``<session tmp>/live-prefect``."""
    from imagegen import serve as S

    home = session_tmp / "live-prefect"
    served = S.bring_up(pipeline_root, port=S.free_port(), home=home, worker_log=home / "worker.log",
                        worker_env={"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "INFO",
                                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    yield served
    served.stop()


@pytest.fixture(scope="session")
def tiny_curate(tmp_path_factory):
    """One uninterrupted tiny curate (``imagegen curate --no-prefect`` of
    ``imagegen.faultinject.TINY_CURATE``) in its own data root, once per session: test_faults.py's
    reference bytes, and the root test_serve_auth.py's worker runs the same request in (its stages
    are found done, so that flow run costs start-up and API traffic only).  (root, --json result,
    dataset digests)."""
    from imagegen import faultinject as F

    root = tmp_path_factory.mktemp("tiny-curate")
    o = F.run(F.curate_cmd(root), env={"OMP_NUM_THREADS": "1"})
    assert o.returncode == 0 and o.result is not None, f"exit {o.returncode}\n{o.stderr[-4000:]}"
    return root, o.result, F.dataset_digests(o.result["path"])

"""``imagegen serve``: a local Prefect server, the work pool, every deployment of prefect.yaml and a worker.

    imagegen serve [--host 127.0.0.1] [--port 4200] [--home DIR] [--data-root DIR] [--no-worker] [--api-url URL]

Each step is a plain function (the tests call them one by one):

* :func:`start_server` runs ``prefect server start`` on loopback in its own process group, with
  ``PREFECT_HOME`` = ``--home`` (default ``<data root>/prefect``: the SQLite database, the UI build,
  the result storage) and analytics off; :func:`wait_healthy` polls ``/api/health``.
* :func:`ensure_work_pool` creates the process work pool ``imagegen-process`` and
  :func:`ensure_gpu_limit` the tag concurrency limit ``gpu`` = 1 (every task run tagged ``gpu``
  -- training and distillation -- waits for the one slot, whichever flow run it belongs to).
* :func:`deploy_all` runs ``prefect --no-prompt deploy --all`` in the checkout that holds
  prefect.yaml (the deployments record it as their working directory).
* :func:`start_worker` runs ``prefect worker start --pool imagegen-process`` with
  ``IMAGEGEN_DATA_ROOT`` set, so flow runs that name no data root use the served one.

``--api-url`` skips the server: the pool, the limit, the deployments and the worker go to an existing
Prefect server (e.g. ``http://gpu-box:4200/api``).  Ctrl-C or SIGTERM stops the worker, then the
server, each with its whole process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

POOL = "imagegen-process"
GPU_TAG = "gpu"
GPU_SLOTS = 1
PREFECT_FILE = "prefect.yaml"
WORKER_QUERY_SECONDS = "2"  # the worker's poll interval (a loopback server: cheap)


class ServeError(RuntimeError):
    pass


def project_dir() -> Path:
    """The checkout holding prefect.yaml (the deployments' working directory)."""
    here = Path(__file__).resolve().parents[1]
    if not (here / PREFECT_FILE).is_file():
        raise ServeError(f"no {PREFECT_FILE} in {here}: `imagegen serve` deploys from a checkout of "
                         "imagegen-pipeline (pip install -e .), not from an installed wheel")
    return here


def api_url_for(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/api"


def ui_url_for(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def prefect_exe() -> str:
    """The ``prefect`` command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("prefect")
    if not exe.is_file():
        raise ServeError(f"no `prefect` command next to {sys.executable}; install the project (./setup.sh)")
    return str(exe)


SERVER_AUTH = "PREFECT_SERVER_API_AUTH_STRING"  # the server's basic-auth "user:password" (Prefect's setting)
CLIENT_AUTH = "PREFECT_API_AUTH_STRING"  # what clients, the worker and flow runs send


def auth_string() -> str | None:
    """The credentials this process sends: ``$PREFECT_API_AUTH_STRING``, else the server's own
    ``$PREFECT_SERVER_API_AUTH_STRING`` (``imagegen serve`` is the operator of the server it starts)."""
    return os.environ.get(CLIENT_AUTH) or os.environ.get(SERVER_AUTH) or None


def client_env(api_url: str, home: Path | str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment aimed at ``api_url``: for ``prefect deploy``, the worker and its flow runs
    (with the basic-auth credentials when the server wants them)."""
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop(SERVER_AUTH, None)  # a client holds the credentials it sends, never the server's setting
    if auth_string():
        env[CLIENT_AUTH] = auth_string()
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    env.update(extra)
    return env


@dataclass
class Proc:
    """A child in its own process group, its output going to ``log`` (None: this terminal)."""

    name: str
    popen: subprocess.Popen
    log: Path | None = None
    _fh: IO[bytes] | None = field(default=None, repr=False)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 40) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM to the whole group, SIGKILL after ``timeout`` seconds; returns the exit code."""
        if self.alive():
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.popen.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.popen.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # the leader is gone; what is left of its group goes too
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        return self.popen.poll()


def _spawn(name: str, args: list[str], env: dict[str, str], log: Path | None, cwd: Path | None = None) -> Proc:
    fh = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "ab")
    # without a log file the child writes to our stderr: stdout carries only the UI line
    popen = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=fh or sys.stderr.fileno(),
                             stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(name, popen, log, fh)


def start_server(home: Path | str, host: str = "127.0.0.1", port: int = 4200, log: Path | None = None) -> Proc:
    """``prefect server start`` with its SQLite database under ``home``; returns at once (see wait_healthy)."""
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeError(f"cannot serve on {host}:{port} ({exc.strerror or exc}); pick another --port, or "
                             f"use the server already there with --api-url {api_url_for(host, port)}") from None
    api_url = api_url_for(host, port)
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", CLIENT_AUTH)}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_API_URL=api_url)
    return _spawn("server", [prefect_exe(), "server", "start", "--host", host, "--port", str(port)], env,
                  log if log is not None else home / "server.log")


def wait_healthy(api_url: str, timeout: float = 120.0, proc: Proc | None = None) -> float:
    """Poll ``<api_url>/health`` until it answers; returns the seconds waited.  A server process that
    exits, or no answer in ``timeout`` seconds, raises with the end of its log."""
    import httpx

    t0 = time.monotonic()
    last: Exception | str = "no answer"
    while time.monotonic() - t0 < timeout:
        if proc is not None and not proc.alive():
            raise ServeError(f"the Prefect server exited with code {proc.popen.returncode} before answering at "
                             f"{api_url}; its log ({proc.log}):\n{proc.tail()}")
        try:
            r = httpx.get(f"{api_url.rstrip('/')}/health", timeout=5.0)
            if r.status_code == 200:
                return time.monotonic() - t0
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    tail = f"; its log ({proc.log}):\n{proc.tail()}" if proc is not None else ""
    raise ServeError(f"no Prefect server answered at {api_url}/health within {timeout:.0f} s ({last}){tail}")


@contextmanager
def client(api_url: str) -> Iterator[Any]:
    """A synchronous Prefect client of the server at ``api_url`` (whatever this process's settings say)."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url, auth_string=auth_string()) as c:
        yield c


def ensure_work_pool(api_url: str, name: str = POOL) -> Any:
    """The process work pool ``name`` (created if missing; an existing pool must be a process pool)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with client(api_url) as c:
        try:
            pool = c.read_work_pool(name)
        except ObjectNotFound:
            pool = c.create_work_pool(WorkPoolCreate(name=name, type="process",
                                                     description="imagegen-pipeline flows, run as local processes"))
    if pool.type != "process":
        raise ServeError(f"work pool {name!r} at {api_url} is of type {pool.type!r}; prefect.yaml needs a process "
                         "pool (delete it or serve another server)")
    return pool


def ensure_gpu_limit(api_url: str, tag: str = GPU_TAG, slots: int = GPU_SLOTS) -> Any:
    """The tag concurrency limit: at most ``slots`` task runs tagged ``tag`` at once (upserted)."""
    with client(api_url) as c:
        c.create_concurrency_limit(tag=tag, concurrency_limit=slots)
        return c.read_concurrency_limit_by_tag(tag)


def deploy_all(api_url: str, home: Path | str | None = None, cwd: Path | None = None, timeout: float = 600.0,
               log: Path | None = None) -> list[str]:
    """``prefect --no-prompt deploy --all`` from the checkout; returns the deployments as ``flow/name``."""
    cwd = cwd or project_dir()
    wanted = deployment_names(cwd)
    t0 = time.monotonic()
    proc = subprocess.run([prefect_exe(), "--no-prompt", "deploy", "--all"], cwd=cwd,
                          env=client_env(api_url, home), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
    if proc.returncode != 0:
        raise ServeError(f"`prefect deploy --all` in {cwd} failed (exit {proc.returncode}) after "
                         f"{time.monotonic() - t0:.0f} s:\n{out[-4000:]}")
    with client(api_url) as c:
        flows = {f.id: f.name for f in c.read_flows()}
        found = {d.name: f"{flows.get(d.flow_id, '?')}/{d.name}" for d in c.read_deployments()}
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ServeError(f"`prefect deploy --all` succeeded but deployments {missing} are not on {api_url}:\n"
                         f"{out[-4000:]}")
    return [found[n] for n in wanted]


def deployment_names(cwd: Path | None = None) -> list[str]:
    """The deployment names in prefect.yaml."""
    import yaml

    path = (cwd or project_dir()) / PREFECT_FILE
    spec = yaml.safe_load(path.read_text()) or {}
    return [d["name"] for d in spec.get("deployments") or []]


def start_worker(api_url: str, home: Path | str | None = None, data_root: Path | str | None = None,
                 pool: str = POOL, log: Path | None = None, env: dict[str, str] | None = None) -> Proc:
    """``prefect worker start --pool POOL``: each flow run becomes a process in the deployment's folder.
    It polls the (local) server every ``WORKER_QUERY_SECONDS`` unless ``PREFECT_WORKER_QUERY_SECONDS``
    is set: Prefect's default, 10 s, is up to 10 s more before a run from the UI starts."""
    extra = {"PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS),
             **(env or {})}
    if data_root is not None:
        extra["IMAGEGEN_DATA_ROOT"] = str(Path(data_root).expanduser().resolve())
    name = worker_name()
    args = [prefect_exe(), "worker", "start", "--pool", pool, "--name", name]
    proc = _spawn("worker", args, client_env(api_url, home, **extra), log)
    proc.name = f"worker {name}"
    return proc


def worker_name() -> str:
    """Unique per serving process: several workers (machines) may serve one pool."""
    return f"imagegen-{socket.gethostname()}-{os.getpid()}"


def wait_worker_online(api_url: str, pool: str = POOL, name: str | None = None, timeout: float = 90.0,
                       proc: Proc | None = None) -> float:
    """Wait until the worker ``name`` (default: this process's, see worker_name) has sent a heartbeat
    to ``pool``; returns the seconds waited."""
    name = name or worker_name()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and not proc.alive():
            raise ServeError(f"the worker exited with code {proc.popen.returncode}; its log ({proc.log}):\n"
                             f"{proc.tail()}")
        with client(api_url) as c:
            if any(w.name == name for w in c.read_workers_for_work_pool(pool)):
                return time.monotonic() - t0
        time.sleep(0.5)
    raise ServeError(f"worker {name!r} of pool {pool!r} did not report to {api_url} within {timeout:.0f} s")


def wait_for_flow_run(api_url: str, flow_run_id: Any, timeout: float = 600.0, poll: float = 1.0) -> Any:
    """The flow run once it is in a final state (completed, failed, crashed, cancelled)."""
    t0 = time.monotonic()
    while True:
        with client(api_url) as c:
            run = c.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"flow run {run.name} ({flow_run_id}) still {run.state.name if run.state else None} "
                               f"after {timeout:.0f} s")
        time.sleep(poll)


@dataclass
class Served:
    api_url: str
    ui_url: str
    home: Path
    data_root: Path
    deployments: list[str]
    server: Proc | None = None
    worker: Proc | None = None

    def stop(self) -> None:
        """The worker first (its flow runs end with it), then the server.  Ctrl-C and SIGTERM are
        ignored meanwhile (a second Ctrl-C must not leave the server running without us)."""
        in_main = threading.current_thread() is threading.main_thread()
        old = [(s, signal.signal(s, signal.SIG_IGN)) for s in (signal.SIGINT, signal.SIGTERM)] if in_main else []
        try:
            for p in (self.worker, self.server):
                if p is not None:
                    p.stop()
        finally:
            for s, handler in old:
                signal.signal(s, handler)


def bring_up(data_root: Path | str | None = None, host: str = "127.0.0.1", port: int = 4200,
             home: Path | str | None = None, worker: bool = True, api_url: str | None = None,
             note: Any = None, worker_env: dict[str, str] | None = None, worker_log: Path | None = None) -> Served:
    """Every step of ``imagegen serve`` in order; on a failure, whatever was started is stopped."""
    from imagegen.paths import data_root as resolve_root, ensure_writable

    say = note or (lambda line: None)
    root = ensure_writable(resolve_root(data_root))
    home_dir = Path(home).expanduser().resolve() if home else root / "prefect"
    home_dir.mkdir(parents=True, exist_ok=True)
    served = Served(api_url or api_url_for(host, port), "", home_dir, root, [])
    served.ui_url = ui_url_for(served.api_url)
    try:
        if api_url is None:
            say(f"starting the Prefect server on {host}:{port} (database and logs under {home_dir})")
            served.server = start_server(home_dir, host, port)
            waited = wait_healthy(served.api_url, proc=served.server)
            say(f"server healthy after {waited:.1f} s")
        else:
            wait_healthy(served.api_url, timeout=15.0)
        ensure_work_pool(served.api_url)
        ensure_gpu_limit(served.api_url)
        say(f"work pool {POOL!r} and concurrency limit {GPU_TAG!r}={GPU_SLOTS} ready; deploying prefect.yaml")
        served.deployments = deploy_all(served.api_url, home_dir, log=home_dir / "deploy.log")
        say(f"deployed {', '.join(served.deployments)}")
        if worker:
            served.worker = start_worker(served.api_url, home_dir, root, log=worker_log, env=worker_env)
            wait_worker_online(served.api_url, proc=served.worker)
            say(f"worker of pool {POOL!r} online; flow runs use data root {root}")
    except BaseException:
        served.stop()
        raise
    return served


def serve(data_root: str | None = None, host: str = "127.0.0.1", port: int = 4200, home: str | None = None,
          worker: bool = True, api_url: str | None = None) -> int:
    """``imagegen serve``: bring everything up, print the UI URL, run until Ctrl-C / SIGTERM or until a child exits."""
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise

    def say(line: str) -> None:
        print(f"[serve] {line}", file=sys.stderr, flush=True)

    stopping = {"sig": None}

    def on_signal(signum: int, frame: Any) -> None:
        stopping["sig"] = signum
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    served = None
    try:
        served = bring_up(data_root, host, port, home, worker, api_url, note=say)
        print(f"Prefect UI: {served.ui_url}  (API {served.api_url}); deployments: {', '.join(served.deployments)}",
              flush=True)
        if api_url is None and not os.environ.get(SERVER_AUTH):
            say(f"the API is open to every local user; set {SERVER_AUTH}=user:password before `imagegen serve` "
                f"to require basic auth (clients then need {CLIENT_AUTH}=user:password)")
        if not worker:
            say(f"no worker started: run `PREFECT_API_URL={served.api_url} prefect worker start --pool {POOL}`")
        children = [p for p in (served.server, served.worker) if p is not None]
        if not children:
            return 0  # --api-url with --no-worker: deployed, nothing to keep running
        while all(p.alive() for p in children):
            time.sleep(1.0)
        dead = next(p for p in children if not p.alive())
        say(f"the {dead.name} exited with code {dead.popen.returncode}; stopping")
        return 1
    except KeyboardInterrupt:
        what = " and ".join(p.name for p in (served.worker, served.server) if p is not None) if served else ""
        say(f"{'SIGTERM' if stopping['sig'] else 'Ctrl-C'}: stopping {what or 'the start-up'}")
        return 0
    finally:
        if served is not None:
            served.stop()
        signal.signal(signal.SIGTERM, old)

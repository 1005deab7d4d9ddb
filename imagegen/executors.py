"""Where the map steps of curation run: a local process pool, a Dask cluster or a Ray cluster.

A *runner spec* names the engine, and nothing else about the work (it is an execution knob, left
out of every content id: the same parts give the same bytes on any runner):

- ``local`` (a process pool sized to the machine), ``local:N`` (N processes; ``local:1`` runs in
  this process)
- ``dask`` / ``dask:N``: a ``distributed.LocalCluster`` with N worker processes (default: the CPU
  count), started here and closed afterwards; ``dask://HOST:PORT`` (or ``tcp://HOST:PORT``): an
  existing Dask scheduler
- ``ray`` / ``ray:N``: Ray started locally with N CPUs; ``ray://HOST:PORT``: an existing Ray
  cluster through Ray Client

Map steps are plain module-level functions over one part each (picklable arguments, results
small: counts and paths), so any of the engines can ship them.  A part whose worker dies is run
again (Dask reschedules it, Ray retries it, the local pool is rebuilt and the unfinished parts
resubmitted); parts write their outputs atomically, so a rerun gives the same bytes.

:func:`check_runner` refuses a runner before any work: an engine package that is not installed,
an address that does not answer, a data root a worker cannot write.

A cluster costs seconds to start (a Dask LocalCluster: 20-28 CPU-s on 2 loaded cores), so a
curate starts one for all its stages: inside :func:`shared_executors` every :func:`executor` of a
``dask``/``ray`` spec uses the one engine started for that spec on first use, and the context
closes them all at its end, also on an error (:func:`imagegen.curate.curate` and the pipeline run
inside one).  Outside it, each :func:`executor` starts and closes its own.

**Threads per worker.**  A map step gets ``cores // workers`` threads (at least 1) for the libraries
that start pools of their own: torch's intra-op threads, Arrow's CPU pool (parquet decoding), and the
OpenMP/BLAS pools (through threadpoolctl); ``local:1`` gets every core, ``dask:2`` on 2 cores one thread
per worker.  :func:`thread_caps` sets them around each part's call, in whichever process runs it, and
restores the previous counts after (the driver's own, for ``local:1``); :func:`map_threads` overrides the
count for the executors' maps inside it (``benchmarks/bench_curate_scale.py --map-compare`` runs its
``local:1`` baseline on 1 thread: one worker against one worker).  The caps never change an output:
CLIP encoding pins its own torch thread count (:mod:`imagegen.determinism`), Arrow decodes the same
bytes on any pool, the hashes are per image (tests/test_executors.py: one part hashed and scored on 1
and on 2 threads gives the same parquet bytes).  A cluster started elsewhere (``dask://``, ``ray://``)
keeps its workers' own settings: its cores are not known here.  Dask's nanny also sets
OMP/MKL/OpenBLAS to the cap before it spawns a worker, in its own process's environment, which in a
LocalCluster is the driver's: :func:`_restoring_nanny` puts the driver's values back once the worker is
up (else every process the driver starts afterwards, img2dataset's workers or a training run, would
inherit one thread).

An orchestrator may take the map steps over (:func:`mapped_by`): inside that context every
:func:`executor` hands its ``map`` to the orchestrator's mapper instead of starting an engine;
the curate flow uses it to run each part as a Prefect task on the flow's task runner
(``tasks/curate_map.py``).  :func:`map_step` declares what such a mapper needs to know about a
step: its name, a content key per part (for caching), the files it writes, whether it loads a model.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import contextvars
import functools
import logging
import multiprocessing
import os
import re
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Sequence

from pydantic import AfterValidator, Field

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^(?P<kind>local|dask|ray)(?::(?P<n>\d+))?$|^(?P<scheme>dask|tcp|ray)://(?P<host>[^:/\s]+):(?P<port>\d+)$")
PART_RETRIES = 2  # a part is tried up to 1 + PART_RETRIES times when its worker dies


class RunnerError(ValueError):
    """The runner cannot be used; the message names the runner, address or path and why."""


@dataclass(frozen=True)
class Runner:
    kind: str                      # local | dask | ray
    workers: int | None = None     # None: the engine's default (CPU count)
    address: str | None = None     # an existing cluster's address (host:port)

    @property
    def host_port(self) -> tuple[str, int] | None:
        if self.address is None:
            return None
        host, _, port = self.address.rpartition(":")
        return host, int(port)

    def __str__(self) -> str:
        if self.address:
            return f"{'ray' if self.kind == 'ray' else 'dask'}://{self.address}"
        return self.kind + (f":{self.workers}" if self.workers else "")


def parse_runner(spec: str) -> Runner:
    """``local``, ``local:N``, ``dask``, ``dask:N``, ``dask://HOST:PORT``, ``ray``, ``ray:N``, ``ray://HOST:PORT``."""
    m = _SPEC.match(str(spec).strip())
    if not m:
        raise RunnerError(f"runner {spec!r} is not one of local, local:N, dask, dask:N, dask://HOST:PORT, "
                          "ray, ray:N, ray://HOST:PORT")
    if m.group("kind"):
        n = int(m.group("n")) if m.group("n") else None
        if n is not None and not 1 <= n <= 4096:
            raise RunnerError(f"runner {spec!r}: the worker count must be in 1..4096")
        return Runner(m.group("kind"), n)
    port = int(m.group("port"))
    if not 0 < port < 65536:
        raise RunnerError(f"runner {spec!r}: port {port} is out of range")
    kind = "ray" if m.group("scheme") == "ray" else "dask"
    return Runner(kind, None, f"{m.group('host')}:{port}")


def runner_spec(v: str | None) -> str | None:
    """Pydantic validator body: a well-formed runner spec (normalised) or None."""
    if v is None:
        return None
    return str(parse_runner(v))


# A stage config's ``runner`` field: where its per-part map steps run (None: the curate config's)
StageRunner = Annotated[str | None, AfterValidator(runner_spec), Field(
    description="Where this stage's per-part map steps run: local, local:N, dask, dask:N, dask://HOST:PORT, "
                "ray, ray:N, ray://HOST:PORT (default: the curate config's runner); an execution knob, never "
                "part of the stage id")]


_PACKAGES = {"dask": ("distributed", "dask[distributed]"), "ray": ("ray", "ray")}


def _require_package(r: Runner) -> None:
    if r.kind not in _PACKAGES:
        return
    module, pip_name = _PACKAGES[r.kind]
    try:
        __import__(module)
    except ImportError as exc:
        raise RunnerError(f"runner {str(r)!r} needs the {pip_name!r} package, which is not installed here "
                          f"({exc}); install it (pip install '{pip_name}') or use --runner local") from None


def _reachable(r: Runner, timeout: float = 3.0) -> None:
    hp = r.host_port
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as exc:
        raise RunnerError(f"runner {str(r)!r}: cannot reach the {r.kind} cluster at {r.address} "
                          f"({exc.strerror or exc}); is its scheduler/head running and the port open?") from None


def check_runner(spec: str, root: Path | None = None) -> Runner:
    """Everything that can be checked before work: the spec, the engine package, the address.

    The data root's writability from the workers is checked by :func:`probe_root` once the
    executor is up (the local check is :func:`imagegen.paths.ensure_writable`)."""
    r = parse_runner(spec)
    _require_package(r)
    _reachable(r)
    return r


# ---------------------------------------------------------------------------- img2dataset's distributors

DISTRIBUTORS = ("multiprocessing", "ray", "pyspark")
_DIST_PACKAGES = {"ray": ("ray", "ray"), "pyspark": ("pyspark", "pyspark")}
_DIST_ADDRESS = {
    "ray": re.compile(r"^(?:auto|(?:ray://)?(?P<host>[^:/\s]+):(?P<port>\d+))$"),
    "pyspark": re.compile(r"^(?:local\[(?:\d+|\*)\]|spark://(?P<host>[^:/\s]+):(?P<port>\d+))$"),
}
JAVA_HINT = ("install a Java 17+ runtime (Debian/Ubuntu: apt-get install -y default-jre-headless) or point "
             "JAVA_HOME at one")


def distributor_address_problem(kind: str, address: str | None) -> str | None:
    """Why ``address`` is not a valid cluster address for img2dataset's distributor ``kind`` (or None)."""
    if address is None:
        return None
    if kind == "multiprocessing":
        return "download.distributor_address is only for distributor 'ray' or 'pyspark' (multiprocessing runs here)"
    if not _DIST_ADDRESS[kind].match(address.strip()):
        want = "auto, HOST:PORT (the head's GCS port, 6379) or ray://HOST:PORT (Ray Client)" if kind == "ray" else \
            "spark://HOST:PORT (a standalone master) or local[N]"
        return f"download.distributor_address {address!r} is not a {kind} address: use {want}"
    return None


def java_binary() -> str | None:
    """The Java runtime pyspark would start: $JAVA_HOME/bin/java, else ``java`` on PATH."""
    import shutil

    home = os.environ.get("JAVA_HOME")
    if home:
        exe = Path(home) / "bin" / "java"
        return str(exe) if exe.is_file() and os.access(exe, os.X_OK) else None
    return shutil.which("java")


def check_distributor(kind: str, address: str | None = None) -> None:
    """img2dataset's distributor ``kind`` can start here, before any work: its package is installed,
    pyspark finds a Java runtime, a cluster address answers.  Raises :class:`RunnerError` naming the
    package, the runtime or the address."""
    if kind not in DISTRIBUTORS:
        raise RunnerError(f"download.distributor {kind!r} is not one of {', '.join(DISTRIBUTORS)}")
    problem = distributor_address_problem(kind, address)
    if problem:
        raise RunnerError(problem)
    if kind == "multiprocessing":
        return
    module, pip_name = _DIST_PACKAGES[kind]
    try:
        __import__(module)
    except ImportError as exc:
        extra = " (the project's extra: pip install -c constraints.txt -e '.[spark]')" if kind == "pyspark" else ""
        raise RunnerError(f"download.distributor={kind!r} needs the {pip_name!r} package, which is not installed "
                          f"here ({exc}); install it{extra} or use download.distributor=multiprocessing") from None
    if kind == "pyspark" and java_binary() is None:
        where = f"JAVA_HOME={os.environ['JAVA_HOME']} has no bin/java" if os.environ.get("JAVA_HOME") else \
            "no 'java' on PATH and JAVA_HOME is not set"
        raise RunnerError(f"download.distributor='pyspark' needs a Java runtime ({where}): {JAVA_HINT}; "
                          "or use download.distributor=multiprocessing")
    m = _DIST_ADDRESS[kind].match(address.strip()) if address else None
    if m and m.group("host"):
        host, port = m.group("host"), int(m.group("port"))
        try:
            with socket.create_connection((host, port), timeout=3.0):
                pass
        except OSError as exc:
            what = "Ray head" if kind == "ray" else "Spark master"
            raise RunnerError(f"download.distributor={kind!r}: cannot reach the {what} at {address} "
                              f"({exc.strerror or exc}); is it running and the port open?") from None


def _ray_download(downloader: Callable[[Any], tuple[bool, Any]], shard: Any) -> tuple[bool, Any]:
    return downloader(shard)  # a Ray task: img2dataset's subjob, (status, shard) as its distributors take it


def ray_distributor(processes_count: int, downloader: Callable[[Any], tuple[bool, Any]], reader: Any,
                    subjob_size: int, max_shard_retry: int) -> None:
    """img2dataset's ``ray`` distributor, retrying a failed subjob as its other distributors do.

    img2dataset 1.47's own ``ray_distributor`` ignores the status its downloader returns and its
    ``max_shard_retry``: a subjob that fails (the downloader caught an error and returned False) is never
    run again, while ``multiprocessing`` and ``pyspark`` run the failed ones again through its
    ``retrier``.  This one submits every subjob as a Ray task (Ray reruns a task whose worker died), then
    hands the failed ones to that same ``retrier``.  Installed by :func:`img2dataset_ray_retries`."""
    import ray
    from img2dataset.distributor import retrier

    task = ray.remote(_ray_download)
    ref = ray.put(downloader)

    def run(shards: Any) -> list[Any]:
        refs = [task.remote(ref, shard) for shard in shards]
        return [shard for ok, shard in ray.get(refs) if ok is False]

    retrier(run, run(reader), max_shard_retry)


@contextlib.contextmanager
def img2dataset_ray_retries() -> Iterator[None]:
    """While in this context ``img2dataset.download(distributor="ray")`` uses :func:`ray_distributor`
    (img2dataset looks the name up in its ``main`` module at each call); restored afterwards."""
    import importlib

    i2d_main = importlib.import_module("img2dataset.main")  # the module: the package's ``main`` is a function
    saved = i2d_main.ray_distributor
    i2d_main.ray_distributor = ray_distributor
    try:
        yield
    finally:
        i2d_main.ray_distributor = saved


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------- threads per worker

# The environment variables an engine sets before a worker process starts (read by OpenMP/BLAS at load)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("imagegen_map_threads", default=None)


def worker_threads(workers: int) -> int:
    """Threads of one map-step worker out of ``workers`` on this machine: the :func:`map_threads`
    override, else ``max(1, cores // workers)``."""
    forced = _THREADS.get()
    return forced if forced is not None else max(1, default_workers() // max(1, workers))


@contextlib.contextmanager
def map_threads(n: int) -> Iterator[int]:
    """Inside this context every executor's ``map`` runs its parts on ``n`` threads each (see the module doc)."""
    if n < 1:
        raise ValueError(f"map threads must be >= 1, got {n}")
    token = _THREADS.set(n)
    try:
        yield n
    finally:
        _THREADS.reset(token)


@contextlib.contextmanager
def thread_caps(n: int) -> Iterator[int]:
    """Run the block with at most ``n`` threads in torch's intra-op pool (if torch is loaded), Arrow's CPU
    pool and the loaded OpenMP/BLAS pools, then restore the previous counts.

    Process-wide settings: an executor calls it around a whole part, one part at a time per process."""
    import sys

    import pyarrow as pa

    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    torch = sys.modules.get("torch")  # not imported for it: a step that needs torch imports it itself
    prev_arrow = pa.cpu_count()
    prev_torch = torch.get_num_threads() if torch is not None else None
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: without it OpenMP/BLAS keep their pools (no output depends on them)
            pass
        else:
            stack.enter_context(threadpool_limits(limits=n))
        pa.set_cpu_count(n)
        if torch is not None:
            torch.set_num_threads(n)
        try:
            yield n
        finally:
            pa.set_cpu_count(prev_arrow)
            if torch is not None and prev_torch is not None:
                torch.set_num_threads(prev_torch)


def _capped_call(fn: Callable[[Any], Any], n: int | None, item: Any) -> Any:
    """Runs on a worker: ``fn(item)`` under :func:`thread_caps` (``n`` None: the worker's own settings)."""
    if n is None:
        return fn(item)
    with thread_caps(n):
        return fn(item)


# ---------------------------------------------------------------------------- probing workers

def _pid(_: Any) -> int:
    return os.getpid()


def _probe(path: str) -> str:
    """Runs on a worker: write and remove a file under ``path``; returns '' or the error."""
    p = Path(path) / f".probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"ok")
        p.unlink()
        return ""
    except OSError as exc:
        return f"{socket.gethostname()} (pid {os.getpid()}): {exc.strerror or exc}"


# ---------------------------------------------------------------------------- map step declarations

@dataclass(frozen=True)
class MapStepInfo:
    """What an orchestrator needs to know about a map step (the library itself ignores it)."""
    name: str                                           # e.g. "dedup-hash" (a Prefect task name)
    key: Callable[[Any], Any] | None = None             # part -> JSON-able content identity; None: never cached
    outputs: Callable[[Any], list[str]] | None = None   # part -> files the step writes (a cached result is
                                                        # only used while they exist)
    model: Callable[[Any], bool] | bool = False         # loads a model (GPU-backed): tagged for the gpu limit

    def uses_model(self, item: Any) -> bool:
        return bool(self.model(item)) if callable(self.model) else bool(self.model)


def map_step(name: str, *, key: Callable[[Any], Any] | None = None, outputs: Callable[[Any], list[str]] | None = None,
             model: Callable[[Any], bool] | bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a module-level function as a map step (sets ``fn.map_step``; the function is unchanged)."""
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.map_step = MapStepInfo(name, key, outputs, model)  # type: ignore[attr-defined]
        return fn
    return deco


def step_info(fn: Callable[..., Any]) -> MapStepInfo:
    """The declaration of ``fn``, or a default one (its name, not cached, no model)."""
    return getattr(fn, "map_step", None) or MapStepInfo(getattr(fn, "__name__", "map-step").replace("_", "-"))


# A mapper: (runner spec, fn, items) -> [fn(x) for x in items], run wherever the orchestrator runs tasks
Mapper = Callable[[str, Callable[[Any], Any], Sequence[Any]], list[Any]]
_MAPPER: contextvars.ContextVar[Mapper | None] = contextvars.ContextVar("imagegen_mapper", default=None)


@contextlib.contextmanager
def mapped_by(mapper: Mapper) -> Iterator[None]:
    """Inside this context, :func:`executor` delegates every map step to ``mapper``."""
    token = _MAPPER.set(mapper)
    try:
        yield
    finally:
        _MAPPER.reset(token)


# ---------------------------------------------------------------------------- executors

class Executor:
    """``map(fn, items)`` returns ``[fn(x) for x in items]`` in order, wherever it runs."""

    runner: Runner
    workers: int = 1

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    @property
    def threads(self) -> int | None:
        """Threads each part runs on (:func:`worker_threads`); None: the workers' own settings (a cluster
        started elsewhere)."""
        return worker_threads(self.workers) if self.runner.address is None else None

    @property
    def in_process(self) -> bool:
        """True when ``map`` runs in this process (a step may then use its own pool inside)."""
        return False

    def probe_root(self, root: Path) -> None:
        """Every worker can write under ``root`` (a shared filesystem on a cluster), or a clear error."""
        errors = [e for e in self.map(_probe, [str(root)] * max(1, self.workers)) if e]
        if errors:
            raise RunnerError(f"runner {str(self.runner)!r}: the data root {root} is not writable from every "
                              f"worker ({'; '.join(sorted(set(errors)))}); workers read and write only under "
                              "the data root, so it must be a filesystem they all mount at the same path")

    def close(self) -> None:
        pass

    # submit: parts handed over one at a time as they become ready (a map whose items arrive while
    # the caller still works on the next ones); the engines' own futures, never a scheduler here
    supports_submit = False  # Delegated (an orchestrator's mapper) takes whole lists only

    def warm(self) -> None:
        """Start the engine's workers now (a local pool forks its processes here: call it from the main
        thread before starting threads of one's own, so no worker is forked while they hold locks)."""

    def submit(self, fn: Callable[[Any], Any], item: Any) -> Any:
        """Run ``fn(item)`` on the engine; returns a handle whose ``result()`` waits for its value (or
        raises its error) and whose ``cancel()`` drops it if it has not started.  Thread-safe."""
        raise NotImplementedError(f"runner {self.runner}: this executor takes whole maps only")


class _Done:
    """The handle of a call that already ran (its value or its error)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        try:
            self._value = fn()
        except Exception as exc:  # handed to result(), as a pool's future would
            self._error = exc

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> bool:
        return False


class _PoolCall:
    """A :class:`LocalPool` part in flight: ``result()`` resubmits it to a new pool when its worker died."""

    def __init__(self, owner: "LocalPool", fn: Callable[[Any], Any], item: Any) -> None:
        self.owner, self.fn, self.item, self.tries = owner, fn, item, 1
        self.pool, self.fut = owner._submit(fn, item)
        self.fut.add_done_callback(self._drop_item)

    def _drop_item(self, fut: cf.Future) -> None:
        """A part that ran (its worker did not die) is never resubmitted: its item is let go."""
        if not fut.cancelled() and not isinstance(fut.exception(), cf.process.BrokenProcessPool):
            self.item = None

    def result(self) -> Any:
        while True:
            try:
                return self.fut.result()
            except cf.process.BrokenProcessPool:
                if self.tries > PART_RETRIES:
                    raise RuntimeError(f"a part failed {1 + PART_RETRIES} times because its worker process "
                                       "died (out of memory? killed?)") from None
                self.tries += 1
                log.warning("a worker process died; resubmitting a part (attempt %d)", self.tries)
                self.owner._replace(self.pool)
                self.pool, self.fut = self.owner._submit(self.fn, self.item)
                self.fut.add_done_callback(self._drop_item)

    def cancel(self) -> bool:
        return self.fut.cancel()


class Delegated(Executor):
    """The map steps of an orchestrator (see :func:`mapped_by`): no engine is started here."""

    def __init__(self, runner: Runner, spec: str, mapper: Mapper) -> None:
        self.runner, self.spec, self._mapper = runner, spec, mapper
        self.workers = runner.workers or (default_workers() if runner.address is None else 2)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        items = list(items)
        return self._mapper(self.spec, fn, items) if items else []


class InProcess(Executor):
    def __init__(self, runner: Runner | None = None) -> None:
        self.runner = runner or Runner("local", 1)
        self.workers = 1

    @property
    def in_process(self) -> bool:
        return True

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        with thread_caps(self.threads or 1):
            return [fn(x) for x in items]

    supports_submit = True

    def submit(self, fn: Callable[[Any], Any], item: Any) -> Any:
        """Runs ``fn(item)`` now, in the calling thread."""
        return _Done(lambda: fn(item))


class LocalPool(Executor):
    """A process pool (fork where available); a dead worker's parts are resubmitted to a new pool."""

    def __init__(self, runner: Runner, workers: int) -> None:
        self.runner, self.workers = runner, workers
        methods = multiprocessing.get_all_start_methods()
        self._ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self._live: cf.ProcessPoolExecutor | None = None  # the pool of submit (map makes its own)
        self._lock = threading.Lock()

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        items = list(items)
        results: dict[int, Any] = {}
        todo = list(range(len(items)))
        for attempt in range(1 + PART_RETRIES):
            if not todo:
                break
            broken = False
            with cf.ProcessPoolExecutor(min(self.workers, len(todo)), mp_context=self._ctx) as pool:
                futs = {pool.submit(_capped_call, fn, self.threads, items[i]): i for i in todo}
                for fut in cf.as_completed(futs):
                    try:
                        results[futs[fut]] = fut.result()
                    except cf.process.BrokenProcessPool:
                        broken = True
            todo = [i for i in todo if i not in results]
            if todo and broken:
                log.warning("a worker process died; resubmitting %d part(s) (attempt %d)", len(todo), attempt + 2)
        if todo:
            raise RuntimeError(f"{len(todo)} part(s) failed {1 + PART_RETRIES} times because their worker "
                               "process died (out of memory? killed?)")
        return [results[i] for i in range(len(items))]

    # submit: one pool kept for the executor's life (map keeps making its own)
    supports_submit = True

    def _submit(self, fn: Callable[[Any], Any], item: Any) -> tuple[cf.ProcessPoolExecutor, cf.Future]:
        with self._lock:
            if self._live is None:
                self._live = cf.ProcessPoolExecutor(self.workers, mp_context=self._ctx)
            return self._live, self._live.submit(_capped_call, fn, self.threads, item)  # as map's parts

    def _replace(self, broken: cf.ProcessPoolExecutor) -> None:
        with self._lock:
            if self._live is broken:
                self._live = None
        broken.shutdown(wait=False, cancel_futures=True)

    def warm(self) -> None:
        """Forks the pool's processes (a fork pool starts them all at its first call)."""
        _, fut = self._submit(_pid, None)
        fut.result()

    def submit(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return _PoolCall(self, fn, item)

    def close(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.shutdown(wait=True, cancel_futures=True)


# Dask's LocalCluster settings for our map steps:
# - non-daemonic workers: a step may start processes of its own (img2dataset does);
# - glibc's trim threshold left alone: Dask's default sets MALLOC_TRIM_THRESHOLD_=65536 in its workers'
#   environment, which turns off glibc's dynamic mmap threshold, so every image or tensor buffer over
#   128 KiB is mmap'd and unmapped again; a filter-score part (5,000 images, the reference CLIP) took
#   7.5-7.9 CPU-s in such a worker against 5.1-5.2 without it and 3.8-4.8 in a local pool worker
#   (benchmarks/README.md);
# - OMP/MKL/OpenBLAS threads: cores // workers (Dask's default is 1), set by :func:`local_cluster`
#   (an environment variable of the driver's, as Dask's own precedence goes, wins).
LOCAL_CLUSTER_CONFIG = {"distributed.worker.daemon": False,
                        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


@functools.cache
def _restoring_nanny() -> type:
    """A ``distributed.Nanny`` that gives the driver its environment back after starting a worker.

    Before each worker spawn (the first and every restart after a worker died) Dask's nanny runs
    ``os.environ.update(pre_spawn_env)`` in its own process, which in a LocalCluster is the driver: the
    driver kept ``OMP_NUM_THREADS=1`` and the rest for good, and every process it started afterwards
    with them.  The spawned worker has its copy by the time ``instantiate`` returns; the driver's values
    of those keys are put back once no worker is starting (nannies start their workers concurrently: the
    values are taken before the first of them and put back after the last)."""
    import threading

    from distributed import Nanny

    lock = threading.Lock()
    state: dict[str, Any] = {"starting": 0, "saved": {}}

    class RestoringNanny(Nanny):
        async def instantiate(self):  # type: ignore[override]
            keys = list(getattr(self, "pre_spawn_env", {}) or {})
            with lock:
                if state["starting"] == 0:
                    state["saved"] = {}
                for k in keys:  # the driver's own value: before any nanny of ours wrote it
                    state["saved"].setdefault(k, os.environ.get(k))
                state["starting"] += 1
            try:
                return await super().instantiate()
            finally:
                with lock:
                    state["starting"] -= 1
                    if state["starting"] == 0:
                        for k, v in state["saved"].items():
                            if v is None:
                                os.environ.pop(k, None)
                            else:
                                os.environ[k] = v

    return RestoringNanny


def local_cluster(n_workers: int, **kwargs: Any) -> Any:
    """A ``distributed.LocalCluster`` of ``n_workers`` single-threaded worker processes on loopback with
    :data:`LOCAL_CLUSTER_CONFIG`, OMP/MKL/OpenBLAS at :func:`worker_threads` and the driver's environment
    kept as it was (:func:`_restoring_nanny`); also prefect-dask's ``cluster_class`` for ``dask``/``dask:N``."""
    import dask
    from distributed import LocalCluster

    opts = {"threads_per_worker": 1, "processes": True, "dashboard_address": None, "host": "127.0.0.1",
            "worker_class": _restoring_nanny(), **kwargs}
    caps = {f"distributed.nanny.pre-spawn-environ.{k}": str(worker_threads(n_workers)) for k in THREAD_ENV}
    with dask.config.set({**LOCAL_CLUSTER_CONFIG, **caps}):  # read when the nannies are made, which is here
        return LocalCluster(n_workers=n_workers, **opts)


class DaskExecutor(Executor):
    """A Dask cluster's client: a LocalCluster started here (closed by :meth:`close`) or an existing
    scheduler's."""

    def __init__(self, runner: Runner) -> None:
        from distributed import Client

        self.runner = runner
        self._cluster = None
        if runner.address:
            self.client = Client(f"tcp://{runner.address}", timeout=10)
        else:
            self._cluster = local_cluster(runner.workers or default_workers())
            self.client = Client(self._cluster)
        self.workers = max(1, len(self.client.scheduler_info().get("workers", {})))
        self.address = self.client.scheduler_info().get("address", f"tcp://{runner.address}")
        log.info("runner %s: %s Dask scheduler %s (%d workers)", runner,
                 "started the" if self._cluster is not None else "connected to the", self.address, self.workers)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if not items:
            return []
        futs = self.client.map(functools.partial(_capped_call, fn, self.threads), list(items), pure=False,
                               retries=PART_RETRIES, key=step_info(fn).name)
        return self.client.gather(futs)

    supports_submit = True

    def submit(self, fn: Callable[[Any], Any], item: Any) -> Any:
        """A Dask future (``result()``, ``cancel()``), rescheduled like a map's part when its worker dies."""
        return self.client.submit(_capped_call, fn, self.threads, item, pure=False, retries=PART_RETRIES)

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()
            log.info("runner %s: closed the Dask cluster %s", self.runner, self.address)


class RayExecutor(Executor):
    def __init__(self, runner: Runner) -> None:
        import ray

        self.runner = runner
        self._started = False
        if not ray.is_initialized():
            if runner.address:
                ray.init(address=f"ray://{runner.address}", log_to_driver=False)
            else:
                ray.init(num_cpus=runner.workers or default_workers(), include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            self._started = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.address = ray.get_runtime_context().gcs_address
        log.info("runner %s: %s Ray %s (%d CPUs)", runner, "started" if self._started else "using the running",
                 self.address, self.workers)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        import ray

        if not items:
            return []
        remote = ray.remote(max_retries=PART_RETRIES, num_cpus=1)(_capped_call)
        return ray.get([remote.remote(fn, self.threads, x) for x in items])

    supports_submit = True

    def submit(self, fn: Callable[[Any], Any], item: Any) -> Any:
        """Ray's own future of the task (``result()``, ``cancel()``), retried like a map's part."""
        import ray

        return ray.remote(max_retries=PART_RETRIES, num_cpus=1)(_capped_call).remote(fn, self.threads, item).future()

    def close(self) -> None:
        import ray

        if self._started:
            ray.shutdown()
            log.info("runner %s: shut Ray %s down", self.runner, self.address)


_SHARED: contextvars.ContextVar[dict[str, Executor] | None] = contextvars.ContextVar("imagegen_shared_executors",
                                                                                      default=None)


@contextlib.contextmanager
def shared_executors() -> Iterator[dict[str, Executor]]:
    """Inside this context one engine per ``dask``/``ray`` runner spec serves every :func:`executor`
    of that spec (started on first use); all are closed when the context ends, also on an error.

    Yields the started executors by spec.  Nested, the outermost context owns them.  ``local``
    runners are not shared: a process pool is cheap and sized per stage."""
    if _SHARED.get() is not None:
        yield _SHARED.get()  # type: ignore[misc]
        return
    engines: dict[str, Executor] = {}
    token = _SHARED.set(engines)
    try:
        yield engines
    finally:
        _SHARED.reset(token)
        for spec, ex in reversed(list(engines.items())):
            try:
                ex.close()
            except Exception as exc:  # closing one must not keep the others open
                log.warning("runner %s: closing it failed (%s: %s)", spec, type(exc).__name__, exc)


def _start(r: Runner) -> Executor:
    return DaskExecutor(r) if r.kind == "dask" else RayExecutor(r)


@contextlib.contextmanager
def executor(spec: str | None = "local", root: Path | None = None, workers: int | None = None) -> Iterator[Executor]:
    """The executor for ``spec`` (see the module doc); ``workers`` caps ``local`` (default: CPU count).

    With ``root``, every worker of a cluster runner must be able to write under it.  Inside
    :func:`shared_executors` a cluster runner's engine is the shared one (left running here)."""
    r = check_runner(spec or "local")
    mapper = _MAPPER.get()
    if mapper is not None and not (r.kind == "local" and r.workers == 1):  # local:1 stays in this process
        ex: Executor = Delegated(r, str(r), mapper)
        if root is not None and r.kind != "local":
            ex.probe_root(Path(root))
        yield ex
        return
    shared = _SHARED.get() if r.kind != "local" else None
    if shared is not None:
        if str(r) not in shared:
            shared[str(r)] = _start(r)
        ex = shared[str(r)]
        if root is not None:
            ex.probe_root(Path(root))
        yield ex
        return
    if r.kind == "local":
        n = r.workers or workers or default_workers()
        ex = InProcess(r) if n <= 1 else LocalPool(r, n)
    else:
        ex = _start(r)
    try:
        if root is not None and r.kind != "local":
            ex.probe_root(Path(root))
        yield ex
    finally:
        ex.close()

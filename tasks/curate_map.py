"""The per-part map steps of curation as Prefect tasks, mapped over parts on a Prefect task runner.

Under the curate flow, :func:`imagegen.executors.mapped_by` hands every stage's map step (decode a
download part, hash a part, embed a part, score a part) to :func:`prefect_mapper`: one task run per
part (``task.map`` over the parts' jobs: paths, row ids and parameters, never images), on

- the flow's task runner when the stage's runner is the curate config's ``runner`` (the flow is
  run with :func:`task_runner_for` of it: ``dask``/``dask:N``/``dask://HOST:PORT`` ->
  prefect-dask's ``DaskTaskRunner``, ``ray``/``ray:N``/``ray://HOST:PORT`` -> prefect-ray's
  ``RayTaskRunner``, ``local``/``local:N`` -> Prefect's ``ProcessPoolTaskRunner``);
- a task runner of its own when a stage overrides the runner: started on first use and shared by
  every map step of that spec until the curate's stages end (:func:`prefect_mapping`), so a curate
  starts one cluster per runner spec, never one per stage.

Each part's cache key is its content identity as the step declares it (``map_step(key=...)``: the
part file's sha256, the parameters that change its result) plus the step's code version, so a
rerun serves unchanged parts from Prefect's cache; a cached result whose files are gone (the
step's ``outputs``) is computed again.  Model-backed steps carry the tag ``gpu``, so the
``gpu`` concurrency limit that bounds training and distillation bounds them too.
Results (compact: hashes, scores, ledger columns) are persisted where Prefect keeps results
(``PREFECT_LOCAL_STORAGE_PATH``; on a cluster point it at the shared filesystem so that every
worker finds the cache).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from prefect import task, unmapped
from prefect.context import TaskRunContext

from imagegen.executors import (PART_RETRIES, Mapper, default_workers, local_cluster, mapped_by, parse_runner,
                                step_info)
from imagegen.hashing import code_version, stable_hash

log = logging.getLogger(__name__)

GPU_TAG = "gpu"  # the tag concurrency limit of prefect.yaml / `imagegen serve`


def task_runner_for(spec: str) -> Any:
    """The Prefect task runner for a runner spec (see the module doc)."""
    r = parse_runner(spec)
    if r.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if r.address:
            return DaskTaskRunner(address=f"tcp://{r.address}")
        return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs={"n_workers": r.workers or default_workers()})
    if r.kind == "ray":
        from prefect_ray import RayTaskRunner

        if r.address:
            return RayTaskRunner(address=f"ray://{r.address}")
        return RayTaskRunner(init_kwargs={"num_cpus": r.workers or default_workers(), "include_dashboard": False,
                                          "log_to_driver": False, "configure_logging": False})
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    n = r.workers or default_workers()
    return ThreadPoolTaskRunner(max_workers=1) if n <= 1 else ProcessPoolTaskRunner(max_workers=n)


def _step_code(fn: Callable[..., Any]) -> str:
    mod = inspect.getmodule(fn)
    return code_version(mod) if mod is not None else fn.__qualname__


def part_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Content key of one part: the step's declared identity of the part + its code version."""
    fn, item = parameters["fn"], parameters["item"]
    info = step_info(fn)
    if info.key is None:
        return None
    return f"imagegen-part-{info.name}-" + stable_hash({"part": info.key(item), "code": _step_code(fn)}, 32)


@task(name="part", retries=PART_RETRIES, retry_delay_seconds=1, persist_result=True, cache_key_fn=part_cache_key)
def run_part(fn: Callable[[Any], Any], item: Any) -> Any:
    """One part of a map step (``fn`` is a module-level map step of :mod:`imagegen.stages`)."""
    return fn(item)


def _missing_outputs(fn: Callable[..., Any], item: Any) -> bool:
    info = step_info(fn)
    return info.outputs is not None and not all(Path(p).exists() for p in info.outputs(item))


def map_parts(fn: Callable[[Any], Any], items: Sequence[Any], root: Path, task_runner: Any | None = None,
              entered: bool = False) -> list[Any]:
    """``[fn(x) for x in items]`` as Prefect task runs: on ``task_runner`` (entered and closed here,
    unless ``entered``: the caller holds it open) or, with None, on the current flow's task runner."""
    info = step_info(fn)
    items = list(items)
    tags = {GPU_TAG} if any(info.uses_model(x) for x in items) else set()

    def run(subset: list[Any], refresh: bool = False) -> list[Any]:
        t = run_part.with_options(name=info.name, tags=tags, refresh_cache=refresh)
        if task_runner is None:
            futures = t.map(unmapped(fn), subset)
        else:
            futures = task_runner.map(t, {"fn": unmapped(fn), "item": subset})
        return [f.result() for f in futures]

    def go() -> list[Any]:
        results = run(items)
        stale = [i for i, x in enumerate(items) if _missing_outputs(fn, x)]
        if stale:  # served from Prefect's cache, but the files it wrote then are gone: compute them again
            log.info("%s: %d part(s) cached without their files; running them again", info.name, len(stale))
            for i, res in zip(stale, run([items[i] for i in stale], refresh=True)):
                results[i] = res
        return results

    if task_runner is None or entered:
        return go()
    with task_runner:
        return go()


def prefect_mapper(flow_spec: str, root: Path, own: dict[str, Any] | None = None,
                   stack: contextlib.ExitStack | None = None) -> Mapper:
    """The mapper the curate flow installs (:func:`imagegen.executors.mapped_by`): a stage whose
    runner is ``flow_spec`` maps on the flow's task runner, another on a task runner of its own.

    With ``own`` and ``stack`` (see :func:`prefect_mapping`) a stage's own task runner is entered
    once on ``stack`` and kept in ``own`` for every later map step of its spec; without them each
    map step starts and closes one."""
    flow_spec = str(parse_runner(flow_spec))

    def mapper(spec: str, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        spec = str(parse_runner(spec))
        if spec == flow_spec:
            return map_parts(fn, items, root)
        if own is None or stack is None:
            return map_parts(fn, items, root, task_runner_for(spec))
        if spec not in own:
            own[spec] = stack.enter_context(task_runner_for(spec))
        return map_parts(fn, items, root, own[spec], entered=True)

    return mapper


@contextlib.contextmanager
def prefect_mapping(flow_spec: str, root: Path) -> Iterator[None]:
    """Every map step inside runs as Prefect tasks (:func:`prefect_mapper`); a task runner a stage's
    own runner needs is started once and closed when the context ends, also on an error."""
    with contextlib.ExitStack() as stack:
        with mapped_by(prefect_mapper(flow_spec, root, {}, stack)):
            yield

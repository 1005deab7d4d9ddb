"""The curate flow: download -> dedup -> filter -> recaption -> shard, as one Prefect flow.

The stages run in the subflow ``curate-stages``, whose task runner follows the config's ``runner``
(``tasks.curate_map.task_runner_for``: Dask, Ray or a local process pool); each stage's per-part map
step is a Prefect task per part on it (``tasks/curate_map.py``): one cluster for the whole curate (a
stage with a runner of its own gets one more, started once for it and closed with the stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger

from flows.publish import publish_pages
from imagegen import curate as C
from imagegen.paths import data_root as resolve_root
from imagegen.presets import CURATE_PRESETS, build_config
from imagegen.report import curate_pages, curate_summary
from tasks import curate as T
from tasks.curate_map import prefect_mapping, task_runner_for


def _fresh(task: Any, *args: Any) -> dict[str, Any]:
    """Run a task; if its cached result points at a folder that is gone, run it again for real."""
    res = task(*args)
    if not Path(res["path"]).exists():
        res = task.with_options(refresh_cache=True)(*args)
    return res


# each stage of imagegen.curate.run_stages -> its Prefect task
TASKS = {"world": T.publish_world, "reference_clip": T.reference_clip, "download": T.download, "dedup": T.dedup,
         "filter": T.filter_images, "recaption": T.recaption, "shard": T.shard}


def _task_runner(root: str) -> C.StageRunner:
    """Run a stage as its task: stage results travel as dicts (ids and paths), the data root as a string."""
    def run(stage: str, fn: Any, _root: Path, *args: Any) -> C.StageResult:
        plain = [a.model_dump() if isinstance(a, C.StageResult) else a for a in args]
        return C.StageResult.model_validate(_fresh(TASKS[stage], root, *plain))

    return run


@flow(name="curate-stages", log_prints=True)
def curate_stages(config: C.CurateConfig, data_root: str) -> dict[str, Any]:
    """The stage tasks in order; map steps are Prefect tasks per part on this flow's task runner."""
    with prefect_mapping(config.runner, Path(data_root)):
        ds = C.run_stages(config, Path(data_root), run=_task_runner(data_root))
    return ds.model_dump()


@flow(name="curate", log_prints=True)
def curate_flow(preset: Literal["smoke", "demo"] | None = "smoke", config: C.CurateConfig | None = None,
                overrides: list[str] | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Curate a dataset into reusable WebDataset shards and register it.

    Give either ``config`` (every parameter) or a ``preset`` plus ``overrides`` such as
    ``["download.timeout=3", "source.publish.n_images=500"]``.
    """
    logger = get_run_logger()
    cfg = config if config is not None else build_config(C.CurateConfig, CURATE_PRESETS, preset, overrides)
    root = resolve_root(data_root)
    C.check_preconditions(cfg, root)
    cfg = C.resolve_parent(cfg, root)  # a parent version by its immutable id
    ds = C.StageResult.model_validate(
        curate_stages.with_options(task_runner=task_runner_for(cfg.runner))(cfg, str(root)))
    publish_pages(curate_pages(ds.path))
    summary = curate_summary(Path(ds.path))
    logger.info("dataset %s (%s) at %s", cfg.name, ds.id, ds.path)
    return summary

"""Prefect task for the leaderboard: a thin wrapper around :func:`imagegen.leaderboard.build_leaderboard`.

The evaluations themselves are ``tasks.evaluate.evaluate`` tasks, one per (run, steps); this task
turns their summaries into ``<root>/leaderboards/<id>/`` (parquet, markdown, plots, card).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from imagegen import leaderboard as L


@task(name="leaderboard", retries=0, cache_policy=NO_CACHE, persist_result=False)
def leaderboard(eval_summaries: list[dict[str, Any]], data_root: str, card: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """Write the leaderboard of ``eval_summaries`` under ``data_root``; its summary (id, path, files, rows)."""
    logger = get_run_logger()
    out = L.build_leaderboard(Path(data_root), eval_summaries, card)
    logger.info("leaderboard %s: %d rows of %d runs, ranked by %s (%s)", out["leaderboard_id"], len(out["rows"]),
                len(out["runs"]), out["main_metric"], out["path"])
    return out

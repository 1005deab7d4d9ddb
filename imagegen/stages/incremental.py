"""A new version of a dataset's download that reuses its parent's parts.

Users ask for "retry only what failed" and "add a URL list without redoing the rest": the child
download starts from the parent's ledger and image parts (hard links, or copies across
filesystems), fetches only the rows that failed for a transient reason (timeout, 5xx, truncated
body, connection error) and the rows of an appended list (row ids continue after the parent's),
and writes those as new parts after the parent's.  Every row keeps one ledger row; a retried row's
``attempts`` add up over the versions.  Parts are content-addressed downstream (the filter's
per-part scores are keyed by the part file's sha256), so the unchanged parts are not rescored.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imagegen.stages import download as D
from imagegen.stages.ledger import read_ledger, write_ledger


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def run_incremental_download(parent_dir: Path, refetch_urls: pd.DataFrame, append: pd.DataFrame | None,
                             cfg: D.DownloadConfig, out_dir: Path, runner: str | None = None) -> dict[str, Any]:
    """``refetch_urls``: the current (row_id, url, caption) of the parent's rows (only the transiently
    failed ones are used); ``append``: a URL list from :func:`read_url_list` whose rows are added."""
    parent_ledger = read_ledger(parent_dir)
    transient = parent_ledger["status"].eq("failed") & parent_ledger["reason"].map(
        lambda r: isinstance(r, str) and D.is_transient(r))
    retry_ids = parent_ledger.loc[transient, "row_id"].astype("int64")
    cur = refetch_urls.set_index("row_id")
    missing = sorted(set(retry_ids) - set(cur.index))
    if missing:
        raise D.InputError(f"parent download {parent_dir}: rows {missing[:5]} to retry are not in the current "
                           "URL list")
    pending = pd.DataFrame({"row_id": retry_ids.to_numpy(), "url": cur.loc[retry_ids, "url"].to_numpy(),
                            "caption": cur.loc[retry_ids, "caption"].to_numpy()})
    pending["skip_reason"] = None
    if "record_url" in cur.columns:  # the world's table: the ledger keeps the port-free URL
        pending["record_url"] = cur.loc[retry_ids, "record_url"].to_numpy()
    n_append = 0
    if append is not None and len(append):
        start = int(parent_ledger["row_id"].max()) + 1
        add = append.copy()
        add["row_id"] = add["row_id"].astype("int64") + start
        known = parent_ledger.drop_duplicates("url").set_index("url")["row_id"]
        seen = add["url"].isin(known.index) & add["skip_reason"].isna()
        if seen.any():
            if cfg.on_duplicate_urls == "error":
                ex = ", ".join(f"{u} (parent row {known[u]})" for u in add.loc[seen, "url"][:3])
                raise D.InputError(f"the appended list repeats {int(seen.sum())} URL(s) of the parent: {ex}; "
                                   "pass on_duplicate_urls='skip' to ledger them as skipped")
            add.loc[seen, "skip_reason"] = [f"duplicate_url_of_row_{known[u]}" for u in add.loc[seen, "url"]]
        if "record_url" in pending.columns:
            add["record_url"] = add["url"]
        pending = pd.concat([pending, add[[c for c in pending.columns]]], ignore_index=True)
        n_append = len(add)

    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    parent_parts = sorted((parent_dir / "images").glob("part-*.parquet"))
    for i, p in enumerate(parent_parts):
        _link(p, images / f"part-{i:05d}.parquet")
    ledger = parent_ledger.set_index("row_id", drop=False)
    new_counts: dict[str, Any] = {}
    if len(pending):
        work = out_dir / "_new"
        work.mkdir()
        new_counts = D.run_download(pending.reset_index(drop=True), cfg, work, runner=runner)
        new = read_ledger(work).set_index("row_id", drop=False)
        import pyarrow.parquet as pq

        new_parts = [p for p in sorted((work / "images").glob("part-*.parquet")) if pq.ParquetFile(p).metadata.num_rows]
        for j, p in enumerate(new_parts):
            os.replace(p, images / f"part-{len(parent_parts) + j:05d}.parquet")
        again = new.index.intersection(ledger.index)
        new.loc[again, "attempts"] = (new.loc[again, "attempts"].astype("Int64")
                                      + ledger.loc[again, "attempts"].astype("Int64"))
        ledger = pd.concat([ledger.drop(index=again), new]).sort_index()
        shutil.rmtree(work)
    ledger = ledger.reset_index(drop=True)[D.LEDGER_COLUMNS]
    for col in ("attempts", "original_width", "original_height", "width", "height"):
        ledger[col] = ledger[col].astype("Int64")
    ledger["exif_transposed"] = ledger["exif_transposed"].astype("boolean")
    write_ledger(out_dir, ledger, cfg.number_sample_per_shard)
    counts = D.summarize_ledger(ledger)
    recovered = int(np.isin(ledger.loc[ledger["status"] == "success", "row_id"], retry_ids).sum())
    counts.update(parts=len(list(images.glob("part-*.parquet"))),
                  incremental={"reused_parts": len(parent_parts), "refetched": int(len(retry_ids)),
                               "recovered": recovered, "appended": n_append,
                               "passes": new_counts.get("passes", [])})
    return counts

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

import itertools
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow.dataset as pds

from imagegen.stages import download as D
from imagegen.stages.ledger import LedgerWriter, iter_ledger, read_ledger


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


_url_hashes = D.url_hashes  # 64-bit hashes of URLs; a hit is confirmed on the URL itself


def _parent_urls(parent_dir: Path, urls: list[str]) -> dict[str, int]:
    """The first parent row of each of ``urls`` (read in batches, only those URLs kept)."""
    want = set(urls)
    found: dict[str, int] = {}
    for batch in iter_ledger(parent_dir, ["row_id", "url"]):
        for rid, url in zip(batch.column("row_id").to_pylist(), batch.column("url").to_pylist()):
            if url in want and url not in found:
                found[url] = int(rid)
    return found


def run_incremental_download(parent_dir: Path, refetch_urls: pd.DataFrame,
                             append: pd.DataFrame | str | Path | None,
                             cfg: D.DownloadConfig, out_dir: Path, runner: str | None = None) -> dict[str, Any]:
    """``refetch_urls``: the current (row_id, url, caption) of the parent's rows (only the transiently
    failed ones are used); ``append``: a URL list whose rows are added: its path (checked first, then
    read in batches) or a table from :func:`read_url_list`.

    The parent's ledger is streamed: the driver keeps its failed rows, its row ids' maximum and (with
    ``append``) a 64-bit hash per URL; the appended list goes to the download a batch at a time; the
    child's ledger is written part by part."""
    append_batches: Any = None
    if isinstance(append, (str, Path)):  # refused before any work (duplicates, bad columns...)
        _, append_batches = D.iter_checked_url_list(append, cfg.url_col, cfg.caption_col, cfg.on_duplicate_urls)
    elif append is not None and len(append):
        append_batches = iter([append])
    failed = read_ledger(parent_dir, ["row_id", "status", "reason"], filter=pds.field("status") == "failed")
    transient = failed["reason"].map(lambda r: isinstance(r, str) and D.is_transient(r))
    retry_ids = failed.loc[transient, "row_id"].astype("int64")
    del failed
    cur = refetch_urls.set_index("row_id")
    missing = sorted(set(retry_ids) - set(cur.index))
    if missing:
        raise D.InputError(f"parent download {parent_dir}: rows {missing[:5]} to retry are not in the current "
                           "URL list")
    pending = pd.DataFrame({"row_id": retry_ids.to_numpy(), "url": cur.loc[retry_ids, "url"].to_numpy(),
                            "caption": cur.loc[retry_ids, "caption"].to_numpy()})
    pending["skip_reason"] = None
    with_record = "record_url" in cur.columns
    if with_record:  # the world's table: the ledger keeps the port-free URL
        pending["record_url"] = cur.loc[retry_ids, "record_url"].to_numpy()
    del cur
    n_append = 0
    first_add: pd.DataFrame | None = None
    if append_batches is not None:
        max_id, hashes = -1, []
        for batch in iter_ledger(parent_dir, ["row_id", "url"]):
            ids = batch.column("row_id").to_numpy()
            if len(ids):
                max_id = max(max_id, int(ids.max()))
            hashes.append(_url_hashes(batch.column("url").to_pandas()))
        known = np.unique(np.concatenate(hashes)) if hashes else np.zeros(0, dtype=np.uint64)
        del hashes

        def added() -> Iterator[pd.DataFrame]:
            """The appended rows, a batch at a time: ids after the parent's, the parent's URLs skipped."""
            nonlocal n_append
            for add in append_batches:
                if not len(add):
                    continue
                add = add.copy()
                add["row_id"] = add["row_id"].astype("int64") + max_id + 1
                maybe = np.isin(_url_hashes(add["url"]), known) & add["skip_reason"].isna().to_numpy()
                first = _parent_urls(parent_dir, add.loc[maybe, "url"].tolist()) if maybe.any() else {}
                seen = add["url"].isin(first.keys()) & add["skip_reason"].isna()
                if seen.any():
                    if cfg.on_duplicate_urls == "error":
                        ex = ", ".join(f"{u} (parent row {first[u]})" for u in add.loc[seen, "url"][:3])
                        raise D.InputError(f"the appended list repeats {int(seen.sum())} URL(s) of the parent: "
                                           f"{ex}; pass on_duplicate_urls='skip' to ledger them as skipped")
                    add.loc[seen, "skip_reason"] = [f"duplicate_url_of_row_{first[u]}" for u in add.loc[seen, "url"]]
                if with_record:
                    add["record_url"] = add["url"]
                n_append += len(add)
                yield add[list(pending.columns)]

        more = added()
        first_add = next(more, None)  # the first batch now: a repeat of the parent's URLs is refused before work
    batches: Any = [pending] if len(pending) else []
    if first_add is not None:
        batches = itertools.chain(batches, [first_add], more)
    has_rows = len(pending) > 0 or first_add is not None

    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    parent_parts = sorted((parent_dir / "images").glob("part-*.parquet"))
    for i, p in enumerate(parent_parts):
        _link(p, images / f"part-{i:05d}.parquet")
    new_counts: dict[str, Any] = {}
    work = out_dir / "_new"
    if has_rows:
        work.mkdir()
        new_counts = D.run_download(batches, cfg, work, runner=runner)
        import pyarrow.parquet as pq

        new_parts = [p for p in sorted((work / "images").glob("part-*.parquet")) if pq.ParquetFile(p).metadata.num_rows]
        for j, p in enumerate(new_parts):
            os.replace(p, images / f"part-{len(parent_parts) + j:05d}.parquet")
    writer = LedgerWriter(out_dir, cfg.number_sample_per_shard, D.LEDGER_SCHEMA)
    summary = D.LedgerSummary()
    recovered = 0
    retry_set = np.sort(retry_ids.to_numpy())
    for part in _merged_ledger(parent_dir, work if has_rows else None):
        summary.add(part)
        writer.add(part)
        ok = part.loc[part["status"] == "success", "row_id"].to_numpy(dtype=np.int64)
        recovered += int(np.isin(ok, retry_set).sum())
    writer.close()
    shutil.rmtree(work, ignore_errors=True)
    counts = summary.result()
    counts.update(parts=len(list(images.glob("part-*.parquet"))),
                  incremental={"reused_parts": len(parent_parts), "refetched": int(len(retry_ids)),
                               "recovered": recovered, "appended": n_append,
                               "passes": new_counts.get("passes", [])})
    return counts


def _merged_ledger(parent_dir: Path, new_dir: Path | None) -> Iterator[pd.DataFrame]:
    """The child's ledger in row-id order, a batch at a time: the parent's rows, each replaced by the new
    download's row of the same id (``attempts`` added up), then the new rows after the parent's.  Both
    ledgers are in row-id order (row ids grow in a URL list; appended ids follow the parent's)."""
    new_batches = iter_ledger(new_dir) if new_dir is not None else iter(())
    new_buf = D.ledger_frame(pd.DataFrame(columns=D.LEDGER_COLUMNS))
    new_done = new_dir is None

    def new_upto(limit: int | None) -> pd.DataFrame:
        """The new rows with row_id <= ``limit`` (all of them for None), taken off the buffer."""
        nonlocal new_buf, new_done
        while not new_done and (limit is None or not len(new_buf) or int(new_buf["row_id"].iloc[-1]) <= limit):
            b = next(new_batches, None)
            if b is None:
                new_done = True
                break
            new_buf = pd.concat([new_buf, D.ledger_frame(b.to_pandas())], ignore_index=True)
        take = len(new_buf) if limit is None else int(np.searchsorted(new_buf["row_id"].to_numpy(dtype=np.int64),
                                                                      limit, side="right"))
        out, new_buf = new_buf.iloc[:take], new_buf.iloc[take:].reset_index(drop=True)
        return out

    last = -1
    for batch in iter_ledger(parent_dir):
        old = D.ledger_frame(batch.to_pandas())
        if not len(old):
            continue
        ids = old["row_id"].to_numpy(dtype=np.int64)
        if ids[0] <= last or (np.diff(ids) <= 0).any():
            raise ValueError(f"the parent ledger in {parent_dir} is not in row-id order near row {int(ids[0])}")
        last = int(ids[-1])
        new = new_upto(last)
        if len(new):
            again = old.set_index("row_id")["attempts"].reindex(new["row_id"].to_numpy())
            new = new.copy()
            hit = again.notna().to_numpy()
            new.loc[hit, "attempts"] = new.loc[hit, "attempts"].to_numpy() + again.to_numpy()[hit]
            old = pd.concat([old[~np.isin(ids, new["row_id"].to_numpy())], new]).sort_values(
                "row_id", kind="stable").reset_index(drop=True)
        yield D.ledger_frame(old)
    rest = new_upto(None)
    if len(rest):
        yield D.ledger_frame(rest)

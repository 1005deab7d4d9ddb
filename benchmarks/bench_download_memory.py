"""Traced heap of ``run_download``'s driver at two list sizes: the streamed input keeps compact columns only.

A loopback server (its own process, so its allocations are not traced) answers ``/img/N.png`` with a small
PNG; the URL list is a parquet file of N rows that ``run_download`` reads itself in batches (a path).  The
driver's peak traced heap (tracemalloc: Python and NumPy/pandas buffers; img2dataset's and the decode
pool's processes are other processes) is printed per size, with the slope in bytes per row between the two
sizes against the compact columns the driver keeps by design (row ids, attempts, a status code, where a row
last failed, its image part, the row-id index, the ledger summary's row ids).  Memory, not speed: it needs
no quiet machine.

    .venv/bin/python benchmarks/bench_download_memory.py --sizes 20000 80000
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# per row kept by the driver: row id (8), attempts (8), failed (1), pass (1) and part (4) of the last failure,
# image part (8), the row_id -> position index (pandas' hash table: 26 measured at 20,000-40,000 rows), and
# the ledger summary's row ids (8: its check that every row is in the ledger once, filled part by part)
COMPACT_BYTES_PER_ROW = 8 + 8 + 1 + 1 + 4 + 8 + 26 + 8


def _serve(port_out, stop) -> None:
    import http.server
    import threading

    from PIL import Image

    pngs = []
    for i in range(64):
        buf = io.BytesIO()
        Image.new("RGB", (24, 16), (i * 4 % 256, 7 * i % 256, 90)).save(buf, "PNG")
        pngs.append(buf.getvalue())

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = pngs[int(self.path.rsplit("/", 1)[-1].split(".")[0]) % len(pngs)]
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    port_out.put(srv.server_address[1])
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    stop.wait()
    srv.shutdown()


def measure(n: int, base: str, tmp: Path, processes: int) -> dict:
    from imagegen.stages.download import DownloadConfig, run_download

    lst = tmp / f"list-{n}.parquet"
    pd.DataFrame({"url": [f"{base}/img/{i}.png" for i in range(n)],
                  "caption": [f"a caption of row {i}" for i in range(n)]}).to_parquet(lst, index=False)
    out = tmp / f"dl-{n}"
    out.mkdir()
    cfg = DownloadConfig(processes_count=processes, thread_count=32, timeout=30, retry_passes=0, image_size=16,
                         number_sample_per_shard=5000, allow_private_addresses=True)
    tracemalloc.start()
    t0 = time.perf_counter()
    counts = run_download(lst, cfg, out, progress=False)
    wall = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # every row is in the ledger (LedgerSummary checks it); on a loaded machine a few may time out
    assert counts["input_rows"] == n and counts["success"] >= 0.99 * n, counts
    shutil.rmtree(out, ignore_errors=True)
    return {"n": n, "success": counts["success"], "peak_traced_mb": round(peak / 2**20, 2), "wall_s": round(wall, 1),
            "maxrss_mb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "loadavg": open("/proc/loadavg").read().split()[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[20_000, 80_000])
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    ctx = multiprocessing.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(q, stop), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{q.get(timeout=60)}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-dl-mem-"))
    try:
        # a small download first, untraced for the figures: the first one imports img2dataset and its
        # dependencies (about 100 MB of traced heap) and fills one-time caches
        measure(200, base, tmp, args.processes)
        rows = [measure(n, base, tmp, args.processes) for n in args.sizes]
    finally:
        stop.set()
        server.join(10)
        shutil.rmtree(tmp, ignore_errors=True)
    (a, b) = rows
    slope = (b["peak_traced_mb"] - a["peak_traced_mb"]) * 2**20 / (b["n"] - a["n"])
    for r in rows:
        print(f"n={r['n']:>8}  peak traced heap {r['peak_traced_mb']:8.2f} MB  wall {r['wall_s']:7.1f} s  "
              f"load {r['loadavg']}")
    print(f"slope {slope:.1f} bytes/row between the sizes (compact columns by design: ~{COMPACT_BYTES_PER_ROW} "
          f"bytes/row)")
    print(json.dumps({"bench": "download_memory", "rows": rows, "slope_bytes_per_row": round(slope, 1),
                      "compact_bytes_per_row": COMPACT_BYTES_PER_ROW}))


if __name__ == "__main__":
    main()

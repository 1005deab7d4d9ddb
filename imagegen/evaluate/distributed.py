"""Generation for evaluation spread over processes with torchrun: each rank generates a disjoint,
contiguous range of the evaluation set's batches (so of image indices and the seeds derived from
them), one gather checks that every batch was made, and rank 0 then computes the metrics on the
complete set.  Images are byte-identical to a one-process evaluation (each image's noise is
seeded by (seed, index), and the batches are the same), so the evaluation id, which does not hash
the process count, names the same result.

    torchrun --nproc_per_node 8 -m imagegen.evaluate.distributed --request req.json --data-root ROOT

``--request`` is an :class:`~imagegen.evaluate.run.EvalRequest` as JSON (a file or inline).  The
backend is NCCL with one GPU per rank (``LOCAL_RANK``) when CUDA is present, else gloo on CPU.
Rank 0 prints the evaluation summary as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _request(text: str) -> dict[str, Any]:
    p = Path(text)
    return json.loads(p.read_text() if p.is_file() else text)


def run(request: dict[str, Any], root: Path, backend: str = "auto") -> dict[str, Any] | None:
    import torch
    import torch.distributed as dist

    from imagegen.evaluate.run import (EvalRequest, Source, _check_before_work, _device, eval_identity, evals_dir,
                                       evaluate, generate_set)
    from imagegen.hashing import stable_hash

    req = EvalRequest(**request)
    if req.n_seeds > 1:
        raise ValueError("distributed generation runs one seed per launch; launch once per seed (n_seeds=1)")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and req.device != "cpu" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        src = Source(req, root)
        _check_before_work(req, src)
        out = evals_dir(root) / stable_hash(eval_identity(req, src))
        if src.run is not None:
            generate_set(src, req, out / "samples", _device(req))
        dist.barrier()
        summary = evaluate(req, root) if dist.get_rank() == 0 else None
        dist.barrier()
        return summary  # type: ignore[return-value]
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imagegen.evaluate.distributed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--request", required=True, help="EvalRequest JSON (a file or the JSON itself)")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    args = ap.parse_args(argv)
    summary = run(_request(args.request), Path(args.data_root), args.backend)
    if summary is not None:
        print(json.dumps(summary, default=str, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a model-backed step pins so that its output depends only on what its id hashes.

CPU float reductions in torch (oneDNN convolutions, BLAS GEMMs) split work by thread count, and
the split changes the rounding: measured here, the reference CLIP trained 20 steps on 1 and on
2 threads gave different weights, and its image embeddings differed in 780 of 25,600 floats
(by at most 4.5e-8), enough to flip a CLIP-score threshold.  So a model-backed step never takes
its thread count from the machine (cores, load average, ``OMP_NUM_THREADS``): it runs under
:func:`torch_threads` with a count from its config, and that count is part of its id
(``docs/DESIGN.md``, "What goes into an id").
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

# Default thread count of model-backed CPU steps.  One thread is the only count that is not
# slower on a loaded machine (an oversubscribed OpenMP pool spin-waits: 2 threads ran a CLIP
# training step 7x slower than 1 on 2 busy cores); steps that want more say so in their config.
DEFAULT_THREADS = 1


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run the block on exactly ``n`` intra-op torch threads, then restore the previous count."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    import torch  # here, not at the top: config models read DEFAULT_THREADS without importing torch

    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(prev)

"""The training presets: named partial ``TrainRequest`` dicts (``imagegen train --preset NAME``).

Plain data with no imports, so the command line validates ``--preset`` without importing torch,
the trainer or the model registry; ``imagegen.train.runs`` re-exports them.
"""

from __future__ import annotations

from typing import Any

WORLD_TEXT_ENCODER = "world"  # alias: the reference CLIP of the (embedded-world) dataset trained on

# Presets: partial TrainRequest dicts; every family accepts the model fields used here.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # minutes on 2 CPU cores: a tiny U-Net conditioned on the shape named first in the caption
    "smoke": {
        "dataset": "world-smoke",
        "train": {
            "family": "flow", "steps": 300, "batch_size": 32, "lr": 1e-3, "warmup_steps": 30,
            "schedule": "cosine", "ema_decay": 0.99, "ckpt_every": 100, "log_every": 5, "epoch_batches": 50,
            "shuffle_buffer": 256, "sample_count": 10, "sample_steps": 20, "sample_guidance": 2.0,
            "label_keywords": ["circle", "square", "triangle", "star", "cross"],
            "model": {"net": "unet", "net_size": "tiny", "image_size": 32, "conditioning": "class",
                      # one more level so self-attention runs at 8x8 (the preset's 16x16 costs 3x per step)
                      "net_overrides": {"channel_mult": [1, 2, 2], "attention_resolutions": [8]}},
        },
    },
    # tens of minutes on CPU: text-conditioned on the world's captions through its reference CLIP
    "demo": {
        "dataset": "world-demo",
        "train": {
            "family": "flow", "steps": 3000, "batch_size": 64, "lr": 5e-4, "warmup_steps": 200,
            "schedule": "cosine", "ema_decay": 0.999, "ckpt_every": 500, "log_every": 10, "epoch_batches": 200,
            "sample_every": 1000, "sample_count": 16, "sample_steps": 30, "sample_guidance": 3.0,
            "model": {"net": "unet", "net_size": "tiny", "image_size": 32, "conditioning": "text",
                      "text_encoder": WORLD_TEXT_ENCODER,
                      "net_overrides": {"channel_mult": [1, 2, 2], "attention_resolutions": [8]}},
        },
    },
    # one or more GPUs: DiT-B/2 flow matching in bf16, text-conditioned (SD3/minRF-style recipe)
    "gpu": {
        "dataset": "world-demo",
        "train": {
            "family": "flow", "steps": 100_000, "batch_size": 256, "micro_batches": 8, "lr": 1e-4,
            "warmup_steps": 1000, "schedule": "constant", "ema_decay": 0.9999, "precision": "bf16",
            "device": "cuda", "ckpt_every": 5000, "log_every": 50, "epoch_batches": 1000, "num_workers": 4,
            "sample_every": 5000, "sample_count": 32, "sample_steps": 50, "sample_guidance": 4.0,
            "model": {"net": "dit", "net_size": "B", "image_size": 64, "conditioning": "text",
                      "text_encoder": WORLD_TEXT_ENCODER},
        },
    },
}

"""Small builders shared by several test files (imported as ``from _helpers import ...``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def tiny_random_clip(folder: Path, context_length: int = 32, seed: int = 0) -> str:
    """A tiny randomly initialised open_clip CLIP saved as a local-dir (config + safetensors).

    It goes through exactly the loading path of real weights; nothing is downloaded."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from imagegen.clip import CONFIG_NAME, SAFE_WEIGHTS_NAME
    from imagegen.world.reference_clip import ReferenceClipConfig, open_clip_config
    from imagegen.world.scene import WorldConfig

    folder.mkdir(parents=True, exist_ok=True)
    small = ReferenceClipConfig(embed_dim=16, patch_size=16, vision_width=32, vision_layers=1, text_width=32,
                                text_layers=1, head_width=16, context_length=context_length, steps=2,
                                warmup_steps=1)
    conf = open_clip_config(WorldConfig(), small)
    (folder / CONFIG_NAME).write_text(json.dumps(conf))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**conf["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / SAFE_WEIGHTS_NAME))
    return f"local-dir:{folder}"


def gradient_png(i: int, size: int = 16) -> bytes:
    """Smooth two-colour gradient (horizontal for odd i, vertical for even): learnable in a few steps."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None] if i % 2 else np.linspace(0, 1, size)[:, None, None]
    arr = (a * (1 - t) + b * t) * np.ones((size, size, 1))
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def gradient_shards(out, n: int = 40, per_shard: int = 10) -> list:
    """n gradient PNGs (captions "gradient <i>") written as real shards of per_shard samples."""
    from pathlib import Path

    from imagegen.stages.shard import ShardConfig, write_shards

    write_shards([{"key": f"{i:04d}", "image": gradient_png(i), "ext": "png", "caption": f"gradient {i}"}
                  for i in range(n)], Path(out), ShardConfig(target_shard_size=per_shard))
    return sorted(Path(out).glob("*.tar"))


def register_world_dataset(root, name: str = "world-tiny", n: int = 48, per_shard: int = 12,
                           stage_ids: dict | None = None) -> str:
    """A registered dataset of n embedded-world scenes (JPEG, real shards, manifest, card) in
    ``<root>/datasets/<id>``, built without the curate stages; returns its id."""
    import io
    import time
    from pathlib import Path

    import pandas as pd

    from imagegen.artifacts import write_json_atomic
    from imagegen.hashing import stable_hash
    from imagegen.registry import register_name
    from imagegen.stages.shard import ShardConfig, write_shards
    from imagegen.world.scene import WorldConfig, render_scene

    world = WorldConfig()
    samples, rows = [], []
    for i in range(n):
        scene, image = render_scene(world, i)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)
        samples.append({"key": f"{i:05d}", "image": buf.getvalue(), "ext": "jpg", "caption": scene.caption,
                        "meta": {"kind": scene.kind}})
    dataset_id = stable_hash({"test-world": name, "n": n, "per_shard": per_shard})
    folder = Path(root) / "datasets" / dataset_id
    write_shards(samples, folder / "shards", ShardConfig(target_shard_size=per_shard))
    for i, s in enumerate(samples):
        rows.append({"key": s["key"], "shard": f"{i // per_shard:05d}.tar", "caption": s["caption"],
                     "kind": s["meta"]["kind"]})
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet", index=False)
    write_json_atomic(folder / "card.json", {"id": dataset_id, "name": name, "created_unix": time.time(),
                                             "stage_ids": stage_ids or {}, "counts": {"shard": {"samples": n}}})
    register_name(Path(root), name, dataset_id)
    return dataset_id


TINY_UNET = {"net": "unet", "net_size": "tiny", "image_size": 16,
             "net_overrides": {"model_channels": 16, "norm_groups": 8, "head_channels": 16}}


def eval_world_root(root, n: int = 48, per_shard: int = 16) -> str:
    """A data root for evaluation tests: a tiny random reference CLIP (``models/reference_clip/testclip``)
    and a registered world dataset ``world-tiny`` of n scenes that names it; returns the dataset id."""
    from pathlib import Path

    clip_dir = Path(root) / "models" / "reference_clip" / "testclip"
    tiny_random_clip(clip_dir)
    (clip_dir / "card.json").write_text("{}")
    return register_world_dataset(root, n=n, per_shard=per_shard, stage_ids={"reference_clip": "testclip"})


def tiny_text_run(root, family: str = "flow", steps: int = 4, seed: int = 0) -> str:
    """A finished text-conditioned run (tiny U-Net, 16 px, the world CLIP as text encoder) of ``steps``
    steps on ``world-tiny`` (see eval_world_root); returns its id."""
    from imagegen.train.runs import train_run

    req = {"dataset": "world-tiny", "train": {
        "family": family, "model": {**TINY_UNET, "conditioning": "text", "text_encoder": "world"}, "steps": steps,
        "batch_size": 8, "lr": 2e-3, "warmup_steps": 0, "ema_decay": 0.9, "ckpt_every": steps,
        "epoch_batches": 2, "shuffle_buffer": 16, "sample_count": 2, "sample_steps": 2, "seed": seed}}
    return train_run(req, root)["run_id"]


def world_scene_shards(out, n: int = 96, per_shard: int = 24, image_format: str = "PNG") -> list:
    """n embedded-world scenes (captions = their ground-truth captions) as real shards in ``out``."""
    import io
    from pathlib import Path

    from imagegen.stages.shard import ShardConfig, write_shards
    from imagegen.world.scene import WorldConfig, render_scene

    ext = {"PNG": "png", "JPEG": "jpg"}[image_format]
    samples = []
    for i in range(n):
        scene, image = render_scene(WorldConfig(), i)
        buf = io.BytesIO()
        image.save(buf, format=image_format, **({"quality": 95} if image_format == "JPEG" else {}))
        samples.append({"key": f"{i:05d}", "image": buf.getvalue(), "ext": ext, "caption": scene.caption})
    write_shards(samples, Path(out), ShardConfig(target_shard_size=per_shard))
    return sorted(Path(out).glob("*.tar"))


def flow_artifacts(flow_run_id=None, key: str | None = None) -> list:
    """Artifacts on the test's Prefect server, filtered by flow run and/or key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]) if flow_run_id else None,
                         key=ArtifactFilterKey(any_=[key]) if key else None)
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=flt)


def artifact_data(artifact):
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def build_tiny_blip(path: str | Path, *, seed: int = 0, image_size: int = 64) -> Path:
    """Write a tiny randomly initialised BLIP captioner (model + processor) to ``path``.

    It exercises the real loading and generation code path in seconds and without a network;
    its captions are gibberish drawn from a small word list.  Saved as safetensors.
    """
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    words = ("a an the photo of picture image and with on left right above below two three four "
             "red orange yellow green blue purple pink brown black white circle square triangle star "
             "cross circles squares triangles stars crosses").split()
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(special + words) + "\n")
    vocab = {tok: i for i, tok in enumerate(vocab_file.read_text().split("\n")) if tok}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)
    ids = {t: vocab[t] for t in special}
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, projection_dim=32,
                         bos_token_id=ids["[DEC]"], eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"],
                         pad_token_id=ids["[PAD]"], initializer_range=0.3),
        # a visible init range so that different images give different captions
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=16, projection_dim=32, initializer_range=0.5),
        projection_dim=32, image_text_hidden_size=32, initializer_range=0.3)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(cfg).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def random_family(name: str, net: dict, seed: int = 0, **model):
    """A family whose weights are small random numbers (a fresh net outputs exactly 0), in eval mode."""
    import torch

    from models.registry import build_family

    torch.manual_seed(seed)
    fam = build_family(name, {**net, **model})
    with torch.no_grad():
        for p in fam.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return fam.eval()


def stage_task_runs(client: Any, flow_run_id: Any) -> list[Any]:
    """The task runs of a flow run and of its child flow runs (curate runs its stages in a
    ``curate-stages`` subflow on the runner's task runner), without the tasks that only stand for a
    child flow run in its parent."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter, \
        TaskRunFilterFlowRunId

    children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    placeholders = {c.parent_task_run_id for c in children}
    tasks = client.read_task_runs(task_run_filter=TaskRunFilter(
        flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id, *[c.id for c in children]])))
    return [t for t in tasks if t.id not in placeholders]

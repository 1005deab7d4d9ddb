"""Latent datasets: a registered image dataset encoded once by a frozen autoencoder run.

``encode_dataset(root, dataset, autoencoder_run)`` reads every sample of the dataset (in shard
order, decoded and resized exactly as the training loader does, at the autoencoder's image
size), encodes it to the posterior mean, measures the latent scale factor ``1 / std`` over the
whole dataset (so the stored latents have unit variance; a tokenizer's token grids are stored as
exact float32 ids [1, h, w], unscaled: Rombach et al. 2022 measure it on a
batch and hard-code 0.18215 for SD; here it is measured per (dataset, autoencoder)), and writes
a registered dataset of ``.npy`` latents (float32, never pickled) with the original captions,
.json fields and manifest rows.  Its id hashes (dataset id, autoencoder checkpoint sha256, this
code), so every latent model reuses it; its card records the scale, the latent shape and the
reconstruction error measured while encoding.  Any diffusion/flow family then trains on it with
``model.data = "latents"`` (the run layer fills channels, size, scale and the decoder in).

A pretrained diffusers ``AutoencoderKL`` works too: ``autoencoder_run="diffusers:PATH_OR_REPO_ID"``
(a pipeline's ``vae`` or an AutoencoderKL folder, safetensors only; models/hf_diffusers.py) or the
loaded model itself.  Its latents are stored as ``(mu - shift_factor) * scaling_factor`` with the
model's own factors (SD's 0.18215; SD3/FLUX's scale and shift), not a measured scale, so the
published decoder convention holds; the card records the measured std too.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from imagegen.artifacts import is_complete, stage_output
from imagegen.hashing import code_version, stable_hash
from imagegen.paths import datasets_dir
from imagegen.registry import get_dataset, register_name


class LatentError(ValueError):
    pass


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def _metas(shards: list[Path]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out[m.name[:-5]] = json.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
    return out


def _encode_all(ds: Any, image_size: int, batch_size: int, device: str,
                encode: Any) -> tuple[list[str], list[str], np.ndarray, float]:
    """(keys, captions, latents, reconstruction MSE) of every readable sample of ``ds``, in shard
    order, through ``encode(x) -> (latent, reconstruction)`` in batches."""
    from imagegen.loader import make_dataset

    keys: list[str] = []
    captions: list[str] = []
    latents: list[np.ndarray] = []
    sq_err = n_px = 0.0
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal sq_err, n_px
        x = torch.stack([b["image"] for b in batch]).to(device)
        with torch.no_grad():
            mu, x_hat = encode(x)
        sq_err += float(((x_hat.clamp(-1, 1) - x) ** 2).sum())
        n_px += x.numel()
        latents.extend(mu.float().cpu().numpy())
        keys.extend(b["key"] for b in batch)
        captions.extend(b["caption"] for b in batch)
        batch.clear()

    for sample in make_dataset(ds.shards, image_size=image_size, shuffle_buffer=0):
        batch.append(sample)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not latents:
        raise LatentError(f"dataset {ds.id} yielded no readable samples")
    return keys, captions, np.stack(latents), sq_err / n_px


def _write_latents(final: Path, ds: Any, keys: list[str], captions: list[str], stack: np.ndarray, scale: float,
                   card_fields: dict[str, Any]) -> None:
    """The latent dataset folder: npy shards of ``stack * scale``, the parent's manifest rows, the card."""
    from imagegen.stages.shard import ShardConfig, write_shards

    metas = _metas(ds.shards)
    with stage_output(final) as (tmp, card):
        write_shards([{"key": k, "image": _npy(z * scale), "ext": "npy", "caption": c, "meta": metas.get(k, {})}
                      for k, z, c in zip(keys, stack, captions)], tmp / "shards", ShardConfig(target_shard_size=1000))
        manifest = pd.read_parquet(ds.path / "manifest.parquet")
        manifest = manifest[manifest["key"].isin(set(keys))]
        manifest.to_parquet(tmp / "manifest.parquet", index=False)
        card.update(card_fields)


def encode_dataset(root: Path | str, dataset: str, autoencoder_run: Any, *, batch_size: int = 64,
                   device: str = "cpu", name: str | None = None, image_size: int | None = None) -> str:
    """Encode ``dataset`` with the autoencoder of a finished run into a registered latent dataset; its id."""
    from models.checkpoint import read_state
    from imagegen.train.runs import get_run
    from models.checkpoint import load_family

    root = Path(root)
    ds = get_dataset(root, dataset)
    if ds.card.get("kind") == "latents":
        raise LatentError(f"dataset {ds.id} already holds latents")
    if not isinstance(autoencoder_run, str) or autoencoder_run.startswith("diffusers:"):
        return _encode_with_diffusers_vae(root, ds, autoencoder_run, batch_size=batch_size, device=device, name=name,
                                          image_size=image_size)
    run = get_run(root, autoencoder_run)
    if run.card.get("status") != "finished" or run.checkpoint is None:
        raise LatentError(f"autoencoder run {run.id} is {run.card.get('status')!r}, not finished")
    meta = read_state(run.checkpoint)
    ae = load_family(run.checkpoint, device=device)
    tokens = hasattr(ae, "encode_tokens") and hasattr(ae, "decode_tokens")
    if not tokens and not (hasattr(ae, "encode") and hasattr(ae, "decode")):
        raise LatentError(f"run {run.id} is family {ae.name!r}, which has no encode/decode (train a vae, "
                          "kl_autoencoder or vq run)")
    ident = {"dataset": ds.id, "autoencoder": meta["tensors_sha256"],
             "code": code_version(__import__("imagegen.loader", fromlist=["x"]), __import__(__name__, fromlist=["x"]))}
    dataset_id = stable_hash(ident)
    label = name or f"latents-{ds.name or ds.id[:8]}-{run.id[:8]}"
    final = _reuse_or_target(root, dataset_id, label)
    if final is None:
        return dataset_id
    t0 = time.time()

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens:  # a tokenizer: integer token grids, stored as exact float32 [1, h, w] (or [K, h, w])
            t = ae.encode_tokens(x)
            return (t[:, None] if t.ndim == 3 else t).float(), ae.decode_tokens(t)
        mu, _ = ae.encode(x)
        return mu, ae.decode(mu)

    keys, captions, stack, recon_mse = _encode_all(ds, ae.cfg.image_size, batch_size, device, encode)
    std = float(stack.std())
    scale = 1.0 if tokens else (1.0 / std if std > 0 else 1.0)  # token ids are never scaled
    _write_latents(final, ds, keys, captions, stack, scale, dict(
        id=dataset_id, name=label, kind="latents", inputs=ident, stage_ids={},
        source={"kind": "latents", "parent_dataset": ds.id, "autoencoder_run": run.id},
        latent_shape=list(stack.shape[1:]), latent_scale=scale, latent_std_before_scaling=std,
        recon_mse=recon_mse, counts={"shard": {"samples": len(keys)}},
        tokens=bool(tokens), vocab_size=int(ae.vocab_size) if tokens else None,
        image_size=ae.cfg.image_size, seconds=round(time.time() - t0, 3)))
    register_name(root, label, dataset_id)
    return dataset_id


def _reuse_or_target(root: Path, dataset_id: str, label: str) -> Path | None:
    """The folder a latent dataset is written to, or None when it is complete already (then its name
    is registered again: an encode with a new name reuses the same bytes)."""
    final = datasets_dir(root) / dataset_id
    if is_complete(final):
        register_name(root, label, dataset_id)
        return None
    return final


def _encode_with_diffusers_vae(root: Path, ds: Any, source: Any, *, batch_size: int, device: str, name: str | None,
                               image_size: int | None) -> str:
    """encode_dataset with a diffusers AutoencoderKL (its own scaling/shift factors)."""
    from models.hf_diffusers import DiffusersVAE

    ae = DiffusersVAE(source, device=device, image_size=image_size)
    ident = {"dataset": ds.id, "autoencoder": ae.identity, "image_size": ae.cfg.image_size,
             "code": code_version(__import__("imagegen.loader", fromlist=["x"]), __import__(__name__, fromlist=["x"]),
                                  __import__("models.hf_diffusers", fromlist=["x"]))}
    dataset_id = stable_hash(ident)
    spec = source if isinstance(source, str) else None
    label = name or f"latents-{ds.name or ds.id[:8]}-vae-{dataset_id[:8]}"
    final = _reuse_or_target(root, dataset_id, label)
    if final is None:
        return dataset_id
    t0 = time.time()

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, _ = ae.encode(x)
        return mu, ae.decode(mu).to(x.device)

    keys, captions, stack, recon_mse = _encode_all(ds, ae.cfg.image_size, batch_size, device, encode)
    scale = ae.scaling_factor
    _write_latents(final, ds, keys, captions, stack, scale, dict(
        id=dataset_id, name=label, kind="latents", inputs=ident, stage_ids={},
        source={"kind": "latents", "parent_dataset": ds.id, "autoencoder_run": None,
                "autoencoder": spec, "autoencoder_identity": ae.identity},
        latent_shape=list(stack.shape[1:]), latent_scale=scale, latent_shift=ae.shift_factor,
        latent_std_before_scaling=float(stack.std()), latent_std=float((stack * scale).std()),
        recon_mse=recon_mse, counts={"shard": {"samples": len(keys)}}, tokens=False,
        vocab_size=None, image_size=ae.cfg.image_size, seconds=round(time.time() - t0, 3)))
    register_name(root, label, dataset_id)
    return dataset_id

"""Evaluate a training/distillation run (or a folder of images): FID/FD + KID, CLIPScore, GenEval.

``evaluate(request, root)``:

1. Source.  A run: its latest checkpoint (EMA weights), sampled with the request's sampler,
   steps, guidance and seed.  The evaluation set is generated to disk first
   (``<root>/evals/<id>/samples/00000.png ...`` + ``captions.jsonl``), image i from its own
   noise seeded by (seed, i), so any subset or batch size gives the same images.  Conditions come
   from the reference dataset: captions (text models), the class named in them (class models),
   none (unconditional).  A diffusers pipeline (``model="diffusers:PATH_OR_REPO_ID[@REVISION]"``,
   models/hf_diffusers.py) is generated from like a text run, with captions of the reference
   dataset, at ``resolution``, with ``negative``; its identity holds the files' sha256.  A folder: its images as they are (``captions.jsonl`` next to them, one
   ``{"file", "caption"}`` per line, enables CLIPScore; a GenEval layout enables GenEval).
2. FID / FD-<extractor> and KID against the reference dataset's images, decoded and resized to
   the evaluated images' size exactly as the training loader does; reference features are cached
   by (dataset id, size, extractor, mode, n).  ``extractor="auto"``: the dataset's reference CLIP
   for embedded-world datasets (reported as FD-CLIP-..., never FID), else clean-fid's Inception.
3. CLIPScore (both conventions) of each image against its caption.
4. GenEval: a prompt file (official format) or ``"world"`` (the world's prompts), images per
   prompt in the official layout, scored by the world detector or a torchvision detector.

The eval folder id hashes the source (checkpoint tensors sha256, or the folder's files), the
settings and this code, so evaluating again reuses what is on disk.  Every metric is one row of
``metrics.parquet`` with its provenance (implementation, mode, extractor and its weights, library
versions, sample counts, seeds, sampler settings, reference-statistics hash).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from imagegen.artifacts import read_card, sweep_stale, write_json_atomic
from imagegen.determinism import torch_threads
from imagegen.evaluate import metrics as M
from imagegen.evaluate import request as request_mod
from imagegen.evaluate.request import EvalRequest, EvalSummary, RewardModel  # noqa: F401 (re-exported)
from imagegen.hashing import code_version, stable_hash
from imagegen.paths import models_dir
from imagegen.registry import DatasetRef, get_dataset

EVALS = "evals"


class EvalError(ValueError):
    """An evaluation that cannot run as asked (says what and where)."""


def evals_dir(root: Path) -> Path:
    return Path(root) / EVALS


def _device(req: EvalRequest) -> str:
    if req.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if req.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("device='cuda' but no CUDA device is available")
    return req.device


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for pkg in ("clean-fid", "open-clip-torch", "numpy", "scipy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------ source


class Source:
    """What is evaluated: a run's model or a folder; resolved and checked before any work."""

    def __init__(self, req: EvalRequest, root: Path) -> None:
        self.req, self.root = req, root
        self.family: Any = None
        self.latent_size: tuple[int, int] | None = None  # (h, w) a run samples at (height/width), None = square
        self.train_cfg: Any = None
        self.run: Any = None
        self.diffusers: str | None = None
        if req.model is not None:
            from models.hf_diffusers import DiffusersError, image_size, resolve_spec

            path, self.identity = resolve_spec(req.model)  # not a pipeline / pickled weights: refused here
            self.diffusers = req.model
            try:
                h, w = image_size(path, req.resolution, req.height, req.width)  # checked before any work
            except DiffusersError as exc:
                raise EvalError(str(exc)) from None
            self.size = max(h, w)  # the long side (a square's side)
            ds_name = req.reference
            if ds_name is None and req.reference_stats is None and set(req.metrics) - {"geneval"}:
                raise EvalError(f"evaluating {req.model} needs reference= (a dataset whose captions prompt it and whose "
                                "images are the FID/KID reference)")
        elif req.run is not None:
            from models.checkpoint import read_state
            from imagegen.train.runs import get_run
            from imagegen.train.trainer import TrainConfig

            self.run = get_run(root, req.run)
            if self.run.checkpoint is None:
                raise EvalError(f"run {self.run.id} has no checkpoint yet (status {self.run.card.get('status')!r})")
            meta = read_state(self.run.checkpoint)
            self.train_cfg = TrainConfig(**self.run.card["config"])
            self.identity = {"run": self.run.id, "step": int(meta["step"]), "tensors": meta["tensors_sha256"]}
            ds_name = req.reference or self.run.card.get("dataset_id")
            if req.height is not None or req.width is not None:  # an aspect-bucket size: checked before any work
                from imagegen.sample_edit import EditInputError, bucket_size, pixel_size

                model = meta.get("config", {}).get("model", self.train_cfg.model)
                try:
                    self.latent_size = bucket_size(req.width, req.height, self.run.id, self.train_cfg.family, model,
                                                   pixel_size(self.train_cfg.family, model))
                except EditInputError as exc:
                    raise EvalError(str(exc)) from None
        else:
            from imagegen.evaluate.images import list_images

            folder = Path(str(req.folder))
            if not folder.is_dir():
                raise EvalError(f"image folder {folder} does not exist")
            # a GenEval layout keeps its images in NNNNN/samples/; the others at the top level
            only_geneval = set(req.metrics) <= {"geneval"}
            self.files = [] if only_geneval else list_images(folder, recursive=False, same_size=True)
            listed = self.files or sorted(folder.rglob("*.png"))
            self.identity = {"folder": str(folder.resolve()),
                             "files": stable_hash([(str(f.relative_to(folder)), f.stat().st_size) for f in listed])}
            if req.reference is None and req.reference_stats is None and ({"fid", "kid"} & set(req.metrics)):
                raise EvalError("evaluating a folder for FID/KID needs reference= (a dataset name or id) or "
                                "reference_stats= (imported .npz statistics)")
            ds_name = req.reference
            self.size = Image.open(self.files[0]).size[0] if self.files else 0
        self.dataset: DatasetRef | None = get_dataset(root, ds_name) if ds_name else None
        if self.dataset is not None and self.dataset.card.get("kind") == "latents":
            from imagegen.train.runs import parent_dataset

            # a latent model's samples are decoded to images: compare them with the images encoded
            self.dataset = get_dataset(root, str(parent_dataset(self.dataset)))

    @property
    def is_world(self) -> bool:
        from imagegen.train.runs import parent_dataset

        return bool(self.dataset is not None and (self.dataset.card.get("stage_ids", {}).get("reference_clip")
                                                  or parent_dataset(self.dataset)))

    def world_clip_spec(self) -> str:
        ds = self.dataset
        assert ds is not None
        from imagegen.train.runs import parent_dataset

        clip_id = ds.card.get("stage_ids", {}).get("reference_clip")
        if not clip_id and parent_dataset(ds):
            clip_id = get_dataset(self.root, parent_dataset(ds)).card.get("stage_ids", {}).get("reference_clip")
        if not clip_id:
            raise EvalError(f"'world' names the reference CLIP of an embedded-world dataset; {ds.id} has none")
        path = models_dir(self.root) / "reference_clip" / clip_id
        if not (path / "card.json").is_file():
            raise EvalError(f"the reference CLIP {clip_id} is missing from {path}; rerun `imagegen curate`")
        return f"local-dir:{path.resolve()}"

    @property
    def generates(self) -> bool:
        """A model to generate from (a run or a diffusers pipeline), not a folder of images."""
        return self.run is not None or self.diffusers is not None

    def load(self, device: str) -> Any:
        if self.family is None and self.diffusers is not None:
            from models.hf_diffusers import DiffusersModel

            self.family = DiffusersModel(self.diffusers, device=device, resolution=self.req.resolution,
                                         height=self.req.height, width=self.req.width)
        if self.family is None and self.run is not None:
            from models.checkpoint import load_family

            self.family = load_family(self.run.checkpoint, device=device)
        return self.family

    @property
    def image_size(self) -> int:
        return int(self.train_cfg.model["image_size"]) if self.train_cfg is not None else self.size

    def sampling(self, fam: Any) -> tuple[tuple[int, ...], dict[str, int]]:
        """(one image's noise shape, the height/width arguments) of generation from ``fam``."""
        shape = tuple(fam.noise_shape)
        if self.latent_size is None:
            return shape, {}
        h, w = self.latent_size
        return (shape[0], h, w), {"height": h, "width": w}


def _resolve_clip(spec: str, src: Source) -> str:
    if spec == "auto":
        return "world" if src.is_world else "ViT-B-32:openai"
    return spec


def _check_before_work(req: EvalRequest, src: Source) -> None:
    """Everything that can fail fast: weights, conditioning, prompt file, detector."""
    if req.reference_stats is not None:
        _stats_card(req, src)
    if {"fid", "kid", "sfid"} & set(req.metrics):
        ext = _extractor_name(req, src)
        if ext == "inception":
            from imagegen.evaluate.fid import check_inception_weights

            check_inception_weights(req.fid_mode)
    if src.family is None and src.run is not None:
        cond = src.train_cfg.model.get("conditioning", "none")
        if req.guidance != 1.0 and cond == "none":
            raise EvalError(f"guidance={req.guidance} needs a conditional model; run {src.run.id} is unconditional")
        from models.registry import get_family

        fam = get_family(src.train_cfg.family)
        if req.sampler is not None and req.sampler not in fam.samplers:
            raise EvalError(f"unknown sampler {req.sampler!r} for family {fam.name!r}; it has {list(fam.samplers)}")
    if src.diffusers is not None:
        from models.hf_diffusers import DiffusersModel

        s = req.sampler
        if s is not None and s not in DiffusersModel.samplers and not s.startswith("pipeline:"):
            raise EvalError(f"unknown sampler {s!r} for a diffusers model; it has {list(DiffusersModel.samplers)} or "
                            "'pipeline:<diffusers scheduler class>'")
    if "geneval" in req.metrics and req.geneval_prompts != "world":
        from imagegen.evaluate.geneval import read_prompts

        read_prompts(req.geneval_prompts)  # line-numbered errors
    if "geneval" in req.metrics:
        _detector(req)  # a missing detector weights file is named now, not after generation
    if "control" in req.metrics:
        from imagegen.evaluate.control import check_request as check_control

        try:
            check_control(req, src)
        except ValueError as e:
            raise EvalError(str(e)) from None
    if {"fd_dinov2", "prdc"} & set(req.metrics) and (req.prdc_features == "dinov2" or "fd_dinov2" in req.metrics):
        from imagegen.evaluate.hf_models import check_available

        check_available(req.dinov2_model, "DINOv2 weights")
    for spec in req.reward_models if "reward" in req.metrics else ():
        for what, path in (("weights", spec.path if spec.kind != "hpsv2" else None), ("processor", spec.processor)):
            if path and not Path(path).expanduser().exists():
                raise EvalError(f"reward model {spec.kind}: {what} {path} does not exist")
    if "dpg" in req.metrics:
        from imagegen.evaluate.hf_models import check_available
        from imagegen.evaluate.vqa import read_dpg_questions

        read_dpg_questions(str(req.dpg_questions))  # row-numbered errors before any generation
        check_available(str(req.vqa_model), "VQA model weights")
    specs = []
    if "cmmd" in req.metrics and req.cmmd_clip not in ("auto", "world"):
        specs.append(req.cmmd_clip)
    if "clipscore" in req.metrics:
        specs.append(_resolve_clip(req.clip_model, src))
    if {"fid", "kid"} & set(req.metrics) and _extractor_name(req, src) != "inception":
        specs.append(_extractor_name(req, src))
    for spec in specs:
        from imagegen.clip import parse_spec, resolve_weights

        resolve_weights(parse_spec(src.world_clip_spec() if spec == "world" else spec))


def check_request(request: EvalRequest, root: Path | str) -> None:
    """Every check that needs no image generated (the flows call it before any work)."""
    _check_before_work(request, Source(request, Path(root)))


def _stats_card(req: EvalRequest, src: Source) -> dict[str, Any]:
    """The imported reference statistics' card, checked against the request (extractor, clean-fid mode)."""
    from imagegen.importers.fid_stats import get_fid_ref

    card = get_fid_ref(src.root, str(req.reference_stats))
    if req.extractor not in ("auto", card["extractor"]):
        raise EvalError(f"reference_stats {card['name']} ({card['id']}) are {card['extractor']} features; "
                        f"extractor={req.extractor!r} would compare other features with them")
    if card.get("mode") and card["mode"] != req.fid_mode:
        raise EvalError(f"reference_stats {card['name']} were computed in clean-fid mode {card['mode']!r}; "
                        f"set fid_mode={card['mode']!r} (this request has {req.fid_mode!r})")
    return card


def _extractor_name(req: EvalRequest, src: Source) -> str:
    if req.reference_stats is not None:
        return _stats_card(req, src)["extractor"]
    if req.extractor == "auto":
        return "world" if src.is_world else "inception"
    return req.extractor


# ------------------------------------------------------------------------------------------ generation


def image_noise(seed: int, indices: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """x_T of images ``indices``: one generator per image, seeded by (seed, index)."""
    from imagegen.loader import derive_seed
    from models.reflow import pair_noise

    return pair_noise([derive_seed("eval-image", seed, i) % 2**62 for i in indices], shape)


def conditions(src: Source, n: int, seed: int) -> tuple[list[str] | None, Any]:
    """(captions, model conditioning) for n images, drawn (seeded) from the reference dataset."""
    cond_kind = "text" if src.diffusers else src.train_cfg.model.get("conditioning", "none")
    if src.dataset is None:
        raise EvalError("generating an evaluation set needs a reference dataset for its captions")
    manifest = pd.read_parquet(src.dataset.path / "manifest.parquet", columns=["key", "caption"]).sort_values("key")
    caps = manifest["caption"].astype(str).to_numpy()
    picks = np.random.default_rng(seed).integers(0, len(caps), size=n)
    captions = caps[picks].tolist()
    if cond_kind == "text":
        return captions, captions
    if cond_kind == "class":
        from imagegen.train.trainer import Labeler

        lab = Labeler(src.train_cfg)
        if src.train_cfg.label_field:  # no caption keyword: name the class
            labels = list(range(n))
            labels = [i % len(lab.names) for i in labels]
        else:
            labels = [lab.label(c, None, f"eval {i}") for i, c in enumerate(captions)]
        names = [f"a photo of a {lab.names[y]}" for y in labels] if src.train_cfg.label_field else captions
        return names, labels
    return None, None


def rank_batches(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """The batch starts rank ``rank`` of ``world`` generates: a contiguous, disjoint range of the
    global batches (so of image indices, and of the seeds derived from them).  Batches are the same
    as in one process, which makes every image byte-identical to a one-process run (stochastic
    samplers draw from a generator seeded by the batch start)."""
    starts = list(range(0, n, batch_size))
    return starts[rank * len(starts) // world:(rank + 1) * len(starts) // world]


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


BATCHES = ".batches"  # generate_set's per-batch records: <start>.json once that batch's images are on disk


def _batch_done(out: Path, start: int, idx: list[int]) -> int | None:
    """The NFE of batch ``start`` when a killed earlier run finished it (record and every image there)."""
    rec = out / BATCHES / f"{start:06d}.json"
    if not rec.is_file() or not all((out / f"{i:05d}.png").is_file() for i in idx):
        return None
    try:
        got = json.loads(rec.read_text())
    except ValueError:
        return None
    return int(got["nfe"]) if got.get("images") == len(idx) and got.get("nfe") is not None else None


def _save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG under a temporary name, then rename: an image file on disk is always whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def generate_set(src: Source, req: EvalRequest, out: Path, device: str) -> dict[str, Any]:
    """n_samples PNGs + captions.jsonl in ``out`` (kept when already complete).

    The folder is the evaluation's (named by its id), so a batch a killed run finished is the
    same batch: every image is written whole (temporary name, rename), a record per batch
    (``.batches/<start>.json``) follows its images, and a rerun keeps the recorded batches and
    generates the rest (each batch depends only on its own seeds, see :func:`rank_batches`).

    Under torchrun (a process group initialised) each rank generates its range of batches
    (:func:`rank_batches`) into the shared folder, then one gather tells rank 0 what each rank
    did; rank 0 checks every batch was made and writes captions.jsonl last."""
    done = out / "captions.jsonl"
    info_path = out / "generate.json"
    if done.is_file() and len(done.read_text().splitlines()) == req.n_samples and info_path.is_file():
        return {**json.loads(info_path.read_text()), "generated": 0, "reused": True}
    rank, world = _dist_rank_world()
    fam = src.load(device)
    captions, cond = conditions(src, req.n_samples, req.seed)
    shape, size = src.sampling(fam)
    out.mkdir(parents=True, exist_ok=True)
    (out / BATCHES).mkdir(exist_ok=True)
    if rank == 0:  # half-written images and records of a killed run
        sweep_stale(out)
        sweep_stale(out / BATCHES)
    t0 = time.time()
    nfe = None
    kept = 0
    mine = rank_batches(req.n_samples, req.batch_size, rank, world)
    for start in mine:
        idx = list(range(start, min(req.n_samples, start + req.batch_size)))
        had = _batch_done(out, start, idx)
        if had is not None:
            nfe, kept = had, kept + len(idx)
            continue
        c = None if cond is None else (cond[start:idx[-1] + 1] if isinstance(cond, list) else cond)
        if isinstance(c, list) and c and isinstance(c[0], int):
            c = torch.tensor(c)
        extra = {"negative": [req.negative] * len(idx)} if req.negative is not None else {}
        res = fam.sample_result(len(idx), conditioning=c, sampler=req.sampler, steps=req.steps,
                                guidance=req.guidance if c is not None else 1.0, **extra, **size,
                                x_T=image_noise(req.seed, idx, shape).to(device),
                                generator=torch.Generator(device=device).manual_seed(req.seed + start))
        nfe = int(res.nfe)
        u8 = ((res.sample.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for j, i in enumerate(idx):
            _save_png(Image.fromarray(u8[j]), out / f"{i:05d}.png")
        write_json_atomic(out / BATCHES / f"{start:06d}.json", {"nfe": nfe, "images": len(idx)})
    if world > 1:
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, {"rank": rank, "starts": mine, "nfe": nfe, "seconds": round(time.time() - t0, 3)})
        made = sorted(s for p in parts for s in p["starts"])
        if made != list(range(0, req.n_samples, req.batch_size)):
            raise EvalError(f"distributed generation: the ranks made batches {made}, not every batch once")
        nfe = next((p["nfe"] for p in parts if p["nfe"] is not None), None)
        if rank != 0:
            return {"nfe": nfe, "generated": sum(len(range(s, min(req.n_samples, s + req.batch_size))) for s in mine)
                    - kept, "kept": kept, "reused": False, "rank": rank, "world": world}
    lines = [json.dumps({"file": f"{i:05d}.png", "caption": captions[i] if captions else None})
             for i in range(req.n_samples)]
    tmp = out / ".captions.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    info = {"nfe": nfe, "seconds": round(time.time() - t0, 3), "world_size": world}
    write_json_atomic(info_path, info)
    tmp.replace(done)  # written last: marks the set complete
    return {**info, "generated": req.n_samples - kept, "kept": kept, "reused": False}


def reference_images(src: Source, size: int, n: int | None, seed: int) -> list[Path]:
    """The reference dataset's images decoded and resized to ``size`` as the training loader does,
    written once per (dataset id, size) under ``<root>/evals/reference``."""
    from imagegen.loader import make_dataset

    ds = src.dataset
    if ds is None:
        raise EvalError("FID/KID need a reference dataset")
    folder = evals_dir(src.root) / "reference" / f"{ds.id}-{size}px"
    marker = folder / "done.json"
    if not marker.is_file():

        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")  # filled aside, renamed into place
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        count = 0
        for sample in make_dataset(ds.shards, image_size=size, shuffle_buffer=0):
            x = ((sample["image"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(x).save(tmp / f"{sample['key']}.png")
            count += 1
        write_json_atomic(tmp / "done.json", {"dataset_id": ds.id, "size": size, "images": count})
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first (or a leftover without done.json)
            if not marker.is_file():
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(folder.glob("*.png"))
    if n is not None and n < len(files):
        idx = np.sort(np.random.default_rng(seed).choice(len(files), n, replace=False))
        files = [files[i] for i in idx]
    return files


# ------------------------------------------------------------------------------------------ metrics


def _features(files: list[Path], extractor: Any, req: EvalRequest, device: str, cache: Path | None) -> np.ndarray:
    from imagegen.evaluate.fid import clean_fid_features

    if cache is not None and cache.is_file():
        return np.load(cache, allow_pickle=False)
    feats = clean_fid_features(files, mode=req.fid_mode, model=extractor, batch_size=req.batch_size,
                               num_workers=0, device=device)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}.npy")
        np.save(tmp, feats, allow_pickle=False)
        tmp.replace(cache)
    return feats


def fid_kid(src: Source, req: EvalRequest, gen_files: list[Path], device: str, base: dict[str, Any]) -> list[dict]:
    from imagegen.evaluate.fid import (INCEPTION_ID, clip_image_extractor, fd_from_features, gaussian_stats, kid,
                                       metric_name, stats_hash)

    name = _extractor_name(req, src)
    if name == "inception":
        extractor, ext_id, weights = None, INCEPTION_ID, {}
    else:
        spec = src.world_clip_spec() if name == "world" else name
        extractor = clip_image_extractor(spec, device)
        ext_id, weights = extractor.extractor_id, dict(extractor.identity)
    size = Image.open(gen_files[0]).size[0]
    if req.reference_stats is not None:
        return _fid_against_stats(req, src, extractor, ext_id, weights, gen_files, device, base)
    ref_files = reference_images(src, size, req.reference_n, req.seed)
    key = stable_hash({"dataset": src.dataset.id, "size": size, "extractor": ext_id, "mode": req.fid_mode,
                       "n": req.reference_n, "seed": req.seed})
    ref = _features(ref_files, extractor, req, device, evals_dir(src.root) / "reference" / "features" / f"{key}.npy")
    gen = _features(gen_files, extractor, req, device, None)
    mu, sigma = gaussian_stats(ref, name="reference features")
    prov = {**base, "implementation": f"clean-fid {importlib.metadata.version('clean-fid')} features, "
            "imagegen float64 eigen Fréchet distance", "mode": req.fid_mode, "extractor": ext_id,
            "extractor_weights": json.dumps(weights, default=str), "n_generated": len(gen_files),
            "n_reference": len(ref_files), "reference_dataset": src.dataset.id, "reference_size": size,
            "reference_stats_sha256": stats_hash(mu, sigma)}
    from imagegen.evaluate.uncertainty import KID_RESAMPLE_SUBSETS, flag_columns, interval_columns

    rows = []
    if "fid" in req.metrics:
        value = fd_from_features(gen, ref)
        rows.append({**prov, "metric": metric_name(ext_id), "value": value,
                     **interval_columns(gen, ref, req, kind="fd", value=value),
                     **flag_columns("fd", len(gen), len(ref), dim=int(gen.shape[1]))})
    if "kid" in req.metrics:
        size_k = min(req.kid_subset_size, len(gen), len(ref))
        mean, std = kid(gen, ref, subsets=req.kid_subsets, subset_size=size_k, seed=req.seed)
        kid_name = "KID" if ext_id == INCEPTION_ID else f"KD-{ext_id}"
        sub = min(req.kid_subsets, KID_RESAMPLE_SUBSETS)
        rows.append({**prov, "metric": kid_name, "value": float(mean), "std": float(std),
                     "kid_subsets": req.kid_subsets, "kid_subset_size": size_k,
                     **interval_columns(gen, ref, req, kind="metric", value=float(mean),
                                        metric=lambda g, r: kid(g, r, subsets=sub, subset_size=size_k, seed=req.seed)[0],
                                        method=f"percentile bootstrap (KID of {sub} subsets per resample)"),
                     **flag_columns("kid", len(gen), len(ref), subset_size=req.kid_subset_size)})
    return rows


def _fid_against_stats(req: EvalRequest, src: Source, extractor: Any, ext_id: str, weights: dict[str, Any],
                       gen_files: list[Path], device: str, base: dict[str, Any]) -> list[dict]:
    """FID (and KID when the file holds clean-fid's features) against imported statistics."""
    from imagegen.evaluate.fid import INCEPTION_ID, frechet_distance, gaussian_stats, kid, metric_name
    from imagegen.importers.fid_stats import load_fid_ref

    mu, sigma, feats, card = load_fid_ref(src.root, str(req.reference_stats))
    gen = _features(gen_files, extractor, req, device, None)
    if gen.shape[1] != mu.shape[0]:
        raise EvalError(f"reference_stats {card['name']} are {mu.shape[0]}-d; extractor {ext_id} gives {gen.shape[1]}-d")
    g_mu, g_sigma = gaussian_stats(gen, name="generated features")
    prov = {**base, "implementation": f"clean-fid {importlib.metadata.version('clean-fid')} features, "
            "imagegen float64 eigen Fréchet distance, imported reference statistics", "mode": req.fid_mode,
            "extractor": ext_id, "extractor_weights": json.dumps(weights, default=str), "n_generated": len(gen_files),
            "n_reference": card.get("n_feats"), "reference_dataset": None, "reference_stats": card["id"],
            "reference_stats_name": card["name"], "reference_stats_file_sha256": card["file_sha256"],
            "reference_stats_protocol": card.get("protocol"), "reference_stats_sha256": card["stats_sha256"]}
    from imagegen.evaluate.uncertainty import KID_RESAMPLE_SUBSETS, flag_columns, interval_columns

    def fd_to_stats(g: np.ndarray, _: Any) -> float:
        return frechet_distance(*gaussian_stats(g, name="resampled generated features"), mu, sigma)

    rows = []
    if "fid" in req.metrics:
        value = frechet_distance(g_mu, g_sigma, mu, sigma)
        rows.append({**prov, "metric": metric_name(ext_id), "value": value,
                     **interval_columns(gen, None, req, kind="metric", metric=fd_to_stats, value=value,
                                        method="percentile bootstrap over the generated set (imported statistics fixed)"),
                     **flag_columns("fd", len(gen), card.get("n_feats"), dim=int(gen.shape[1]))})
    if "kid" in req.metrics and feats is not None:
        size_k = min(req.kid_subset_size, len(gen), len(feats))
        mean, std = kid(gen, feats, subsets=req.kid_subsets, subset_size=size_k, seed=req.seed)
        sub = min(req.kid_subsets, KID_RESAMPLE_SUBSETS)
        rows.append({**prov, "metric": "KID" if ext_id == INCEPTION_ID else f"KD-{ext_id}", "value": float(mean),
                     "std": float(std), "kid_subsets": req.kid_subsets, "kid_subset_size": size_k,
                     **interval_columns(gen, feats, req, kind="metric", value=float(mean),
                                        metric=lambda g, r: kid(g, r, subsets=sub, subset_size=size_k, seed=req.seed)[0],
                                        method=f"percentile bootstrap (KID of {sub} subsets per resample)"),
                     **flag_columns("kid", len(gen), len(feats), subset_size=req.kid_subset_size)})
    return rows


def clipscore(src: Source, req: EvalRequest, files: list[Path], captions: list[str], device: str,
              base: dict[str, Any]) -> list[dict]:
    from imagegen.evaluate.clipscore import clip_score_images

    spec = _resolve_clip(req.clip_model, src)
    spec = src.world_clip_spec() if spec == "world" else spec
    out = clip_score_images(spec, files, captions, batch_size=req.batch_size, device=device)
    prov = {**base, "implementation": "open_clip cosine of L2-normalised embeddings", "clip": json.dumps(out["clip"]),
            "n_generated": len(files)}
    from imagegen.evaluate.clipscore import HESSEL_W
    from imagegen.evaluate.uncertainty import interval_columns

    cos = np.asarray(out["cosine"], dtype=np.float64)
    tm_ci = interval_columns(100.0 * cos, None, req, kind="mean")  # max(mean, 0) is monotone in the mean
    tm_ci = {k: (max(v, 0.0) if k in ("ci_low", "ci_high") and v is not None else v) for k, v in tm_ci.items()}
    return [{**prov, "metric": "CLIPScore (Hessel et al. 2021: 2.5*max(cos,0))", "value": out["clipscore_hessel2021"],
             **interval_columns(HESSEL_W * np.maximum(cos, 0.0), None, req, kind="mean")},
            {**prov, "metric": "CLIPScore (torchmetrics: max(mean 100*cos, 0))", "value": out["clipscore_torchmetrics"],
             **tm_ci}]


def _detector(req: EvalRequest) -> tuple[Any, Any]:
    from imagegen.evaluate import geneval as G

    if req.detector == "world":
        from imagegen.world.geneval import WorldDetector

        return WorldDetector(), G.detector_color
    if req.detector.startswith("torchvision:"):
        return G.TorchvisionDetector(req.detector.split(":", 1)[1]), None
    if req.detector.startswith("owlv2:"):
        from imagegen.evaluate.owl_detector import OwlDetector

        return OwlDetector(req.detector.split(":", 1)[1]), None
    raise EvalError(f"unknown detector {req.detector!r}; use 'world', 'torchvision:/path/to/weights' or "
                    f"'owlv2:<model name or folder>'")


def geneval(src: Source, req: EvalRequest, out: Path, device: str, base: dict[str, Any]) -> list[dict]:
    from imagegen.evaluate import geneval as G
    from imagegen.world.scene import WorldConfig

    if req.geneval_prompts == "world":
        from imagegen.world.geneval import world_prompts

        prompts = world_prompts(WorldConfig())
    else:
        prompts = G.read_prompts(req.geneval_prompts)
    if req.geneval_max_prompts is not None:
        prompts = prompts[:req.geneval_max_prompts]
    layout = out / "geneval"
    world_size = WorldConfig().image_size
    if src.generates:
        fam = src.load(device)
        shape, size = src.sampling(fam)

        def make_images(meta: dict[str, Any], n: int, i: int) -> list[Image.Image]:
            idx = [i * 1000 + k for k in range(n)]
            res = fam.sample(n, conditioning=[meta["prompt"]] * n, sampler=req.sampler, steps=req.steps,
                             guidance=req.guidance, x_T=image_noise(req.seed, idx, shape).to(device), **size,
                             generator=torch.Generator(device=device).manual_seed(req.seed + i))
            u8 = ((res.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            ims = [Image.fromarray(a) for a in u8]
            if req.detector == "world" and ims[0].size[0] != world_size and ims[0].size[0] == ims[0].size[1]:
                # the detector reads world-sized images (a non-square bucket's as they are: its objects keep
                # the square world's sizes)
                ims = [im.resize((world_size, world_size), Image.Resampling.BICUBIC) for im in ims]
            return ims

        G.generate_layout(layout, prompts, req.geneval_per_prompt, make_images)
    else:
        layout = Path(str(req.folder))
    detector, color = _detector(req)
    rows = G.score_folder(layout, detector, color, outfile=out / "geneval_results.jsonl")
    summary = G.summarize(rows)
    write_json_atomic(out / "geneval_summary.json", summary)
    from imagegen.evaluate.owl_detector import result_flags

    det = result_flags(detector)
    prov = {**base, "implementation": "imagegen GenEval rules (Ghosh et al. 2023)", "detector": req.detector,
            "detector_identity": json.dumps(det["detector_identity"], default=str),
            "comparable_with_published": det["comparable_with_published"], "note": det["note"],
            "prompts": req.geneval_prompts, "n_prompts": summary["prompts"], "n_generated": summary["images"],
            "per_prompt": req.geneval_per_prompt}
    from imagegen.evaluate.uncertainty import interval_columns, rows_bootstrap

    overall_ci = rows_bootstrap(rows, lambda rs: G.summarize(rs)["overall"], req, summary["overall"])
    out_rows = [{**prov, "metric": "GenEval overall", "value": summary["overall"],
                 "complete": summary["complete"], **overall_ci}]
    for t, v in summary["tasks"].items():
        correct = [float(bool(r["correct"])) for r in rows if str(r["tag"]) == t]
        out_rows.append({**prov, "metric": f"GenEval {t}", "value": v["accuracy"],
                         **interval_columns(correct, None, req, kind="mean")})
    return out_rows


# ------------------------------------------------------------------------------------------ the table's compute functions


@dataclass
class MetricContext:
    """What a metric's compute function gets besides the source and the request."""

    out: Path                        # the evaluation folder
    device: str
    base: dict[str, Any]             # provenance columns shared by every row
    files: list[Path]                # the generated set (or the folder's images); empty when not needed
    captions: list[str | None]
    cache: dict[str, Any] = field(default_factory=dict)  # features shared by rows (fd_dinov2 and prdc)


Computed = tuple[list[dict[str, Any]], dict[str, str]]  # (metric rows, skipped metric -> reason)


def fid_kid_rows(src: Source, req: EvalRequest, ctx: MetricContext) -> Computed:
    rows = fid_kid(src, req, ctx.files, ctx.device, ctx.base)
    if "kid" in req.metrics and req.reference_stats is not None and not any(r["metric"].startswith("K") for r in rows):
        return rows, {"kid": (f"reference_stats {req.reference_stats} hold mu/sigma only; KID needs the reference "
                              "features (clean-fid's *_kid.npz 'feats')")}
    return rows, {}


def sfid_rows(src: Source, req: EvalRequest, ctx: MetricContext) -> Computed:
    """sFID: the Fréchet distance on Inception's spatial features (imagegen.evaluate.fid.InceptionSpatial,
    from the same weights file as FID), against the reference dataset or the spatial part
    (``mu_s`` / ``sigma_s``) of imported reference statistics."""
    from imagegen.evaluate.fid import SFID_ID, frechet_distance, gaussian_stats, inception_spatial_extractor, stats_hash
    from imagegen.importers.fid_stats import load_fid_ref_spatial

    name = _extractor_name(req, src)
    if name != "inception":
        return [], {"sfid": f"sFID is defined on Inception's spatial features; the extractor here is {name!r} "
                            "(set extractor=inception, with the Inception weights in place)"}
    extractor = inception_spatial_extractor(req.fid_mode, ctx.device)
    weights = {"file_sha256": _inception_sha(req.fid_mode)}
    gen = _features(ctx.files, extractor, req, ctx.device, None)
    prov = {**ctx.base, "implementation": f"clean-fid {importlib.metadata.version('clean-fid')} data path, Inception "
            "mixed_6/conv channels 0-6 (17x17x7, HWC), imagegen float64 eigen Fréchet distance", "mode": req.fid_mode,
            "extractor": SFID_ID, "extractor_weights": json.dumps(weights), "n_generated": len(ctx.files)}
    if req.reference_stats is not None:
        got = load_fid_ref_spatial(src.root, str(req.reference_stats))
        if got is None:
            return [], {"sfid": f"reference_stats {req.reference_stats} hold no spatial statistics (mu_s/sigma_s, as "
                                "ADM's reference batches do)"}
        mu, sigma, card = got
        if gen.shape[1] != mu.shape[0]:
            raise EvalError(f"reference_stats {card['name']}: spatial statistics are {mu.shape[0]}-d, the extractor "
                            f"gives {gen.shape[1]}-d")
        prov.update(n_reference=card.get("n_feats"), reference_dataset=None, reference_stats=card["id"],
                    reference_stats_name=card["name"], reference_stats_file_sha256=card["file_sha256"],
                    reference_stats_protocol=card.get("protocol"), reference_stats_sha256=card["spatial_stats_sha256"])
    else:
        size = Image.open(ctx.files[0]).size[0]
        ref_files = reference_images(src, size, req.reference_n, req.seed)
        key = stable_hash({"dataset": src.dataset.id, "size": size, "extractor": SFID_ID, "mode": req.fid_mode,
                           "n": req.reference_n, "seed": req.seed, "weights": weights})
        ref = _features(ref_files, extractor, req, ctx.device, evals_dir(src.root) / "reference" / "features" / f"{key}.npy")
        mu, sigma = gaussian_stats(ref, name="reference spatial features")
        prov.update(n_reference=len(ref_files), reference_dataset=src.dataset.id, reference_size=size,
                    reference_stats_sha256=stats_hash(mu, sigma))
    from imagegen.evaluate.uncertainty import flag_columns, interval_columns

    def fd_to_stats(g: np.ndarray, _: Any) -> float:
        return frechet_distance(*gaussian_stats(g, name="resampled generated spatial features"), mu, sigma)

    value = frechet_distance(*gaussian_stats(gen, name="generated spatial features"), mu, sigma)
    return [{**prov, "metric": "sFID", "value": value,
             **interval_columns(gen, None, req, kind="metric", metric=fd_to_stats, value=value,
                                method="percentile bootstrap over the generated set (reference statistics fixed)"),
             **flag_columns("fd", len(gen), prov.get("n_reference"), dim=int(gen.shape[1]))}], {}


def _inception_sha(mode: str) -> str:
    from imagegen.evaluate.fid import check_inception_weights
    from imagegen.hashing import file_sha256

    return file_sha256(check_inception_weights(mode))


def clipscore_rows(src: Source, req: EvalRequest, ctx: MetricContext) -> Computed:
    if any(c is None for c in ctx.captions):
        return [], {"clipscore": ("the model is unconditional (no captions)" if src.generates else
                                  "the folder has no captions.jsonl with a caption for every image")}
    return clipscore(src, req, ctx.files, [str(c) for c in ctx.captions], ctx.device, ctx.base), {}


def geneval_rows(src: Source, req: EvalRequest, ctx: MetricContext) -> Computed:
    is_layout = not src.generates and (Path(str(req.folder)) / "00000" / "metadata.jsonl").is_file()
    if src.run is not None and src.train_cfg.model.get("conditioning") != "text":
        return [], {"geneval": (f"GenEval prompts are text; run {src.run.id} is "
                                f"{src.train_cfg.model.get('conditioning')}-conditioned")}
    if not src.generates and not is_layout:
        return [], {"geneval": "the folder is not a GenEval layout (NNNNN/metadata.jsonl + NNNNN/samples/)"}
    return geneval(src, req, ctx.out, ctx.device, ctx.base), {}


# ------------------------------------------------------------------------------------------ evaluate


def evaluate(request: EvalRequest | dict[str, Any], root: Path | str) -> EvalSummary:
    """Run the requested metrics; returns a summary with the metric values and paths."""
    if not isinstance(request, EvalRequest):
        request = EvalRequest(**request)
    root = Path(root)
    req = request
    if req.n_seeds > 1:
        return _evaluate_seeds(req, root)
    with torch_threads(req.threads):
        return _evaluate_one(req, root)


def _evaluate_one(req: EvalRequest, root: Path) -> EvalSummary:
    src = Source(req, root)
    _check_before_work(req, src)
    device = _device(req)
    ident = eval_identity(req, src)
    eval_id = stable_hash(ident)
    out = evals_dir(root) / eval_id
    if (out / "card.json").is_file():
        card = read_card(out)
        if card.get("identity") == json.loads(json.dumps(ident, default=str)) and \
                (card.get("metrics_file") is None or Path(card["metrics_file"]).is_file()):
            return {k: v for k, v in card.items() if k not in ("request", "identity")} | {"reused": True}  # type: ignore[return-value]
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, evals_dir(root) / "reference"):  # temporaries of a killed evaluation
        sweep_stale(folder)
    t0 = time.time()
    base = {"eval_id": eval_id, "source": json.dumps(src.identity), "run_id": src.run.id if src.run else None,
            "family": src.train_cfg.family if src.train_cfg else ("diffusers" if src.diffusers else None),
            "model": src.diffusers,
            "sampler": req.sampler or (src.load(device).default_sampler if src.generates else None),
            "steps": req.steps or (int(src.load(device).default_steps) if src.generates else None),
            "guidance": req.guidance, "seed": req.seed, "versions": json.dumps(_versions())}
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    need_set = M.needs_generated_set(req.metrics)
    files: list[Path] = []
    captions: list[str | None] = []
    if need_set:
        if src.generates:
            info = generate_set(src, req, out / "samples", device)
            base["nfe"] = info.get("nfe")
            recs = [json.loads(x) for x in (out / "samples" / "captions.jsonl").read_text().splitlines()]
            files = [out / "samples" / r["file"] for r in recs]
            captions = [r["caption"] for r in recs]
        else:
            files = src.files
            cap_file = Path(str(req.folder)) / "captions.jsonl"
            by_file = {}
            if cap_file.is_file():
                by_file = {json.loads(x)["file"]: json.loads(x)["caption"] for x in cap_file.read_text().splitlines()
                           if x.strip()}
            captions = [by_file.get(f.name) for f in files]
    ctx = MetricContext(out, device, base, files, captions)
    for compute in M.compute_functions(req.metrics):
        got, why = compute(src, req, ctx)
        rows += got
        skipped.update(why)
    df = pd.DataFrame(rows)
    if not df.empty:
        df.to_parquet(out / "metrics.parquet", index=False)
    from imagegen.evaluate.protocol import eval_protocol

    summary: EvalSummary = {"eval_id": eval_id, "path": str(out), "metrics": {r["metric"]: r["value"] for r in rows},
               "skipped": skipped, "run_id": base["run_id"], "family": base["family"],
               "model": ({"spec": src.diffusers, "source": src.identity["source"], "revision": src.identity["revision"],
                          "pipeline": src.identity["pipeline"], "files_sha256": stable_hash(src.identity["files"])}
                         if src.diffusers else None),
               "sampler": base["sampler"], "steps": base["steps"], "nfe": base.get("nfe"),
               "guidance": req.guidance, "n_samples": len(files), "seconds": round(time.time() - t0, 3),
               "metrics_file": str(out / "metrics.parquet") if rows else None, "reused": False,
               **_row_summaries(rows), "n_seeds": 1,
               "protocol": eval_protocol(rows, req.model_dump(mode="json"), [req.seed], len(files))}
    write_json_atomic(out / "card.json", {**summary, "request": req.model_dump(mode="json"), "identity": ident})
    return summary


def eval_identity(req: EvalRequest, src: Source) -> dict[str, Any]:
    """What the evaluation id hashes: the source, the settings (not where or in what batches it runs)
    and the code of the requested metrics."""
    # batch_size is hashed: stochastic samplers seed their generator per batch (see generate_set)
    ident = {"source": src.identity, "settings": req.model_dump(mode="json", exclude={"run", "folder", "device"}),
             "code": code_version(*M.modules(req.metrics), M, _self(), request_mod)}
    if req.reference_stats is not None:  # a name can be given to another file: the file's hash decides
        ident["reference_stats_sha256"] = _stats_card(req, src)["file_sha256"]
    return ident


def _row_summaries(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``intervals`` (result -> [low, high]) and ``flags`` (result -> sample-count flags) of the rows."""
    intervals = {r["metric"]: [float(r["ci_low"]), float(r["ci_high"])] for r in rows
                 if r.get("ci_low") is not None and r.get("ci_high") is not None}
    flags = {r["metric"]: json.loads(r["flags"]) for r in rows if r.get("flagged")}
    return {"intervals": intervals, "flags": flags}


def _evaluate_seeds(req: EvalRequest, root: Path) -> EvalSummary:
    """``n_seeds`` evaluations with seeds ``seed, seed+1, ...`` (independent noise, captions and
    bootstrap draws), each its own evaluation folder (reused when present), combined into one:
    every result present in all of them becomes mean +- std over seeds with a Student-t interval."""
    from imagegen.evaluate.protocol import eval_protocol
    from imagegen.evaluate.uncertainty import over_seeds

    seeds = [req.seed + k for k in range(req.n_seeds)]
    parts = [evaluate(req.model_copy(update={"seed": s, "n_seeds": 1}), root) for s in seeds]
    ident = {"seeds": seeds, "parts": [p["eval_id"] for p in parts], "code": code_version(_self(), request_mod)}
    eval_id = stable_hash(ident)
    out = evals_dir(root) / eval_id
    out.mkdir(parents=True, exist_ok=True)
    frames = [pd.read_parquet(p["metrics_file"]) for p in parts if p.get("metrics_file")]
    names = [m for m in parts[0]["metrics"] if all(m in p["metrics"] for p in parts)]
    rows = []
    for m in names:
        first = frames[0][frames[0]["metric"] == m].iloc[0].to_dict()
        per = [float(p["metrics"][m]) for p in parts]
        flagged = [f for p in parts for f in p.get("flags", {}).get(m, [])]
        rows.append({**{k: v for k, v in first.items() if not k.startswith("ci_")}, "eval_id": eval_id,
                     "seed": seeds[0], "seeds": json.dumps(seeds), "part_eval_ids": json.dumps(ident["parts"]),
                     **over_seeds(per, req.confidence), "flags": json.dumps(sorted(set(flagged))),
                     "flagged": bool(flagged)})
    pd.DataFrame(rows).to_parquet(out / "metrics.parquet", index=False)
    skipped = {k: v for p in parts for k, v in p["skipped"].items()}
    p0 = parts[0]
    summary: EvalSummary = {"eval_id": eval_id, "path": str(out), "metrics": {r["metric"]: r["value"] for r in rows},
                            "skipped": skipped, "run_id": p0["run_id"], "family": p0["family"],
                            "sampler": p0["sampler"], "steps": p0["steps"], "nfe": p0["nfe"],
                            "guidance": req.guidance, "n_samples": p0["n_samples"],
                            "seconds": round(sum(p["seconds"] for p in parts), 3),
                            "metrics_file": str(out / "metrics.parquet"), "reused": all(p["reused"] for p in parts),
                            **_row_summaries(rows), "n_seeds": req.n_seeds,
                            "protocol": eval_protocol(rows, req.model_dump(mode="json"), seeds, p0["n_samples"])}
    write_json_atomic(out / "card.json", {**summary, "request": req.model_dump(mode="json"), "identity": ident})
    return summary


def _self() -> Any:
    import sys

    return sys.modules[__name__]


def read_eval(root: Path | str, eval_id: str) -> dict[str, Any]:
    path = evals_dir(Path(root)) / eval_id
    if not (path / "card.json").is_file():
        raise LookupError(f"no evaluation {eval_id!r} under {evals_dir(Path(root))}")
    return read_card(path)


def measured_nfe(root: Path, run_id: str, sampler: str | None, steps: int | None) -> int:
    """The network evaluations the run's sampler makes at ``steps``: one image sampled from zero
    noise (the NFE does not depend on the noise, the condition or the guidance scale)."""
    from imagegen.train.runs import get_run
    from models.checkpoint import load_family

    ref = get_run(root, run_id)
    if ref.checkpoint is None:
        raise LookupError(f"run {run_id} has no checkpoint to count the NFE of")
    fam = load_family(ref.checkpoint)
    x_T = torch.zeros((1, fam.cfg.channels, fam.cfg.image_size, fam.cfg.image_size))
    res = fam.sample_result(1, sampler=sampler, steps=steps, x_T=x_T, generator=torch.Generator().manual_seed(0))
    return int(res.nfe)


def run_evaluation(request: EvalRequest, root: Path | str) -> EvalSummary:
    """:func:`evaluate`, with ``nfe`` filled in when it comes back empty.

    ``evaluate`` reports the NFE of the sampling it does; an evaluation that reuses its
    generated set, or computes GenEval only, returns ``nfe=None``.  The leaderboard plots
    metrics against NFE, so it is counted here from one sample."""
    root = Path(root)
    summary = evaluate(request, root)
    if summary.get("nfe") is None and summary.get("run_id"):
        summary = {**summary, "nfe": measured_nfe(root, summary["run_id"], summary.get("sampler"),
                                                  summary.get("steps"))}
    return summary

"""The metric table's compute functions for FD-DINOv2, CMMD, precision/recall + density/coverage,
Inception Score, reward / aesthetic models and DPG-Bench (VQA) adherence.

Each is ``(src, req, ctx) -> (rows, skipped)`` as :mod:`imagegen.evaluate.metrics` asks; the
metric itself lives in its own module (dinov2, cmmd, prdc, inception_score, rewards, vqa), this
file only feeds it the evaluation's images and writes the rows with their provenance, interval
and sample-count flags (:mod:`imagegen.evaluate.uncertainty`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imagegen.evaluate.run import EvalRequest, MetricContext, Source, evals_dir, reference_images
from imagegen.evaluate.uncertainty import flag_columns, interval_columns, no_flags
from imagegen.hashing import stable_hash

Computed = tuple[list[dict[str, Any]], dict[str, str]]


def _reference_files(src: Source, req: EvalRequest, ctx: MetricContext) -> list[Path] | None:
    if src.dataset is None:
        return None
    size = Image.open(ctx.files[0]).size[0]
    return reference_images(src, size, req.reference_n, req.seed)


def _cached(path: Path, make: Any) -> np.ndarray:
    if path.is_file():
        return np.load(path, allow_pickle=False)
    arr = np.asarray(make())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, arr, allow_pickle=False)
    tmp.replace(path)
    return arr


def dinov2_feature_sets(src: Source, req: EvalRequest, ctx: MetricContext) -> dict[str, Any] | None:
    """(generated, reference) DINOv2 features, computed once per evaluation (fd_dinov2 and prdc);
    reference features cached by (dataset, size, n, seed, weights)."""
    if "dinov2" in ctx.cache:
        return ctx.cache["dinov2"]
    from imagegen.evaluate.dinov2 import dinov2_extractor, dinov2_features

    ref_files = _reference_files(src, req, ctx)
    if ref_files is None:
        return None
    ext = dinov2_extractor(req.dinov2_model, ctx.device)
    gen = dinov2_features(ctx.files, ext, batch_size=req.batch_size, num_workers=0, device=ctx.device)
    key = stable_hash({"dataset": src.dataset.id, "size": Image.open(ctx.files[0]).size[0],  # type: ignore[union-attr]
                       "n": req.reference_n, "seed": req.seed, "extractor": ext.extractor_id,
                       "weights": ext.identity})
    ref = _cached(evals_dir(src.root) / "reference" / "features" / f"dinov2-{key}.npy",
                  lambda: dinov2_features(ref_files, ext, batch_size=req.batch_size, num_workers=0, device=ctx.device))
    out = {"generated": gen, "reference": ref, "extractor": ext, "n_reference": len(ref_files)}
    ctx.cache["dinov2"] = out
    return out


def fd_dinov2_rows(src: Source, req: EvalRequest, ctx: MetricContext) -> Computed:
    from imagegen.evaluate.dinov2 import PREPROCESSING
    from imagegen.evaluate.fid import fd_from_features, stats_hash, gaussian_stats

    sets = dinov2_feature_sets(src, req, ctx)
    if sets is None:
        return [], {"fd_dinov2": "FD-DINOv2 needs a reference dataset (reference=); imported statistics are "
                                 "Inception/CLIP features"}
    gen, ref, ext = sets["generated"], sets["reference"], sets["extractor"]
    value = fd_from_features(gen, ref)
    row = {**ctx.base, "metric": ext.name, "value": value, "implementation": "transformers Dinov2Model CLS "
           "(pooler_output) features, imagegen float64 eigen Fréchet distance", "extractor": ext.extractor_id,
           "extractor_weights": json.dumps(ext.identity, default=str), "preprocessing": PREPROCESSING,
           "mode": "clean", "feature_dim": ext.feature_dim, "n_generated": len(gen), "n_reference": len(ref),
           "reference_dataset": src.dataset.id, "reference_stats_sha256": stats_hash(*gaussian_stats(ref)),  # type: ignore[union-attr]
           **interval_columns(gen, ref, req, kind="fd", value=value),
           **flag_columns("fd", len(gen), len(ref), dim=ext.feature_dim)}
    return [row], {}


def _fd_features(src: Source, req: EvalRequest, ctx: MetricContext) -> tuple[np.ndarray, np.ndarray, str, str] | None:
    """The FID/FD extractor's features of both sets (prdc_features='fd')."""
    from imagegen.evaluate.fid import INCEPTION_ID, clip_image_extractor
    from imagegen.evaluate.run import _extractor_name, _features

    ref_files = _reference_files(src, req, ctx)
    if ref_files is None:
        return None
    name = _extractor_name(req, src)
    if name == "inception":
        extractor, ext_id, weights = None, INCEPTION_ID, {}
    else:
        extractor = clip_image_extractor(src.world_clip_spec() if name == "world" else name, ctx.device)
        ext_id, weights = extractor.extractor_id, dict(extractor.identity)
    size = Image.open(ctx.files[0]).size[0]
    key = stable_hash({"dataset": src.dataset.id, "size": size, "extractor": ext_id, "mode": req.fid_mode,  # type: ignore[union-attr]
                       "n": req.reference_n, "seed": req.seed})
    ref = _features(ref_files, extractor, req, ctx.device, evals_dir(src.root) / "reference" / "features" / f"{key}.npy")
    gen = _features(ctx.files, extractor, req, ctx.device, None)
    return gen, ref, ext_id, json.dumps(weights, default=str)


PRDC_NAMES = {"precision": "Precision", "recall": "Recall", "density": "Density", "coverage": "Coverage"}


def prdc_rows(src: Source, req: EvalRequest, ctx: MetricContext) -> Computed:
    from imagegen.evaluate.prdc import prdc

    if req.prdc_features == "dinov2":
        sets = dinov2_feature_sets(src, req, ctx)
        if sets is None:
            return [], {"prdc": "precision/recall need a reference dataset (reference=)"}
        gen, ref = sets["generated"], sets["reference"]
        ext_id, weights = sets["extractor"].extractor_id, json.dumps(sets["extractor"].identity, default=str)
    else:
        got = _fd_features(src, req, ctx)
        if got is None:
            return [], {"prdc": "precision/recall need a reference dataset (reference=)"}
        gen, ref, ext_id, weights = got
    k = req.prdc_k
    flags = flag_columns("knn", len(gen), len(ref), k=k)
    if flags["flagged"]:
        return [], {"prdc": "; ".join(json.loads(flags["flags"]))}
    full = prdc(ref, gen, k)
    prov = {**ctx.base, "implementation": "imagegen k-NN balls (Kynkäänniemi et al. 2019; Naeem et al. 2020), "
            "open balls as the prdc package", "extractor": ext_id, "extractor_weights": weights, "k": k,
            "n_generated": len(gen), "n_reference": len(ref), "reference_dataset": src.dataset.id, **flags}  # type: ignore[union-attr]
    ci = _prdc_intervals(gen, ref, k, req, full)
    return [{**prov, "metric": f"{PRDC_NAMES[m]} ({ext_id}, k={k})", "value": full[m], **ci[m]}
            for m in PRDC_NAMES], {}


def _prdc_intervals(gen: np.ndarray, ref: np.ndarray, k: int, req: EvalRequest,
                    full: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One bootstrap loop for the four values (both sets resampled).  Resampling with replacement
    duplicates rows, which shrinks the k-NN radii and so biases every resample (precision and
    recall fall): the percentile interval is shifted by the bootstrap's bias estimate
    (mean of the resamples - the value; Efron & Tibshirani 1993, ch. 10), so it is centred where the
    value is; read it at equal n only."""
    from imagegen.evaluate.prdc import prdc

    if req.n_resamples == 0:
        return {m: interval_columns([], None, req) for m in PRDC_NAMES}
    rng = np.random.default_rng(req.seed)
    est = {m: [] for m in PRDC_NAMES}
    for _ in range(req.n_resamples):
        g = gen[rng.integers(0, len(gen), len(gen))]
        r = ref[rng.integers(0, len(ref), len(ref))]
        got = prdc(r, g, k)
        for m in PRDC_NAMES:
            est[m].append(got[m])
    alpha = (1.0 - req.confidence) / 2.0
    out = {}
    for m, v in est.items():
        a = np.asarray(v)
        bias = float(a.mean()) - float(full[m])
        lo, hi = np.quantile(a, [alpha, 1.0 - alpha]) - bias
        out[m] = {"ci_low": float(lo), "ci_high": float(hi), "ci_std": float(a.std(ddof=1)),
                  "ci_confidence": req.confidence, "n_resamples": req.n_resamples,
                  "ci_method": f"percentile bootstrap, shifted by its bias estimate ({bias:+.4f})",
                  "ci_resampled": "generated+reference"}
    return out


def cmmd_rows(src: Source, req: EvalRequest, ctx: MetricContext) -> Computed:
    from imagegen.evaluate.cmmd import SCALE, SIGMA, clip_embeddings, cmmd

    ref_files = _reference_files(src, req, ctx)
    if ref_files is None:
        return [], {"cmmd": "CMMD needs a reference dataset (reference=)"}
    spec = req.cmmd_clip
    if spec == "auto":
        spec = "world" if src.is_world else "ViT-L-14-336:openai"
    spec = src.world_clip_spec() if spec == "world" else spec
    gen, ident = clip_embeddings(spec, ctx.files, batch_size=req.batch_size, device=ctx.device)
    size = Image.open(ctx.files[0]).size[0]
    key = stable_hash({"dataset": src.dataset.id, "size": size, "n": req.reference_n, "seed": req.seed,  # type: ignore[union-attr]
                       "clip": ident})
    ref = _cached(evals_dir(src.root) / "reference" / "features" / f"cmmd-{key}.npy",
                  lambda: clip_embeddings(spec, ref_files, batch_size=req.batch_size, device=ctx.device)[0])
    value = cmmd(gen, ref)
    row = {**ctx.base, "metric": "CMMD", "value": value, "implementation": "imagegen unbiased MMD^2, Gaussian RBF "
           f"sigma={SIGMA} on L2-normalised CLIP image embeddings, x{SCALE:g} (Jayasumana et al. 2024)",
           "estimator": "unbiased", "clip": json.dumps(ident, default=str), "n_generated": len(gen),
           "n_reference": len(ref), "reference_dataset": src.dataset.id,  # type: ignore[union-attr]
           **interval_columns(gen, ref, req, kind="metric", metric=lambda g, r: cmmd(g, r), value=value),
           **flag_columns("mmd", len(gen), len(ref))}
    return [row], {}


def inception_score_rows(src: Source, req: EvalRequest, ctx: MetricContext) -> Computed:
    from imagegen.evaluate.fid import _offline, check_inception_weights
    from imagegen.evaluate.inception_score import inception_score, inception_score_from_logits

    if req.fid_mode == "legacy_pytorch":
        return [], {"inception_score": "Inception Score uses the TF-Inception weights of fid_mode 'clean' or "
                                       "'legacy_tensorflow'; legacy_pytorch's network has no 1008-way output"}
    try:
        check_inception_weights(req.fid_mode, download=not _offline())
    except (FileNotFoundError, OSError, ValueError) as e:
        return [], {"inception_score": f"the Inception weights are not present: {e}"}
    splits = min(req.is_splits, len(ctx.files))
    out = inception_score(ctx.files, mode=req.fid_mode, splits=splits, batch_size=req.batch_size, num_workers=0,
                          device=ctx.device)
    logits = out["logits"]
    row = {**ctx.base, "metric": "IS", "value": out["mean"], "std": out["std"], "splits": splits,
           "implementation": "clean-fid TF-Inception unbiased logits, 10-split IS (Salimans et al. 2016)",
           "mode": req.fid_mode, "extractor_weights": json.dumps(out["weights"], default=str),
           "n_generated": out["n"],
           **interval_columns(logits, None, req, kind="metric", value=out["mean"],
                              metric=lambda g, _: inception_score_from_logits(g, splits)[0]),
           **flag_columns("is", out["n"], splits=req.is_splits)}
    return [row], {}


def prompt_set(src: Source, req: EvalRequest) -> str:
    """The name of the prompts the evaluated images come from (every reward row names it)."""
    if src.run is not None:
        ds = src.dataset.id if src.dataset is not None else None
        return f"captions of dataset {ds} drawn with seed {req.seed} (n={req.n_samples})"
    return f"captions.jsonl of folder {req.folder}"


def _scorer(spec: Any, device: str, batch_size: int) -> Any:
    from imagegen.evaluate import rewards as R

    if spec.kind == "aesthetic":
        if not spec.clip:
            raise ValueError("reward model 'aesthetic' needs clip= (published: ViT-L-14:openai)")
        return R.AestheticScorer(spec.clip, spec.path, device=device, batch_size=batch_size)
    if spec.kind == "hpsv2":
        return R.HPSv2Scorer(spec.clip or spec.path, device=device, batch_size=batch_size)
    if spec.kind == "pickscore":
        return R.PickScoreScorer(spec.path, spec.processor, device=device, batch_size=batch_size)
    return R.ImageRewardScorer(spec.path, device=device, batch_size=batch_size)


def reward_rows(src: Source, req: EvalRequest, ctx: MetricContext) -> Computed:
    from imagegen.evaluate.rewards import reward_scores

    rows, skipped = [], {}
    have_prompts = all(c is not None for c in ctx.captions)
    pset = prompt_set(src, req)
    for spec in req.reward_models:
        if spec.kind != "aesthetic" and not have_prompts:
            skipped[f"reward:{spec.kind}"] = f"{spec.kind} scores image-prompt pairs; the images have no captions"
            continue
        scorer = _scorer(spec, ctx.device, req.batch_size)
        prompts = [str(c) for c in ctx.captions] if spec.kind != "aesthetic" else None
        got = reward_scores(scorer, ctx.files, prompts, pset, n_resamples=max(req.n_resamples, 2), seed=req.seed)
        rows.append({**ctx.base, "metric": f"Reward {scorer.name}", "value": got["mean"],
                     "implementation": f"imagegen {type(scorer).__name__}", "model": json.dumps(got["model"], default=str),
                     "prompt_set": pset, "prompts_sha256": got["prompts_sha256"], "n_generated": got["n"],
                     **interval_columns(got["scores"], None, req, kind="mean"), **no_flags()})
    if not rows and skipped:
        skipped = {"reward": "; ".join(skipped.values())}
    return rows, skipped


def dpg_rows(src: Source, req: EvalRequest, ctx: MetricContext) -> Computed:
    from imagegen.evaluate.vqa import TransformersVQA, dpg_score, read_dpg_questions

    prompts = read_dpg_questions(str(req.dpg_questions))
    if req.dpg_max_prompts is not None:
        prompts = dict(list(prompts.items())[:req.dpg_max_prompts])
    images: dict[str, list[Image.Image]] = {}
    if src.run is not None:
        if src.train_cfg.model.get("conditioning") != "text":
            return [], {"dpg": f"DPG-Bench prompts are text; run {src.run.id} is "
                               f"{src.train_cfg.model.get('conditioning')}-conditioned"}
        images = _generate_dpg(src, req, ctx, prompts)
    else:
        folder = Path(str(req.folder))
        for item in prompts:
            files = sorted(folder.glob(f"{item}.png")) + sorted(folder.glob(f"{item}_*.png"))
            if files:
                images[item] = [Image.open(f).convert("RGB") for f in files]
        missing = [k for k in prompts if k not in images]
        if missing:
            return [], {"dpg": f"the folder has no image for {len(missing)} DPG-Bench prompt(s) "
                               f"(<item_id>.png or <item_id>_<k>.png; first: {missing[:3]})"}
    vqa = TransformersVQA(str(req.vqa_model), mode=req.vqa_mode, device=ctx.device)
    out = dpg_score(prompts, images, vqa, model_name=vqa.name)
    per_prompt = 100.0 * np.asarray(list(out["per_prompt"].values()), dtype=np.float64)
    row = {**ctx.base, "metric": "DPG-Bench", "value": out["value"], "implementation": "imagegen DPG-Bench rules "
           "(Hu et al. 2024)", "vqa_model": json.dumps(vqa.identity, default=str), "note": out["note"],
           "comparable_with_published": out["comparable_with_published"], "prompts": str(req.dpg_questions),
           "n_prompts": out["n_prompts"], "per_prompt": req.dpg_per_prompt,
           **interval_columns(per_prompt, None, req, kind="mean"), **no_flags()}
    return [row], {}


def _generate_dpg(src: Source, req: EvalRequest, ctx: MetricContext, prompts: dict[str, Any]) -> dict[str, list]:
    import torch

    from imagegen.evaluate.run import image_noise

    fam = src.load(ctx.device)
    shape, size = src.sampling(fam)
    out = ctx.out / "dpg"
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for p, (item, pr) in enumerate(prompts.items()):
        n = req.dpg_per_prompt
        files = [out / f"{item}_{k}.png" for k in range(n)]
        if not all(f.is_file() for f in files):
            idx = [p * 1000 + k for k in range(n)]
            res = fam.sample(n, conditioning=[pr.text] * n, sampler=req.sampler, steps=req.steps,
                             guidance=req.guidance, x_T=image_noise(req.seed, idx, shape).to(ctx.device), **size,
                             generator=torch.Generator(device=ctx.device).manual_seed(req.seed + p))
            u8 = ((res.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for f, a in zip(files, u8):
                Image.fromarray(a).save(f)
        images[item] = [Image.open(f).convert("RGB") for f in files]
    return images

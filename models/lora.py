"""LoRA adapters (Hu et al. 2022) on the project's own networks, through ``peft``.

``add_lora(family, rank)`` injects peft LoRA layers into the family's denoiser (``family.net``)
and freezes everything else, so the default ``optimizers_spec`` (every trainable parameter)
trains only the adapters and the generic trainer needs nothing new.  Adapters are saved in
peft's own layout, a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` whose
keys are ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (what
``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` / diffusers'
``load_lora_adapter`` read), and loaded back onto a fresh family with ``load_lora``.
``merge_lora`` folds W + (alpha / r) B A into the base weights (no extra cost at sampling);
``unmerge_lora`` subtracts it again.

Default targets: every attention projection (qkv / q / kv / proj) and MLP linear of the U-Net and
DiT, the DiT's AdaLN modulation linears and the U-Net's timestep projections (``emb_proj``);
``targets="all"`` adds the U-Net's convolutions (far more capacity, far more parameters on a
narrow net); any other value is peft's ``target_modules`` (module-name suffixes or a regex).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("qkv", "q", "kv", "proj", "fc1", "fc2", "adaLN.1", "emb_proj")
CONV_TARGETS = ("conv1", "conv2", "conv_in", "conv_out")  # added by targets="all" (U-Net convolutions)


class LoraError(ValueError):
    """An adapter that cannot be added, saved or loaded as asked (says why)."""


def _net(family: Any) -> nn.Module:
    net = getattr(family, "net", None)
    if not isinstance(net, nn.Module):
        raise LoraError(f"{type(family).__name__}: LoRA needs a family with a denoiser `net`")
    return net


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def add_lora(family: Any, rank: int = 4, alpha: float | None = None, targets: Sequence[str] | str | None = None,
             dropout: float = 0.0) -> list[nn.Parameter]:
    """Inject LoRA of ``rank`` (scale alpha / rank, alpha defaults to rank) into ``family.net``;
    freeze every other parameter of the family.  Returns the adapter parameters (B starts at 0,
    so the family is unchanged until it trains)."""
    from peft import LoraConfig, inject_adapter_in_model

    net = _net(family)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"add_lora: rank must be a positive int, got {rank!r}")
    if lora_layers(net):
        raise LoraError(f"{type(family).__name__}: its net already has LoRA layers")
    tm: Any = list(targets) if targets is not None and not isinstance(targets, str) else targets
    if tm is None:
        tm = "default"
    if tm in ("default", "all"):
        wanted = DEFAULT_TARGETS + (CONV_TARGETS if tm == "all" else ())
        names = {n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        tm = sorted({t for t in wanted if any(n == t or n.endswith("." + t) for n in names)})
    cfg = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=tm,
                     lora_dropout=dropout, bias="none")
    family.requires_grad_(False)
    try:
        inject_adapter_in_model(cfg, net)
    except ValueError as exc:
        raise LoraError(f"{type(family).__name__}: peft found no module to adapt for targets {tm!r} ({exc})") from None
    object.__setattr__(net, "_lora_config", cfg)
    params = [p for n, p in net.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_state_dict(family: Any) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's saved names (``base_model.model.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    net = _net(family)
    if not lora_layers(net):
        raise LoraError(f"{type(family).__name__}: its net has no LoRA layers (add_lora first)")
    sd = get_peft_model_state_dict(net)
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in sd.items()}


def save_lora(family: Any, folder: str | Path) -> Path:
    """Write the adapter as peft does: adapter_config.json + adapter_model.safetensors."""
    net = _net(family)
    cfg = getattr(net, "_lora_config", None)
    if cfg is None:
        raise LoraError(f"{type(family).__name__}: its net has no LoRA layers (add_lora first)")
    if any(getattr(m, "merged", False) for m in lora_layers(net)):
        raise LoraError("save_lora: the adapter is merged into the weights; unmerge_lora first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    d["target_modules"] = sorted(d["target_modules"]) if isinstance(d.get("target_modules"), (set, list)) \
        else d.get("target_modules")
    d["peft_type"] = "LORA"
    d["base_model_name_or_path"] = f"imagegen:{family.name}"
    (folder / ADAPTER_CONFIG).write_text(json.dumps(d, indent=1, sort_keys=True, default=str))
    save_file(lora_state_dict(family), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return folder


def load_lora(family: Any, folder: str | Path) -> list[nn.Parameter]:
    """Add the adapter saved in ``folder`` (peft layout) to ``family``'s net; every tensor must match."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    cf, wf = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cf.is_file() or not wf.is_file():
        raise LoraError(f"load_lora: {folder} is not a peft adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    conf = json.loads(cf.read_text())
    if conf.get("peft_type") != "LORA":
        raise LoraError(f"load_lora: {cf} holds a {conf.get('peft_type')!r} adapter, not LORA")
    params = add_lora(family, int(conf["r"]), float(conf["lora_alpha"]), conf["target_modules"],
                      float(conf.get("lora_dropout", 0.0)))
    tensors = load_file(str(wf))
    sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
    own = {k for k in _net(family).state_dict() if "lora_" in k}
    want = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            for k in sd}
    if want != own:
        missing, extra = sorted(own - want)[:3], sorted(want - own)[:3]
        raise LoraError(f"load_lora: the adapter in {folder} does not fit {type(family).__name__}'s net "
                        f"(missing e.g. {missing}, unexpected e.g. {extra})")
    for k, v in _net(family).state_dict().items():
        if k in want:
            src = sd[k.replace(".default.weight", ".weight")]
            if src.shape != v.shape:
                raise LoraError(f"load_lora: {k} has shape {tuple(src.shape)} in {folder}, the net has {tuple(v.shape)}")
    set_peft_model_state_dict(_net(family), sd)
    return params


def merge_lora(family: Any) -> None:
    """Fold every adapter into its base weight (W <- W + scale B A)."""
    layers = lora_layers(_net(family))
    if not layers:
        raise LoraError(f"{type(family).__name__}: its net has no LoRA layers")
    for m in layers:
        if not m.merged:
            m.merge()


def unmerge_lora(family: Any) -> None:
    """Undo merge_lora (W <- W - scale B A)."""
    for m in lora_layers(_net(family)):
        if m.merged:
            m.unmerge()


def trainable_fraction(family: Any) -> float:
    """Trainable / all parameters of the family (the LoRA budget)."""
    total = sum(p.numel() for p in family.parameters())
    return sum(p.numel() for p in family.parameters() if p.requires_grad) / max(total, 1)

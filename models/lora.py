"""LoRA adapters (Hu et al. 2022) on the project's own networks, through ``peft``.

``add_lora(family, rank)`` injects peft LoRA layers into the family's denoiser (``family.net``)
and freezes everything else, so the default ``optimizers_spec`` (every trainable parameter)
trains only the adapters and the generic trainer needs nothing new.  Adapters are saved in
peft's own layout, a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` whose
keys are ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (what
``PeftModel.save_pretrained`` writes and ``PeftModel.from_pretrained`` / diffusers'
``load_lora_adapter`` read), and loaded back onto a fresh family with ``load_lora``.
``merge_lora`` folds W + (alpha / r) B A into the base weights (no extra cost at sampling);
``unmerge_lora`` subtracts it again.  Several adapters go on one net under their own names
(``adapter_name``); ``apply_loras(family, [(source, scale), ...])`` loads them and merges
W + sum_i scale_i (alpha_i / r_i) B_i A_i, from adapter folders or in-memory ``LoraSource``s (a
personalize run's adapter); ``check_lora_fits`` names the first tensor whose shape does not fit a
net's weights, from the shapes alone (before any model is built).

Default targets: every attention projection (qkv / q / kv / proj) and MLP linear of the U-Net and
DiT, the DiT's AdaLN modulation linears and the U-Net's timestep projections (``emb_proj``);
``targets="all"`` adds the U-Net's convolutions (far more capacity, far more parameters on a
narrow net); any other value is peft's ``target_modules`` (module-name suffixes or a regex).
"""

from __future__ import annotations

import json
import warnings
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


def adapter_names(module: nn.Module) -> list[str]:
    """The names of the LoRA adapters injected into ``module`` (in injection order)."""
    names: dict[str, None] = {}
    for m in lora_layers(module):
        names.update(dict.fromkeys(m.lora_A.keys()))
    return list(names)


def add_lora(family: Any, rank: int = 4, alpha: float | None = None, targets: Sequence[str] | str | None = None,
             dropout: float = 0.0, adapter_name: str = "default") -> list[nn.Parameter]:
    """Inject LoRA of ``rank`` (scale alpha / rank, alpha defaults to rank) into ``family.net``;
    freeze every other parameter of the family.  Returns the adapter parameters (B starts at 0,
    so the family is unchanged until it trains).  A second adapter goes in under another
    ``adapter_name`` (for sampling with several: :func:`apply_loras`)."""
    from peft import LoraConfig, inject_adapter_in_model

    net = _net(family)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"add_lora: rank must be a positive int, got {rank!r}")
    have = adapter_names(net)
    if have and (adapter_name == "default" or adapter_name in have):
        raise LoraError(f"{type(family).__name__}: its net already has LoRA layers ({have}); add another adapter "
                        "under a new adapter_name")
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
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: as meant
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(cfg, net, adapter_name=adapter_name)
    except ValueError as exc:
        raise LoraError(f"{type(family).__name__}: peft found no module to adapt for targets {tm!r} ({exc})") from None
    if adapter_name == "default":
        object.__setattr__(net, "_lora_config", cfg)
    params = [p for n, p in net.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
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


class LoraSource:
    """An adapter to load: rank, alpha, targets (peft's ``target_modules``, or "default" / "all")
    and its tensors keyed ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` relative to the
    net; ``where`` names it in errors."""

    def __init__(self, rank: int, alpha: float, targets: Any, tensors: dict[str, torch.Tensor], where: str,
                 dropout: float = 0.0) -> None:
        self.rank, self.alpha, self.targets, self.dropout = int(rank), float(alpha), targets, float(dropout)
        self.tensors, self.where = tensors, where

    @classmethod
    def from_folder(cls, folder: str | Path) -> "LoraSource":
        """A peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
        folder = Path(folder)
        cf, wf = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
        if not cf.is_file() or not wf.is_file():
            raise LoraError(f"load_lora: {folder} is not a peft adapter folder (needs {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS})")
        conf = json.loads(cf.read_text())
        if conf.get("peft_type") != "LORA":
            raise LoraError(f"load_lora: {cf} holds a {conf.get('peft_type')!r} adapter, not LORA")
        tensors = load_file(str(wf))
        sd = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
        return cls(int(conf["r"]), float(conf["lora_alpha"]), conf["target_modules"], sd, str(folder),
                   float(conf.get("lora_dropout", 0.0)))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str, rank: int, alpha: float, targets: Any,
                   where: str, adapter_name: str = "default") -> "LoraSource":
        """The adapter ``adapter_name`` inside a state dict whose net keys start with ``prefix``
        (a personalize run's checkpoint: ``inner.net.``)."""
        tag = f".{adapter_name}.weight"
        sd = {k[len(prefix):].replace(tag, ".weight"): v for k, v in state.items()
              if k.startswith(prefix) and ".lora_" in k and k.endswith(tag)}
        if not sd:
            raise LoraError(f"{where} holds no LoRA adapter (no {prefix}*.lora_A{tag} tensors)")
        return cls(rank, alpha, targets, sd, where)

    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.tensors})


def check_lora_fits(source: LoraSource, weights: dict[str, tuple[int, ...]], what: str) -> None:
    """Refuse an adapter whose modules are absent from, or whose shapes do not fit, a net whose
    weights have ``weights`` = {module name: weight shape} (e.g. read from a checkpoint's header)."""
    missing = [m for m in source.modules() if m not in weights]
    if missing:
        raise LoraError(f"the LoRA adapter {source.where} adapts {len(missing)} module(s) {what} does not have, "
                        f"e.g. {missing[:3]} (an adapter for another base model)")
    bad = []
    for key, t in sorted(source.tensors.items()):
        mod, part = key.rsplit(".lora_", 1)
        w = weights[mod]
        if part.startswith("A"):
            want = (source.rank, w[1], *w[2:]) if len(w) == 4 else (source.rank, w[1])
        else:
            want = (w[0], source.rank, 1, 1) if len(w) == 4 else (w[0], source.rank)
        if tuple(t.shape) != tuple(want):
            bad.append(f"{key} is {list(t.shape)} in the adapter but {what} needs {list(want)} (weight {list(w)})")
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise LoraError(f"the LoRA adapter {source.where} does not fit {what}: shape mismatch: {bad[0]}{more}; it was "
                        "trained for another base model")


def load_lora(family: Any, folder: str | Path | LoraSource, adapter_name: str = "default") -> list[nn.Parameter]:
    """Add the adapter saved in ``folder`` (peft layout, or a :class:`LoraSource`) to ``family``'s
    net under ``adapter_name``; every tensor must match."""
    from peft import set_peft_model_state_dict

    src = folder if isinstance(folder, LoraSource) else LoraSource.from_folder(folder)
    params = add_lora(family, src.rank, src.alpha, src.targets, src.dropout, adapter_name=adapter_name)
    sd = src.tensors
    tag = f".{adapter_name}.weight"
    own = {k for k in _net(family).state_dict() if "lora_" in k and k.endswith(tag)}
    want = {k.replace(".lora_A.weight", f".lora_A{tag}").replace(".lora_B.weight", f".lora_B{tag}") for k in sd}
    if want != own:
        missing, extra = sorted(own - want)[:3], sorted(want - own)[:3]
        raise LoraError(f"load_lora: the adapter in {src.where} does not fit {type(family).__name__}'s net "
                        f"(missing e.g. {missing}, unexpected e.g. {extra})")
    for k, v in _net(family).state_dict().items():
        if k in want:
            t = sd[k.replace(tag, ".weight")]
            if t.shape != v.shape:
                raise LoraError(f"load_lora: {k} has shape {tuple(t.shape)} in {src.where}, the net has {tuple(v.shape)}")
    set_peft_model_state_dict(_net(family), sd, adapter_name=adapter_name)
    return params


def apply_loras(family: Any, adapters: Sequence[tuple[str | Path | LoraSource, float]]) -> list[str]:
    """Load every (adapter, scale) onto ``family``'s net (as ``lora0``, ``lora1``, ...) and merge
    them all: W <- W + sum_i scale_i (alpha_i / r_i) B_i A_i.  Returns the adapter names."""
    net = _net(family)
    names = []
    for i, (src, scale) in enumerate(adapters):
        name = f"lora{i}"
        load_lora(family, src, adapter_name=name)
        for layer in lora_layers(net):
            layer.set_scale(name, float(scale))
        names.append(name)
    for m in lora_layers(net):
        mine = [n for n in names if n in m.lora_A]
        if mine:
            m.merge(adapter_names=mine)
    return names


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

"""Name -> family class.  Adding a family = one file defining it + one register_family line here
(or, outside this package, one ``register_family(MyFamily)`` call in the user's own module)."""

from __future__ import annotations

from models.base import Family, FamilyConfig

FAMILIES: dict[str, type[Family]] = {}


class UnknownFamilyError(KeyError, ValueError):
    """No family is registered under that name (str() is the plain message, not KeyError's repr)."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_family(cls: type[Family]) -> type[Family]:
    """Register a Family subclass under ``cls.name`` (usable as a decorator); checks its class
    attributes so a broken family fails here, not halfway through a training run."""
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise TypeError(f"register_family: expected a subclass of models.base.Family, got {cls!r}")
    where = f"register_family({cls.__name__})"
    if not isinstance(cls.name, str) or not cls.name.strip():
        raise ValueError(f"{where}: set the class attribute `name` (a non-empty string)")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, FamilyConfig)):
        raise ValueError(f"{where}: `Config` must be a subclass of FamilyConfig")
    if not cls.samplers or cls.default_sampler not in cls.samplers:
        raise ValueError(f"{where}: `samplers` must be non-empty and contain default_sampler "
                         f"{cls.default_sampler!r}, got {cls.samplers}")
    unknown = set(cls.sampler_options) - set(cls.samplers)
    if unknown:
        raise ValueError(f"{where}: sampler_options names unknown samplers {sorted(unknown)}")
    if not isinstance(cls.default_steps, int) or cls.default_steps < 1:
        raise ValueError(f"{where}: default_steps must be a positive int, got {cls.default_steps!r}")
    if not cls.conditioning or not set(cls.conditioning) <= {"none", "class", "text"}:
        raise ValueError(f"{where}: conditioning must be a non-empty subset of none/class/text, "
                         f"got {set(cls.conditioning)}")
    old = FAMILIES.get(cls.name)
    if old is not None and old is not cls:
        raise ValueError(f"{where}: name {cls.name!r} is already taken by {old.__module__}.{old.__name__}")
    FAMILIES[cls.name] = cls
    return cls


def get_family(name: str) -> type[Family]:
    """A registered family by name, or ``"package.module:ClassName"``: the module is imported and
    the class registered (under its ``name`` and under this string).  That is how a user family
    outside this package reaches every process of a run, torchrun ranks included."""
    if name not in FAMILIES and isinstance(name, str) and ":" in name:
        return _import_family(name)
    if name not in FAMILIES:
        raise UnknownFamilyError(f"unknown model family {name!r}; registered: {sorted(FAMILIES)} "
                                 "(or give 'package.module:ClassName')")
    return FAMILIES[name]


def _import_family(ref: str) -> type[Family]:
    import importlib

    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownFamilyError(f"family {ref!r}: cannot import module {module_name!r} ({exc})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise UnknownFamilyError(f"family {ref!r}: module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise UnknownFamilyError(f"family {ref!r}: {module_name}.{attr} is {type(cls).__name__} {cls!r}, "
                                 "not a subclass of models.base.Family")
    register_family(cls)  # checks its class attributes; no-op if the module registered it
    FAMILIES[ref] = cls
    return cls


def build_family(name: str, cfg: FamilyConfig | dict) -> Family:
    """get_family(name)(cfg): what a trainer config {"family": ..., "model": {...}} turns into."""
    return get_family(name)(cfg)


# Built-in families: one line each.
from models.ddpm import DDPM  # noqa: E402
from models.edm import EDM  # noqa: E402
from models.flow import FlowMatching  # noqa: E402

register_family(DDPM)
register_family(EDM)
register_family(FlowMatching)
from models.consistency import ConsistencyDistillation  # noqa: E402
from models.progressive import ProgressiveDistillation  # noqa: E402
from models.reflow import Reflow  # noqa: E402

register_family(ProgressiveDistillation)
register_family(Reflow)
register_family(ConsistencyDistillation)
from models.vae import VAE, KLAutoencoder  # noqa: E402

register_family(VAE)
register_family(KLAutoencoder)
from models.gan import GAN  # noqa: E402

register_family(GAN)
from models.vq import VQTokenizer  # noqa: E402

register_family(VQTokenizer)
from models.maskgit import MaskGIT  # noqa: E402

register_family(MaskGIT)
from models.vqgan import VQGAN  # noqa: E402

register_family(VQGAN)
from models.ar import AutoregressiveTransformer  # noqa: E402

register_family(AutoregressiveTransformer)
from models.msvq import MultiScaleVQ  # noqa: E402
from models.var import VAR  # noqa: E402

register_family(MultiScaleVQ)
register_family(VAR)
from models.dmd import DMD  # noqa: E402
from models.ict import ConsistencyTraining  # noqa: E402

register_family(ConsistencyTraining)
register_family(DMD)
from models.controlnet import ControlNet  # noqa: E402

register_family(ControlNet)
from models.inpainting import Inpainting  # noqa: E402

register_family(Inpainting)
from models.personalize import Personalize  # noqa: E402

register_family(Personalize)


def describe_families() -> list[dict[str, object]]:
    """One record per registered family (built-ins and user families registered so far): name,
    module, a one-line summary, samplers, default sampler and steps, conditioning, and the teacher
    families a distillation family accepts."""
    import re
    import sys

    from models.teacher import TEACHERS

    out: list[dict[str, object]] = []
    for name, cls in FAMILIES.items():
        if name != cls.name:
            continue  # a "package.module:Class" alias of a family listed under its own name
        doc = cls.__doc__ or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        summary = re.split(r" \(|: ", first, maxsplit=1)[0].rstrip(".")
        out.append({"name": name, "module": cls.__module__, "summary": summary, "samplers": list(cls.samplers),
                    "default_sampler": cls.default_sampler, "default_steps": cls.default_steps,
                    "conditioning": sorted(cls.conditioning), "teachers": list(TEACHERS.get(name, ()))})
    return out


def family_lines() -> list[str]:
    """``describe_families`` as one line per family (``imagegen families``, ``imagegen train --help``)."""
    lines = []
    for f in describe_families():
        teacher = f"; teacher {' or '.join(f['teachers'])}" if f["teachers"] else ""  # type: ignore[arg-type]
        steps = int(f["default_steps"])  # type: ignore[call-overload]
        lines.append(f"{f['name']:15} {f['summary']} - samplers {', '.join(f['samplers'])} "  # type: ignore[arg-type]
                     f"(default {f['default_sampler']}, {steps} step{'' if steps == 1 else 's'}); "
                     f"conditioning {'/'.join(f['conditioning'])}{teacher}")  # type: ignore[arg-type]
    return lines
from models.diffusers_lora import DiffusersLora  # noqa: E402

register_family(DiffusersLora)
from models.lcm_lora import LcmLora  # noqa: E402

register_family(LcmLora)

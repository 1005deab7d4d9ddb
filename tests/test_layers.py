"""The import layers (docs/DESIGN.md, "Layers"): models/ and imagegen/ never import flows/, tasks/ or
prefect, except the Prefect-facing modules; models/ does not reach back into imagegen.train; the
``--no-prefect`` paths run without Prefect.  Checked in fresh interpreters (a test process has
imported everything already)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WRAPPERS = ("flows", "tasks", "prefect")
# Prefect-facing modules of the library: `imagegen serve` drives a Prefect server and worker
PREFECT_FACING = {"imagegen/serve.py"}
# the CLI dispatches to a flow only on its Prefect branch, inside the command functions
LAZY_FLOW_DISPATCH = {"imagegen/cli.py"}


def _library_files() -> list[Path]:
    return sorted(p for top in ("imagegen", "models") for p in (REPO / top).rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import statement."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                out.append((child.module, top))
            visit(child, inner)

    visit(tree, True)
    return out


def test_library_source_never_imports_the_wrapper_layer():
    bad = []
    for path in _library_files():
        rel = path.relative_to(REPO).as_posix()
        if rel in PREFECT_FACING:
            continue
        for module, top in _imports(ast.parse(path.read_text(), rel)):
            if module.split(".")[0] not in WRAPPERS:
                continue
            if rel in LAZY_FLOW_DISPATCH and not top and module.startswith("flows.") and module.count(".") == 1:
                continue  # `from flows.x import x_flow` on the CLI's Prefect branch
            bad.append(f"{rel}: import {module}")
    assert not bad, "the library imports the wrapper layer:\n" + "\n".join(bad)


# the library modules models/ may import: leaf utilities that import nothing above them
MODELS_MAY_IMPORT = {"imagegen.hashing", "imagegen.checks", "imagegen.clip", "imagegen.perceptual", "imagegen.world.scene",
                     "imagegen.world.detector"}


def test_models_import_only_the_library_leaf_utilities():
    bad = []
    for path in sorted((REPO / "models").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        for module, _ in _imports(ast.parse(path.read_text(), rel)):
            if module.split(".")[0] == "imagegen" and module not in MODELS_MAY_IMPORT:
                bad.append(f"{rel}: import {module}")
    assert not bad, "models/ reaches above the library's leaf utilities:\n" + "\n".join(bad)


def _fresh(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_BLOCK_WRAPPERS = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('prefect', 'flows', 'tasks'):
            raise ImportError(f'the --no-prefect path imported {name}')
        return None
sys.meta_path.insert(0, Block())
"""


@pytest.fixture(scope="module")
def no_wrappers(tmp_path_factory) -> dict:
    """One fresh interpreter with prefect, flows and tasks unimportable: it imports every library
    module, then runs the parameter checks of every command that runs work (refused, exit 2)."""
    names = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in _library_files()]
    names = [n.removesuffix(".__init__") for n in names if n != "imagegen.serve" and not n.endswith("__main__")]
    root = str(tmp_path_factory.mktemp("no-wrappers"))
    return _fresh(_BLOCK_WRAPPERS + f"""
import importlib
import models.registry, models.checkpoint, models.teacher, models.base
first = sorted(m for m in sys.modules if m.startswith('imagegen.train'))
import imagegen.train
lazy = sorted(m for m in sys.modules if m.startswith('imagegen.train'))
from imagegen.train import EMA
layers = {{"models": first, "package": lazy, "ema": EMA.__module__}}
from imagegen.cli import main
failed = {{}}
for name in {names!r}:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        failed[name] = str(exc)
root = {root!r}
codes = [main(['curate', '--no-prefect', '--set', 'download.timeout=-1', '--data-root', root]),
         main(['train', '--no-prefect', '--dataset', 'no-such', '--data-root', root]),
         main(['distill', '--no-prefect', '--teacher', 'no-such', '--method', 'reflow', '--data-root', root]),
         main(['evaluate', '--no-prefect', '--run', 'no-such', '--data-root', root]),
         main(['benchmark', '--no-prefect', '--runs', 'no-such', '--data-root', root])]
print(json.dumps({{"failed": failed, "codes": codes, "layers": layers,
                  "wrappers": sorted(m for m in sys.modules if m.split('.')[0] in {WRAPPERS!r})}}))
""")


def test_importing_every_library_module_imports_no_wrapper(no_wrappers):
    assert no_wrappers["failed"] == {} and no_wrappers["wrappers"] == []


def test_models_do_not_import_the_trainer_package(no_wrappers):
    """models/ reads checkpoints itself (models.checkpoint.load_family); importing the models and
    their registry pulls in neither the trainer nor the run layer, and ``imagegen.train`` imports
    its submodules lazily.  (The fixture's interpreter checks this before importing anything else.)"""
    assert no_wrappers["layers"] == {"models": [], "package": ["imagegen.train"], "ema": "imagegen.train.ema"}


def test_refused_commands_need_no_prefect(no_wrappers):
    """Parameter checks of every command that runs work happen before (and without) Prefect."""
    assert no_wrappers["codes"] == [2, 2, 2, 2, 2]


@pytest.mark.slow
def test_curate_no_prefect_never_imports_prefect(tmp_path):
    """A whole (small) ``imagegen curate --no-prefect`` with prefect, flows and tasks unimportable."""
    out = _fresh(_BLOCK_WRAPPERS + f"""
from imagegen.cli import main
code = main(['curate', '--no-prefect', '--json', '--data-root', {str(tmp_path)!r},
             '--set', 'source.publish.n_images=40', '--set', 'reference_clip.n_train=64',
             '--set', 'reference_clip.n_heldout=20', '--set', 'reference_clip.steps=2',
             '--set', 'reference_clip.warmup_steps=0', '--set', 'download.processes_count=1',
             '--set', 'download.thread_count=4', '--set', 'filter.clip_score=null'])
print(json.dumps({{"code": code, "prefect": [m for m in sys.modules if m.split('.')[0] == 'prefect']}}))
""")
    assert out == {"code": 0, "prefect": []}


def test_the_command_line_parser_imports_no_torch():
    """``imagegen --help`` and a refused ``--preset`` import neither torch nor the trainer: the parser
    reads the preset names from plain-data modules (imagegen.train.presets, imagegen.presets)."""
    out = _fresh("""
import contextlib, io, json, sys
import imagegen.cli
parser = imagegen.cli.build_parser()
err = io.StringIO()
with contextlib.redirect_stderr(err):
    try:
        parser.parse_args(['train', '--preset', 'nope'])
        code = 0
    except SystemExit as exc:
        code = exc.code
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'open_clip', 'prefect'))
print(json.dumps({"heavy": heavy, "code": code, "err": err.getvalue()}))
""")
    from imagegen.train.runs import TRAIN_PRESETS  # the run layer's presets are the ones the parser offers

    assert out["heavy"] == [] and out["code"] == 2
    assert "--preset: invalid choice: 'nope'" in out["err"]
    assert all(repr(name) in out["err"] for name in TRAIN_PRESETS), out["err"]


def test_curate_requests_and_the_curate_flow_module_import_no_torch(tmp_path):
    """A refused ``imagegen curate`` and the import a worker's curate flow run starts with
    (flows/curate.py) load neither torch nor open_clip: the curate config reads the reference CLIP's
    settings from imagegen.world.reference_clip_config; training it imports them only then."""
    out = _fresh(f"""
import contextlib, io, json, sys
from imagegen.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(['curate', '--no-prefect', '--set', 'download.timeout=-1', '--data-root', {str(tmp_path)!r}])
import flows.curate
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'open_clip'))
from imagegen.world.reference_clip_config import ReferenceClipConfig as Light
print(json.dumps({{"code": code, "err": err.getvalue(), "heavy": heavy,
                  "curate_field": flows.curate.C.CurateConfig.model_fields["reference_clip"].annotation is Light}}))
""")
    assert out["heavy"] == [], out["heavy"]
    assert out["code"] == 2 and "download.timeout" in out["err"], out["err"]
    assert out["curate_field"] is True
    from imagegen.world import reference_clip, reference_clip_config  # the trainer's class is the light one

    assert reference_clip.ReferenceClipConfig is reference_clip_config.ReferenceClipConfig


def test_flow_modules_import_no_torch():
    """What a worker's flow run starts with, importing its flow's module: no flow module (pipeline,
    train, distill, evaluate, benchmark, ... together) loads torch, open_clip or the model families.
    The requests in their signatures are plain pydantic (imagegen.train.config,
    imagegen.distill_config, imagegen.evaluate.request) and the tasks import the work only when
    they run.  (One interpreter imports them all: what all of them load together, each loads at most.)"""
    names = sorted(f"flows.{p.stem}" for p in (REPO / "flows").glob("*.py") if p.stem != "__init__")
    out = _fresh(f"""
import importlib, json, sys
for name in {names!r}:
    importlib.import_module(name)
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'open_clip', 'diffusers')
               or m.startswith('models.registry') or m == 'imagegen.world.reference_clip')
import flows.pipeline, flows.train, flows.distill, flows.evaluate
hints = {{
    "train": flows.train.train_flow.fn.__annotations__["request"],
    "distill": flows.distill.distill_flow.fn.__annotations__["request"],
    "evaluate": flows.evaluate.evaluate_flow.fn.__annotations__["request"],
}}
print(json.dumps({{"heavy": heavy, "loaded": [n for n in {names!r} if n in sys.modules], "hints": hints,
                  "schema": sorted(flows.pipeline.pipeline_flow.parameters.properties)}}))
""")
    assert out["heavy"] == [], out["heavy"]
    assert out["loaded"] == names and "flows.pipeline" in names and "flows.train" in names
    assert out["hints"] == {"train": "TrainRequest | None", "distill": "DistillRequest | None",
                            "evaluate": "EvalRequest | None"}
    assert {"preset", "request", "overrides", "data_root"} <= set(out["schema"])
    # the old import paths still give the same classes
    from imagegen import distill, distill_config
    from imagegen.evaluate import request, run
    from imagegen.train import config, runs, trainer
    import imagegen.train

    assert trainer.TrainConfig is runs.TrainConfig is config.TrainConfig is imagegen.train.TrainConfig
    assert runs.TrainRequest is config.TrainRequest and trainer.RESUMABLE_CHANGES is config.RESUMABLE_CHANGES
    assert distill.DistillRequest is distill_config.DistillRequest
    assert run.EvalRequest is request.EvalRequest and run.RewardModel is request.RewardModel
    assert run.EvalSummary is request.EvalSummary


def test_module_source_reads_what_inspect_would_without_importing():
    """imagegen.hashing.module_source: the text inspect.getsource gives once the module is imported
    (so ids hashing a heavy module's source are the same whether it was imported or not), read
    from the file before; unknown modules are an error naming them."""
    out = _fresh("""
import inspect, json, sys
from imagegen.hashing import module_source
before = module_source('imagegen.world.reference_clip')
imported_early = 'imagegen.world.reference_clip' in sys.modules or 'torch' in sys.modules
from imagegen.world.reference_clip_config import ReferenceClipConfig, reference_clip_id
from imagegen.world.scene import WorldConfig
light_id = reference_clip_id(WorldConfig(image_size=32), ReferenceClipConfig(n_train=64, steps=3, warmup_steps=0))
still_light = 'imagegen.world.reference_clip' not in sys.modules and 'open_clip' not in sys.modules
import imagegen.world.reference_clip as R
world, small = WorldConfig(image_size=32), dict(n_train=64, warmup_steps=0)
print(json.dumps({"same": inspect.getsource(R) == before, "early": imported_early, "light": still_light,
                  "ids": [light_id, R.reference_clip_id(world, ReferenceClipConfig(steps=3, **small))],
                  "other": R.reference_clip_id(world, ReferenceClipConfig(steps=4, **small))}))
""")
    assert out["same"] is True and out["early"] is False and out["light"] is True
    assert out["ids"][0] == out["ids"][1] != out["other"]
    from imagegen.hashing import module_source

    with pytest.raises(ModuleNotFoundError, match="imagegen.no_such_module"):
        module_source("imagegen.no_such_module")


@pytest.mark.slow
def test_a_curate_found_done_imports_no_torch(tiny_curate):
    """The session's tiny curate asked again (every stage found done) loads neither torch, open_clip
    nor the reference CLIP's trainer: the reference CLIP id reads the trainer's source
    (reference_clip_config.reference_clip_id) and the filter stage id reads the filter modules'
    sources (imagegen.filters.stage_identity), without importing them; the ids are the first run's."""
    from imagegen import faultinject as F

    root, first, _ = tiny_curate
    cmd = F.curate_cmd(root)
    out = _fresh(f"""
import contextlib, io, json, sys
from imagegen.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    code = main({cmd[cmd.index("curate"):]!r})
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'open_clip')
               or m in ('imagegen.world.reference_clip', 'imagegen.filters.aesthetic_mlp'))
print(json.dumps({{"code": code, "heavy": heavy, "result": json.loads(buf.getvalue().strip().splitlines()[-1])}}))
""")
    assert out["code"] == 0 and out["heavy"] == [], out["heavy"]
    assert out["result"]["stage_ids"] == first["stage_ids"] and out["result"]["path"] == first["path"]
    assert first["stage_ids"]["reference_clip"] and first["stage_ids"]["filter"]

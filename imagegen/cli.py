"""The ``imagegen`` command: one sub-command per flow, plus the dataset registry.

    imagegen curate --preset smoke [--set download.timeout=3 ...] [--json]
    imagegen datasets list | show NAME_OR_ID
    imagegen train --preset smoke [--dataset D] [--family F] [--steps N] [--nproc N] [--set train.lr=3e-4 ...]
    imagegen families
    imagegen runs list | show RUN_ID
    imagegen distill --teacher RUN [--method progressive|reflow|consistency] [--preset P] [--steps N] [--set target_steps=2 ...]
    imagegen distill --teacher diffusers:PATH --dataset D [--steps N] [--set lora_rank=64 ...]   # LCM-LoRA
    imagegen evaluate (--run RUN | --folder DIR) [--preset P] [--metrics fid,kid,clipscore,geneval] [--set steps=8 ...]
    imagegen benchmark [--runs A,B | --families flow,reflow] [--dataset D] [--nfe 1,2,4,8] [--set n_samples=5000 ...]
    imagegen pipeline --preset smoke|demo|gpu [--set train.family=ddpm --set distill.method=null ...]
    imagegen serve [--host 127.0.0.1] [--port 4200] [--home DIR] [--no-worker] [--api-url URL]
    imagegen import folder|webdataset|hf SOURCE [--name N] [--curate] [--image-column C ...] [--set shard.target_shard_size=500]
    imagegen import fid-stats FILE.npz --name N [--protocol TEXT]
    imagegen sample --run RUN --prompt TEXT [--prompts FILE] [--guidance G] [--steps N] [--n N] [--out DIR]

Every flow sub-command takes ``--preset``, ``--set key.path=value`` overrides (validated before
any work), ``--data-root`` (default ``$IMAGEGEN_DATA_ROOT`` or ``./imagegen-data``) and
``--json`` (a one-line JSON summary as the last line of stdout).  By default flows run through
Prefect (visible in the UI when ``PREFECT_API_URL`` points at a server); ``--no-prefect`` runs
the same plain functions directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be computed when help is shown (``lazy_epilog``): the
    family list of ``imagegen train --help`` imports the model registry only then."""

    def __init__(self, *args: Any, lazy_epilog: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_epilog = lazy_epilog

    def format_help(self) -> str:
        if self.lazy_epilog is not None and self.epilog is None:
            self.epilog = self.lazy_epilog()
        return super().format_help()


def _families_epilog() -> str:
    from models.registry import family_lines

    return ("registered families (--family NAME, or 'package.module:ClassName' for your own; "
            "`imagegen families` lists them):\n  " + "\n  ".join(family_lines()))


def _common(p: argparse.ArgumentParser, presets: list[str], default: str,
            example: str = "download.timeout=3") -> None:
    p.add_argument("--preset", choices=presets, default=default, help=f"parameter preset (default {default})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a parameter, e.g. --set {example} (repeatable)")
    p.add_argument("--data-root", default=None, help="data root (default $IMAGEGEN_DATA_ROOT or ./imagegen-data)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last stdout line")
    p.add_argument("--no-prefect", action="store_true", help="run the plain functions without Prefect")


def build_parser() -> argparse.ArgumentParser:
    from imagegen.evaluate.metrics import ALL_METRICS, KNOWN_METRICS
    from imagegen.pipeline import DISTILL_PRESETS, EVAL_PRESETS
    from imagegen.presets import CURATE_PRESETS
    from imagegen.train.presets import TRAIN_PRESETS
    from models.teacher import METHODS

    parser = argparse.ArgumentParser(prog="imagegen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cur = sub.add_parser("curate", help="download -> dedup -> filter -> recaption -> shard into a dataset")
    _common(cur, sorted(CURATE_PRESETS), "smoke")
    cur.add_argument("--url-list", help="a LAION-style parquet/CSV/TSV/JSONL of url + caption "
                     "(instead of the embedded world)")
    cur.add_argument("--name", help="registry name of the dataset")
    cur.add_argument("--url-col", help="URL column name (default url)")
    cur.add_argument("--caption-col", help="caption column name (default caption)")
    cur.add_argument("--parent", help="make a new version NAME@<next> of this dataset (NAME, NAME@N or id): reuse "
                     "its parts, fetch again only the rows that failed for a transient reason (= --set parent=...)")
    cur.add_argument("--append-list", help="with --parent: a URL list whose rows are added to the new version")
    cur.add_argument("--runner", help="where the per-part map steps of curation run: local (default), local:N, dask, dask:N, dask://HOST:PORT, ray, ray:N, ray://HOST:PORT (= --set runner=... / curate.runner=...)")

    ds = sub.add_parser("datasets", help="list or show datasets in the registry")
    ds.add_argument("action", choices=["list", "show"])
    ds.add_argument("dataset", nargs="?", help="name or id (for show)")
    ds.add_argument("--data-root", default=None)
    ds.add_argument("--json", action="store_true")

    tr = sub.add_parser("train", help="train (or resume, or reuse) a model on a registered dataset",
                        lazy_epilog=_families_epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(tr, sorted(TRAIN_PRESETS), "smoke", example="train.lr=3e-4 --set train.model.net_size=B")
    tr.add_argument("--dataset", help="dataset name or id in the registry (= --set dataset=...)")
    tr.add_argument("--family", help="model family, e.g. flow, ddpm, edm (= --set train.family=...)")
    tr.add_argument("--steps", type=int, help="optimizer steps (= --set train.steps=...)")
    tr.add_argument("--nproc", type=int, help="processes (GPUs); >1 launches torchrun (= --set nproc=...)")

    fm = sub.add_parser("families", help="list the registered model families, one line each")
    fm.add_argument("--json", action="store_true", help="print them as one JSON line")

    rs = sub.add_parser("runs", help="list or show training runs")
    rs.add_argument("action", choices=["list", "show"])
    rs.add_argument("run", nargs="?", help="run id or unique id prefix (for show)")
    rs.add_argument("--data-root", default=None)
    rs.add_argument("--json", action="store_true")

    di = sub.add_parser("distill", help="distil a finished training run into a few-step student, with an NFE report")
    di.add_argument("--teacher", required=True, help="teacher: a finished training run id or unique prefix, or "
                    "diffusers:PATH_OR_REPO_ID[@REVISION] (method lcm_lora)")
    di.add_argument("--dataset", help="lcm_lora: the dataset of images and captions to distil on (= --set dataset=...)")
    di.add_argument("--method", choices=list(METHODS),
                    help="progressive (DDPM v-prediction teacher), reflow (flow teacher), consistency (EDM teacher), "
                    "dmd (flow teacher), ict (consistency training; the EDM run is data, network and reference); "
                    "default: the one the teacher's family fits")
    di.add_argument("--preset", choices=sorted(DISTILL_PRESETS), default=None,
                    help="the distillation settings of a pipeline preset (default: DistillRequest's defaults)")
    di.add_argument("--steps", type=int, help="training steps per student run (= --set steps=...)")
    di.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a request field, e.g. --set target_steps=2 --set report_nfe=[1,2,4] (repeatable)")
    di.add_argument("--data-root", default=None, help="data root (default $IMAGEGEN_DATA_ROOT or ./imagegen-data)")
    di.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last stdout line")
    di.add_argument("--no-prefect", action="store_true", help="run the plain functions without Prefect")

    ev = sub.add_parser("evaluate", help="FID/FD + KID, CLIPScore and GenEval of a run (sampled to disk first) "
                        "or of a folder of images")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a training or distillation run id (or unique prefix): its latest checkpoint")
    src.add_argument("--folder", help="a folder of images, evaluated as they are (FID/KID need --set reference=D)")
    src.add_argument("--model", help="a diffusers pipeline, diffusers:PATH_OR_REPO_ID[@REVISION] (needs --set reference=D)")
    ev.add_argument("--metrics", help=f"comma-separated subset of {','.join(KNOWN_METRICS)} "
                    f"(default: {','.join(ALL_METRICS)})")
    ev.add_argument("--preset", choices=sorted(EVAL_PRESETS), default=None,
                    help="the evaluation settings of a pipeline preset (default: EvalRequest's defaults)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="set a request field, e.g. --set steps=8 --set n_samples=5000 --set guidance=3 "
                    "--set geneval_prompts=evaluation_metadata.jsonl (repeatable)")
    ev.add_argument("--data-root", default=None, help="data root (default $IMAGEGEN_DATA_ROOT or ./imagegen-data)")
    ev.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last stdout line")
    ev.add_argument("--no-prefect", action="store_true", help="run the plain functions without Prefect")

    bm = sub.add_parser("benchmark", help="evaluate a set of runs with the same settings and write a leaderboard")
    bm.add_argument("--runs", help="comma-separated run ids or unique prefixes, or diffusers:... model specs "
                    "(else: a registry query)")
    bm.add_argument("--families", help="comma-separated families: every finished run of them (default: any)")
    bm.add_argument("--dataset", help="only runs trained on this dataset (name or id), students through "
                    "their teacher")
    bm.add_argument("--nfe", help="comma-separated step counts each run is evaluated at too, e.g. 1,2,4,8")
    bm.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="an evaluation setting for every run, e.g. --set n_samples=5000 --set steps=8 (repeatable)")
    bm.add_argument("--data-root", default=None, help="data root (default $IMAGEGEN_DATA_ROOT or ./imagegen-data)")
    bm.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last stdout line")
    bm.add_argument("--no-prefect", action="store_true", help="run the plain functions without Prefect")

    from imagegen.pipeline import PIPELINE_PRESETS

    pl = sub.add_parser("pipeline", help="curate -> train -> distill -> evaluate teacher and student, and a report")
    _common(pl, sorted(PIPELINE_PRESETS), "smoke")  # --set STAGE.KEY=VALUE, e.g. train.family=ddpm
    pl.add_argument("--runner", help="where the per-part map steps of curation run: local (default), local:N, dask, dask:N, dask://HOST:PORT, ray, ray:N, ray://HOST:PORT (= --set runner=... / curate.runner=...)")

    from imagegen.importers.cli import add_import_parser
    from imagegen.sample import add_sample_parser

    add_import_parser(sub)
    add_sample_parser(sub)
    from imagegen.compare import add_compare_parser

    add_compare_parser(sub)

    sv = sub.add_parser("serve", help="a local Prefect server (UI), the work pool, every deployment and a worker")
    sv.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1: loopback only)")
    sv.add_argument("--port", type=int, default=4200, help="server port (default 4200)")
    sv.add_argument("--home", default=None, help="PREFECT_HOME of the server, worker and flow runs: SQLite "
                    "database, logs, results (default <data root>/prefect)")
    sv.add_argument("--data-root", default=None, help="data root of the flow runs (default $IMAGEGEN_DATA_ROOT "
                    "or ./imagegen-data)")
    sv.add_argument("--no-worker", action="store_true", help="start no worker (run one elsewhere: "
                    "prefect worker start --pool imagegen-process)")
    sv.add_argument("--api-url", default=None, help="use the Prefect server at this API URL (e.g. "
                    "http://host:4200/api) instead of starting one: create the pool, deploy, start the worker")
    return parser


def _curate_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.url_list:
        extra += ["source.kind=url_list", f"source.url_list={Path(args.url_list).resolve()}"]
    if args.name:
        extra.append(f"name={args.name}")
    if args.url_col:
        extra.append(f"download.url_col={args.url_col}")
    if args.caption_col:
        extra.append(f"download.caption_col={args.caption_col}")
    if getattr(args, "runner", None):
        extra.append(f"runner={args.runner}")
    if getattr(args, "parent", None):
        extra.append(f"parent={args.parent}")
    if getattr(args, "append_list", None):
        extra.append(f"download.append_list={Path(args.append_list).resolve()}")
    return extra + list(args.overrides)


def cmd_curate(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen import curate as C
    from imagegen.paths import data_root
    from imagegen.presets import CURATE_PRESETS, build_config

    cfg = build_config(C.CurateConfig, CURATE_PRESETS, args.preset, _curate_overrides(args))
    root = data_root(args.data_root)
    C.check_preconditions(cfg, root)
    if args.no_prefect:
        def note(stage: str, res: C.StageResult) -> None:
            print(f"[{stage}] {'cached' if res.cached else 'done'} {res.id} -> {res.path}", file=sys.stderr)

        ref = C.curate(cfg, root, progress=note)
        from imagegen.report import curate_summary
        return curate_summary(ref.path)
    from flows.curate import curate_flow

    return curate_flow(config=cfg, data_root=str(root))


def cmd_datasets(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.paths import data_root
    from imagegen.registry import get_dataset, list_datasets

    root = data_root(args.data_root)
    if args.action == "list":
        refs = [r.summary() for r in list_datasets(root)]
        if not args.json:
            print(f"{'id':18} {'name':24} {'samples':>8} {'shards':>6}  path")
            for r in refs:
                print(f"{r['id']:18} {r['name'] or '-':24} {r['samples'] or 0:>8} {r['shards']:>6}  {r['path']}")
        return {"datasets": refs}
    if not args.dataset:
        raise SystemExit("imagegen datasets show: name the dataset (name or id)")
    ref = get_dataset(root, args.dataset)
    if not args.json:
        print(json.dumps(ref.card, indent=2, default=str))
    return ref.summary()


def _progress(tag: str) -> Any:
    """The trainer's progress callback of a --no-prefect run: one line on stderr per report."""
    from imagegen.report import progress_line

    def note(info: dict[str, Any]) -> None:
        print(f"[{tag}] {progress_line(info)}", file=sys.stderr)

    return note


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.paths import data_root
    from imagegen.requests import build_train_request

    # validated before anything starts; the dataset and model checks come first in train_run
    root = data_root(args.data_root)
    request = build_train_request(args.preset, None, list(args.overrides), args.dataset, args.family, args.steps,
                                  args.nproc, root=root)
    if args.no_prefect:
        from imagegen.train import runs

        return runs.train_run(request, root, progress=_progress("train"))
    from flows.train import train_flow

    return train_flow(request=request, data_root=str(root))


def cmd_families(args: argparse.Namespace) -> dict[str, Any]:
    from models.registry import describe_families, family_lines

    if not args.json:
        print("\n".join(family_lines()))
    return {"families": describe_families()}


def cmd_runs(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.paths import data_root
    from imagegen.train.runs import get_run, list_runs

    root = data_root(args.data_root)
    if args.action == "list":
        refs = [r.summary() for r in list_runs(root)]
        if not args.json:
            print(f"{'id':18} {'status':11} {'family':8} {'dataset':20} {'step':>13}  last losses")
            for r in refs:
                losses = " ".join(f"{k}={v:.4g}" for k, v in (r["last_losses"] or {}).items()) or "-"
                print(f"{r['id']:18} {r['status'] or '-':11} {r['family'] or '-':8} {r['dataset'] or '-':20} "
                      f"{r['step'] or 0:>6}/{r['steps'] or 0:<6}  {losses}")
        return {"runs": refs}
    if not args.run:
        raise SystemExit("imagegen runs show: name the run (id or unique id prefix)")
    ref = get_run(root, args.run)
    if not args.json:
        print(json.dumps(ref.card, indent=2, default=str))
    ckpt = ref.checkpoint
    return {**ref.summary(), "checkpoint": str(ckpt) if ckpt else None}


def cmd_distill(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.paths import data_root
    from imagegen.requests import build_distill_request as build_request
    from imagegen.requests import check_distill_request as check_request
    from imagegen.requests import natural_method

    named_steps = [f"steps={args.steps}"] if args.steps is not None else []
    if args.dataset is not None:
        named_steps.append(f"dataset={json.dumps(args.dataset)}")
    root = data_root(args.data_root)
    method = args.method or natural_method(root, args.teacher)
    request = build_request(None, args.teacher, method, [*args.overrides, *named_steps], preset=args.preset)
    check_request(request, root)  # an unknown, unfinished or unfitting teacher fails here, before any run
    if args.no_prefect:
        from imagegen.distill import distill

        return distill(request, root, progress=_progress("distill"))
    from flows.distill import distill_flow

    return distill_flow(request=request, data_root=str(root))


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.paths import data_root
    from imagegen.requests import build_eval_request as build_request
    from imagegen.requests import check_eval_request as check_request

    named = [f"metrics={json.dumps(_csv(args.metrics))}"] if args.metrics is not None else []
    folder = str(Path(args.folder).resolve()) if args.folder else None
    request = build_request(None, args.run, folder, [*args.overrides, *named], preset=args.preset,
                            model=getattr(args, "model", None) or None)
    root = data_root(args.data_root)
    check_request(request, root)  # an unknown run, a bad folder or prompt file fails here, before any work
    if args.no_prefect:
        from imagegen.evaluate.run import run_evaluation

        return run_evaluation(request, root)
    from flows.evaluate import evaluate_flow

    return evaluate_flow(request=request, data_root=str(root))


def _nfe_list(text: str | None) -> list[int]:
    try:
        return [int(x) for x in _csv(text)]
    except ValueError:
        raise ValueError(f"--nfe takes comma-separated step counts such as 1,2,4,8; got {text!r}") from None


def cmd_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.benchmark import check_plan, plan, settings_from_overrides
    from imagegen.paths import data_root

    runs, families, nfe = _csv(args.runs) or None, _csv(args.families) or None, _nfe_list(args.nfe) or None
    settings = settings_from_overrides(args.overrides)
    root = data_root(args.data_root)
    jobs = plan(root, runs, families, args.dataset, settings, nfe)  # every request validated, runs resolved
    check_plan(jobs, root)
    if args.no_prefect:
        from imagegen.benchmark import benchmark_card, run_plan
        from imagegen.leaderboard import build_leaderboard

        summaries = run_plan(jobs, root, note=lambda line: print(line, file=sys.stderr))
        card = benchmark_card(settings, nfe, runs, families, args.dataset, [])
        return {**build_leaderboard(root, summaries, card), "failed": []}
    from flows.benchmark import benchmark_flow

    return benchmark_flow(runs=runs, families=families, dataset=args.dataset, settings=settings, nfe_sweep=nfe,
                          data_root=str(root))


def cmd_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen import pipeline as P
    from imagegen.paths import data_root

    overrides = ([f"curate.runner={args.runner}"] if getattr(args, "runner", None) else []) + list(args.overrides)
    request = P.build_request(args.preset, None, overrides)  # every stage validated before any work
    root = data_root(args.data_root)
    if args.no_prefect:
        def note(line: str) -> None:
            print(line, file=sys.stderr)

        return P.summary_result(P.run_pipeline(request, root, P.plain_stages(note), note=note))
    from flows.pipeline import pipeline_flow

    return pipeline_flow(request=request, data_root=str(root))


def cmd_serve(args: argparse.Namespace) -> int:
    """Runs until Ctrl-C / SIGTERM; returns the exit code."""
    from imagegen.serve import ServeError, serve

    try:
        return serve(args.data_root, args.host, args.port, args.home, not args.no_worker, args.api_url)
    except (ServeError, OSError, ValueError) as exc:
        print(f"imagegen serve: error: {exc}", file=sys.stderr)
        return 2


def _cmd_import(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.importers.cli import cmd_import

    return cmd_import(args)


def _cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.sample import cmd_sample

    def via_prefect(request: Any, root: Path) -> dict[str, Any]:
        from flows.sample import sample_flow

        return sample_flow(request=request, data_root=str(root))

    return cmd_sample(args, via_prefect)


def _cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    from imagegen.compare import cmd_compare

    def publish(report: dict[str, Any]) -> None:
        from flows.compare import compare_report_flow

        compare_report_flow(report=report)

    return cmd_compare(args, None if args.no_prefect else publish)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # Prefect's telemetry heartbeat writes to the temporary server's SQLite database while the
    # flow does, which logs "database is locked" tracebacks; users can turn it back on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.command == "serve":
        return cmd_serve(args)
    try:
        result = {"curate": cmd_curate, "datasets": cmd_datasets, "train": cmd_train,
                  "families": cmd_families, "runs": cmd_runs, "distill": cmd_distill, "evaluate": cmd_evaluate,
                  "benchmark": cmd_benchmark, "pipeline": cmd_pipeline, "import": _cmd_import,
                  "sample": _cmd_sample, "compare": _cmd_compare}[args.command](args)
    except ValidationError as exc:
        print(f"imagegen {args.command}: invalid parameters:\n{exc}", file=sys.stderr)
        return 2
    except (ValueError, LookupError, OSError) as exc:
        print(f"imagegen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from imagegen.train.checkpoint import CheckpointError

        if not isinstance(exc, CheckpointError):
            raise
        print(f"imagegen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        sys.stdout.flush()
        print(json.dumps(result, default=str, separators=(",", ":")))
    elif args.command == "curate":
        print(f"dataset {result['name']} ({result['dataset_id']}): {result['samples']} samples in "
              f"{result['shards']} shards at {result['path']}")
    elif args.command == "train":
        print(result["run_id"])
    elif args.command == "distill":
        print(result["student_run"])
    elif args.command == "evaluate":
        from imagegen.report import metric_lines

        for line in metric_lines(result):
            print(line)
        for name, why in result["skipped"].items():
            print(f"imagegen evaluate: skipped {name}: {why}", file=sys.stderr)
    elif args.command == "benchmark":
        import pandas as pd

        from imagegen.leaderboard import leaderboard_markdown

        print(leaderboard_markdown(pd.DataFrame(result["rows"]), title=f"Leaderboard {result['leaderboard_id']}",
                                  protocol=result.get("protocol")))
        print(result["path"])
    elif args.command in ("import", "sample", "compare"):
        print(result["message"])
    elif args.command == "pipeline":
        for role, metrics in result["metrics"].items():
            for name, value in metrics.items():
                print(f"{role} {name}: {value:.6g}")
        print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
        print(f"report: {result['report']['markdown']} (and report.html)")
    return 0


def entry() -> None:
    """The ``imagegen`` console script.  A refused command (exit code != 0) leaves at once after
    flushing: it started no work, and an interpreter teardown racing native thread pools (torch,
    pyarrow) once turned a clean exit 2 into an abort (-6) on a CI machine."""
    code = main()
    if code != 0:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()

"""A human A/B page: a person picks the better of two images generated from the same prompt and the
same seed by two evaluated runs, and the win rate comes with a binomial confidence interval.

* :func:`pair_sets` pairs two evaluation sets (``<root>/evals/<id>/samples/NNNNN.png`` +
  ``captions.jsonl``, as :func:`imagegen.evaluate.run.generate_set` writes them).  Image ``i`` of an
  evaluation set is drawn from noise seeded by ``(seed, i)`` and its caption by ``seed``, so two sets
  made with the same seed hold the same prompt and noise at the same index; the sets must share the
  seed, and an index whose captions differ is left out (and counted).
* :class:`CompareSession` shows the pairs in a seeded random order, each with a seeded random
  left/right placement, records each choice (left, right or skip) with undo, and rewrites
  ``<root>/compare/<id>/votes.parquet`` atomically after every change, so closing the page loses
  nothing and reopening resumes where the person stopped.  ``<id>`` hashes the two evaluation ids and
  the order seed.
* :func:`win_rate` counts wins of A over B (skips left out) and gives the Wilson score interval
  (Wilson 1927, "Probable inference, the law of succession, and statistical inference"), which keeps
  its coverage near the nominal rate for small n and rates near 0 or 1, unlike the normal
  approximation.
* :func:`serve_compare` serves the page on 127.0.0.1 (a free port by default) from a thread; keys:
  ``1`` / ``←`` left, ``2`` / ``→`` right, ``s`` / ``↓`` / space skip, ``u`` / backspace undo.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from imagegen.artifacts import write_json_atomic
from imagegen.hashing import stable_hash

COMPARE = "compare"
CHOICES = ("left", "right", "skip")
VOTE_COLUMNS = ["comparison_id", "position", "pair_index", "caption", "left", "choice", "winner", "eval_a", "eval_b",
                "voter", "time_unix"]


class CompareError(ValueError):
    """Two evaluation sets that cannot be compared (says which and why)."""


@dataclass(frozen=True)
class Pair:
    index: int
    caption: str | None
    file_a: Path
    file_b: Path


def _eval_folder(root: Path, eval_id_or_path: str | Path) -> Path:
    p = Path(str(eval_id_or_path))
    if p.is_dir():
        return p
    folder = Path(root) / "evals" / str(eval_id_or_path)
    if not folder.is_dir():
        raise CompareError(f"no evaluation {eval_id_or_path!r}: {folder} does not exist")
    return folder


def _read_set(folder: Path) -> tuple[dict[int, tuple[Path, str | None]], dict[str, Any]]:
    caps = folder / "samples" / "captions.jsonl"
    if not caps.is_file():
        raise CompareError(f"{folder} has no generated evaluation set ({caps} is missing; folders evaluated as "
                           f"they are have no seeds to pair by)")
    card_path = folder / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    out: dict[int, tuple[Path, str | None]] = {}
    for line_no, line in enumerate(caps.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        f = folder / "samples" / rec["file"]
        if not f.is_file():
            raise CompareError(f"{caps}, line {line_no}: {f} is missing")
        out[int(Path(rec["file"]).stem)] = (f, rec.get("caption"))
    return out, card


def pair_sets(root: Path | str, eval_a: str | Path, eval_b: str | Path) -> tuple[list[Pair], dict[str, Any]]:
    """The pairs (same index, so same seed and noise, and the same caption) of two evaluation sets, and
    an account: how many indices each set has, how many pair, how many were left out and why."""
    fa, fb = _eval_folder(Path(root), eval_a), _eval_folder(Path(root), eval_b)
    if fa.resolve() == fb.resolve():
        raise CompareError(f"both sides are the same evaluation ({fa})")
    set_a, card_a = _read_set(fa)
    set_b, card_b = _read_set(fb)
    seed_a = (card_a.get("request") or {}).get("seed")
    seed_b = (card_b.get("request") or {}).get("seed")
    if seed_a is None or seed_b is None:
        raise CompareError(f"the evaluation cards of {fa.name} and {fb.name} must record their seed (request.seed)")
    if seed_a != seed_b:
        raise CompareError(f"{fa.name} was generated with seed {seed_a} and {fb.name} with seed {seed_b}: their images "
                           f"do not share prompts and noise; evaluate both with the same seed")
    pairs, caption_mismatch = [], 0
    for i in sorted(set(set_a) & set(set_b)):
        (f1, c1), (f2, c2) = set_a[i], set_b[i]
        if c1 != c2:
            caption_mismatch += 1
            continue
        pairs.append(Pair(i, c1, f1, f2))
    account = {"eval_a": fa.name, "eval_b": fb.name, "seed": seed_a, "images_a": len(set_a), "images_b": len(set_b),
               "pairs": len(pairs), "only_in_one": len(set(set_a) ^ set(set_b)), "caption_mismatch": caption_mismatch,
               "run_a": card_a.get("run_id"), "run_b": card_b.get("run_id")}
    if not pairs:
        raise CompareError(f"{fa.name} and {fb.name} have no image in common with the same caption ({account})")
    return pairs, account


# ------------------------------------------------------------------------------------ statistics


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n = 0."""
    from scipy.stats import norm

    if n == 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in 0..n, got {successes} of {n}")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(votes: pd.DataFrame, confidence: float = 0.95) -> dict[str, Any]:
    """Wins of A over B among the decided votes (skips excluded) with the Wilson interval."""
    decided = votes[votes["winner"].isin(["a", "b"])] if len(votes) else votes
    wins_a = int((decided["winner"] == "a").sum()) if len(decided) else 0
    n = int(len(decided))
    lo, hi = wilson_interval(wins_a, n, confidence)
    return {"wins_a": wins_a, "wins_b": n - wins_a, "skips": int(len(votes) - n), "decided": n,
            "win_rate_a": wins_a / n if n else None, "interval": [lo, hi], "confidence": confidence,
            "interval_method": "Wilson score", "significant": bool(n and (lo > 0.5 or hi < 0.5))}


# ------------------------------------------------------------------------------------ session


class CompareSession:
    """The state of one comparison: the order, the placements, the votes, and their parquet file."""

    def __init__(self, root: Path | str, eval_a: str | Path, eval_b: str | Path, *, seed: int = 0,
                 voter: str = "anonymous") -> None:
        self.root = Path(root)
        self.pairs, self.account = pair_sets(self.root, eval_a, eval_b)
        self.eval_a, self.eval_b = self.account["eval_a"], self.account["eval_b"]
        self.seed, self.voter = int(seed), str(voter)
        self.id = stable_hash({"eval_a": self.eval_a, "eval_b": self.eval_b, "seed": self.seed})
        rng = np.random.default_rng([self.seed, 1017])
        self.order = rng.permutation(len(self.pairs)).tolist()
        self.a_left = (rng.random(len(self.pairs)) < 0.5).tolist()  # per position: is A on the left?
        self.folder = self.root / COMPARE / self.id
        self.votes_path = self.folder / "votes.parquet"
        self._lock = threading.Lock()
        self.votes: list[dict[str, Any]] = []
        if self.votes_path.is_file():  # resume
            self.votes = pd.read_parquet(self.votes_path).to_dict(orient="records")
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / "card.json", {"comparison_id": self.id, **self.account, "order_seed": self.seed,
                                                      "votes_file": str(self.votes_path)})

    @property
    def position(self) -> int:
        return len(self.votes)

    @property
    def done(self) -> bool:
        return self.position >= len(self.pairs)

    def pair_at(self, position: int) -> tuple[Pair, bool]:
        return self.pairs[self.order[position]], bool(self.a_left[position])

    def image(self, position: int, side: str) -> Path:
        if not 0 <= position < len(self.pairs) or side not in ("left", "right"):
            raise KeyError(f"no image {side!r} at position {position}")
        pair, a_left = self.pair_at(position)
        return pair.file_a if (side == "left") == a_left else pair.file_b

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.votes, columns=VOTE_COLUMNS)

    def _save(self) -> None:
        tmp = self.votes_path.with_name(f".{self.votes_path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        self.frame().to_parquet(tmp, index=False)
        os.replace(tmp, self.votes_path)

    def vote(self, choice: str, position: int | None = None) -> dict[str, Any]:
        """Record ``choice`` for the current pair (``position``, when given, must be the current one)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        with self._lock:
            if self.done:
                raise CompareError("every pair has been judged")
            if position is not None and int(position) != self.position:
                raise CompareError(f"stale page: it showed position {position}, the current one is {self.position}")
            pair, a_left = self.pair_at(self.position)
            left = "a" if a_left else "b"
            winner = None if choice == "skip" else (left if choice == "left" else ("b" if left == "a" else "a"))
            self.votes.append({"comparison_id": self.id, "position": self.position, "pair_index": pair.index,
                               "caption": pair.caption, "left": left, "choice": choice, "winner": winner,
                               "eval_a": self.eval_a, "eval_b": self.eval_b, "voter": self.voter,
                               "time_unix": round(time.time(), 3)})
            self._save()
        return self.state()

    def undo(self) -> dict[str, Any]:
        with self._lock:
            if self.votes:
                self.votes.pop()
                self._save()
        return self.state()

    def report(self, confidence: float = 0.95) -> dict[str, Any]:
        return {"comparison_id": self.id, **self.account, "judged": self.position, "total": len(self.pairs),
                "votes_file": str(self.votes_path), **win_rate(self.frame(), confidence)}

    def state(self) -> dict[str, Any]:
        pair = None
        if not self.done:
            p, _ = self.pair_at(self.position)
            pair = {"position": self.position, "caption": p.caption, "left": f"/img/{self.position}/left",
                    "right": f"/img/{self.position}/right"}
        return {"position": self.position, "total": len(self.pairs), "done": self.done, "pair": pair,
                "report": self.report()}


# ------------------------------------------------------------------------------------ the page

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>A/B comparison</title>
<style>
 body { font-family: sans-serif; margin: 1.5em; background: #fafafa; }
 #pair { display: flex; gap: 2em; align-items: flex-start; }
 figure { margin: 0; text-align: center; }
 img { width: 320px; height: 320px; image-rendering: pixelated; border: 3px solid #ccc; background: #fff; }
 button { font-size: 1em; margin: 0.3em; padding: 0.4em 1em; }
 #caption { font-size: 1.2em; margin: 0.6em 0; min-height: 1.4em; }
 #report { margin-top: 1em; color: #333; }
 kbd { border: 1px solid #999; border-radius: 3px; padding: 0 0.3em; }
</style></head>
<body>
<h1>Which image is better?</h1>
<div id="progress"></div>
<div id="caption"></div>
<div id="pair">
 <figure><img id="left" alt="left image"><figcaption><button id="pick-left">Left (<kbd>1</kbd> / <kbd>&larr;</kbd>)</button></figcaption></figure>
 <figure><img id="right" alt="right image"><figcaption><button id="pick-right">Right (<kbd>2</kbd> / <kbd>&rarr;</kbd>)</button></figcaption></figure>
</div>
<div><button id="skip">Skip (<kbd>s</kbd>)</button><button id="undo">Undo (<kbd>u</kbd>)</button></div>
<div id="report"></div>
<script>
let state = null, busy = false;
function show(s) {
  state = s;
  document.getElementById('progress').textContent = `pair ${Math.min(s.position + 1, s.total)} of ${s.total}` + (s.done ? ' - done, thank you' : '');
  const r = s.report;
  const rate = r.win_rate_a === null ? '-' : (100 * r.win_rate_a).toFixed(1) + '%';
  // the tally is shown only at the end: during judging it would tell which side was A (unblinding)
  document.getElementById('report').textContent = !s.done ? '' :
    `A wins ${r.wins_a}, B wins ${r.wins_b}, skipped ${r.skips}; A's win rate ${rate} ` +
    `(${Math.round(100 * r.confidence)}% ${r.interval_method} interval ${(100 * r.interval[0]).toFixed(1)}-${(100 * r.interval[1]).toFixed(1)}%)`;
  document.getElementById('pair').style.display = s.done ? 'none' : 'flex';
  document.body.dataset.position = s.position;
  document.body.dataset.done = s.done;
  if (!s.done) {
    document.getElementById('caption').textContent = s.pair.caption || '(no caption)';
    document.getElementById('left').src = s.pair.left;
    document.getElementById('right').src = s.pair.right;
  } else { document.getElementById('caption').textContent = ''; }
}
async function post(path, body) {
  if (busy) return; busy = true;
  try {
    const res = await fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body || {})});
    const s = await res.json();
    show(s.state || s);
  } finally { busy = false; }
}
function vote(choice) { if (state && !state.done) post('/api/vote', {choice: choice, position: state.position}); }
document.getElementById('pick-left').onclick = () => vote('left');
document.getElementById('pick-right').onclick = () => vote('right');
document.getElementById('skip').onclick = () => vote('skip');
document.getElementById('undo').onclick = () => post('/api/undo');
document.addEventListener('keydown', (e) => {
  const k = e.key;
  if (k === '1' || k === 'ArrowLeft') vote('left');
  else if (k === '2' || k === 'ArrowRight') vote('right');
  else if (k === 's' || k === 'ArrowDown' || k === ' ') { e.preventDefault(); vote('skip'); }
  else if (k === 'u' || k === 'Backspace') { e.preventDefault(); post('/api/undo'); }
});
fetch('/api/state').then(r => r.json()).then(show);
</script></body></html>
"""


def _handler(session: CompareSession) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # quiet
            return

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj, default=str).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802
            if self.path in ("/", "/index.html"):
                return self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            if self.path == "/api/state":
                return self._json(200, session.state())
            parts = self.path.strip("/").split("/")
            if len(parts) == 3 and parts[0] == "img" and parts[1].isdigit():
                try:
                    f = session.image(int(parts[1]), parts[2])
                except KeyError as exc:
                    return self._json(404, {"error": str(exc)})
                ctype = "image/png" if f.suffix.lower() == ".png" else "image/jpeg"
                return self._send(200, f.read_bytes(), ctype)
            self._json(404, {"error": f"no page {self.path}"})

        def do_POST(self) -> None:  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}") if length else {}
                if self.path == "/api/vote":
                    return self._json(200, session.vote(str(body.get("choice")), body.get("position")))
                if self.path == "/api/undo":
                    return self._json(200, session.undo())
                self._json(404, {"error": f"no endpoint {self.path}"})
            except (CompareError, ValueError) as exc:
                self._json(409, {"error": str(exc), "state": session.state()})

    return Handler


@dataclass
class CompareServer:
    session: CompareSession
    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def serve_compare(root: Path | str, eval_a: str | Path, eval_b: str | Path, *, port: int = 0,
                  host: str = "127.0.0.1", seed: int = 0, voter: str = "anonymous") -> CompareServer:
    """Start the A/B page for two evaluation sets on ``host:port`` (loopback, a free port by default)
    in a background thread; ``.url`` is where to open it, ``.stop()`` ends it, and
    ``.session.report()`` gives the win rate at any time."""
    session = CompareSession(root, eval_a, eval_b, seed=seed, voter=voter)
    server = ThreadingHTTPServer((host, port), _handler(session))
    thread = threading.Thread(target=server.serve_forever, name=f"compare-{session.id}", daemon=True)
    thread.start()
    return CompareServer(session, server, thread)


def read_votes(root: Path | str, comparison_id: str) -> pd.DataFrame:
    path = Path(root) / COMPARE / comparison_id / "votes.parquet"
    if not path.is_file():
        raise LookupError(f"no votes for comparison {comparison_id!r} ({path} does not exist)")
    return pd.read_parquet(path)


# ------------------------------------------------------------------------------------ runs -> pairs, the CLI


def generated_set(root: Path | str, run: str, *, n: int, seed: int, sampler: str | None = None,
                  steps: int | None = None, guidance: float = 1.0, batch_size: int = 64,
                  device: str = "auto") -> Path:
    """The evaluation set of ``run`` (``n`` images, image i from noise seeded by (seed, i), captions
    drawn with ``seed`` from the run's dataset) as :func:`imagegen.evaluate.run.generate_set` writes
    it, under ``<root>/evals/<id>/samples`` with a card naming the run and the seed; reused when
    complete.  Two runs on one dataset with the same seed get the same prompts and noise."""
    from imagegen.evaluate.run import EvalRequest, Source, _device, evals_dir, generate_set
    from imagegen.hashing import code_version
    import imagegen.evaluate.run as R

    req = EvalRequest(run=run, metrics=("clipscore",), n_samples=n, seed=seed, sampler=sampler, steps=steps,
                      guidance=guidance, batch_size=batch_size, device=device)  # type: ignore[arg-type]
    src = Source(req, Path(root))
    if src.train_cfg.model.get("conditioning", "none") == "none" and guidance != 1.0:
        raise CompareError(f"guidance={guidance} needs a conditional model; run {src.run.id} is unconditional")
    ident = {"compare-set": src.identity, "n": n, "seed": seed, "sampler": sampler, "steps": steps,
             "guidance": guidance, "code": code_version(R)}
    out = evals_dir(Path(root)) / f"set-{stable_hash(ident)}"
    info = generate_set(src, req, out / "samples", _device(req))
    write_json_atomic(out / "card.json", {"kind": "compare-set", "run_id": src.run.id, "identity": ident,
                                          "request": req.model_dump(mode="json"), "nfe": info.get("nfe")})
    return out


def compare_pages(report: dict[str, Any]) -> list[Any]:
    """The win rate as artifact pages (flows/publish.py publishes them)."""
    from imagegen.report import Page

    w = report["win_rate"] if "win_rate" in report else report
    lo, hi = w["interval"]
    rate = "-" if w["win_rate_a"] is None else f"{w['win_rate_a']:.3f}"
    row = {"comparison_id": report.get("comparison_id"), "eval_a": report.get("eval_a"),
           "eval_b": report.get("eval_b"), "wins_a": w["wins_a"], "wins_b": w["wins_b"], "skips": w["skips"],
           "win_rate_a": w["win_rate_a"], "ci_low": lo, "ci_high": hi, "confidence": w["confidence"],
           "significant": w["significant"]}
    md = (f"# A/B comparison {report.get('comparison_id')}\n\nA = `{report.get('eval_a')}`, B = "
          f"`{report.get('eval_b')}`: A preferred in {w['wins_a']} of {w['decided']} decided pairs "
          f"({w['skips']} skipped), win rate {rate}, {w['confidence']:.0%} {w['interval_method']} interval "
          f"[{lo:.3f}, {hi:.3f}]" + (" (different from 0.5)" if w["significant"] else
                                     " (0.5 inside: no preference shown)") + ".\n")
    return [Page("compare-win-rate", "table", [row], f"A/B win rate of {report.get('eval_a')} over "
                 f"{report.get('eval_b')}"),
            Page("compare-summary", "markdown", md, "A/B comparison summary")]


def compare_runs(root: Path | str, run_a: str, run_b: str, *, n: int = 20, seed: int = 0, steps: int | None = None,
                 sampler: str | None = None, guidance: float = 1.0, port: int = 0, voter: str = "anonymous",
                 order_seed: int = 0, on_ready: Any = None, poll_s: float = 0.2,
                 timeout_s: float | None = None) -> dict[str, Any]:
    """``imagegen compare``: generate both runs' sets (same prompts, same seeds), serve the A/B page
    on loopback, wait until every pair is voted (or Ctrl-C, or ``timeout_s``), return the report.
    ``on_ready(server)`` is called once the page is up (the CLI prints the URL)."""
    set_a = generated_set(root, run_a, n=n, seed=seed, sampler=sampler, steps=steps, guidance=guidance)
    set_b = generated_set(root, run_b, n=n, seed=seed, sampler=sampler, steps=steps, guidance=guidance)
    server = serve_compare(root, set_a, set_b, port=port, seed=order_seed, voter=voter)
    t0 = time.time()
    try:
        if on_ready is not None:
            on_ready(server)
        while not server.session.done and (timeout_s is None or time.time() - t0 < timeout_s):
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return {**server.session.report(), "url": server.url, "run_a": run_a, "run_b": run_b}


def add_compare_parser(sub: Any) -> None:
    cp = sub.add_parser("compare", help="a human A/B page (loopback) for two runs: pairs from the same prompt and "
                        "seed, the win rate with its binomial (Wilson) interval")
    cp.add_argument("run_a", help="run id (or unique prefix): side A")
    cp.add_argument("run_b", help="run id (or unique prefix): side B")
    cp.add_argument("--n", type=int, default=50, help="pairs (images generated per run, default 50)")
    cp.add_argument("--seed", type=int, default=0, help="seeds the prompts and the noise of both sets")
    cp.add_argument("--steps", type=int, default=None, help="sampler steps (default: each family's)")
    cp.add_argument("--sampler", default=None, help="sampler (default: each family's)")
    cp.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    cp.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    cp.add_argument("--voter", default="anonymous", help="recorded with each vote")
    cp.add_argument("--data-root", default=None, help="data root (default $IMAGEGEN_DATA_ROOT or ./imagegen-data)")
    cp.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last stdout line")
    cp.add_argument("--no-prefect", action="store_true", help="do not publish the win rate as a Prefect artifact")


def cmd_compare(args: Any, publish: Any = None) -> dict[str, Any]:
    """The CLI: serves until every pair is judged or Ctrl-C; ``publish(report)`` (the CLI passes
    flows/compare.py's flow unless --no-prefect) publishes the win rate as artifacts."""
    import sys

    from imagegen.paths import data_root

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    root = data_root(args.data_root)

    def ready(server: CompareServer) -> None:
        print(f"A/B page: {server.url}  ({len(server.session.pairs)} pairs; keys 1/2 or arrows, s skip, u undo; "
              f"Ctrl-C to stop)", file=sys.stderr, flush=True)

    report = compare_runs(root, args.run_a, args.run_b, n=args.n, seed=args.seed, steps=args.steps,
                          sampler=args.sampler, guidance=args.guidance, port=args.port, voter=args.voter,
                          on_ready=ready)
    if publish is not None:
        publish(report)
    lo, hi = report["interval"]
    rate = "-" if report["win_rate_a"] is None else f"{report['win_rate_a']:.3f}"
    report["message"] = (f"A ({args.run_a}) preferred in {report['wins_a']} of {report['decided']} pairs "
                         f"({report['skips']} skipped): win rate {rate}, 95% Wilson interval [{lo:.3f}, {hi:.3f}]; "
                         f"votes: {report['votes_file']}")
    return report

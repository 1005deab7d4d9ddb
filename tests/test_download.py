"""Download stage against a real HTTP server on loopback, through the real img2dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from imagegen.stages.download import (DownloadConfig, InputError, classify_error, normalize_image,
                                      read_url_list, run_download)
from imagegen.world.publish import PublishConfig, publish_world, read_truth, url_table
from imagegen.world.scene import WorldConfig, render_scene
from imagegen.world.server import serve_world
from imagegen.stages.ledger import read_ledger


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """A small world with every fault planted, downloaded once for the module."""
    base = tmp_path_factory.mktemp("dl")
    world = WorldConfig(seed=3)
    pub = PublishConfig(seed=3, n_images=60, stall_seconds=3.0, uninformative_rate=0.0, wrong_rate=0.0)
    publish_world(world, pub, base / "world")
    out = base / "out"
    out.mkdir()
    # parts of 20 rows: several image parts and several ledger files
    cfg = DownloadConfig(timeout=1.5, processes_count=1, thread_count=8, number_sample_per_shard=20)
    with serve_world(base / "world") as srv:
        urls = url_table(base / "world", srv.base_url)
        urls["skip_reason"] = None
        counts = run_download(urls, cfg, out)
        stats = srv.stats()
    ledger = read_ledger(out)
    truth = read_truth(base / "world")
    return world, counts, ledger.merge(truth, on="row_id"), out, stats


@pytest.mark.slow
def test_ledger_accounts_for_every_row(downloaded):
    import pyarrow.parquet as pq

    from imagegen.stages.ledger import ledger_files

    _, counts, led, out, _ = downloaded
    assert counts["input_rows"] == len(led) == led["row_id"].nunique()
    files = ledger_files(out)  # the ledger is per-part files, in row order, read as one
    assert len(files) >= 3 and [f.parent.name for f in files] == ["ledger"] * len(files)
    ids = [r for f in files for r in pq.read_table(f, columns=["row_id"]).column("row_id").to_pylist()]
    assert ids == sorted(ids) == sorted(led["row_id"]) and not (out / "ledger.parquet").exists()
    assert counts["success"] + counts["failed"] + counts["skipped"] == counts["input_rows"]
    assert sum(counts["reasons"].values()) == counts["failed"] + counts["skipped"]
    assert led["status"].isin(["success", "failed", "skipped"]).all()


@pytest.mark.slow
def test_failures_have_the_right_reason(downloaded):
    _, _, led, _, _ = downloaded
    by = {p: g for p, g in led.groupby("planted")}
    assert (by["not_found"]["reason"] == "http_404").all()
    assert (by["timeout"]["reason"] == "timeout").all()
    assert (by["truncated"]["reason"] == "truncated").all()
    assert (by["html"]["reason"] == "not_an_image").all()
    assert (by["corrupt"]["reason"] == "corrupt_image").all()
    assert (by["redirect"]["status"] == "success").all()
    # a 500 that succeeds on retry: failed once, fetched on the second pass, counted
    flaky = by["flaky"]
    assert (flaky["status"] == "success").all() and (flaky["attempts"] == 2).all()
    # only transient failures were retried
    retried = led[led["attempts"] > 1]
    assert set(retried["planted"]) <= {"flaky", "timeout", "truncated"}
    # every row the world expects to fetch did, and no other (an undecodable body is fetched
    # over HTTP but fails our decode)
    expected = (led["expected_download"] == "success") & (led["planted"] != "corrupt")
    assert ((led["status"] == "success") == expected).all()


@pytest.mark.slow
def test_images_are_uniform_rgb_and_exif_applied(downloaded):
    world, _, led, out, _ = downloaded
    parts = pd.concat([pd.read_parquet(p) for p in sorted((out / "images").glob("part-*.parquet"))])
    assert len(parts) == int((led["status"] == "success").sum())
    for data in parts["image"]:
        im = Image.open(io.BytesIO(data))
        assert im.mode == "RGB" and im.size == (world.image_size, world.image_size)
    rot = led[led["planted"] == "exif_rotated"]
    assert rot["exif_transposed"].all()
    # after applying EXIF the image matches the upright scene (not a rotated one)
    img_by_row = dict(zip(parts["row_id"], parts["image"]))
    for _, r in rot.iterrows():
        _, truth_img = render_scene(world, int(r["scene_index"]))
        got = np.asarray(Image.open(io.BytesIO(img_by_row[r["row_id"]])).convert("RGB"), dtype=float)
        want = np.asarray(truth_img, dtype=float)
        assert np.abs(got - want).mean() < np.abs(got - np.rot90(want)).mean()
    for kind, mode in [("cmyk", "CMYK"), ("grayscale", "L"), ("alpha", "RGBA"), ("png16", None)]:
        rows = led[led["planted"] == kind]
        assert (rows["status"] == "success").all(), kind
        if mode:
            assert (rows["original_mode"] == mode).all(), (kind, rows["original_mode"].tolist())


@pytest.mark.slow
def test_server_saw_the_retry(downloaded):
    *_, stats = downloaded
    assert json.dumps(stats)  # JSON-able for the stage card


def test_normalize_reports_reasons():
    cfg = DownloadConfig()
    assert normalize_image(b"", cfg)["reason"] == "empty_body"
    assert normalize_image(b"<!DOCTYPE html><html></html>", cfg)["reason"] == "not_an_image"
    assert normalize_image(b"\xff\xd8\xff\xe0" + b"x" * 50, cfg)["reason"] in {"corrupt_image", "not_an_image"}
    # the ledger's error text is the same in every run: PIL's message names no object address
    errors = {normalize_image(b"\x89PNG\r\n\x1a\n" + b"y" * 40, cfg)["error"] for _ in range(3)}
    assert len(errors) == 1 and "0x" not in errors.pop()
    buf = io.BytesIO()
    Image.new("RGBA", (20, 10), (255, 0, 0, 0)).save(buf, "PNG")
    r = normalize_image(buf.getvalue(), cfg)
    assert r["ok"] and (r["original_width"], r["original_height"]) == (20, 10)
    px = np.asarray(Image.open(io.BytesIO(r["image"])))
    assert px.mean() > 240  # fully transparent -> composited over white, not black


def test_classify_error():
    assert classify_error("HTTP Error 404: Not Found") == "http_404"
    assert classify_error("HTTP Error 503: Service Unavailable") == "http_5xx"
    assert classify_error("The read operation timed out") == "timeout"
    assert classify_error("IncompleteRead(10 bytes read, 90 more expected)") == "truncated"


def test_bad_url_lists(tmp_path):
    good = pd.DataFrame({"url": ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"], "caption": ["a", "b"]})
    (tmp_path / "nocol.parquet").write_bytes(b"")
    good.rename(columns={"url": "image_url"}).to_parquet(tmp_path / "renamed.parquet")
    with pytest.raises(InputError, match="no column.*'url'.*image_url"):
        read_url_list(tmp_path / "renamed.parquet")
    with pytest.raises(InputError, match="could not be read"):
        read_url_list(tmp_path / "nocol.parquet")
    good.iloc[:0].to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="empty"):
        read_url_list(tmp_path / "empty.parquet")
    pd.concat([good, good.iloc[:1]]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(InputError, match="duplicate URL.*row 2 repeats row 0"):
        read_url_list(tmp_path / "dup.csv")
    skipped = read_url_list(tmp_path / "dup.csv", on_duplicate_urls="skip")
    assert skipped["skip_reason"].tolist() == [None, None, "duplicate_url_of_row_0"]
    with pytest.raises(InputError, match="does not exist"):
        read_url_list(tmp_path / "missing.parquet")


def _png_bomb(side: int) -> bytes:
    """A valid RGB PNG of side x side black pixels: a few hundred KB that decode to side² x 3 bytes."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    """Finding 5: 13300 x 13300 is under twice PIL's limit, so PIL decodes it (~860 MB); the pixel
    limit refuses it from the header, as image_too_large, in a process that stays small."""
    import subprocess
    import sys

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bomb(13300))
    code = (
        "import sys\n"
        "from imagegen.stages.download import DownloadConfig, normalize_image\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "r = normalize_image(data, DownloadConfig())\n"
        # VmHWM: this process image's own peak (ru_maxrss would carry the forking pytest's size over exec)
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1]\n"
        "print(r['reason'], len(data), int(hwm) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, check=True)
    reason, size, rss_mb = out.stdout.split()
    assert reason == "image_too_large" and int(size) < 1_000_000
    assert int(rss_mb) < 400, f"{rss_mb} MB peak RSS: the bomb was decoded"
    assert "DecompressionBombWarning" not in out.stderr
    small = _png_bomb(300)
    assert normalize_image(small, DownloadConfig(max_pixels=300 * 300))["ok"]
    r = normalize_image(small, DownloadConfig(max_pixels=300 * 300 - 1))
    assert r["reason"] == "image_too_large" and "download.max_pixels" in r["error"]


def test_gzip_body_is_not_inflated():
    import gzip

    r = normalize_image(gzip.compress(b"\x00" * 10_000_000), DownloadConfig())
    assert r["reason"] == "compressed_body" and not r["ok"]


def test_the_decode_pool_ends_without_a_traceback_under_prefects_sigterm_handler(capfd):
    """Issue 12, finding 10: a one-part download with processes_count > 1 decodes on a fork pool
    inside the flow process, where Prefect's engine has installed its SIGTERM handler (it raises
    TerminationSignal); the forked workers inherit it, so ending the pool by terminate() printed a
    TerminationSignal Traceback per worker into the flow's logs.  The pool is closed and joined
    (workers leave on their own) and its workers restore the default SIGTERM action."""
    from prefect.utilities.engine import capture_sigterm

    from imagegen.stages.download import _normalize_all

    blobs = []
    for i in range(300):  # over the 256 blobs from which the decode uses a pool
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (i % 256, 3 * i % 256, 7)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    cfg = DownloadConfig(processes_count=2)
    capfd.readouterr()
    with capture_sigterm():  # the real handler a Prefect flow run installs in its process
        pooled = _normalize_all(blobs, cfg)
    err = capfd.readouterr()
    assert "Traceback" not in err.err + err.out, err.err[-3000:]
    assert pooled == [normalize_image(b, cfg) for b in blobs]


def test_ledger_part_files_read_as_one(tmp_path):
    """write_ledger cuts the rows into part files with one schema (a part whose column is all null
    included); read_ledger/iter_ledger concatenate them lazily; a one-file ledger reads the same; a
    folder without a ledger is named."""
    import pyarrow.parquet as pq

    from imagegen.stages import ledger as L

    led = pd.DataFrame({"row_id": range(25), "key": [f"{i:09d}" if i < 10 else None for i in range(25)],
                        "status": ["success"] * 10 + ["failed"] * 15,
                        "original_width": pd.array([32] * 10 + [None] * 15, dtype="Int64")})
    paths = L.write_ledger(tmp_path / "a", led, rows_per_file=10)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert len({pq.read_schema(p).remove_metadata() for p in paths}) == 1  # part 2's key column is all null
    pd.testing.assert_frame_equal(L.read_ledger(tmp_path / "a"), led)
    got = L.read_ledger(tmp_path / "a", ["row_id", "status"], filter=L.pds.field("status") == "failed")
    assert got["row_id"].tolist() == list(range(10, 25))
    assert sum(b.num_rows for b in L.iter_ledger(tmp_path / "a", ["row_id"], batch_rows=4)) == 25
    assert L.count_rows(tmp_path / "a") == 25
    w = L.LedgerWriter(tmp_path / "w", rows_per_file=10, schema=L.pa.Schema.from_pandas(led, preserve_index=False))
    for start in (0, 3, 10, 17):  # rows arriving in pieces that straddle the part boundaries
        w.add(led.iloc[start:{0: 3, 3: 10, 10: 17, 17: 25}[start]])
    assert [p.name for p in w.close()] == [p.name for p in paths]  # the same files as write_ledger
    pd.testing.assert_frame_equal(L.read_ledger(tmp_path / "w"), led)
    (tmp_path / "b").mkdir()
    led.to_parquet(tmp_path / "b" / "ledger.parquet", index=False)  # a folder from before the part files
    pd.testing.assert_frame_equal(L.read_ledger(tmp_path / "b"), led)
    with pytest.raises(ValueError, match="lacks column"):
        L.read_ledger(tmp_path / "a", ["nope"])
    with pytest.raises(FileNotFoundError, match="no download ledger"):
        L.read_ledger(tmp_path / "c")


def test_img2dataset_prints_go_to_stderr_not_to_the_callers_stdout(capfd):
    """`imagegen curate --json` prints one JSON document on stdout: img2dataset's progress prints (in this
    process and in the workers it starts) are sent to stderr while it runs, and stdout is restored."""
    import subprocess
    import sys

    from imagegen.stages.download import stdout_to_stderr

    with stdout_to_stderr():
        print("from this process", flush=True)
        subprocess.run([sys.executable, "-c", "print('from a worker')"], check=True)
    print("after", flush=True)
    out, err = capfd.readouterr()
    assert out == "after\n"
    assert "from this process" in err and "from a worker" in err


class _FlakyOnce:
    """A loopback HTTP server of small PNGs, ``/img/N.png``; each path in ``flaky`` answers 503 the
    first time it is asked, then serves the image."""

    def __init__(self, flaky: set[str], slow: dict[str, float] | None = None):
        import http.server
        import threading
        import time

        self.flaky, self.asked, self.lock = set(flaky), {}, threading.Lock()
        self.slow = dict(slow or {})  # path -> seconds to wait before answering
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                with outer.lock:
                    outer.asked[self.path] = n = outer.asked.get(self.path, 0) + 1
                time.sleep(outer.slow.get(self.path, 0.0))
                if self.path in outer.flaky and n == 1:
                    self.send_response(503)
                    self.end_headers()
                    return
                buf = io.BytesIO()
                i = int(self.path.rsplit("/", 1)[-1].split(".")[0])
                Image.new("RGB", (24, 16), (i % 256, 7 * i % 256, 90)).save(buf, "PNG")
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(buf.getvalue())))
                self.end_headers()
                self.wfile.write(buf.getvalue())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_a_row_lost_in_the_first_pass_and_fetched_on_a_retry_gets_its_image_part(tmp_path, monkeypatch):
    """Issue 14: img2dataset can lose a subjob's rows (a crashed subjob; its ray distributor never retries
    one).  Its part of the first pass is taken away after the real img2dataset wrote it (the crash), one
    URL of another part fails once with a 503: both are fetched again on the retry pass, and every
    row is accounted for, decoded into the image part of its input row (before: the lost rows had no
    image part, and the lost part shifted the later parts' numbers)."""
    import img2dataset

    from imagegen.stages.download import summarize_ledger

    real = img2dataset.download
    lost: list[str] = []

    def crash_subjob_1_of_pass_0(**kw):
        out = Path(kw["output_folder"])
        if out.parent.name != "pass0":
            return real(**kw)
        # img2dataset writes elsewhere; then every part but 00001 appears where the stage watches (parquet,
        # then stats, as a finishing subjob writes them): subjob 1 never finished and wrote nothing there
        real(**{**kw, "output_folder": str(out) + "-real"})
        out.mkdir(exist_ok=True)
        for f in sorted(Path(str(out) + "-real").glob("*.parquet")):
            if f.stem == "00001":
                lost.append(f.name)
                continue
            f.rename(out / f.name)
            stats = f.with_name(f"{f.stem}_stats.json")
            if stats.exists():
                stats.rename(out / stats.name)

    monkeypatch.setattr(img2dataset, "download", crash_subjob_1_of_pass_0)
    n = 30
    with _FlakyOnce({"/img/25.png"}) as base:
        urls = pd.DataFrame({"row_id": np.arange(n, dtype=np.int64),
                             "url": [f"{base}/img/{i}.png" for i in range(n)],
                             "caption": [f"c{i}" for i in range(n)], "skip_reason": None})
        cfg = DownloadConfig(processes_count=1, thread_count=4, number_sample_per_shard=10, retry_passes=1,
                             retry_wait=0, allow_private_addresses=True, image_size=16)
        counts = run_download(urls, cfg, tmp_path / "dl", progress=False)
    assert "00001.parquet" in lost
    led = read_ledger(tmp_path / "dl")
    assert summarize_ledger(led) == {k: counts[k] for k in summarize_ledger(led)}
    assert counts["success"] == n and (led["status"] == "success").all(), led[led["status"] != "success"]
    assert counts["passes"][0]["transient_failures"] == 11 and counts["recovered_on_retry"] == 11
    retried = led.loc[led["attempts"] == 2, "row_id"].tolist()
    assert retried == [*range(10, 20), 25]
    parts = sorted((tmp_path / "dl" / "images").glob("part-*.parquet"))
    assert counts["parts"] == len(parts) == 3
    for k, p in enumerate(parts):  # part k holds input rows 10k..10k+9, in row order
        assert pd.read_parquet(p, columns=["row_id"])["row_id"].tolist() == list(range(10 * k, 10 * k + 10))


def _read_whole_as_before(path, url_col="url", caption_col="caption", on_duplicate_urls="error"):
    """The URL list as read_url_list read it before issue 14 (the whole file as one frame, repeats by
    pandas ``duplicated``): the reference the batched reader is held to."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix == ".parquet":
        df = pd.read_parquet(path)
    elif suffix.startswith((".csv", ".tsv")):
        df = pd.read_csv(path, sep="\t" if suffix.startswith(".tsv") else ",", dtype=str, keep_default_na=False)
    else:
        df = pd.read_json(path, lines=True, dtype=False)
    out = pd.DataFrame({"row_id": np.arange(len(df), dtype=np.int64), "url": df[url_col].astype(str).str.strip(),
                        "caption": df[caption_col].fillna("").astype(str)})
    out["skip_reason"] = None
    bad_url = ~out["url"].str.match(r"^https?://[^\s/]+", na=False)
    out.loc[bad_url, "skip_reason"] = "invalid_url"
    dup = out["url"].duplicated(keep="first") & ~bad_url
    first = out.drop_duplicates("url").set_index("url")["row_id"]
    out.loc[dup, "skip_reason"] = [f"duplicate_url_of_row_{first[u]}" for u in out.loc[dup, "url"]]
    return out


def _planted_list(n=200):
    rng = np.random.default_rng(14)
    urls = [f"https://ex{i % 7}.org/img/{i}.jpg" for i in range(n)]
    for i in rng.choice(n, 40, replace=False):  # repeats of earlier rows, across batch boundaries
        if i > 0:
            urls[i] = urls[int(rng.integers(0, i))]
    urls[3], urls[50], urls[51] = "ftp://nope/x.jpg", "not a url", ""
    urls[60] = "  " + urls[61] + " "   # whitespace around a URL that a later row repeats bare
    captions = [f"a caption, with \"quotes\" {i}" if i % 5 else "" for i in range(n)]
    captions[7] = "line\nbreak"
    return pd.DataFrame({"url": urls, "caption": captions, "extra": range(n)})


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv.gz", "jsonl"])
def test_the_batched_url_list_reads_as_the_whole_file_did(tmp_path, fmt):
    """Issue 14: the list is read in batches (here of 7 rows, so repeats and bad rows straddle them) and its
    repeats found by 64-bit hashes confirmed on the URLs: the same frame as the whole-file read of before,
    for every format; the duplicate error names the same rows."""
    from imagegen.stages.download import iter_url_list, scan_url_list

    df = _planted_list()
    path = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        df.to_parquet(path, index=False, row_group_size=13)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv.gz":
        df.to_csv(path, sep="\t", index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    want = _read_whole_as_before(path)
    assert want["skip_reason"].str.startswith("duplicate_url_of_row_").sum() >= 20
    assert (want["skip_reason"] == "invalid_url").sum() == 3
    import imagegen.stages.download as D

    got = pd.concat(list(D.iter_checked_url_list(path, on_duplicate_urls="skip", batch_rows=7)[1]),
                    ignore_index=True)
    pd.testing.assert_frame_equal(got, want)
    pd.testing.assert_frame_equal(read_url_list(path, on_duplicate_urls="skip"), want)
    assert sum(len(b) for b in iter_url_list(path, batch_rows=7)) == len(df)
    with pytest.raises(InputError) as new_err:
        scan_url_list(path, batch_rows=7)
    dup = want[want["skip_reason"].str.startswith("duplicate", na=False)]
    first = ", ".join(f"row {r} repeats row {s.rsplit('_', 1)[1]}" for r, s in
                      zip(dup["row_id"][:5], dup["skip_reason"][:5]))
    assert f"has {len(dup)} duplicate URL(s) ({first})" in str(new_err.value) and str(path) in str(new_err.value)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_read_batch_leaves_no_reference_cycle(tmp_path, fmt):
    """Issue 14: a batch of the URL list is freed as soon as it is dropped, not at the next full garbage
    collection (pandas' cached ``.str`` accessor made a cycle per batch that kept its strings: ~190 bytes a
    row of every batch in the driver, most of the slope of bench_download_memory)."""
    import gc

    from imagegen.stages.download import iter_url_list, scan_url_list

    df = _planted_list(300)
    path = tmp_path / f"list.{fmt}"
    df.to_parquet(path, index=False) if fmt == "parquet" else df.to_csv(path, index=False)
    gc.collect()
    gc.disable()
    try:
        n = sum(len(b) for b in iter_url_list(path, batch_rows=50))
        scan_url_list(path, on_duplicate_urls="skip", batch_rows=50)
        unreachable = gc.collect()
    finally:
        gc.enable()
    assert n == len(df)
    assert unreachable == 0


def test_the_ledger_summary_keeps_8_bytes_a_row():
    """Its row ids are copies: a view of a ledger part's row_id kept the part's whole int64 block."""
    from imagegen.stages.download import LEDGER_COLUMNS, LedgerSummary, ledger_frame

    n = 1000
    part = pd.DataFrame({c: [None] * n for c in LEDGER_COLUMNS})
    part = part.assign(row_id=np.arange(n, dtype=np.int64), url="u", caption="c", status="failed", reason="timeout",
                       error="e", attempts=np.ones(n, dtype=np.int64))
    summary = LedgerSummary()
    summary.add(ledger_frame(part))
    kept = summary.ids[0]
    while kept.base is not None:
        kept = kept.base
    assert kept.nbytes == 8 * n
    assert summary.result()["failed"] == n


def test_a_hash_collision_never_makes_a_row_a_duplicate(tmp_path, monkeypatch):
    """Every URL hashing to the same 64 bits (the worst collision): the repeats found are still exactly
    the equal URLs, because a hash hit is confirmed on the URLs themselves."""
    import imagegen.stages.download as D

    df = _planted_list(100)
    df.to_parquet(tmp_path / "l.parquet", index=False)
    want = _read_whole_as_before(tmp_path / "l.parquet")
    monkeypatch.setattr(D, "url_hashes", lambda urls: np.zeros(len(urls), dtype=np.uint64))
    got = pd.concat(list(D.iter_checked_url_list(tmp_path / "l.parquet", on_duplicate_urls="skip",
                                                 batch_rows=9)[1]), ignore_index=True)
    pd.testing.assert_frame_equal(got, want)


def test_a_bad_jsonl_line_is_named_in_a_batched_read(tmp_path):
    lines = [json.dumps({"url": f"http://a.org/{i}.jpg", "caption": "c"}) for i in range(30)]
    lines[23] = "{not json"
    (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"l\.jsonl could not be read as \.jsonl, line 24"):
        read_url_list(tmp_path / "l.jsonl")


def _tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (ledger parts, image parts), by relative path."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _small_list(base: str, n: int) -> pd.DataFrame:
    return pd.DataFrame({"row_id": np.arange(n, dtype=np.int64), "url": [f"{base}/img/{i}.png" for i in range(n)],
                         "caption": [f"c{i}" for i in range(n)], "skip_reason": None})


@pytest.mark.slow
def test_parts_are_decoded_while_img2dataset_still_fetches_and_the_bytes_are_the_same(tmp_path, monkeypatch):
    """Issue 14: an image part is decoded as soon as img2dataset has finished it (its stats file), while the
    fetch goes on.  The last part's URLs answer after 2 s, so img2dataset (one process: its parts one after
    the other) is still fetching it when it returns the earlier parts; a row of part 1 fails once (503) and
    is fetched on the retry pass, so part 1 waits for that pass.  The ledger and image parts are the same
    bytes as the sequential path's (decode after the fetch)."""
    import img2dataset

    real = img2dataset.download
    seen_at_return: list[list[str]] = []

    def recording(**kw):
        real(**kw)
        dl = Path(kw["output_folder"]).parents[2]
        seen_at_return.append(sorted(p.name for p in (dl / "images").glob("part-*.parquet")))

    monkeypatch.setattr(img2dataset, "download", recording)
    n = 40
    cfg = DownloadConfig(processes_count=1, thread_count=4, number_sample_per_shard=10, retry_passes=1,
                         retry_wait=0, allow_private_addresses=True, image_size=16, timeout=10)
    slow = {f"/img/{i}.png": 2.0 for i in range(30, 40)}
    digests, counts = {}, {}
    server = _FlakyOnce({"/img/15.png"}, slow)
    with server as base:  # one server (the ledger records its port), its 503 armed again for each run
        for overlap in (True, False):
            server.asked.clear()
            counts[overlap] = run_download(_small_list(base, n), cfg, tmp_path / f"dl-{overlap}", progress=False,
                                           overlap=overlap)
            digests[overlap] = _tree_digest(tmp_path / f"dl-{overlap}")
    # pass 0 with overlap: parts 0 and 2 were decoded before img2dataset returned (part 3 may have been,
    # img2dataset takes a while to wind down), part 1 (a row to retry) was not
    assert {"part-00000.parquet", "part-00002.parquet"} <= set(seen_at_return[0]), seen_at_return
    assert "part-00001.parquet" not in seen_at_return[0], seen_at_return
    assert seen_at_return[2] == [], seen_at_return  # sequential: nothing decoded during the fetch
    assert counts[True] == counts[False] and counts[True]["success"] == n and counts[True]["recovered_on_retry"] == 1
    assert digests[True] == digests[False] and len([k for k in digests[True] if k.startswith("images/")]) == 4


@pytest.mark.slow
def test_overlapped_decode_on_a_process_pool_gives_the_sequential_bytes_with_every_fault(tmp_path):
    """Every planted fault (timeouts, 5xx once, truncated, HTML, corrupt, EXIF, CMYK, 16-bit...) through the
    real img2dataset on 2 processes and a local pool of 2 decode workers: overlapped and sequential runs
    (each against a fresh server) write sha256-identical ledger and image parts."""
    world = WorldConfig(seed=5)
    pub = PublishConfig(seed=5, n_images=40, stall_seconds=3.0, uninformative_rate=0.0, wrong_rate=0.0)
    publish_world(world, pub, tmp_path / "world")
    cfg = DownloadConfig(timeout=1.5, processes_count=2, thread_count=8, number_sample_per_shard=10)
    digests, counts = {}, {}
    for overlap in (True, False):
        out = tmp_path / f"dl-{overlap}"
        out.mkdir()
        with serve_world(tmp_path / "world") as srv:
            urls = url_table(tmp_path / "world", srv.base_url)
            urls["skip_reason"] = None
            counts[overlap] = run_download(urls, cfg, out, progress=False, overlap=overlap)
        digests[overlap] = _tree_digest(out)
    assert counts[True] == counts[False]
    assert counts[True]["failed"] and counts[True]["recovered_on_retry"], counts[True]
    assert digests[True] == digests[False]
    names = sorted(digests[True])  # only the outputs are left: image parts and ledger parts, several of each
    assert len([f for f in names if f.startswith("images/part-")]) == counts[True]["parts"] >= 4
    assert len([f for f in names if f.startswith("ledger/part-")]) >= 4
    assert all(f.startswith(("images/part-", "ledger/part-")) for f in names), names


def _all_whole(folder: Path) -> None:
    """No temporary file is left and every parquet file under ``folder`` reads whole."""
    import pyarrow.parquet as pq

    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name]
    for p in folder.rglob("*.parquet"):
        pq.read_table(p)


@pytest.mark.slow
def test_a_decode_error_during_the_fetch_surfaces_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A part whose decode fails while img2dataset still fetches: the error is raised by run_download, no
    ledger is written, and every file left is whole (each decode writes atomically)."""
    from imagegen.stages import download as D

    real = D.decode_part

    def fails_on_part_1(job):
        if job.index == 1:
            raise RuntimeError("planted decode failure in part 1")
        return real(job)

    monkeypatch.setattr(D, "decode_part", fails_on_part_1)
    _fails_cleanly(tmp_path, RuntimeError, "planted decode failure in part 1")


def _fails_cleanly(tmp_path, exc: type[BaseException], match: str) -> None:
    """run_download on 30 rows in parts of 10 raises ``exc``; no ledger, every file left whole, the part
    watcher's thread stopped."""
    import threading

    cfg = DownloadConfig(processes_count=1, thread_count=4, number_sample_per_shard=10, retry_passes=0,
                         allow_private_addresses=True, image_size=16)
    with _FlakyOnce(set()) as base:
        with pytest.raises(exc, match=match):
            run_download(_small_list(base, 30), cfg, tmp_path / "dl", progress=False)
    assert not (tmp_path / "dl" / "ledger").exists()
    _all_whole(tmp_path / "dl")
    assert not [t for t in threading.enumerate() if t.name.startswith("img2dataset-parts")]


@pytest.mark.slow
def test_a_fetch_error_surfaces_after_the_watcher_stops(tmp_path, monkeypatch):
    """img2dataset failing after it wrote its parts: the error is raised, the part watcher has stopped, no
    ledger is written and every file left is whole."""
    import img2dataset

    real = img2dataset.download

    def fails_after_writing(**kw):
        real(**kw)
        raise OSError("planted fetch failure")

    monkeypatch.setattr(img2dataset, "download", fails_after_writing)
    _fails_cleanly(tmp_path, OSError, "planted fetch failure")


@pytest.mark.slow
def test_a_url_list_path_is_streamed_to_the_same_bytes_as_its_table(tmp_path):
    """Issue 14: run_download reads a URL list path itself, in batches (repeats, invalid and padded URLs,
    rows of several parts), and the incremental download streams an appended list the same way; both give
    the ledger and image parts of the whole-table input, byte for byte."""
    from imagegen.stages import download as D
    from imagegen.stages.incremental import run_incremental_download

    server = _FlakyOnce({"/img/4.png"})
    with server as base:
        urls = [f"{base}/img/{i}.png" for i in range(24)]
        rows = urls + [urls[3], "  " + urls[5] + " ", "not a url", "", urls[20]]
        pd.DataFrame({"url": rows, "caption": [f"cap {i}" for i in range(len(rows))]}).to_parquet(tmp_path / "l.parquet")
        cfg = DownloadConfig(processes_count=1, thread_count=4, number_sample_per_shard=10, retry_passes=0,
                             allow_private_addresses=True, image_size=16, on_duplicate_urls="skip")
        digests, counts = {}, {}
        for how in ("path", "table"):
            server.asked.clear()
            inp = tmp_path / "l.parquet" if how == "path" else read_url_list(tmp_path / "l.parquet",
                                                                              on_duplicate_urls="skip")
            counts[how] = run_download(inp, cfg, tmp_path / how, progress=False)
            digests[how] = _tree_digest(tmp_path / how)
        assert counts["path"] == counts["table"] and digests["path"] == digests["table"]
        assert counts["path"]["skipped"] == 5 and counts["path"]["reasons"].get("http_5xx") == 1
        # a new version: the 503 row again, and an appended list (one URL of the parent, new ones)
        pd.DataFrame({"url": [urls[2], *(f"{base}/img/{i}.png" for i in range(30, 45))],
                      "caption": [f"add {i}" for i in range(16)]}).to_parquet(tmp_path / "add.parquet")
        parent = read_ledger(tmp_path / "path", ["row_id", "url", "caption"])
        child = {}
        for how in ("path", "table"):
            server.asked.clear()
            server.asked["/img/4.png"] = 1  # its 503 was served to the parent: the child's refetch succeeds
            append = tmp_path / "add.parquet" if how == "path" else read_url_list(tmp_path / "add.parquet")
            out = tmp_path / f"child-{how}"
            out.mkdir()
            child[how] = run_incremental_download(tmp_path / "path", parent, append, cfg, out)
            digests[f"child-{how}"] = _tree_digest(out)
    assert child["path"] == child["table"] and digests["child-path"] == digests["child-table"]
    assert child["path"]["incremental"]["appended"] == 16 and child["path"]["incremental"]["recovered"] == 1
    led = read_ledger(tmp_path / "child-path")
    assert led["row_id"].tolist() == list(range(len(rows) + 16))
    assert led.loc[len(rows), "reason"] == "duplicate_url_of_row_2" and D.is_transient("http_5xx")

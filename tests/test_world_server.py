"""The loopback HTTP server: each planted behaviour, checked with real clients on a real socket."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import requests

from imagegen.world.publish import BAD_IMAGE_KINDS, FAILURE_KINDS, PublishConfig, publish_world
from imagegen.world.scene import WorldConfig
from imagegen.world.server import PortInUseError, load_routes, serve_world
from imagegen.stages.ledger import read_ledger

STALL = 20.0  # far longer than any client timeout used here; the tests never wait for it


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("served") / "pub"
    rates = {f"{k}_rate": 0.0 for k in BAD_IMAGE_KINDS} | {f"{k}_rate": 0.05 for k in FAILURE_KINDS}
    publish_world(WorldConfig(seed=2), PublishConfig(n_images=30, stall_seconds=STALL, **rates), out)
    return out, pd.read_parquet(out / "truth.parquet")


def _paths(truth: pd.DataFrame, planted: str) -> list[str]:
    return list(truth[truth.planted == planted].path)


def _file(out: Path, path: str) -> bytes:
    routes = json.loads((out / "routes.json").read_text())
    route = routes[path]
    if route["behaviour"] == "redirect":
        route = routes[route["target"]]
    return (out / "files" / route["file"]).read_bytes()


def test_clean_and_not_found(world):
    out, truth = world
    with serve_world(out) as srv:
        assert srv.base_url.startswith("http://127.0.0.1:") and srv.port > 0
        p = _paths(truth, "clean")[0]
        with urllib.request.urlopen(srv.base_url + p, timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("image/")
            assert r.read() == _file(out, p)
        for p in [_paths(truth, "not_found")[0], "/img/does-not-exist.jpg"]:
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(srv.base_url + p, timeout=5)
            assert e.value.code == 404
        st = srv.stats()
        assert st["total"] == 3 and st["per_status"] == {200: 1, 404: 2}
        assert st["per_behaviour"] == {"ok": 1, "not_found": 2}


def test_flaky_fails_once_then_serves(world):
    out, truth = world
    p = _paths(truth, "flaky")[0]
    with serve_world(out) as srv:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(srv.base_url + p, timeout=5)
        assert e.value.code == 500
        r = requests.get(srv.base_url + p, timeout=5)
        assert r.status_code == 200 and r.content == _file(out, p)
        assert srv.stats()["per_path"][p] == 2
    with serve_world(out) as srv:  # a fresh server forgets: the first request fails again
        assert requests.get(srv.base_url + p, timeout=5).status_code == 500


def test_truncated_body_is_detected(world):
    out, truth = world
    p = _paths(truth, "truncated")[0]
    full = _file(out, p)
    with serve_world(out) as srv:
        with urllib.request.urlopen(srv.base_url + p, timeout=5) as r:
            assert int(r.headers["Content-Length"]) == len(full)
            with pytest.raises(http.client.IncompleteRead) as e:
                r.read()
        assert 0 < len(e.value.partial) < len(full) and full.startswith(e.value.partial)
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(srv.base_url + p, timeout=5)


def test_html_instead_of_image(world):
    out, truth = world
    p = _paths(truth, "html")[0]
    assert p.endswith((".jpg", ".png"))  # looks like an image URL
    with serve_world(out) as srv:
        r = requests.get(srv.base_url + p, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert r.content.startswith(b"<!doctype html>")


def test_redirect_is_followed(world):
    out, truth = world
    p = _paths(truth, "redirect")[0]
    with serve_world(out) as srv:
        r = requests.get(srv.base_url + p, timeout=5)
        assert r.status_code == 200 and r.content == _file(out, p)
        assert [h.status_code for h in r.history] == [302] and "/moved/" in r.url
        with urllib.request.urlopen(srv.base_url + p, timeout=5) as u:
            assert u.read() == _file(out, p) and u.url != srv.base_url + p
        st = srv.stats()
    assert st["per_behaviour"]["redirect"] == 2 and st["per_status"] == {302: 2, 200: 2}


def test_timeout_does_not_block_others_or_shutdown(world):
    out, truth = world
    stalled, clean = _paths(truth, "timeout")[0], _paths(truth, "clean")[0]
    outcome: dict[str, object] = {}

    def slow_client(url: str) -> None:
        try:
            with urllib.request.urlopen(url, timeout=STALL * 3) as r:
                outcome["body"] = r.read()
        except Exception as exc:  # noqa: BLE001 - the outcome is what we check
            outcome["error"] = exc

    with serve_world(out) as srv:
        with pytest.raises((TimeoutError, urllib.error.URLError, socket.timeout)):
            urllib.request.urlopen(srv.base_url + stalled, timeout=0.3)
        t = threading.Thread(target=slow_client, args=(srv.base_url + stalled,))
        t.start()
        # the stalled requests hold their own threads: a normal request is answered meanwhile
        # (its timeout is far below the stall, so a blocked server would fail this line)
        assert requests.get(srv.base_url + clean, timeout=STALL / 4).status_code == 200
        while srv.stats()["per_path"].get(stalled, 0) < 2:
            threading.Event().wait(0.01)
    # leaving the block woke the stalled request and dropped it: the client saw no image
    t.join()
    assert "body" not in outcome and isinstance(outcome["error"], (http.client.HTTPException, OSError))


def test_port_in_use_is_a_clear_error(world):
    out, _ = world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PortInUseError) as e:
            with serve_world(out, port=port):
                pass
    msg = str(e.value)
    assert msg == f"port {port} on 127.0.0.1 is already in use; pick another with --world-port or 0 for any free port"


def test_refuses_public_hosts(world):
    out, _ = world
    for host in ("0.0.0.0", "192.168.1.10", "example.com"):
        with pytest.raises(PermissionError, match="non-loopback"):
            with serve_world(out, host=host):
                pass


def test_bad_folder_and_routes(world, tmp_path):
    out, _ = world
    with pytest.raises(FileNotFoundError, match="routes.json"):
        with serve_world(tmp_path):
            pass
    routes = json.loads((out / "routes.json").read_text())
    first = sorted(routes)[0]
    routes[first]["behaviour"] = "teapot"
    (tmp_path / "routes.json").write_text(json.dumps(routes))
    (tmp_path / "files").mkdir()
    with pytest.raises(ValueError, match=f"{first}.*teapot"):
        load_routes(tmp_path)


def test_many_parallel_clients(world):
    from concurrent.futures import ThreadPoolExecutor

    out, truth = world
    paths = _paths(truth, "clean") * 3
    with serve_world(out) as srv:
        with ThreadPoolExecutor(32) as pool:
            bodies = list(pool.map(lambda p: requests.get(srv.base_url + p, timeout=10).content, paths))
        assert srv.stats()["per_status"] == {200: len(paths)}
    assert bodies == [_file(out, p) for p in paths]


# ------------------------------------------------------------------ hostile servers, end to end

def _hostile_world(base: Path, image: bytes, bomb: bytes) -> Path:
    out = base / "hostile"
    (out / "files").mkdir(parents=True)
    (out / "files" / "a.jpg").write_bytes(image)
    (out / "files" / "bomb.png").write_bytes(bomb)
    jpg = {"file": "a.jpg", "content_type": "image/jpeg"}
    routes = {
        "/slow.jpg": {"behaviour": "slowloris", "interval": 0.25, "seconds": 2.0, **jpg},
        "/reset.jpg": {"behaviour": "reset", **jpg},
        "/short.jpg": {"behaviour": "truncated", **jpg},
        "/gzip.png": {"behaviour": "gzip_bomb", "inflated_bytes": 64 << 20},
        "/loop.jpg": {"behaviour": "redirect_loop"},
        "/busy.jpg": {"behaviour": "rate_limited", "limited": 1, "retry_after": 1, **jpg},
        "/huge.png": {"behaviour": "ok", "file": "bomb.png", "content_type": "image/png"},
        "/fine.jpg": {"behaviour": "ok", **jpg},
    }
    (out / "routes.json").write_text(json.dumps(routes))
    return out


@pytest.mark.slow
def test_hostile_http_faults_end_in_the_ledger_with_their_reason(world, tmp_path):
    """Slowloris, reset mid-body, Content-Length > body, gzip bomb, redirect loop, 429 with
    Retry-After, a decompression-bomb PNG: each row ends in the ledger with its reason, nothing is
    inflated or decoded in full, and the 429 row is fetched on the retry pass after the wait."""
    import time

    from imagegen.stages.download import DownloadConfig, run_download
    from test_download import _png_bomb

    out, truth = world
    image = _file(out, _paths(truth, "clean")[0])
    pub = _hostile_world(tmp_path, image, _png_bomb(13300))
    cfg = DownloadConfig(timeout=1.5, processes_count=1, thread_count=8, retry_passes=1, retry_wait=1.0,
                         allow_private_addresses=True)
    with serve_world(pub) as srv:
        names = sorted(json.loads((pub / "routes.json").read_text()))
        urls = pd.DataFrame({"row_id": range(len(names)), "url": [srv.base_url + n for n in names],
                             "caption": names, "skip_reason": None})
        t0 = time.monotonic()
        counts = run_download(urls, cfg, tmp_path / "dl")
        took = time.monotonic() - t0
        stats = srv.stats()
    led = read_ledger(tmp_path / "dl").set_index("caption")
    assert counts["input_rows"] == len(names)
    assert led.loc["/fine.jpg", "status"] == "success"
    assert led.loc["/slow.jpg", "status"] == "success"  # bounded here; see the README on slowloris
    assert led.loc["/reset.jpg", "reason"] in ("connection_error", "truncated")
    assert led.loc["/short.jpg", "reason"] == "truncated"
    assert led.loc["/gzip.png", "reason"] == "compressed_body"
    assert led.loc["/loop.jpg", "reason"] == "redirect_loop"
    assert led.loc["/huge.png", "reason"] == "image_too_large"
    busy = led.loc["/busy.jpg"]
    assert busy["status"] == "success" and busy["attempts"] == 2
    assert stats["per_status"].get(429) == 1 and took >= 1.0


def test_private_addresses_are_refused_unless_allowed(tmp_path):
    from imagegen.stages.download import DownloadConfig, is_private_host, run_download

    assert is_private_host("http://169.254.169.254/latest/meta-data") and is_private_host("http://10.1.2.3/a.jpg")
    assert is_private_host("http://localhost:8080/a") and is_private_host("http://[::1]/a")
    assert not is_private_host("https://example.com/a.jpg") and not is_private_host("http://8.8.8.8/a")
    urls = pd.DataFrame({"row_id": [0, 1], "url": ["http://169.254.169.254/x", "http://192.168.1.5/y.jpg"],
                         "caption": ["a", "b"], "skip_reason": None})
    counts = run_download(urls, DownloadConfig(processes_count=1), tmp_path)
    led = read_ledger(tmp_path)
    assert (led["reason"] == "private_address").all() and counts["skipped"] == 2


# ------------------------------------------------------------------ Retry-After (issue 12)

def _rate_limited_world(base: Path, routes: dict) -> Path:
    import io

    from PIL import Image

    out = base / "limited"
    (out / "files").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="JPEG")
    (out / "files" / "a.jpg").write_bytes(buf.getvalue())
    (out / "routes.json").write_text(json.dumps(routes))
    return out


def test_retry_after_is_parsed_as_seconds_or_http_date():
    import email.utils
    import time

    from imagegen.retry_after import parse_retry_after

    now = time.time()
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0  # in the past
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None and parse_retry_after("1.5") is None  # not delta-seconds


def test_the_wait_is_the_servers_retry_after_capped_and_else_retry_wait(tmp_path):
    """The probe reads Retry-After from a real 429 (delta-seconds or HTTP-date), caps it, and
    falls back to retry_wait when the server sends none."""
    import email.utils
    import time

    from imagegen.retry_after import wait_before_retry

    jpg = {"file": "a.jpg", "content_type": "image/jpeg"}
    when = email.utils.formatdate(time.time() + 40, usegmt=True)
    pub = _rate_limited_world(tmp_path, {
        "/secs.jpg": {"behaviour": "rate_limited", "limited": 9, "retry_after": 7, **jpg},
        "/date.jpg": {"behaviour": "rate_limited", "limited": 9, "retry_after": when, **jpg},
        "/fine.jpg": {"behaviour": "ok", **jpg}})
    with serve_world(pub) as srv:
        u = srv.base_url
        assert wait_before_retry([u + "/secs.jpg"], 0.5, 60, 5)["wait_s"] == 7.0
        got = wait_before_retry([u + "/date.jpg"], 0.5, 60, 5)
        assert got["source"] == "retry-after" and 37 <= got["wait_s"] <= 40
        assert wait_before_retry([u + "/secs.jpg"], 0.5, 2.5, 5) == {
            "wait_s": 2.5, "source": "retry-after", "probed": {u.split("//")[1]: 7.0}}
        assert wait_before_retry([u + "/fine.jpg"], 0.5, 60, 5)["source"] == "retry_wait"
    assert wait_before_retry([u + "/secs.jpg"], 0.25, 60, 1)["wait_s"] == 0.25  # server gone: retry_wait


@pytest.mark.slow
def test_a_download_retry_pass_waits_what_retry_after_asks(tmp_path):
    """End to end through img2dataset: a 429 with Retry-After: 3 (retry_wait is 0.1) makes the
    retry pass wait 3 s, recorded in the pass counts, and the row is fetched on that pass."""
    import time

    from imagegen.stages.download import DownloadConfig, run_download

    jpg = {"file": "a.jpg", "content_type": "image/jpeg"}
    # the first two requests get 429: img2dataset's fetch and the probe
    pub = _rate_limited_world(tmp_path, {"/busy.jpg": {"behaviour": "rate_limited", "limited": 2,
                                                       "retry_after": 3, **jpg},
                                         "/fine.jpg": {"behaviour": "ok", **jpg}})
    cfg = DownloadConfig(timeout=5, processes_count=1, thread_count=4, retry_passes=1, retry_wait=0.1,
                         allow_private_addresses=True)
    with serve_world(pub) as srv:
        urls = pd.DataFrame({"row_id": [0, 1], "url": [srv.base_url + "/busy.jpg", srv.base_url + "/fine.jpg"],
                             "caption": ["busy", "fine"], "skip_reason": None})
        t0 = time.monotonic()
        counts = run_download(urls, cfg, tmp_path / "dl")
        took = time.monotonic() - t0
        stats = srv.stats()
    first = counts["passes"][0]
    assert first["rate_limited"] == 1 and first["wait_s"] == 3.0 and first["wait_source"] == "retry-after"
    led = read_ledger(tmp_path / "dl").set_index("caption")
    assert led.loc["busy", "status"] == "success" and led.loc["busy", "attempts"] == 2
    assert stats["per_status"].get(429) == 2 and took >= 3.0

"""Serve a published world over real HTTP on loopback, misbehaving exactly as ``routes.json`` says.

``serve_world(folder)`` is a context manager yielding a :class:`WorldServer` with ``base_url``
(``"http://127.0.0.1:PORT"``) and ``stats()``. Behaviours: ``ok`` (200 + bytes), ``not_found``
(404), ``flaky`` (500 on a path's first request, 200 after), ``timeout`` (stall, then answer),
``truncated`` (claim the full Content-Length, send part, close), ``html`` (200 text/html),
``redirect`` (302 to ``target``); hostile: ``slowloris`` (headers, then the body a few bytes
every ``interval`` seconds for ``seconds``, then the rest), ``reset`` (part of the body, then a TCP
reset), ``gzip_bomb`` (200 with ``Content-Encoding: gzip``: ``inflated_bytes`` of zeros
compressed), ``redirect_loop`` (302 to itself), ``rate_limited`` (429 with ``Retry-After:
retry_after`` for the first ``limited`` requests, then the file). Unknown paths get 404. Each request runs in its own daemon
thread, so a stalled request blocks nobody, and shutdown wakes stalled requests instead of
waiting for them.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import socket
import struct
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

BEHAVIOURS = ("ok", "not_found", "flaky", "timeout", "truncated", "html", "redirect",
              # hostile ones (routes written by hand or by tests; default worlds never plant them)
              "slowloris", "reset", "gzip_bomb", "redirect_loop", "rate_limited")


@functools.lru_cache(maxsize=4)
def _gzip_zeros(n: int) -> bytes:
    """A gzip stream that inflates to ``n`` zero bytes (about n / 1000 bytes on the wire)."""
    import gzip
    import io

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as f:
        block = bytes(1 << 20)
        for _ in range(n >> 20):
            f.write(block)
        f.write(bytes(n & ((1 << 20) - 1)))
    return buf.getvalue()


class PortInUseError(OSError):
    """The requested port is taken; the message says how to pick another."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_routes(published_dir: Path) -> dict[str, dict[str, Any]]:
    """Read and check ``routes.json``: known behaviours, files present, redirect targets routed."""
    path = Path(published_dir) / "routes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {published_dir} is not a published world folder")
    routes = json.loads(path.read_text())
    files = Path(published_dir) / "files"
    for p, r in routes.items():
        beh = r.get("behaviour")
        if beh not in BEHAVIOURS:
            raise ValueError(f"{path}: route {p} has unknown behaviour {beh!r}; known: {list(BEHAVIOURS)}")
        if beh == "redirect":
            if r.get("target") not in routes:
                raise ValueError(f"{path}: redirect {p} points to {r.get('target')!r}, which has no route")
        elif beh not in ("not_found", "gzip_bomb", "redirect_loop"):
            if not r.get("file") or not (files / r["file"]).is_file():
                raise ValueError(f"{path}: route {p} ({beh}) needs a file, {r.get('file')!r} is missing from {files}")
    return routes


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # request threads never keep the process alive
    block_on_close = False  # server_close() does not join stalled request threads
    allow_reuse_address = True
    request_queue_size = 128  # downloaders open many connections at once; 5 would make them retry SYNs

    world: WorldServer


class WorldServer:
    """Handle on a running world server: ``base_url`` and request ``stats()``."""

    def __init__(self, published_dir: Path, routes: dict[str, dict[str, Any]], httpd: _Server) -> None:
        self.published_dir = Path(published_dir)
        self.routes = routes
        self.httpd = httpd
        host, port = httpd.server_address[:2]
        self.host, self.port = str(host), int(port)
        self.base_url = f"http://{self.host}:{self.port}"
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._per_path: Counter[str] = Counter()
        self._per_behaviour: Counter[str] = Counter()
        self._per_status: Counter[int] = Counter()
        self._seen: Counter[str] = Counter()  # flaky bookkeeping

    def _count(self, path: str, behaviour: str) -> int:
        """Record a request; return how many times this path was requested before it."""
        with self._lock:
            before = self._seen[path]
            self._seen[path] += 1
            self._per_path[path] += 1
            self._per_behaviour[behaviour] += 1
            return before

    def _status(self, code: int) -> None:
        with self._lock:
            self._per_status[code] += 1

    def stats(self) -> dict[str, Any]:
        """Requests so far: ``total``, ``per_path``, ``per_behaviour``, ``per_status`` (status sent)."""
        with self._lock:
            return {
                "total": sum(self._per_path.values()),
                "per_path": dict(self._per_path),
                "per_behaviour": dict(self._per_behaviour),
                "per_status": dict(self._per_status),
            }

    def read_file(self, name: str) -> bytes:
        return (self.published_dir / "files" / name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: truncation ends at close
    server_version = "imagegen-world/1"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes, content_type: str, head: bool, extra: dict[str, str] | None = None) -> None:
        self.server.world._status(code)  # before sending, so a client never sees uncounted replies
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _begin_file_body(self, route: dict[str, Any]) -> bytes:
        """Send a 200's headers for the route's whole file (the faults that misbehave mid-body) and
        return the body, for the caller to send in part or slowly."""
        body = self.server.world.read_file(route["file"])
        self.server.world._status(200)
        self.send_response(200)
        self.send_header("Content-Type", route["content_type"])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return body

    def _handle(self, head: bool) -> None:
        world = self.server.world
        path = urlsplit(self.path).path
        route = world.routes.get(path)
        behaviour = route["behaviour"] if route else "not_found"
        before = world._count(path, behaviour)
        try:
            if behaviour == "not_found":
                self._send(404, b"not found\n", "text/plain; charset=utf-8", head)
            elif behaviour == "redirect":
                location = world.base_url + route["target"]
                self._send(302, b"", "text/plain; charset=utf-8", head, {"Location": location})
            elif behaviour == "redirect_loop":
                self._send(302, b"", "text/plain; charset=utf-8", head, {"Location": world.base_url + path})
            elif behaviour == "rate_limited" and before < int(route.get("limited", 1)):
                self._send(429, b"too many requests\n", "text/plain; charset=utf-8", head,
                           {"Retry-After": str(route.get("retry_after", 1))})
            elif behaviour == "gzip_bomb":
                body = _gzip_zeros(int(route.get("inflated_bytes", 1 << 28)))
                self._send(200, body, route.get("content_type", "image/png"), head, {"Content-Encoding": "gzip"})
            elif behaviour == "reset":
                body = self._begin_file_body(route)
                if not head:
                    self.wfile.write(body[:len(body) // 3])
                    self.wfile.flush()
                # SO_LINGER 0: close() sends RST instead of FIN, the client sees "connection reset"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
            elif behaviour == "slowloris":
                body = self._begin_file_body(route)
                if not head:
                    interval, until = float(route.get("interval", 0.2)), float(route.get("seconds", 3.0))
                    sent, t_end = 0, time.monotonic() + until
                    while time.monotonic() < t_end and sent < len(body) - 1:
                        self.wfile.write(body[sent:sent + 2])
                        self.wfile.flush()
                        sent += 2
                        if world.stopping.wait(interval):
                            self.close_connection = True
                            return
                    self.wfile.write(body[sent:])
            elif behaviour == "flaky" and before == 0:
                self._send(500, b"internal server error\n", "text/plain; charset=utf-8", head)
            elif behaviour == "truncated":
                body = world.read_file(route["file"])
                claimed = int(route.get("content_length", len(body) * 2))
                sent = int(route.get("send_bytes", len(body) // 2))
                world._status(200)
                self.send_response(200)
                self.send_header("Content-Type", route["content_type"])
                self.send_header("Content-Length", str(max(claimed, sent + 1)))
                self.end_headers()
                if not head:
                    self.wfile.write(body[:sent])
                    self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            else:  # ok, html, flaky after the first request, timeout after the stall
                if behaviour == "timeout":
                    if world.stopping.wait(float(route.get("stall_seconds", 6.0))):
                        self.close_connection = True
                        return  # server shutting down: drop the request
                self._send(200, world.read_file(route["file"]), route["content_type"], head)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            if exc.errno not in (None, errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                raise
            self.close_connection = True  # the client gave up (e.g. after its own timeout)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._handle(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle(head=True)


@contextmanager
def serve_world(
    published_dir: str | Path, host: str = "127.0.0.1", port: int = 0, allow_public: bool = False
) -> Iterator[WorldServer]:
    """Serve ``published_dir`` on ``host:port`` (0 = any free port) until the block exits.

    Yields a :class:`WorldServer`; use ``.base_url`` to build URLs and ``.stats()`` for counts.
    """
    if not (0 <= port <= 65535):
        raise ValueError(f"port must be 0..65535, got {port}")
    if not allow_public and not _is_loopback(host):
        raise PermissionError(
            f"refusing to serve the world on non-loopback host {host!r}; use 127.0.0.1 "
            "(or pass allow_public=True if you really mean to expose it)"
        )
    try:
        httpd = _Server((host, port), _Handler, bind_and_activate=True)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            err = PortInUseError(
                f"port {port} on {host} is already in use; pick another with --world-port or 0 for any free port"
            )
            err.errno = errno.EADDRINUSE
            raise err from exc
        raise
    try:
        routes = load_routes(Path(published_dir))
    except BaseException:
        httpd.server_close()
        raise
    world = WorldServer(Path(published_dir), routes, httpd)
    httpd.world = world
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name=f"world-server-{world.port}")
    thread.start()
    try:
        yield world
    finally:
        world.stopping.set()  # wake stalled requests so they drop out instead of answering
        httpd.shutdown()
        httpd.server_close()
        thread.join()

"""How long a rate-limited server asks us to wait before the download's retry pass.

img2dataset keeps only an error message of a failed fetch, not the response headers, so the
``Retry-After`` of a 429 or 503 (RFC 9110 section 10.2.3: delta-seconds or an HTTP-date) is
learned by probing: before a retry pass that retries such rows, one HEAD request per host (the
first such row of each, in row order, at most ``MAX_HOSTS`` hosts) reads the header.  The wait is
the longest any host asks for, capped by ``download.retry_after_max``; when no host sends a usable
header the wait is ``download.retry_wait``.
"""

from __future__ import annotations

import email.utils
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from datetime import timezone
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_HOSTS = 8  # probes per retry pass (one per host)
RATE_LIMITED = re.compile(r"http error (429|503)\b", re.IGNORECASE)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds, or an HTTP-date (seconds from
    ``now``, at least 0); ``None`` when absent or malformed."""
    if value is None:
        return None
    v = value.strip()
    if re.fullmatch(r"\d{1,10}", v):
        return float(int(v))
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def probe_retry_after(url: str, timeout: float, user_agent: str | None = None) -> float | None:
    """HEAD ``url`` and return its ``Retry-After`` in seconds (``None`` without a usable one or
    when the probe fails)."""
    headers = {"User-Agent": f"imagegen-retry-probe{f' ({user_agent})' if user_agent else ''}"}
    req = urllib.request.Request(url, method="HEAD", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the row's own URL
            return parse_retry_after(resp.headers.get("Retry-After"))
    except urllib.error.HTTPError as exc:
        return parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def rate_limited(messages: Iterable[str | None]) -> list[bool]:
    """Which error messages are an HTTP 429 or 503 (the statuses that carry Retry-After)."""
    return [bool(RATE_LIMITED.search(m or "")) for m in messages]


def wait_before_retry(urls: list[str], fallback: float, cap: float, timeout: float,
                      user_agent: str | None = None) -> dict[str, object]:
    """The wait before retrying the rate-limited ``urls``: ``{"wait_s", "source", "probed"}``,
    source ``retry-after`` (the longest header value, capped at ``cap``) or ``retry_wait``
    (``fallback``: no host sent one)."""
    first: dict[str, str] = {}
    for u in urls:
        host = urlsplit(u).netloc
        if host not in first and len(first) < MAX_HOSTS:
            first[host] = u
    asked = {host: probe_retry_after(u, timeout, user_agent) for host, u in first.items()}
    found = [s for s in asked.values() if s is not None]
    if found:
        wait, source = min(max(found), cap), "retry-after"
    else:
        wait, source = fallback, "retry_wait"
    return {"wait_s": round(float(wait), 3), "source": source,
            "probed": {h: (None if s is None else round(s, 3)) for h, s in asked.items()}}

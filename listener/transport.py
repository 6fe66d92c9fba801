"""The relay's HTTP client, behind one small interface (SPEC §3).

The transport was chosen by measurement (``shared/perf-notes.md``): aiohttp's
client does ~9,000 signed POSTs/s on loopback where httpx's async client does
~470, so this module wraps one :class:`aiohttp.ClientSession` with a
keep-alive connector sized to the relay's concurrency.  Everything the relay
needs from an attempt comes back as one :class:`HttpResult`: the status, the
first 4 KiB of the response body, ``Retry-After`` in seconds, an error string
for failures that never got a response, and the classification (ok /
retryable / final).

Classification: 2xx is success; connection errors, timeouts, 408, 425, 429
and 5xx are retryable; every other status (other 4xx, and 3xx — redirects
are not followed, a POST must not silently turn into a GET) is final.

Error strings never carry a URL's query string (it may hold a token).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from yarl import URL

#: How much of a response body is kept for the audit trail.
BODY_LIMIT = 4096
#: Statuses worth retrying besides 5xx.
RETRYABLE_STATUSES = frozenset({408, 425, 429})
#: A Retry-After beyond this is clamped (the SQL caps it at one day too).
RETRY_AFTER_MAX_SECONDS = 86400.0
USER_AGENT = "barnum-relay/0.1"


@dataclass(slots=True, frozen=True)
class HttpResult:
    """The outcome of one POST."""

    status: int | None
    body: str | None
    retry_after: float | None
    error: str | None
    duration_ms: int
    #: The receiver answered ``webhook-delivery: abort``: stop retrying (Svix).
    abort: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def retryable(self) -> bool:
        return not self.abort and is_retryable(self.status, self.error)


def is_retryable(status: int | None, error: str | None = None) -> bool:
    """Retry connection errors and timeouts (no status), 408, 425, 429 and 5xx."""
    if status is None:
        return not (error or "").startswith(FINAL_ERROR_PREFIX)
    return status >= 500 or status in RETRYABLE_STATUSES


#: The error recorded when a receiver asks to stop retrying a delivery.
ABORT_ERROR = "the receiver answered webhook-delivery: abort (no more retries)"

#: Errors starting with this are the sender's fault (bad URL): not retried.
FINAL_ERROR_PREFIX = "invalid request: "


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date.

    ``None`` when absent or unparseable; never negative; clamped to a day.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return min(float(int(value)), RETRY_AFTER_MAX_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = time.time() if now is None else now
    delta = when.timestamp() - current
    if math.isnan(delta):
        return None
    return min(max(delta, 0.0), RETRY_AFTER_MAX_SECONDS)


def redact_url(url: str) -> str:
    """``url`` without query, fragment or credentials — safe to log or store."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        base = url.split("#", 1)[0].split("?", 1)[0]
        scheme, sep, rest = base.partition("://")
        if sep and "@" in rest.split("/", 1)[0]:
            rest = rest.split("@", 1)[1]
        return scheme + sep + rest


def _describe(exc: BaseException, url: str) -> str:
    text = str(exc) or type(exc).__name__
    if url and url in text:
        text = text.replace(url, redact_url(url))
    for secret_part in (url.partition("?")[2].partition("#")[0], url.partition("#")[2]):
        if secret_part and secret_part in text:
            text = text.replace(secret_part, "…")
    return f"{type(exc).__name__}: {text}"[:500]


def _decode_body(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


class Transport:
    """One keep-alive HTTP client session for all deliveries of a process.

    Use as ``async with Transport(concurrency) as t: await t.post(...)`` or
    call :meth:`close` yourself.  The session is created lazily on the first
    request so a Transport can be built outside a running loop.
    """

    def __init__(self, concurrency: int = 32) -> None:
        self.concurrency = max(1, concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[int, aiohttp.ClientTimeout] = {}
        self._urls: dict[str, URL] = {}

    async def __aenter__(self) -> Transport:
        self._ensure_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.concurrency,
                limit_per_host=0,
                keepalive_timeout=30.0,
                ttl_dns_cache=60,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": USER_AGENT},
                trust_env=False,
                raise_for_status=False,
            )
        return self._session

    def _timeout(self, timeout_ms: int) -> aiohttp.ClientTimeout:
        cached = self._timeouts.get(timeout_ms)
        if cached is None:
            cached = aiohttp.ClientTimeout(total=timeout_ms / 1000.0)
            self._timeouts[timeout_ms] = cached
        return cached

    def _url(self, url: str) -> URL:
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = URL(url)
            if len(self._urls) >= 4096:
                self._urls.clear()
            self._urls[url] = parsed
        return parsed

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_ms: int = 10000
    ) -> HttpResult:
        """POST ``body`` to ``url``; never raises for network or HTTP failures."""
        session = self._ensure_session()
        started = time.perf_counter()
        status: int | None = None
        try:
            async with session.post(
                self._url(url),
                data=body,
                headers=headers,
                timeout=self._timeout(timeout_ms),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                raw = await _read_limited(resp.content, BODY_LIMIT)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                abort = resp.headers.get("webhook-delivery", "").strip().lower() == "abort"
            return HttpResult(
                status, _decode_body(raw), retry_after,
                ABORT_ERROR if abort and not 200 <= status < 300 else None, _ms(started), abort,
            )
        except asyncio.TimeoutError:
            return HttpResult(status, None, None, f"timeout after {timeout_ms} ms", _ms(started))
        except (aiohttp.InvalidURL, ValueError) as exc:
            if status is not None:
                return HttpResult(status, None, None, _describe(exc, url), _ms(started))
            return HttpResult(None, None, None, FINAL_ERROR_PREFIX + _describe(exc, url), _ms(started))
        except (aiohttp.ClientError, OSError) as exc:
            return HttpResult(status, None, None, _describe(exc, url), _ms(started))

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


async def _read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """Up to ``limit`` bytes of the body.  A body read to its end leaves the
    connection reusable; a longer one is cut and its connection closed."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _ms(started: float) -> int:
    return int(round((time.perf_counter() - started) * 1000.0))


"""Webhook signatures, both directions (SPEC §3, §4.2).

Two schemes over the exact body bytes:

* Standard Webhooks: ``webhook-signature: v1,<base64 HMAC-SHA256(key,
  "{id}.{timestamp}.{body}")>`` (space-separated list of signatures allowed);
  the signed ``webhook-id`` is the callback's idempotency key.
* ``X-Webhook-Signature``: lowercase hex HMAC-SHA256, optionally prefixed
  ``sha256=`` by senders.  With ``X-Webhook-Timestamp: <unix seconds>`` the
  signed bytes are ``"{timestamp}.{body}"`` (5-minute window); without it
  only the body is signed (the seed's scheme, replayable: refused when
  ``WEBHOOK_REQUIRE_TIMESTAMP`` is on).  No header of this scheme but the
  signature is signed, so its idempotency key is derived from the signature.

Header values are compared as bytes: a header holding non-ASCII characters
is a failed check, never an exception.

A secret ``whsec_<base64>`` means its decoded bytes; any other secret its
UTF-8 bytes.  ``WEBHOOK_SECRET`` may list several secrets separated by commas:
sign with the first, accept any (rotation).  Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

#: Standard Webhooks' default tolerance for webhook-timestamp.
TIMESTAMP_TOLERANCE_SECONDS = 300
#: A unix timestamp in seconds: digits only, short enough to be a date.
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")


def decode_secret(secret: str) -> bytes:
    """Key bytes for one secret (``whsec_`` base64 or plain UTF-8)."""
    secret = secret.strip()
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("a whsec_ secret must be valid base64 after the prefix") from exc
    if not secret:
        raise ValueError("empty secret")
    return secret.encode("utf-8")


def parse_secrets(value: str) -> list[bytes]:
    """Keys from a comma-separated ``WEBHOOK_SECRET``; the first one signs."""
    keys = [decode_secret(part) for part in value.split(",") if part.strip()]
    if not keys:
        raise ValueError("WEBHOOK_SECRET holds no secret")
    return keys


def hex_signature(key: bytes, body: bytes) -> str:
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def standard_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def outbound_headers(
    key: bytes,
    body: bytes,
    *,
    event_id: str,
    event_type: str,
    idempotency_key: str,
    timestamp: int | None = None,
) -> dict[str, str]:
    """Every header the relay sends with one delivery (SPEC §3)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        "X-Webhook-Signature": hex_signature(key, body),
        "X-Event-Id": event_id,
        "X-Event-Type": event_type,
        "X-Idempotency-Key": idempotency_key,
        "webhook-id": event_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": standard_signature(key, event_id, ts, body),
    }


def _header_bytes(value: str) -> bytes:
    """A header value's bytes (Starlette decodes headers as Latin-1)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape")


def _timestamp(text: str | None, now: float | None, tolerance: int) -> int | None:
    """A fresh unix timestamp from a header, or None (absent, malformed, stale or future)."""
    if text is None or not _TIMESTAMP_RE.fullmatch(text.strip()):
        return None
    ts = int(text.strip())
    current = time.time() if now is None else now
    return ts if abs(current - ts) <= tolerance else None


def _hex_given(header: str) -> bytes:
    given = header.strip()
    if given[:7].lower() == "sha256=":
        given = given[7:]
    return _header_bytes(given.lower())


def verify_hex(keys: list[bytes], body: bytes, header: str | None, *, timestamp: int | None = None) -> str | None:
    """Check ``X-Webhook-Signature`` (optional ``sha256=`` prefix) against any key.

    With ``timestamp`` the signed bytes are ``"{timestamp}.{body}"``.  Returns
    the matching signature (lowercase hex) or None."""
    if not header:
        return None
    given = _hex_given(header)
    signed = body if timestamp is None else f"{timestamp}.".encode() + body
    match: str | None = None
    for key in keys:
        # No early exit: every key is compared, in constant time each.
        expected = hex_signature(key, signed)
        if hmac.compare_digest(expected.encode(), given):
            match = expected
    return match


def verify_standard(
    keys: list[bytes],
    body: bytes,
    msg_id: str | None,
    timestamp: str | None,
    signature: str | None,
    *,
    now: float | None = None,
    tolerance: int = TIMESTAMP_TOLERANCE_SECONDS,
) -> bool:
    """Check Standard Webhooks headers; a stale, future or malformed timestamp fails."""
    if not (msg_id and signature):
        return False
    ts = _timestamp(timestamp, now, tolerance)
    if ts is None:
        return False
    candidates = [_header_bytes(s) for s in signature.split(" ") if s.startswith("v1,")]
    signed = _header_bytes(msg_id) + f".{ts}.".encode() + body
    ok = False
    for key in keys:
        expected = ("v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()).encode()
        for cand in candidates:
            ok |= hmac.compare_digest(expected, cand)
    return ok


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking a callback's signature."""

    ok: bool
    #: ``standard``, ``hex-timestamp`` or ``hex-body`` (the replayable seed scheme).
    scheme: str = ""
    #: Idempotency key covered by (or derived from) the signature.
    idempotency_key: str | None = None


def verify_callback(
    keys: list[bytes],
    body: bytes,
    headers: Mapping[str, str],
    *,
    require_timestamp: bool = False,
    now: float | None = None,
) -> Verdict:
    """Check an inbound callback's signature (README: Signing callbacks).

    Standard Webhooks when ``webhook-signature`` is present (then it must
    verify: a valid hex header does not rescue it), else the hex scheme —
    timestamped when ``X-Webhook-Timestamp`` is present, body-only otherwise
    (refused with ``require_timestamp``).  ``headers`` is looked up with
    lowercase names."""
    standard = headers.get("webhook-signature")
    if standard is not None:
        msg_id = headers.get("webhook-id")
        if verify_standard(keys, body, msg_id, headers.get("webhook-timestamp"), standard, now=now):
            return Verdict(True, "standard", (msg_id or "").strip() or None)
        return Verdict(False)
    stamp = headers.get("x-webhook-timestamp")
    if stamp is not None:
        ts = _timestamp(stamp, now, TIMESTAMP_TOLERANCE_SECONDS)
        if ts is None:
            return Verdict(False)
        match = verify_hex(keys, body, headers.get("x-webhook-signature"), timestamp=ts)
        return Verdict(True, "hex-timestamp", f"sig:{match}") if match else Verdict(False)
    if require_timestamp:
        return Verdict(False)
    match = verify_hex(keys, body, headers.get("x-webhook-signature"))
    return Verdict(True, "hex-body", f"sig:{match}") if match else Verdict(False)

"""Webhook signatures, both directions (SPEC §3, §4.2).

Two schemes over the exact body bytes:

* ``X-Webhook-Signature``: lowercase hex HMAC-SHA256(key, body), optionally
  prefixed ``sha256=`` by senders;
* Standard Webhooks: ``webhook-signature: v1,<base64 HMAC-SHA256(key,
  "{id}.{timestamp}.{body}")>`` (space-separated list of signatures allowed).

A secret ``whsec_<base64>`` means its decoded bytes; any other secret its
UTF-8 bytes.  ``WEBHOOK_SECRET`` may list several secrets separated by commas:
sign with the first, accept any (rotation).  Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

#: Standard Webhooks' default tolerance for webhook-timestamp.
TIMESTAMP_TOLERANCE_SECONDS = 300


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


def verify_hex(keys: list[bytes], body: bytes, header: str | None) -> bool:
    """Check ``X-Webhook-Signature`` (optional ``sha256=`` prefix) against any key."""
    if not header:
        return False
    given = header.strip()
    if given.lower().startswith("sha256="):
        given = given[len("sha256="):]
    given = given.lower()
    ok = False
    for key in keys:
        # No early exit: every key is compared, in constant time each.
        ok |= hmac.compare_digest(hex_signature(key, body), given)
    return ok


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
    """Check Standard Webhooks headers; a stale or future timestamp fails."""
    if not (msg_id and timestamp and signature):
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        return False
    candidates = [s for s in signature.split(" ") if s.startswith("v1,")]
    ok = False
    for key in keys:
        expected = standard_signature(key, msg_id, ts, body)
        for cand in candidates:
            ok |= hmac.compare_digest(expected, cand)
    return ok

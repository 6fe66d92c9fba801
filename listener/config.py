"""Configuration from the environment (SPEC §5).

A missing required variable stops the process at start with one clear line
naming it (the CLI prints ``ConfigError`` and exits 2).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Final, Mapping

from listener.signing import parse_secrets


class ConfigError(Exception):
    """Bad or missing configuration; the message is one line for the operator."""


@dataclass(frozen=True)
class Config:
    database_url: str | None = None
    listen_database_url: str | None = None
    webhook_secrets: list[bytes] = field(default_factory=list, repr=False)
    n8n_webhook_url: str | None = None
    internal_api_secret: str | None = field(default=None, repr=False)
    public_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "INFO"
    #: Refuse callbacks whose signature covers no timestamp (the seed's body-only hex scheme).
    webhook_require_timestamp: bool = False
    #: WhatsApp Cloud API webhook: app secret(s), comma-separated, and the verify token.
    whatsapp_app_secret: str | None = field(default=None, repr=False)
    whatsapp_verify_token: str | None = field(default=None, repr=False)
    #: Origins a browser may open the realtime endpoint (Socket.IO) from; empty
    #: = same origin only, ("*",) = any.
    cors_origins: tuple[str, ...] = ()

    @property
    def signing_key(self) -> bytes:
        """The key outbound deliveries are signed with (the first secret)."""
        if not self.webhook_secrets:
            raise ConfigError("WEBHOOK_SECRET is not set")
        return self.webhook_secrets[0]

    def require(self, *names: str) -> "Config":
        """Raise ConfigError naming the first missing variable of ``names``."""
        present = {
            "DATABASE_URL": self.database_url,
            "WEBHOOK_SECRET": self.webhook_secrets,
            "INTERNAL_API_SECRET": self.internal_api_secret,
        }
        for name in names:
            if not present.get(name):
                raise ConfigError(f"{name} is not set (see README: Configuration)")
        return self


def load(env: Mapping[str, str] | None = None) -> Config:
    """Read the environment; validates what is present, requires nothing."""
    e = os.environ if env is None else env
    secrets: list[bytes] = []
    if e.get("WEBHOOK_SECRET", "").strip():
        try:
            secrets = parse_secrets(e["WEBHOOK_SECRET"])
        except ValueError as exc:
            raise ConfigError(f"WEBHOOK_SECRET: {exc}") from None
    port_text = e.get("BARNUM_PORT", "8000")
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"BARNUM_PORT must be a port number, got {port_text!r}") from None
    level = e.get("BARNUM_LOG_LEVEL", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"BARNUM_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    require_ts = _flag(e, "WEBHOOK_REQUIRE_TIMESTAMP")
    public = e.get("BARNUM_PUBLIC_URL") or None
    if public and not public.startswith(("http://", "https://")):
        raise ConfigError(f"BARNUM_PUBLIC_URL must start with http:// or https://, got {public!r}")
    cors = _origins(e.get("BARNUM_CORS_ORIGINS", ""))
    return Config(
        database_url=e.get("DATABASE_URL") or None,
        listen_database_url=e.get("LISTEN_DATABASE_URL") or None,
        webhook_secrets=secrets,
        n8n_webhook_url=e.get("N8N_WEBHOOK_URL") or e.get("N8N_WEBHOOK_BASE_URL") or None,
        internal_api_secret=e.get("INTERNAL_API_SECRET") or None,
        public_url=public.rstrip("/") if public else None,
        host=e.get("BARNUM_HOST", "127.0.0.1"),
        port=port,
        log_level=level,
        webhook_require_timestamp=require_ts,
        whatsapp_app_secret=e.get("WHATSAPP_APP_SECRET") or None,
        whatsapp_verify_token=e.get("WHATSAPP_VERIFY_TOKEN") or None,
        cors_origins=cors,
    )


_ORIGIN_RE: Final = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


def _origins(text: str) -> tuple[str, ...]:
    """BARNUM_CORS_ORIGINS: comma-separated origins (scheme://host[:port],
    as a browser sends them in ``Origin``), or ``*``."""
    origins: list[str] = []
    for item in text.split(","):
        value = item.strip().rstrip("/")
        if not value:
            continue
        if value != "*" and not _ORIGIN_RE.fullmatch(value):
            raise ConfigError(f"BARNUM_CORS_ORIGINS: {value!r} is not an origin like https://app.example.com")
        if value not in origins:
            origins.append(value.lower() if value != "*" else value)
    return tuple(origins)


_TRUE: Final = {"1", "true", "yes", "on"}
_FALSE: Final = {"", "0", "false", "no", "off"}


def _flag(env: Mapping[str, str], name: str) -> bool:
    """A boolean variable: true/false, 1/0, yes/no, on/off (unset = false)."""
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {env[name]!r}")

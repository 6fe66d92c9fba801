"""Patient-facing HTML pages of the action links (SPEC §4.1), in ``pt`` and ``en``.

Every page is one self-contained document: no external asset, no script,
one inline ``<style>`` block whose SHA-256 is pinned in the
Content-Security-Policy (:data:`CSP`), a mobile-first viewport.  Every value
that comes from the database or the URL goes through :func:`html.escape`.

The functions here only render; they never decide anything.  The shim picks
the page from the SQL result (or the ``BN4xx`` error) and the locale SQL
reports (``locale`` in the result, or in the error's DETAIL).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Mapping
from html import escape
from typing import Any, Final

LOCALES: Final = ("pt", "en")
DEFAULT_LOCALE: Final = "pt"

#: The only style of every page; its hash is what the CSP allows.
CSS: Final = (
    ":root{color-scheme:light;--fg:#1d2530;--muted:#5b6675;--bg:#f3f5f8;--card:#fff;"
    "--ok:#1a7f4b;--bad:#b42318;--info:#1f5fbf;--line:#e3e7ee}"
    "*{box-sizing:border-box}"
    "html{-webkit-text-size-adjust:100%}"
    "body{margin:0;min-height:100vh;background:var(--bg);color:var(--fg);"
    "font:16px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;"
    "display:flex;align-items:flex-start;justify-content:center;padding:24px 16px}"
    "main{width:100%;max-width:440px;background:var(--card);border-radius:16px;"
    "box-shadow:0 1px 3px rgba(16,24,40,.1),0 1px 2px rgba(16,24,40,.06);padding:28px 22px}"
    ".icon{width:56px;height:56px;border-radius:50%;display:flex;align-items:center;"
    "justify-content:center;font-size:30px;font-weight:700;margin:0 auto 12px;color:#fff;"
    "background:var(--info)}"
    ".icon.ok{background:var(--ok)}.icon.bad{background:var(--bad)}"
    "h1{font-size:1.35rem;line-height:1.3;margin:0 0 8px;text-align:center}"
    "p{margin:0 0 16px;color:var(--muted);text-align:center}"
    "dl{margin:0 0 20px;border-top:1px solid var(--line)}"
    "dl div{display:flex;justify-content:space-between;gap:12px;padding:10px 0;"
    "border-bottom:1px solid var(--line)}"
    "dt{color:var(--muted)}dd{margin:0;font-weight:600;text-align:right;overflow-wrap:anywhere}"
    "form{margin:0}"
    "button{width:100%;min-height:48px;border:0;border-radius:12px;padding:12px 16px;"
    "font:inherit;font-weight:600;color:#fff;background:var(--info);cursor:pointer}"
    "button.ok{background:var(--ok)}button.bad{background:var(--bad)}"
    "button:focus-visible{outline:3px solid #98b8f0;outline-offset:2px}"
    ".foot{margin:18px 0 0;font-size:.85rem}"
    "@media (min-width:600px){body{padding-top:64px}}"
)

_CSS_HASH: Final = base64.b64encode(hashlib.sha256(CSS.encode("utf-8")).digest()).decode("ascii")

#: Content-Security-Policy of every page: nothing may load, only our own
#: stylesheet (by hash) applies, forms only post back to us.
CSP: Final = (
    "default-src 'none'; "
    f"style-src 'sha256-{_CSS_HASH}'; "
    "img-src 'none'; "
    "form-action 'self'; "
    "base-uri 'none'; "
    "frame-ancestors 'none'"
)

# ----------------------------------------------------------------- texts

_TEXT: Final[dict[str, dict[str, str]]] = {
    "pt": {
        "date": "Data",
        "time": "Hora",
        "professional": "Profissional",
        "specialty": "Especialidade",
        "hello": "Olá, {name}.",
        "hello_anon": "Olá.",
        "confirm.title": "Confirmar a consulta",
        "confirm.lead": "Confirma a sua presença nesta consulta?",
        "confirm.button": "Confirmar consulta",
        "cancel.title": "Cancelar a consulta",
        "cancel.lead": "Pretende cancelar esta consulta?",
        "cancel.button": "Cancelar consulta",
        "reschedule.title": "Reagendar a consulta",
        "reschedule.lead": "Pretende marcar esta consulta para outra data? "
        "A clínica entrará em contacto consigo.",
        "reschedule.button": "Pedir reagendamento",
        "done.confirm.title": "Consulta confirmada",
        "done.confirm.lead": "Obrigado! A sua consulta está confirmada. Até breve.",
        "done.cancel.title": "Consulta cancelada",
        "done.cancel.lead": "A sua consulta foi cancelada. Se quiser marcar outra, contacte a clínica.",
        "done.reschedule.title": "Pedido de reagendamento recebido",
        "done.reschedule.lead": "Obrigado. Vamos contactá-lo para combinar uma nova data.",
        "err.400.title": "Pedido inválido",
        "err.400.lead": "Este link não corresponde a esta ação. Use o link exatamente como o recebeu.",
        "err.404.title": "Link inválido",
        "err.404.lead": "Este link não é válido. Confirme que o abriu por inteiro ou contacte a clínica.",
        "err.405.title": "Pedido inválido",
        "err.405.lead": "Este endereço não aceita este tipo de pedido.",
        "err.410.title": "Link já utilizado ou expirado",
        "err.410.lead": "Este link já não pode ser usado. Se precisar de ajuda, contacte a clínica.",
        "err.410.used.title": "Link já utilizado",
        "err.410.used.lead": "Este link já foi utilizado. Cada link só pode ser usado uma vez.",
        "err.410.expired.title": "Link expirado",
        "err.410.expired.lead": "Este link expirou. Se precisar de ajuda, contacte a clínica.",
        "err.409.title": "Não é possível alterar esta consulta",
        "err.409.lead": "Esta consulta já não pode ser alterada por este link "
        "(por exemplo, já foi cancelada ou já passou). Contacte a clínica.",
        "err.500.title": "Ocorreu um erro",
        "err.500.lead": "Não foi possível tratar o seu pedido. Tente de novo dentro de alguns minutos.",
        "err.503.title": "Serviço temporariamente indisponível",
        "err.503.lead": "Não foi possível tratar o seu pedido agora. Tente de novo dentro de alguns minutos.",
        "foot": "Pode fechar esta página.",
    },
    "en": {
        "date": "Date",
        "time": "Time",
        "professional": "Professional",
        "specialty": "Specialty",
        "hello": "Hello, {name}.",
        "hello_anon": "Hello.",
        "confirm.title": "Confirm your appointment",
        "confirm.lead": "Will you attend this appointment?",
        "confirm.button": "Confirm appointment",
        "cancel.title": "Cancel your appointment",
        "cancel.lead": "Do you want to cancel this appointment?",
        "cancel.button": "Cancel appointment",
        "reschedule.title": "Reschedule your appointment",
        "reschedule.lead": "Would you like another date for this appointment? The clinic will contact you.",
        "reschedule.button": "Ask to reschedule",
        "done.confirm.title": "Appointment confirmed",
        "done.confirm.lead": "Thank you! Your appointment is confirmed. See you soon.",
        "done.cancel.title": "Appointment cancelled",
        "done.cancel.lead": "Your appointment has been cancelled. To book another one, please contact the clinic.",
        "done.reschedule.title": "Reschedule request received",
        "done.reschedule.lead": "Thank you. We will contact you to arrange a new date.",
        "err.400.title": "Invalid request",
        "err.400.lead": "This link does not match this action. Please use the link exactly as you received it.",
        "err.404.title": "Invalid link",
        "err.404.lead": "This link is not valid. Check that you opened all of it, or contact the clinic.",
        "err.405.title": "Invalid request",
        "err.405.lead": "This address does not accept this kind of request.",
        "err.410.title": "Link already used or expired",
        "err.410.lead": "This link can no longer be used. If you need help, please contact the clinic.",
        "err.410.used.title": "Link already used",
        "err.410.used.lead": "This link has already been used. Each link works only once.",
        "err.410.expired.title": "Link expired",
        "err.410.expired.lead": "This link has expired. If you need help, please contact the clinic.",
        "err.409.title": "This appointment cannot be changed",
        "err.409.lead": "This appointment can no longer be changed with this link "
        "(for example, it was cancelled or has already taken place). Please contact the clinic.",
        "err.500.title": "Something went wrong",
        "err.500.lead": "We could not handle your request. Please try again in a few minutes.",
        "err.503.title": "Service temporarily unavailable",
        "err.503.lead": "We could not handle your request right now. Please try again in a few minutes.",
        "foot": "You can close this page.",
    },
}

_WEEKDAYS: Final = {
    "pt": ("segunda-feira", "terça-feira", "quarta-feira", "quinta-feira", "sexta-feira", "sábado", "domingo"),
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
}
_MONTHS: Final = {
    "pt": ("janeiro", "fevereiro", "março", "abril", "maio", "junho", "julho", "agosto",
           "setembro", "outubro", "novembro", "dezembro"),
    "en": ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"),
}

#: Icon and colour class per page kind (plain characters: no image, no font).
_ICON: Final = {
    "confirm": ("✓", "ok"),
    "cancel": ("✗", "bad"),
    "reschedule": ("↻", ""),
    "error": ("!", "bad"),
}


def normalize_locale(value: object) -> str:
    """``pt`` or ``en``; anything else (missing, unknown) is the default ``pt``."""
    if isinstance(value, str):
        short = value.strip().lower()[:2]
        if short in LOCALES:
            return short
    return DEFAULT_LOCALE


def _t(locale: str, key: str) -> str:
    return _TEXT[normalize_locale(locale)][key]


def format_date(locale: str, value: object) -> str:
    """``2026-02-01`` → ``domingo, 1 de fevereiro de 2026`` / ``Sunday, 1 February 2026``.

    A value that is not an ISO date is shown as it is (escaped by the caller).
    """
    loc = normalize_locale(locale)
    if not isinstance(value, str):
        return ""
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        return value
    weekday = _WEEKDAYS[loc][day.weekday()]
    month = _MONTHS[loc][day.month - 1]
    if loc == "pt":
        return f"{weekday}, {day.day} de {month} de {day.year}"
    return f"{weekday}, {day.day} {month} {day.year}"


def first_name(value: object) -> str:
    """The first word of a patient's name (pages greet by first name only)."""
    if not isinstance(value, str):
        return ""
    parts = value.split()
    return parts[0] if parts else ""


def _name_of(appointment: Mapping[str, Any], key: str) -> str:
    node = appointment.get(key)
    if isinstance(node, Mapping):
        name = node.get("name")
        if isinstance(name, str):
            return name.strip()
    return ""


def _document(locale: str, title: str, body: str) -> str:
    loc = normalize_locale(locale)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="{loc}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="robots" content="noindex,nofollow">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def _header(kind: str, title: str, lead: str, greeting: str = "") -> str:
    icon, cls = _ICON[kind]
    cls_attr = f"icon {cls}".strip()
    hello = f"<p>{escape(greeting)}</p>" if greeting else ""
    return (
        f'<div class="{cls_attr}" aria-hidden="true">{icon}</div>'
        f"<h1>{escape(title)}</h1>{hello}<p>{escape(lead)}</p>"
    )


def _details(locale: str, appointment: Mapping[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    date = format_date(locale, appointment.get("date"))
    if date:
        rows.append((_t(locale, "date"), date))
    time_value = appointment.get("time")
    if isinstance(time_value, str) and time_value:
        rows.append((_t(locale, "time"), time_value))
    professional = _name_of(appointment, "professional")
    if professional:
        rows.append((_t(locale, "professional"), professional))
    specialty = _name_of(appointment, "specialty")
    if specialty:
        rows.append((_t(locale, "specialty"), specialty))
    if not rows:
        return ""
    items = "".join(f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in rows)
    return f"<dl>{items}</dl>"


def _greeting(locale: str, appointment: Mapping[str, Any]) -> str:
    name = first_name(_name_of(appointment, "patient"))
    return _t(locale, "hello").format(name=name) if name else _t(locale, "hello_anon")


def action_page(locale: str, action: str, appointment: Mapping[str, Any], form_action: str) -> str:
    """The page a GET shows: the appointment and ONE button that POSTs ``form_action``.

    ``form_action`` is a URL reference (the same link); it is escaped here.
    """
    kind = action if action in ("confirm", "cancel", "reschedule") else "confirm"
    button_cls = {"confirm": "ok", "cancel": "bad", "reschedule": ""}[kind]
    cls_attr = f' class="{button_cls}"' if button_cls else ""
    body = (
        _header(kind, _t(locale, f"{kind}.title"), _t(locale, f"{kind}.lead"), _greeting(locale, appointment))
        + _details(locale, appointment)
        + f'<form method="post" action="{escape(form_action, quote=True)}">'
        + f'<button type="submit"{cls_attr}>{escape(_t(locale, f"{kind}.button"))}</button></form>'
    )
    return _document(locale, _t(locale, f"{kind}.title"), body)


def result_page(locale: str, action: str, appointment: Mapping[str, Any]) -> str:
    """The page after the action was performed: ✓ confirmed, ✗ cancelled, ↻ we will contact you."""
    kind = action if action in ("confirm", "cancel", "reschedule") else "confirm"
    title = _t(locale, f"done.{kind}.title")
    body = (
        _header(kind, title, _t(locale, f"done.{kind}.lead"), _greeting(locale, appointment))
        + _details(locale, appointment)
        + f'<p class="foot">{escape(_t(locale, "foot"))}</p>'
    )
    return _document(locale, title, body)


def error_page(locale: str, status: int, reason: str | None = None) -> str:
    """A friendly error page for ``status`` (400, 404, 405, 409, 410, 500, 503).

    ``reason`` refines a 410: ``"used"`` or ``"expired"``.  Never any detail
    of the failure itself: the page is the same whatever went wrong inside.
    """
    code = status if status in (400, 404, 405, 409, 410, 500, 503) else (500 if status >= 500 else 400)
    key = f"err.{code}"
    if code == 410 and reason in ("used", "expired"):
        key = f"err.410.{reason}"
    title = _t(locale, f"{key}.title")
    body = _header("error", title, _t(locale, f"{key}.lead"))
    return _document(locale, title, body)

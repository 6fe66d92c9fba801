"""Endpoint URLs: the host ``barnum.url_parts`` finds is the host the relay
connects to (issue 12, items 3 and 4).

The relay delivers with aiohttp, which parses with yarl; urllib is the other
parser a Python client would use.  For a corpus of tricky URLs and for
generated ones, every URL the SQL accepts must have the same scheme, host and
port under both, no userinfo and no fragment; the known attacks are refused
through ``barnum.endpoint_add``, ``barnum endpoints add`` and the relay's
``N8N_WEBHOOK_URL``.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.parse
from typing import Any

import psycopg
import pytest
import yarl
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg.rows import TupleRow

from tests.test_admin import all_input_errors, barnum_all, ok
from tests.test_relay import run_once

Conn = psycopg.Connection[TupleRow]

# Accepted as loopback by the old regex, which took the host after an '@'
# anywhere; yarl then connected to the other host.
ATTACKS = [
    "http://192.0.2.2:18735?@127.0.0.1/",
    "http://evil#@localhost/",
    "http://a@b@127.0.0.1/",
    "http://127.0.0.1:80@evil/",
    "http://127.0.0.1\\@evil/",
    "http://evil/?@127.0.0.1",
    "http://127.0.0.1@evil.example/",
    "http://localhost#@evil.example/",
]

CORPUS = [
    *ATTACKS,
    "https://192.0.2.2:18735?@127.0.0.1/",
    "https://evil/?@127.0.0.1",
    "http://[::1]:8080/x",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[fe80::1%25eth0]/",
    "http://[::1",
    "http://[1.2.3.4]/",
    "HTTP://LOCALHOST/",
    "hTTpS://Hooks.Example:8443/In?x=1",
    "http://localhost:0/",
    "http://localhost:65535/",
    "http://localhost:65536/",
    "http://localhost:080/",
    "http://localhost:/",
    "http://localhost:99999999999999999999/",
    "http://%6cocalhost/",
    "http://127.0.0.%31/",
    "http://127.1/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0177.0.0.1/",
    "http://127.0.0.1./",
    "http://127.0.0.1.evil.example/",
    "https://n8n_main:5678/webhook/{event_type}",
    "https://n8n.example/webhook/{event_type}?type={event_type}",
    "https://n8n.example/{bad}",
    "https://n8n.example/a%2Fb?c=%40",
    "https://n8n.example/a%zz",
    "https://héllo.example/",
    "https://xn--hllo-bpa.example/",
    "https://a b.example/",
    "https://hooks.example/\tx",
    "https:///nohost",
    "https://:443/",
    "https:hooks.example/",
    "ftp://hooks.example/",
    "https://hooks.example",
    "https://user:pw@hooks.example/",
    "https://@hooks.example/",
    "not a url",
    "",
]


def url_parts(conn: Conn, urls: list[str]) -> dict[str, dict[str, Any]]:
    rows = conn.execute("SELECT u, barnum.url_parts(u) FROM unnest(%s::text[]) u", (urls,)).fetchall()
    return {u: parts for u, parts in rows}


def same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def assert_clients_agree(url: str, parts: dict[str, Any]) -> None:
    """``url`` was accepted: yarl and urllib must see the same endpoint."""
    sent = url.replace("{event_type}", "appointment.confirmed")  # what the relay connects to
    y = yarl.URL(sent)
    s = urllib.parse.urlsplit(sent)
    host, port = parts["host"], parts["port"]
    assert y.scheme == s.scheme == parts["scheme"], url
    assert y.raw_host is not None and same_host(y.raw_host, host), (url, y.raw_host, host)
    assert s.hostname is not None and same_host(s.hostname, host), (url, s.hostname, host)
    assert y.explicit_port == s.port == port, (url, y.explicit_port, s.port, port)
    assert (y.user, y.password, s.username, s.password) == (None, None, None, None), url
    assert y.fragment == s.fragment == "" and parts["fragment"] is None, url
    if parts["host_type"] == "name":
        # Not an IPv4 number to the resolver either (127.1, 2130706433, 0x7f.1).
        with pytest.raises(OSError):
            socket.inet_aton(host)
    else:
        ipaddress.ip_address(host)
    if parts["loopback"]:
        assert host == "localhost" or ipaddress.ip_address(host).is_loopback, url


# ------------------------------------------------------------------ the corpus


def test_corpus_accepted_urls_have_the_host_the_client_connects_to(db_conn: Conn) -> None:
    parts = url_parts(db_conn, CORPUS)
    accepted = [u for u in CORPUS if parts[u]["problem"] is None]
    for url in accepted:
        assert_clients_agree(url, parts[url])
    # The corpus exercises both sides (guards against a parser that refuses everything).
    assert {"http://[::1]:8080/x", "HTTP://LOCALHOST/", "https://n8n_main:5678/webhook/{event_type}",
            "https://192.0.2.2:18735?@127.0.0.1/", "http://localhost:080/"} <= set(accepted)
    refused = set(CORPUS) - set(accepted)
    assert {"http://evil#@localhost/", "http://a@b@127.0.0.1/", "http://127.0.0.1:80@evil/",
            "http://127.0.0.1\\@evil/", "http://%6cocalhost/", "http://127.1/", "http://localhost:65536/",
            "https://user:pw@hooks.example/", "http://[fe80::1%25eth0]/"} <= refused
    loopback = {u for u in accepted if parts[u]["loopback"]}
    assert loopback == {"http://[::1]:8080/x", "http://[0:0:0:0:0:0:0:1]/", "HTTP://LOCALHOST/",
                        "http://localhost:65535/", "http://localhost:080/"}


@pytest.mark.parametrize("url", ATTACKS)
def test_attack_urls_are_refused_by_endpoint_add(db_conn: Conn, url: str) -> None:
    with pytest.raises(psycopg.Error) as caught:
        db_conn.execute("SELECT barnum.endpoint_add('x', %s)", (url,))
    assert caught.value.sqlstate == "BN422", caught.value
    assert db_conn.execute("SELECT count(*) FROM barnum.webhook_endpoints").fetchone() == (0,)


# ------------------------------------------------------------------ generated URLs

HOSTS = ["127.0.0.1", "localhost", "LocalHost", "[::1]", "[::ffff:127.0.0.1]", "192.0.2.2", "evil",
         "evil.example", "n8n_main", "0x7f.1", "127.1", "2130706433", "[fe80::1%25eth0]", "%6cocalhost",
         "xn--bcher-kva.example", "1.2.3.4.5", "a..b", "-a.example", "[1.2.3.4]", "[::1", "::1", "",
         "127.0.0.1.", "0177.0.0.1", "EXAMPLE.com"]
TRICKY = ["@", ":", "?", "#", "/", "\\", "[", "]", "%", "%40", "%2f", "{event_type}", "{", "}", " ", "\t",
          "\n", "é", ".", "80", "8080", "65536", "0", "user", "pw", ";", "=", "&"]
PIECE = st.sampled_from(HOSTS) | st.sampled_from(TRICKY) | st.text(alphabet="ab019.:@/?#[]%\\{}", max_size=4)
SCHEMES = st.sampled_from(["http", "https", "HTTP", "hTtPs", "ftp", "http+unix", "javascript"])


@st.composite
def chaotic_urls(draw: st.DrawFn) -> str:
    sep = draw(st.sampled_from(["://", "://", "://", ":/", ":", ":///", ":\\\\", "//"]))
    return draw(SCHEMES) + sep + "".join(draw(st.lists(PIECE, min_size=1, max_size=7)))


@st.composite
def structured_urls(draw: st.DrawFn) -> str:
    url = draw(SCHEMES) + "://"
    if draw(st.booleans()):
        url += draw(PIECE) + "@"
    url += draw(st.sampled_from(HOSTS))
    if draw(st.booleans()):
        url += ":" + draw(st.sampled_from(["", "0", "1", "80", "080", "8443", "65535", "65536", "99999", "x"]))
    for prefix in ("/", "?", "#"):
        if draw(st.booleans()):
            url += prefix + "".join(draw(st.lists(PIECE, max_size=4)))
    return url


VALID_HOSTS = ["127.0.0.1", "localhost", "LocalHost", "[::1]", "[::ffff:127.0.0.1]", "[2001:DB8::1]", "192.0.2.2",
               "255.255.255.255", "0.0.0.0", "evil", "evil.example", "n8n_main", "xn--bcher-kva.example",
               "EXAMPLE.com", "a-b.c-d.example", "127.0.0.1.evil.example", "localhost.evil.example"]
SAFE = st.text(alphabet="abcXYZ019-._~!$&'()*+,;=:@/", max_size=6) | st.sampled_from(["{event_type}", "%40", "%2F"])


@st.composite
def plausible_urls(draw: st.DrawFn) -> str:
    """Mostly acceptable URLs, with '@', ':' and '?' where a parser could slip."""
    url = draw(st.sampled_from(["http", "https", "HTTPS"])) + "://" + draw(st.sampled_from(VALID_HOSTS))
    if draw(st.booleans()):
        url += ":" + str(draw(st.integers(min_value=1, max_value=65535)))
    if draw(st.booleans()):
        url += "/" + "".join(draw(st.lists(SAFE, max_size=4)))
    if draw(st.booleans()):
        url += "?" + "".join(draw(st.lists(SAFE | st.just("?"), max_size=4)))
    return url


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(url=st.one_of(plausible_urls(), structured_urls(), chaotic_urls()))
def test_generated_urls_accepted_by_sql_agree_with_yarl_and_urllib(db_conn: Conn, url: str) -> None:
    parts = url_parts(db_conn, [url])[url]
    event("accepted" if parts["problem"] is None else "refused")
    if parts["problem"] is None:
        assert_clients_agree(url, parts)
    else:
        # A refused URL is refused by the checks too, whatever allow_http says.
        with pytest.raises(psycopg.Error) as caught:
            db_conn.execute("SELECT barnum.check_receiver_url(%s, true)", (url,))
        assert caught.value.sqlstate == "BN422"


# ------------------------------------------------------------------ the operator CLI


def test_cli_refuses_the_attacks_and_lists_the_real_host(db_url: str, db_conn: Conn) -> None:
    add = ["endpoints", "add"]
    lines = all_input_errors(db_conn, [
        ([*add, "a1", "http://192.0.2.2:18735?@127.0.0.1/"], ["barnum endpoints add:", "192.0.2.2", "--allow-http"]),
        ([*add, "a2", "http://evil#@localhost/"], ["barnum endpoints add:", "fragment"]),
        ([*add, "a3", "http://evil#@localhost/", "--allow-http"], ["barnum endpoints add:", "fragment"]),
        ([*add, "a4", "http://a@b@127.0.0.1/", "--allow-http"], ["barnum endpoints add:", "user name or password"]),
        ([*add, "a5", "http://127.0.0.1:80@evil/"], ["barnum endpoints add:", "user name or password"]),
        ([*add, "a6", "http://127.0.0.1\\@evil/"], ["barnum endpoints add:", "backslash"]),
        ([*add, "a7", "https://user:hunter2@hooks.example/"], ["barnum endpoints add:", "https://***@hooks.example/"]),
        ([*add, "a8", "http://localhost:65536/"], ["barnum endpoints add:", "port"]),
    ], url=db_url)
    assert not any("hunter2" in line for line in lines)

    # With --allow-http the query-smuggled URL is what it says: host 192.0.2.2.
    ok(barnum_all([[*add, "q", "http://192.0.2.2:18735?@127.0.0.1/", "--allow-http"]], url=db_url)[0])
    listed = json.loads(ok(barnum_all([["endpoints", "list", "--json"]], url=db_url)[0]))
    assert [(e["name"], e["url"], e["url_ok"]) for e in listed] == [
        ("q", "http://192.0.2.2:18735?@127.0.0.1/", True)]


def test_stored_urls_the_rules_now_refuse_are_flagged_and_masked(db_url: str, db_conn: Conn) -> None:
    # Rows stored before the URL rules: trg_endpoint_url refuses them on any write now.
    with db_conn.transaction():
        db_conn.execute("ALTER TABLE barnum.webhook_endpoints DISABLE TRIGGER trg_endpoint_url")
        db_conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES"
                        " ('cred', 'https://user:hunter2@hooks.example/in'), ('frag', 'http://evil#@localhost/'),"
                        " ('good', 'https://hooks.example/{event_type}')")
        db_conn.execute("ALTER TABLE barnum.webhook_endpoints ENABLE TRIGGER trg_endpoint_url")
    listed = json.loads(ok(barnum_all([["endpoints", "list", "--json"]], url=db_url)[0]))
    assert [(e["name"], e["url"], e["url_ok"]) for e in listed] == [
        ("cred", "https://***@hooks.example/in", False),
        ("frag", "http://evil#@localhost/", False),
        ("good", "https://hooks.example/{event_type}", True)]
    status = json.loads(ok(barnum_all([["status", "--json"]], url=db_url)[0]))
    assert {e["name"]: e["url_ok"] for e in status["endpoints"]} == {"cred": False, "frag": False, "good": True}
    assert "hunter2" not in json.dumps(listed) + json.dumps(status)


# ------------------------------------------------------------------ ensure_endpoint (the relay)


def test_ensure_endpoint_only_manages_n8n_under_the_url_rules(db_conn: Conn) -> None:
    db_conn.execute("INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('billing', 'https://billing.example/in')")
    db_conn.execute("SET ROLE barnum_relay")
    for name, url, code in [
        ("billing", "https://attacker.example/", "BN400"),
        ("other", "https://attacker.example/", "BN400"),
        ("n8n", "http://192.0.2.2:18735?@127.0.0.1/", "BN422"),
        ("n8n", "http://evil#@localhost/", "BN422"),
        ("n8n", "https://user:pw@n8n.example/", "BN422"),
        ("n8n", "http://n8n.internal:5678/webhook", "BN422"),
    ]:
        with pytest.raises(psycopg.Error) as caught:
            db_conn.execute("SELECT barnum.ensure_endpoint(%s, %s)", (name, url))
        assert caught.value.sqlstate == code, (name, url, caught.value)
    db_conn.execute("SELECT barnum.ensure_endpoint('n8n', 'http://[::1]:5678/webhook/{event_type}')")
    db_conn.execute("RESET ROLE")
    assert db_conn.execute("SELECT name, url FROM barnum.webhook_endpoints ORDER BY name").fetchall() == [
        ("billing", "https://billing.example/in"), ("n8n", "http://[::1]:5678/webhook/{event_type}")]


def test_relay_refuses_an_n8n_webhook_url_the_rules_refuse(db_url: str, db_conn: Conn) -> None:
    done = run_once(db_url, env={"N8N_WEBHOOK_URL": "http://192.0.2.2:18735?@127.0.0.1/"})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "N8N_WEBHOOK_URL" in lines[0] and "192.0.2.2" in lines[0], done.stderr
    assert db_conn.execute("SELECT count(*) FROM barnum.webhook_endpoints").fetchone() == (0,)

    # An operator who wants plain http to n8n on another host adds it once with
    # --allow-http; the relay's same N8N_WEBHOOK_URL then starts normally.
    url = "http://n8n.internal:5678/webhook/barnum-events"
    ok(barnum_all([["endpoints", "add", "n8n", url, "--allow-http"]], url=db_url)[0])
    again = run_once(db_url, env={"N8N_WEBHOOK_URL": url})
    assert again.returncode == 0, again.stderr
    assert db_conn.execute("SELECT url FROM barnum.webhook_endpoints WHERE name = 'n8n'").fetchone() == (url,)

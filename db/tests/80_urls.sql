-- 80_urls: endpoint URLs go through one RFC 3986 parser (url_parts), so a
-- check cannot be fooled into reading a host the relay will not connect to;
-- the relay's ensure_endpoint manages only the n8n endpoint (issue 12).
BEGIN;
SELECT plan(53);

CREATE FUNCTION pg_temp.parts(p_url text) RETURNS jsonb LANGUAGE sql AS $$
    SELECT barnum.url_parts(p_url) - 'problem' - 'fragment' - 'userinfo' $$;
CREATE FUNCTION pg_temp.problem(p_url text) RETURNS text LANGUAGE sql AS $$
    SELECT barnum.url_parts(p_url) ->> 'problem' $$;

-- ============================================================ url_parts: the authority rule
SELECT is(pg_temp.parts('http://192.0.2.2:18735?@127.0.0.1/'),
          '{"scheme": "http", "host": "192.0.2.2", "host_type": "ipv4", "port": 18735, "path": "",
            "query": "@127.0.0.1/", "loopback": false}'::jsonb,
          'the authority ends at the first "?": an "@" in the query is not a userinfo');
SELECT is(barnum.url_parts('http://evil#@localhost/') ->> 'host', 'evil',
          'the authority ends at the first "#"');
SELECT is(barnum.url_parts('http://a@b@127.0.0.1/') ->> 'userinfo', 'a@b',
          'the userinfo runs to the LAST "@" of the authority');
SELECT is(barnum.url_parts('http://127.0.0.1:80@evil/') ->> 'host', 'evil',
          'a "host:port" before an "@" is a userinfo; the host is after it');
SELECT is(pg_temp.parts('http://[::1]:8080/x'),
          '{"scheme": "http", "host": "::1", "host_type": "ipv6", "port": 8080, "path": "/x",
            "query": null, "loopback": true}'::jsonb,
          'a bracketed IPv6 address with a port');
SELECT is(pg_temp.parts('HTTP://LOCALHOST/'),
          '{"scheme": "http", "host": "localhost", "host_type": "name", "port": null, "path": "/",
            "query": null, "loopback": true}'::jsonb,
          'scheme and host are case-insensitive (returned in lower case)');
SELECT is(barnum.url_parts('https://n8n.example/webhook/{event_type}?t={event_type}') ->> 'problem', NULL,
          'the {event_type} placeholder is allowed in the path and the query');

-- ============================================================ url_parts: what is refused
SELECT is(pg_temp.problem(u), p, format('%s is refused: %s', u, p)) FROM (VALUES
    ('http://evil#@localhost/',       'must not have a #fragment'),
    ('http://a@b@127.0.0.1/',         'must not contain a user name or password (an "@" before the host)'),
    ('http://127.0.0.1:80@evil/',     'must not contain a user name or password (an "@" before the host)'),
    ('https://user:pw@hooks.example/','must not contain a user name or password (an "@" before the host)'),
    ('http://127.0.0.1\@evil/',       'must not contain a backslash'),
    ('https://hooks.example/ x',      'must not contain spaces, control or non-ASCII characters'),
    ('https://hé.example/',           'must not contain spaces, control or non-ASCII characters'),
    ('http://%6cocalhost/',           'must have a host made of letters, digits, "-", "_" and "." (IDNs in punycode)'),
    ('http://127.1/',                 'must have an IPv4 address as four decimal numbers 0-255 without leading zeros'),
    ('http://2130706433/',            'must have an IPv4 address as four decimal numbers 0-255 without leading zeros'),
    ('http://0177.0.0.1/',            'must have an IPv4 address as four decimal numbers 0-255 without leading zeros'),
    ('http://[fe80::1%25eth0]/',      'must have a valid IPv6 address in [brackets]'),
    ('http://localhost:0/',           'must have a port between 1 and 65535 after the ":"'),
    ('http://localhost:65536/',       'must have a port between 1 and 65535 after the ":"'),
    ('http://localhost:/',            'must have a port between 1 and 65535 after the ":"'),
    ('https:///path',                 'must have a host'),
    ('https://x..example/',           'must have a host name of dot-separated labels of 1-63 letters, digits, "-" or "_"'),
    ('https://x.example/{bad}',       'must not have braces other than the {event_type} placeholder'),
    ('https://x.example/a%zz',        'must have a path and query of URL characters only (percent-encode the rest)'),
    ('ftp://files.example/',          'must be an http(s) URL'),
    ('not a url',                     'must be an http(s) URL like https://host/path')
) AS t(u, p);

-- ============================================================ endpoint_add
SELECT throws_ok($$SELECT barnum.endpoint_add('x', 'http://192.0.2.2:18735?@127.0.0.1/')$$, 'BN422',
    'plain http is only allowed for loopback receivers; use https:// or allow http explicitly (192.0.2.2)',
    'endpoint_add: "?@127.0.0.1" does not make 192.0.2.2 loopback');
SELECT throws_ok($$SELECT barnum.endpoint_add('x', 'http://evil#@localhost/')$$, 'BN422',
    'endpoint URL must not have a #fragment, got ''http://evil#@localhost/''',
    'endpoint_add: "#@localhost" is refused');
SELECT throws_ok($$SELECT barnum.endpoint_add('x', 'http://evil#@localhost/', p_allow_http => true)$$, 'BN422',
    NULL, 'endpoint_add: a fragment is refused even with allow_http');
SELECT throws_ok($$SELECT barnum.endpoint_add('x', 'https://user:hunter2@hooks.example/in')$$, 'BN422',
    'endpoint URL must not contain a user name or password (an "@" before the host), got ''https://***@hooks.example/in''',
    'endpoint_add: a userinfo is refused, and the error masks it');
SELECT throws_ok($$SELECT barnum.endpoint_add('x', 'http://a@b@127.0.0.1/', p_allow_http => true)$$, 'BN422',
    NULL, 'endpoint_add: "a@b@127.0.0.1" is refused even with allow_http');
SELECT is_empty($$SELECT 1 FROM barnum.webhook_endpoints WHERE name = 'x'$$, 'no refused URL was stored');
SELECT is((barnum.endpoint_add('ok6', 'http://[::1]:8080/{event_type}')) ->> 'url', 'http://[::1]:8080/{event_type}',
          'endpoint_add: http to [::1] with a placeholder is accepted');

-- ============================================================ endpoint_json: legacy rows
-- Rows stored before the URL rules (trg_endpoint_url now refuses them on write).
SELECT throws_ok($$INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('direct', 'http://evil#@localhost/')$$,
                 'BN422', NULL, 'a direct INSERT of a refused URL fails too (trigger)');
ALTER TABLE barnum.webhook_endpoints DISABLE TRIGGER trg_endpoint_url;
INSERT INTO barnum.webhook_endpoints (name, url) VALUES
    ('legacy-q',    'https://192.0.2.2:18735?@127.0.0.1/'),
    ('legacy-cred', 'https://user:hunter2@hooks.example/in'),
    ('legacy-frag', 'http://evil#@localhost/');
ALTER TABLE barnum.webhook_endpoints ENABLE TRIGGER trg_endpoint_url;
SELECT is((SELECT barnum.endpoint_json(ep) ->> 'url' FROM barnum.webhook_endpoints ep WHERE name = 'legacy-q'),
          'https://192.0.2.2:18735?@127.0.0.1/', 'endpoint_json shows the real host (no mask over it)');
SELECT is((SELECT barnum.endpoint_json(ep) ->> 'url' FROM barnum.webhook_endpoints ep WHERE name = 'legacy-cred'),
          'https://***@hooks.example/in', 'endpoint_json masks a stored userinfo only');
SELECT is((SELECT jsonb_object_agg(e ->> 'name', e -> 'url_ok') FROM jsonb_array_elements(barnum.endpoint_list()) e
            WHERE e ->> 'name' LIKE 'legacy-%'),
          '{"legacy-q": true, "legacy-cred": false, "legacy-frag": false}'::jsonb,
          'endpoint_list flags stored URLs the rules now refuse (url_ok)');
SELECT is((SELECT e ->> 'url_problem' FROM jsonb_array_elements(barnum.endpoint_list()) e WHERE e ->> 'name' = 'legacy-frag'),
          'must not have a #fragment', 'endpoint_list says why (url_problem)');
SELECT is((SELECT e -> 'url_ok' FROM jsonb_array_elements(barnum.status_report() -> 'endpoints') e
            WHERE e ->> 'name' = 'legacy-cred'),
          'false'::jsonb, 'status_report flags them too');
DELETE FROM barnum.webhook_endpoints WHERE name LIKE 'legacy-%';

-- ============================================================ ensure_endpoint (as the relay)
INSERT INTO barnum.webhook_endpoints (name, url) VALUES ('billing', 'https://billing.example/in');
SET ROLE barnum_relay;
SELECT throws_ok($$SELECT barnum.ensure_endpoint('billing', 'https://attacker.example/')$$, 'BN400',
    'ensure_endpoint manages only the endpoint named n8n, got ''billing''; add others with barnum endpoints add',
    'ensure_endpoint: the relay cannot re-point another endpoint');
SELECT throws_ok($$SELECT barnum.ensure_endpoint('new', 'https://attacker.example/')$$, 'BN400', NULL,
    'ensure_endpoint: the relay cannot create another endpoint');
SELECT throws_ok($$SELECT barnum.ensure_endpoint('n8n', 'http://192.0.2.2:18735?@127.0.0.1/')$$, 'BN422',
    'plain http is only allowed for loopback receivers; use https:// or allow http explicitly (192.0.2.2)',
    'ensure_endpoint: the loopback rule applies, with the real host');
SELECT throws_ok($$SELECT barnum.ensure_endpoint('n8n', 'https://user:pw@n8n.example/')$$, 'BN422', NULL,
    'ensure_endpoint: the URL rules apply (no userinfo)');
SELECT throws_ok($$SELECT barnum.ensure_endpoint('n8n', 'http://n8n.internal:5678/webhook/barnum')$$, 'BN422', NULL,
    'ensure_endpoint: plain http to another host is refused for a new URL');
SELECT is((barnum.ensure_endpoint('n8n', 'http://127.0.0.1:5678/webhook/barnum')) ->> 'url',
          'http://127.0.0.1:5678/webhook/barnum', 'ensure_endpoint: plain http to loopback is accepted');
SELECT is((barnum.ensure_endpoint('n8n', 'https://n8n.example/webhook/barnum')) ->> 'url',
          'https://n8n.example/webhook/barnum', 'ensure_endpoint: re-points n8n to an https URL');
RESET ROLE;
SELECT is((SELECT url FROM barnum.webhook_endpoints WHERE name = 'billing'), 'https://billing.example/in',
          'the other endpoint is untouched');
SELECT is_empty($$SELECT 1 FROM barnum.webhook_endpoints WHERE name = 'new'$$, 'no endpoint was created for another name');
-- An operator allowed plain http for n8n; the relay's same URL keeps it.
UPDATE barnum.webhook_endpoints SET url = 'http://n8n.internal:5678/webhook/barnum' WHERE name = 'n8n';
SET ROLE barnum_relay;
SELECT lives_ok($$SELECT barnum.ensure_endpoint('n8n', 'http://n8n.internal:5678/webhook/barnum')$$,
    'ensure_endpoint: plain http already stored for n8n (endpoints add --allow-http) is kept');
SELECT throws_ok($$SELECT barnum.ensure_endpoint('n8n', 'http://n8n.internal:5678/webhook/other')$$, 'BN422', NULL,
    'ensure_endpoint: but cannot move to another plain http URL');
RESET ROLE;
SELECT is((SELECT url FROM barnum.webhook_endpoints WHERE name = 'n8n'), 'http://n8n.internal:5678/webhook/barnum',
          'the refused URL changed nothing');

SELECT * FROM finish();
ROLLBACK;

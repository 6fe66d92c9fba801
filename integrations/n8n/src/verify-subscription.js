// Meta's webhook verification handshake (done once when the callback URL is
// registered): GET ?hub.mode=subscribe&hub.verify_token=…&hub.challenge=…
// Answer the challenge only when the token equals $env.WHATSAPP_VERIFY_TOKEN.
const q = $input.first().json.query || {};
const get = (k) => (q['hub.' + k] !== undefined ? q['hub.' + k] : (q.hub || {})[k]);
const expected = String($env.WHATSAPP_VERIFY_TOKEN || '');
const ok = expected !== '' && get('mode') === 'subscribe' && String(get('verify_token') || '') === expected;
return [{ json: { ok, challenge: ok ? String(get('challenge') || '') : '' } }];

// Barnum event sender — step 1: verify the relay's signature (SPEC §3).
//
// Input: the Webhook node's item with option "Raw Body" on, so the exact bytes
// Barnum signed are in binary property "data". Nothing is sent unless:
//   * X-Webhook-Signature = lowercase hex HMAC-SHA256(key, raw body) for one of
//     the keys in $env.BARNUM_WEBHOOK_SECRET (comma-separated rotation list; a
//     "whsec_<base64>" secret means its decoded bytes, any other its UTF-8);
//   * webhook-timestamp is within 5 minutes of now (older → replay, rejected);
//   * the Standard Webhooks header webhook-signature ("v1,<base64 HMAC of
//     id.timestamp.body>", also sent by Barnum) verifies too: it binds the
//     timestamp to the body.
// Output: one item per request. Valid → { verified: true, event: <payload> };
// invalid → { verified: false, reason } (the workflow answers 401 and stops).
// Needs NODE_FUNCTION_ALLOW_BUILTIN=crypto and N8N_BLOCK_ENV_ACCESS_IN_NODE=false.
const crypto = require('crypto');
const TOLERANCE_SECONDS = 300;

function decodeSecret(secret) {
  const s = secret.trim();
  if (s.startsWith('whsec_')) {
    const b64 = s.slice('whsec_'.length);
    if (b64.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(b64)) {
      throw new Error('a whsec_ secret must be valid base64 after the prefix');
    }
    return Buffer.from(b64, 'base64');
  }
  if (!s) throw new Error('empty secret');
  return Buffer.from(s, 'utf8');
}

function parseSecrets(value) {
  const keys = String(value || '').split(',').filter((p) => p.trim()).map(decodeSecret);
  if (!keys.length) throw new Error('BARNUM_WEBHOOK_SECRET holds no secret');
  return keys;
}

function safeEqual(a, b) {
  const x = Buffer.from(String(a), 'utf8');
  const y = Buffer.from(String(b), 'utf8');
  return x.length === y.length && crypto.timingSafeEqual(x, y);
}

function verifyHex(keys, body, header) {
  if (!header) return false;
  let given = String(header).trim();
  if (given.toLowerCase().startsWith('sha256=')) given = given.slice('sha256='.length);
  given = given.toLowerCase();
  let ok = false;
  for (const key of keys) {
    // No early exit: every key is compared, each in constant time.
    ok = safeEqual(crypto.createHmac('sha256', key).update(body).digest('hex'), given) || ok;
  }
  return ok;
}

function verifyStandard(keys, body, msgId, timestamp, signature) {
  if (!(msgId && timestamp && signature)) return false;
  const signed = Buffer.concat([Buffer.from(msgId + '.' + timestamp + '.', 'utf8'), body]);
  const candidates = String(signature).split(' ').filter((s) => s.startsWith('v1,'));
  let ok = false;
  for (const key of keys) {
    const expected = 'v1,' + crypto.createHmac('sha256', key).update(signed).digest('base64');
    for (const cand of candidates) ok = safeEqual(expected, cand) || ok;
  }
  return ok;
}

function header(headers, name) {
  const v = (headers || {})[name];
  return Array.isArray(v) ? v[0] : v;
}

// The exact received bytes: n8n may keep binary data out of the item (then
// only the helper can read it); in the task runner "helpers" is a global.
async function rawBody(ctx, item, index) {
  if (!item.binary || !item.binary.data) return null;
  const h = (typeof helpers !== 'undefined' && helpers) || (ctx && ctx.helpers);
  if (h && typeof h.getBinaryDataBuffer === 'function') {
    return Buffer.from(await h.getBinaryDataBuffer(index, 'data'));
  }
  return Buffer.from(item.binary.data.data, 'base64');
}

function check(keys, body, headers, nowSeconds) {
  if (body === null) return 'no raw body (enable the Webhook option "Raw Body")';
  if (!verifyHex(keys, body, header(headers, 'x-webhook-signature'))) return 'bad signature';
  const tsText = String(header(headers, 'webhook-timestamp') || '').trim();
  if (!/^\d{1,12}$/.test(tsText)) return 'missing webhook-timestamp';
  if (Math.abs(nowSeconds - Number(tsText)) > TOLERANCE_SECONDS) return 'stale webhook-timestamp';
  // The hex signature does not cover the timestamp; the Standard Webhooks one
  // does, so it is required too (else a captured request could be replayed
  // with a fresh webhook-timestamp and its webhook-signature stripped).
  if (!verifyStandard(keys, body, header(headers, 'webhook-id'), tsText, header(headers, 'webhook-signature'))) {
    return 'bad or missing webhook-signature';
  }
  return null;
}

const keys = parseSecrets($env.BARNUM_WEBHOOK_SECRET);
const out = [];
const inputItems = $input.all();
for (let i = 0; i < inputItems.length; i++) {
  const item = inputItems[i];
  const headers = (item.json && item.json.headers) || {};
  const body = await rawBody(this, item, i);
  let reason = check(keys, body, headers, Math.floor(Date.now() / 1000));
  let event = null;
  if (!reason) {
    try {
      event = JSON.parse(body.toString('utf8'));
    } catch (e) {
      reason = 'body is not JSON';
    }
    if (!reason && (!event || typeof event !== 'object' || typeof event.event_type !== 'string')) {
      reason = 'not a Barnum event';
    }
  }
  out.push({ json: reason ? { verified: false, reason } : { verified: true, event_type: event.event_type, event } });
}
return out;

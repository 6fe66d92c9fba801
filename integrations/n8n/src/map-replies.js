// Barnum reply handler — map WhatsApp Cloud API replies to Barnum callbacks
// (SPEC §4.2) and sign them.
//
// Input: the Webhook node's item (option "Raw Body" on) carrying a WhatsApp
// Cloud API notification: entry[].changes[].value.messages[].
//
// 1. Authenticity: with $env.WHATSAPP_APP_SECRET set, X-Hub-Signature-256
//    ("sha256=" + hex HMAC-SHA256(app secret, raw body), Meta's scheme) must
//    verify, else the notification is dropped. Without it nothing is accepted,
//    unless $env.WHATSAPP_ALLOW_UNSIGNED is "true" (local testing only).
// 2. Mapping: the messages Barnum's event sender sends carry the appointment
//    (or patient) id in their reply-button / list-row ids, "<verb>:<uuid>[:n]":
//      confirm:<appointmentId>             → {action: confirm}
//      cancel:<appointmentId>              → {action: cancel}
//      no_show_reschedule:<appointmentId>  → {action: no_show_reschedule, attempt: 1}
//      review:<appointmentId>:<1-5>        → {action: review, reviewSubmitted: true, rating}
//      review:<appointmentId>:no           → {action: review, reviewSubmitted: false}
//      reactivation:<patientId>            → {action: reactivation, workflowType: reactivation}
//      appt:<appointmentId>                → the verb comes from the reply text:
//                                            SIM / S / 1 / CONFIRMAR / CONFIRMO / YES / OK → confirm
//                                            NÃO / NAO / N / 2 / CANCELAR / CANCELO / NO → cancel
//    The id is read from interactive.button_reply.id, interactive.list_reply.id
//    or, for template quick-reply buttons, button.payload. A plain text message
//    ("SIM", "2", …) carries no such id: the context.id it may quote is a
//    WhatsApp message id that cannot be tied to an appointment without state,
//    so plain text is NOT mapped (use the buttons or the action links).
// 3. Signing (Standard Webhooks): the JSON body is built here as a string and
//    signed here with the first key of $env.BARNUM_WEBHOOK_SECRET:
//      webhookId = the WhatsApp message id (so a notification WhatsApp delivers
//                  twice is applied once: Barnum's idempotency key),
//      timestamp = now (unix seconds; Barnum accepts ±5 minutes, so a captured
//                  request cannot be replayed later),
//      signature = 'v1,' + base64 HMAC-SHA256(key, webhookId + '.' + timestamp + '.' + body).
//    The HTTP Request node sends this exact string as the raw body with the
//    headers webhook-id, webhook-timestamp and webhook-signature.
// Output: one item per mappable message:
//   { action, messageId, webhookId, timestamp, body, signature }.
const crypto = require('crypto');

const UUID = '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}';
const REF = new RegExp('^(confirm|cancel|no_show_reschedule|review|reactivation|appt):(' + UUID + ')(?::([A-Za-z0-9]+))?$');
const CONFIRM_WORDS = ['SIM', 'S', '1', 'CONFIRMAR', 'CONFIRMO', 'CONFIRMADO', 'YES', 'Y', 'OK'];
const CANCEL_WORDS = ['NAO', 'N', '2', 'CANCELAR', 'CANCELO', 'CANCELA', 'NO'];

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

function signingKey(value) {
  const keys = String(value || '').split(',').filter((p) => p.trim()).map(decodeSecret);
  if (!keys.length) throw new Error('BARNUM_WEBHOOK_SECRET holds no secret');
  return keys[0]; // sign with the first, Barnum accepts any of its list
}

function safeEqual(a, b) {
  const x = Buffer.from(String(a), 'utf8');
  const y = Buffer.from(String(b), 'utf8');
  return x.length === y.length && crypto.timingSafeEqual(x, y);
}

function metaSignatureOk(appSecret, body, header) {
  if (!header || body === null) return false;
  const expected = 'sha256=' + crypto.createHmac('sha256', Buffer.from(appSecret, 'utf8')).update(body).digest('hex');
  return safeEqual(expected, String(header).trim().toLowerCase());
}

function keyword(text) {
  return String(text || '')
    .normalize('NFD').replace(/[\u0300-\u036f]/g, '')
    .toUpperCase().replace(/[^A-Z0-9 ]+/g, ' ').trim().split(/\s+/)[0] || '';
}

function reference(message) {
  const it = message.interactive || {};
  if (message.type === 'interactive' && it.button_reply) return { ref: it.button_reply.id, text: it.button_reply.title };
  if (message.type === 'interactive' && it.list_reply) return { ref: it.list_reply.id, text: it.list_reply.title };
  if (message.type === 'button' && message.button) return { ref: message.button.payload, text: message.button.text };
  return { ref: null, text: message.text && message.text.body };
}

// The callback for one message, or null when it cannot be mapped.
function callbackFor(message) {
  const { ref, text } = reference(message);
  const m = REF.exec(String(ref || '').trim());
  if (!m) return null;
  let verb = m[1];
  const id = m[2].toLowerCase();
  const extra = m[3];
  const response = text ? String(text).slice(0, 200) : undefined;
  if (verb === 'appt') {
    const word = keyword(text);
    if (CONFIRM_WORDS.includes(word)) verb = 'confirm';
    else if (CANCEL_WORDS.includes(word)) verb = 'cancel';
    else return null;
  }
  switch (verb) {
    case 'confirm':
      return { action: 'confirm', appointmentId: id, patientResponse: response || 'confirmed' };
    case 'cancel':
      return { action: 'cancel', appointmentId: id, reason: 'patient replied ' + JSON.stringify(response || 'cancel') + ' on WhatsApp' };
    case 'no_show_reschedule':
      return { action: 'no_show_reschedule', appointmentId: id, attempt: 1 };
    case 'review': {
      if (extra === 'no') return { action: 'review', appointmentId: id, reviewSubmitted: false };
      const rating = Number(extra);
      if (!Number.isInteger(rating) || rating < 1 || rating > 5) return null;
      return { action: 'review', appointmentId: id, reviewSubmitted: true, rating };
    }
    case 'reactivation':
      return { action: 'reactivation', patientId: id, workflowType: 'reactivation', status: 'interested' };
    default:
      return null;
  }
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

const key = signingKey($env.BARNUM_WEBHOOK_SECRET);
const appSecret = String($env.WHATSAPP_APP_SECRET || '');
const allowUnsigned = String($env.WHATSAPP_ALLOW_UNSIGNED || '').toLowerCase() === 'true';
const out = [];
const inputItems = $input.all();
for (let i = 0; i < inputItems.length; i++) {
  const item = inputItems[i];
  const headers = (item.json && item.json.headers) || {};
  const raw = await rawBody(this, item, i);
  if (appSecret) {
    if (!metaSignatureOk(appSecret, raw, headers['x-hub-signature-256'])) continue;
  } else if (!allowUnsigned) {
    continue;
  }
  let notification;
  try {
    notification = raw !== null ? JSON.parse(raw.toString('utf8')) : item.json.body;
  } catch (e) {
    continue;
  }
  for (const entry of (notification && notification.entry) || []) {
    for (const change of entry.changes || []) {
      const value = change.value || {};
      for (const message of value.messages || []) {
        const callback = callbackFor(message);
        if (!callback || !message.id) continue;
        // The exact bytes that are signed and sent (deterministic: a redelivered
        // notification yields the same body, so Barnum's idempotency replays it).
        const body = JSON.stringify(callback);
        const webhookId = String(message.id);
        const timestamp = String(Math.floor(Date.now() / 1000));
        const signed = webhookId + '.' + timestamp + '.' + body;
        out.push({
          json: {
            action: callback.action,
            messageId: webhookId,
            from: message.from,
            webhookId,
            timestamp,
            body,
            signature: 'v1,' + crypto.createHmac('sha256', key).update(signed, 'utf8').digest('base64'),
          },
        });
      }
    }
  }
}
return out;

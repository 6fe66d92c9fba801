// Barnum event sender — step 2: drop redeliveries of an event already sent.
// Barnum delivers at least once (SPEC §7: receivers dedupe on X-Event-Id):
// when n8n sent the WhatsApp message but Barnum did not get the answer in
// time, it delivers the event again. "Remember sent event" records each
// event_id after the Graph API accepted the message; a redelivery is
// answered 200 without sending. Best effort: the record is n8n's workflow
// static data (saved when an execution of the published workflow ends).
const sent = $getWorkflowStaticData('global').sentEvents || {};
return $input.all().map((item) => ({
  json: Object.assign({}, item.json, { duplicate: Boolean(item.json.event && sent[item.json.event.event_id]) }),
}));

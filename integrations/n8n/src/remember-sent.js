// Barnum event sender — after a successful send: remember the event id (see
// "Skip duplicates"), keeping two days of ids and at most 20,000 of them.
const KEEP_SECONDS = 2 * 24 * 3600;
const MAX_ENTRIES = 20000;
const data = $getWorkflowStaticData('global');
const sent = data.sentEvents || {};
const now = Math.floor(Date.now() / 1000);
const eventId = $('Prepare message fields').first().json.event_id;
if (eventId) sent[eventId] = now;
const kept = Object.entries(sent)
  .filter(([, at]) => now - at <= KEEP_SECONDS)
  .sort((a, b) => b[1] - a[1])
  .slice(0, MAX_ENTRIES);
data.sentEvents = Object.fromEntries(kept);
return $input.all();

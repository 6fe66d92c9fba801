-- 0003: the due queue is indexed per endpoint.
--
-- A disabled endpoint keeps its pending deliveries (they wait, untouched,
-- until it is enabled again).  With one index on next_attempt_at for every
-- endpoint, each claim walked that whole backlog before reaching an active
-- endpoint's rows: a million rows held for a paused endpoint made every
-- claim and every next_due_at() scan a million index entries.  Keyed by
-- endpoint first, claim_deliveries and next_due_at read only the queues of
-- active endpoints (60_relay.sql).  The old index is dropped: nothing else
-- needs the due rows of all endpoints in order, and every index on this
-- table is paid by every booking (issue 7 §2).
--
-- Plain CREATE INDEX (migrations run in a transaction): it holds off writes
-- to webhook_deliveries while it builds — only the pending rows, a small
-- set on a healthy queue.
CREATE INDEX webhook_deliveries_endpoint_due_idx
    ON barnum.webhook_deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending';

DROP INDEX barnum.webhook_deliveries_due_idx;

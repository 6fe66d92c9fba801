-- barnum:no-transaction
-- 0009: two things the inbound path needs at scale.
-- Realtime NOTIFYs only while a shim has a conversation open: NOTIFY takes
-- a database-wide lock at commit that serialises committing transactions,
-- which every inbound message paid even with no staff screen watching.
-- Shims register here (like relay_waiters) and re-register while watching;
-- a crashed shim's row simply expires.
CREATE UNLOGGED TABLE IF NOT EXISTS barnum.realtime_listeners (
    worker text PRIMARY KEY,
    until  timestamptz NOT NULL
);
-- A reply is matched to its patient by phone (contacts, replies that act):
-- without an index every inbound text read the whole patients table.
CREATE INDEX CONCURRENTLY IF NOT EXISTS patients_phone_idx
    ON barnum.patients (phone) WHERE phone IS NOT NULL;

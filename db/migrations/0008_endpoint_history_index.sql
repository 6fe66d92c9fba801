-- barnum:no-transaction
-- 0008: a webhook's delivery history newest first (GET /api/webhooks/{id}/events)
-- walked the whole primary key backwards and filtered on endpoint_id; the
-- index on (endpoint_id, id) reads exactly one page, and serves what the
-- endpoint_id index served (the foreign key's lookups).  Built concurrently:
-- webhook_deliveries is the busiest table.
CREATE INDEX CONCURRENTLY IF NOT EXISTS webhook_deliveries_endpoint_id_idx
    ON barnum.webhook_deliveries (endpoint_id, id);
DROP INDEX CONCURRENTLY IF EXISTS barnum.webhook_deliveries_endpoint_idx;

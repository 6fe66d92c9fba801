-- 90_tick: time-driven work, called by every relay sweep (SPEC §2.5).
-- Idempotent and bounded: each rule handles at most a batch per call, so a
-- backlog drains over a few sweeps instead of one long transaction.
--
-- The batch is 250: a retention purge of 1,000 events (with their deliveries
-- and attempts by cascade) writes enough WAL that claims committing behind
-- it stalled up to 322 ms on the test box; at 250 the longest was 84 ms
-- (bench/scale.py, issue 7 §3).  250 per 5-s sweep still purges 4 M events
-- a day and creates far more reminders than any clinic books.

CREATE OR REPLACE FUNCTION barnum.tick(p_batch int DEFAULT 250) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_now timestamptz := barnum.clock();
    v_lead interval := barnum.setting_interval('reminder_lead');
    v_after interval := barnum.setting_interval('reactivation_after');
    v_retention interval := barnum.setting_interval('retention');
    n_reminders int := 0;
    n_reactivations int := 0;
    n_expired int := 0;
    n_purged int := 0;
    n_tokens int := 0;
    a record;
    wf uuid;
BEGIN
    -- One tick at a time across all relays; the others just skip.
    IF NOT pg_try_advisory_xact_lock(hashtext('barnum.tick')) THEN
        RETURN jsonb_build_object('skipped', 'another tick is running');
    END IF;

    -- Reminders: live appointments inside the lead window with no reminder
    -- for their current starts_at (a moved appointment gets a new one).
    FOR a IN
        SELECT x.id, x.patient_id, x.starts_at FROM barnum.appointments x
         WHERE x.status IN ('scheduled', 'pre_confirmed', 'confirmed')
           AND x.starts_at > v_now AND x.starts_at <= v_now + v_lead
           AND NOT EXISTS (
               SELECT 1 FROM barnum.whatsapp_workflows w
                WHERE w.appointment_id = x.id AND w.workflow_type = 'reminder'
                  AND (w.metadata ->> 'starts_at')::timestamptz = x.starts_at)
         ORDER BY x.starts_at
         LIMIT p_batch
    LOOP
        -- A reminder still open for an older time is void.
        PERFORM barnum.close_workflows(a.id, 'cancelled', 'appointment rescheduled', ARRAY['reminder']);
        wf := barnum.open_workflow('reminder', a.id, a.patient_id, jsonb_build_object('starts_at', a.starts_at),
                                   a.starts_at);
        IF wf IS NOT NULL THEN
            PERFORM barnum.emit_event('appointment.reminder', 'appointment', a.id, wf, v_now);
            n_reminders := n_reminders + 1;
        END IF;
    END LOOP;

    -- Reactivation: reachable patients whose last visit is older than
    -- reactivation_after, nothing booked ahead, not asked in that period.
    FOR a IN
        SELECT p.id FROM barnum.patients p
         WHERE p.last_visit_at < v_now - v_after
           AND NOT p.whatsapp_opt_out AND p.phone IS NOT NULL
           AND NOT EXISTS (
               SELECT 1 FROM barnum.appointments x
                WHERE x.patient_id = p.id AND x.starts_at > v_now
                  AND x.status IN ('scheduled', 'pre_confirmed', 'confirmed'))
           AND NOT EXISTS (
               SELECT 1 FROM barnum.whatsapp_workflows w
                WHERE w.patient_id = p.id AND w.workflow_type = 'reactivation'
                  AND (w.created_at > v_now - v_after OR w.status IN ('pending', 'sent')))
         LIMIT p_batch
    LOOP
        wf := barnum.open_workflow('reactivation', NULL, a.id,
                                   jsonb_build_object('workflowType', 'reactivation'));
        IF wf IS NOT NULL THEN
            PERFORM barnum.emit_event('patient.reactivation', 'patient', a.id, wf, v_now);
            n_reactivations := n_reactivations + 1;
        END IF;
    END LOOP;

    -- Sent workflows that can no longer be answered: a confirmation request
    -- or reminder once its appointment has started (expires_at, found through
    -- a partial index, so the cost follows the due rows, not the sent ones),
    -- the others after reactivation_after.  A batch each per tick.
    WITH x AS (
        UPDATE barnum.whatsapp_workflows w SET status = 'expired', updated_at = now()
         WHERE w.id IN (SELECT y.id FROM barnum.whatsapp_workflows y
                         WHERE y.status = 'sent' AND y.expires_at IS NOT NULL AND y.expires_at < v_now
                         ORDER BY y.expires_at
                         LIMIT p_batch)
        RETURNING 1)
    SELECT count(*) INTO n_expired FROM x;
    WITH x AS (
        UPDATE barnum.whatsapp_workflows w SET status = 'expired', updated_at = now()
         WHERE w.id IN (SELECT y.id FROM barnum.whatsapp_workflows y
                         WHERE y.status = 'sent' AND y.created_at < v_now - v_after
                           AND y.workflow_type IN ('reactivation', 'review_request', 'reschedule_prompt')
                         ORDER BY y.created_at
                         LIMIT p_batch)
        RETURNING 1)
    SELECT n_expired + count(*) INTO n_expired FROM x;

    -- Retention: finished outbox rows (and, by cascade, their deliveries and
    -- attempts) older than retention, a bounded batch per tick so no long
    -- lock is held; SKIP LOCKED never waits on a row a relay holds.
    WITH victims AS (
        SELECT e.id FROM barnum.whatsapp_events e
         WHERE e.status IN ('sent', 'skipped', 'dead_letter') AND e.created_at < v_now - v_retention
         ORDER BY e.created_at
         LIMIT p_batch
         FOR UPDATE SKIP LOCKED
    ), gone AS (
        DELETE FROM barnum.whatsapp_events e USING victims v WHERE e.id = v.id RETURNING 1)
    SELECT count(*) INTO n_purged FROM gone;

    WITH gone AS (
        DELETE FROM barnum.whatsapp_action_tokens t
         WHERE t.id IN (SELECT id FROM barnum.whatsapp_action_tokens
                         WHERE expires_at < v_now - v_retention LIMIT p_batch)
        RETURNING 1)
    SELECT count(*) INTO n_tokens FROM gone;
    DELETE FROM barnum.inbound_callbacks
     WHERE idempotency_key IN (SELECT idempotency_key FROM barnum.inbound_callbacks
                                WHERE created_at < v_now - v_retention LIMIT p_batch);

    RETURN jsonb_build_object(
        'reminders', n_reminders, 'reactivations', n_reactivations,
        'workflows_expired', n_expired, 'events_purged', n_purged, 'tokens_purged', n_tokens);
END
$$;

-- 20_appointments: appointment lifecycle — legal transitions, workflows, and
-- the triggers that turn changes into outbox events (SPEC §2.3, §2.5).

-- Is the patient reachable on WhatsApp?  NULL when yes, else why not.
-- PL/pgSQL rather than SQL on purpose: a SQL function with a FROM clause is
-- never inlined, and called from PL/pgSQL it is re-planned by the SQL-function
-- executor in every transaction (0.099 ms a booking); PL/pgSQL keeps its plan
-- for the session (0.012 ms).
CREATE OR REPLACE FUNCTION barnum.patient_block_reason(p_patient_id uuid) RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_opt_out boolean;
    v_phone text;
BEGIN
    SELECT p.whatsapp_opt_out, p.phone INTO v_opt_out, v_phone
      FROM barnum.patients p WHERE p.id = p_patient_id;
    IF NOT FOUND THEN
        RETURN 'patient not found';
    ELSIF v_opt_out THEN
        RETURN 'patient opted out';
    ELSIF v_phone IS NULL THEN
        RETURN 'patient has no phone';
    END IF;
    RETURN NULL;
END
$$;

-- Legal status changes.  cancelled and completed are final; the only way out
-- of them (and out of no_show) is an explicit reschedule: status back to
-- 'scheduled' together with a new starts_at.
CREATE OR REPLACE FUNCTION barnum.transition_allowed(
    p_from barnum.appointment_status, p_to barnum.appointment_status, p_moved boolean)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT p_from = p_to AND (NOT p_moved OR p_from IN ('scheduled', 'pre_confirmed', 'confirmed'))
        OR (p_to = 'scheduled' AND p_moved)
        OR (p_from IN ('scheduled', 'pre_confirmed')
            AND p_to IN ('pre_confirmed', 'confirmed', 'cancelled', 'completed', 'no_show'))
        OR (p_from = 'confirmed' AND p_to IN ('cancelled', 'completed', 'no_show'))
        OR (p_from = 'no_show' AND p_to = 'cancelled')
$$;

CREATE OR REPLACE FUNCTION barnum.appointments_transition_trg() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    moved boolean := NEW.starts_at IS DISTINCT FROM OLD.starts_at;
BEGIN
    IF NOT barnum.transition_allowed(OLD.status, NEW.status, moved) THEN
        PERFORM barnum.fail('BN409', CASE
            WHEN OLD.status = NEW.status
                THEN format('a %s appointment cannot be moved without rescheduling it (status scheduled)', OLD.status)
            ELSE format('illegal appointment transition: %s → %s', OLD.status, NEW.status)
        END);
    END IF;
    IF moved AND NEW.status = 'scheduled' THEN
        NEW.cancel_reason := NULL;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
SELECT barnum.ensure_trigger('barnum.appointments', 'trg_appointment_transition', $trg$
CREATE OR REPLACE TRIGGER trg_appointment_transition
    BEFORE UPDATE ON barnum.appointments
    FOR EACH ROW EXECUTE FUNCTION barnum.appointments_transition_trg()
$trg$);

CREATE OR REPLACE FUNCTION barnum.touch_updated_at_trg() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
SELECT barnum.ensure_trigger('barnum.patients', 'trg_patients_touch', $trg$
CREATE OR REPLACE TRIGGER trg_patients_touch
    BEFORE UPDATE ON barnum.patients
    FOR EACH ROW EXECUTE FUNCTION barnum.touch_updated_at_trg()
$trg$);
SELECT barnum.ensure_trigger('barnum.whatsapp_workflows', 'trg_workflows_touch', $trg$
CREATE OR REPLACE TRIGGER trg_workflows_touch
    BEFORE UPDATE ON barnum.whatsapp_workflows
    FOR EACH ROW EXECUTE FUNCTION barnum.touch_updated_at_trg()
$trg$);
SELECT barnum.ensure_trigger('barnum.webhook_endpoints', 'trg_endpoints_touch', $trg$
CREATE OR REPLACE TRIGGER trg_endpoints_touch
    BEFORE UPDATE ON barnum.webhook_endpoints
    FOR EACH ROW EXECUTE FUNCTION barnum.touch_updated_at_trg()
$trg$);

-- Open a workflow unless one of that type is already open for the
-- appointment (idempotent triggers).  Returns the new workflow's id, or NULL
-- when nothing should be sent: already open, or the patient is unreachable —
-- then the workflow is recorded as 'cancelled' with the reason in metadata.
-- p_expires_at: when an unanswered workflow stops making sense (the
-- appointment's start for a confirmation request or a reminder); tick()
-- expires 'sent' ones past it.
-- (The four-argument version of the first release is dropped so that calls
-- with four arguments are not ambiguous.)
DROP FUNCTION IF EXISTS barnum.open_workflow(text, uuid, uuid, jsonb);
CREATE OR REPLACE FUNCTION barnum.open_workflow(
    p_type text, p_appointment_id uuid, p_patient_id uuid, p_metadata jsonb DEFAULT '{}',
    p_expires_at timestamptz DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    reason text := barnum.patient_block_reason(p_patient_id);
    wf uuid;
BEGIN
    IF reason IS NOT NULL THEN
        INSERT INTO barnum.whatsapp_workflows (workflow_type, appointment_id, patient_id, status, metadata)
        VALUES (p_type, p_appointment_id, p_patient_id, 'cancelled',
                coalesce(p_metadata, '{}') || jsonb_build_object('reason', reason));
        RETURN NULL;
    END IF;
    IF p_appointment_id IS NOT NULL THEN
        INSERT INTO barnum.whatsapp_workflows (workflow_type, appointment_id, patient_id, metadata, expires_at)
        VALUES (p_type, p_appointment_id, p_patient_id, coalesce(p_metadata, '{}'), p_expires_at)
        ON CONFLICT (appointment_id, workflow_type)
            WHERE status IN ('pending', 'sent') AND appointment_id IS NOT NULL
        DO NOTHING
        RETURNING id INTO wf;
    ELSE
        INSERT INTO barnum.whatsapp_workflows (workflow_type, appointment_id, patient_id, metadata)
        VALUES (p_type, NULL, p_patient_id, coalesce(p_metadata, '{}'))
        ON CONFLICT (patient_id)
            WHERE status IN ('pending', 'sent') AND workflow_type = 'reactivation'
        DO NOTHING
        RETURNING id INTO wf;
    END IF;
    RETURN wf;
END
$$;

-- Close the open workflows of an appointment (optionally of some types) —
-- e.g. a cancelled appointment needs no reminder any more.
CREATE OR REPLACE FUNCTION barnum.close_workflows(
    p_appointment_id uuid, p_status text, p_reason text, p_types text[] DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql
AS $$
DECLARE
    n int;
BEGIN
    UPDATE barnum.whatsapp_workflows
       SET status = p_status,
           metadata = metadata || jsonb_build_object('closed_reason', p_reason)
     WHERE appointment_id = p_appointment_id
       AND status IN ('pending', 'sent')
       AND (p_types IS NULL OR workflow_type = ANY (p_types));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Record the patient's answer on the newest workflow of these types.
CREATE OR REPLACE FUNCTION barnum.complete_workflow(
    p_appointment_id uuid, p_types text[], p_response text, p_metadata jsonb DEFAULT '{}')
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    wf uuid;
BEGIN
    -- Only an open workflow takes the answer: a closed one keeps the answer
    -- it already has (a later confirm must not overwrite an earlier "yes").
    SELECT id INTO wf FROM barnum.whatsapp_workflows
     WHERE appointment_id = p_appointment_id AND workflow_type = ANY (p_types)
       AND status IN ('pending', 'sent')
     ORDER BY created_at DESC
     LIMIT 1
     FOR UPDATE;
    IF wf IS NOT NULL THEN
        UPDATE barnum.whatsapp_workflows
           SET status = 'completed', response = p_response, responded_at = barnum.clock(),
               metadata = metadata || coalesce(p_metadata, '{}')
         WHERE id = wf;
    END IF;
    RETURN wf;
END
$$;

-- AFTER INSERT: ask a new appointment's patient to confirm.
CREATE OR REPLACE FUNCTION barnum.pre_confirmation_trg() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    v_now timestamptz := barnum.clock();
    reason text;
    wf uuid;
BEGIN
    -- An appointment recorded after the fact (data import) asks nothing.
    IF NEW.starts_at <= v_now THEN
        RETURN NULL;
    END IF;
    -- An unreachable patient (rare): open_workflow records why.
    reason := barnum.patient_block_reason(NEW.patient_id);
    IF reason IS NOT NULL THEN
        PERFORM barnum.open_workflow('pre_confirmation', NEW.id, NEW.patient_id,
                                     jsonb_build_object('starts_at', NEW.starts_at), NEW.starts_at);
        RETURN NULL;
    END IF;
    -- The hot path: a brand-new appointment cannot have an open workflow
    -- yet, so a plain INSERT does (open_workflow's ON CONFLICT arbiter is a
    -- speculative insertion per booking).
    INSERT INTO barnum.whatsapp_workflows (workflow_type, appointment_id, patient_id, metadata, expires_at)
    VALUES ('pre_confirmation', NEW.id, NEW.patient_id, jsonb_build_object('starts_at', NEW.starts_at), NEW.starts_at)
    RETURNING id INTO wf;
    PERFORM barnum.emit_event('appointment.pre_confirmed', 'appointment', NEW.id, wf, v_now);
    RETURN NULL;
END
$$;
SELECT barnum.ensure_trigger('barnum.appointments', 'trg_pre_confirmation', $trg$
CREATE OR REPLACE TRIGGER trg_pre_confirmation
    AFTER INSERT ON barnum.appointments
    FOR EACH ROW WHEN (NEW.status IN ('scheduled', 'pre_confirmed', 'confirmed'))
    EXECUTE FUNCTION barnum.pre_confirmation_trg()
$trg$);

-- AFTER UPDATE → no_show: offer to reschedule after no_show_delay.
CREATE OR REPLACE FUNCTION barnum.no_show_trg() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    wf uuid;
BEGIN
    PERFORM barnum.close_workflows(NEW.id, 'cancelled', 'no show', ARRAY['pre_confirmation', 'reminder']);
    wf := barnum.open_workflow('reschedule_prompt', NEW.id, NEW.patient_id);
    IF wf IS NOT NULL THEN
        PERFORM barnum.emit_event('appointment.no_show', 'appointment', NEW.id, wf,
                                             barnum.clock() + barnum.setting_interval('no_show_delay'));
    END IF;
    RETURN NULL;
END
$$;
SELECT barnum.ensure_trigger('barnum.appointments', 'trg_no_show', $trg$
CREATE OR REPLACE TRIGGER trg_no_show
    AFTER UPDATE OF status ON barnum.appointments
    FOR EACH ROW WHEN (NEW.status = 'no_show' AND OLD.status IS DISTINCT FROM 'no_show')
    EXECUTE FUNCTION barnum.no_show_trg()
$trg$);

-- AFTER UPDATE → completed: remember the visit, ask for a review later.
CREATE OR REPLACE FUNCTION barnum.review_trg() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    wf uuid;
BEGIN
    UPDATE barnum.patients
       SET last_visit_at = greatest(last_visit_at, least(NEW.starts_at, barnum.clock()))
     WHERE id = NEW.patient_id;
    PERFORM barnum.close_workflows(NEW.id, 'completed', 'visit completed', ARRAY['pre_confirmation', 'reminder']);
    wf := barnum.open_workflow('review_request', NEW.id, NEW.patient_id);
    IF wf IS NOT NULL THEN
        PERFORM barnum.emit_event('appointment.completed', 'appointment', NEW.id, wf,
                                             barnum.clock() + barnum.setting_interval('review_delay'));
    END IF;
    RETURN NULL;
END
$$;
SELECT barnum.ensure_trigger('barnum.appointments', 'trg_review', $trg$
CREATE OR REPLACE TRIGGER trg_review
    AFTER UPDATE OF status ON barnum.appointments
    FOR EACH ROW WHEN (NEW.status = 'completed' AND OLD.status IS DISTINCT FROM 'completed')
    EXECUTE FUNCTION barnum.review_trg()
$trg$);

-- AFTER UPDATE of status/starts_at: tell the patient what changed.
CREATE OR REPLACE FUNCTION barnum.status_events_trg() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    reachable boolean := barnum.patient_block_reason(NEW.patient_id) IS NULL;
    ev text;
BEGIN
    IF NEW.starts_at IS DISTINCT FROM OLD.starts_at THEN
        -- The old time's reminder and confirmation request are void; tick()
        -- creates a reminder for the new time when it comes into the window.
        PERFORM barnum.close_workflows(NEW.id, 'cancelled', 'appointment rescheduled',
                                       ARRAY['pre_confirmation', 'reminder', 'reschedule_prompt']);
        ev := 'appointment.rescheduled';
    ELSIF NEW.status = 'confirmed' AND OLD.status <> 'confirmed' THEN
        ev := 'appointment.confirmed';
    ELSIF NEW.status = 'cancelled' AND OLD.status <> 'cancelled' THEN
        PERFORM barnum.close_workflows(NEW.id, 'cancelled', 'appointment cancelled');
        ev := 'appointment.cancelled';
    END IF;
    IF ev IS NOT NULL AND reachable THEN
        PERFORM barnum.emit_event(ev, 'appointment', NEW.id, NULL, barnum.clock());
    END IF;
    RETURN NULL;
END
$$;
SELECT barnum.ensure_trigger('barnum.appointments', 'trg_status_events', $trg$
CREATE OR REPLACE TRIGGER trg_status_events
    AFTER UPDATE OF status, starts_at ON barnum.appointments
    FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status OR NEW.starts_at IS DISTINCT FROM OLD.starts_at)
    EXECUTE FUNCTION barnum.status_events_trg()
$trg$);

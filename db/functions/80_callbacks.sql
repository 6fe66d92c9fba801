-- 80_callbacks: n8n's signed callbacks (SPEC §4.2).  The shim has verified
-- the signature; everything else — validation, idempotency, the change — is here.
-- Error convention: a missing field is BN400, a present but unusable value
-- is BN422, an unknown entity BN404, a state that forbids it BN409.

-- Required/optional field readers.  They name the field in the message.
CREATE OR REPLACE FUNCTION barnum.cb_uuid(p_body jsonb, p_field text) RETURNS uuid
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v jsonb := p_body -> p_field;
BEGIN
    IF v IS NULL OR v = 'null' THEN
        PERFORM barnum.fail('BN400', format('%s is required', p_field));
    END IF;
    IF jsonb_typeof(v) <> 'string' OR (v #>> '{}') !~* '^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$' THEN
        PERFORM barnum.fail('BN422', format('%s must be a UUID', p_field));
    END IF;
    RETURN (v #>> '{}')::uuid;
END
$$;

CREATE OR REPLACE FUNCTION barnum.cb_text(p_body jsonb, p_field text, p_required boolean, p_max int DEFAULT 500)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v jsonb := p_body -> p_field;
BEGIN
    IF v IS NULL OR v = 'null' THEN
        IF p_required THEN
            PERFORM barnum.fail('BN400', format('%s is required', p_field));
        END IF;
        RETURN NULL;
    END IF;
    IF jsonb_typeof(v) <> 'string' THEN
        PERFORM barnum.fail('BN422', format('%s must be a string', p_field));
    END IF;
    IF length(v #>> '{}') > p_max THEN
        PERFORM barnum.fail('BN422', format('%s is longer than %s characters', p_field, p_max));
    END IF;
    RETURN v #>> '{}';
END
$$;

CREATE OR REPLACE FUNCTION barnum.cb_int(p_body jsonb, p_field text, p_required boolean, p_min int, p_max int)
RETURNS int
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v jsonb := p_body -> p_field;
BEGIN
    IF v IS NULL OR v = 'null' THEN
        IF p_required THEN
            PERFORM barnum.fail('BN400', format('%s is required', p_field));
        END IF;
        RETURN NULL;
    END IF;
    IF jsonb_typeof(v) <> 'number' OR v::numeric <> trunc(v::numeric) OR v::numeric NOT BETWEEN p_min AND p_max THEN
        PERFORM barnum.fail('BN422', format('%s must be an integer from %s to %s', p_field, p_min, p_max));
    END IF;
    RETURN v::int;
END
$$;

CREATE OR REPLACE FUNCTION barnum.cb_bool(p_body jsonb, p_field text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    v jsonb := p_body -> p_field;
BEGIN
    IF v IS NULL OR v = 'null' THEN
        PERFORM barnum.fail('BN400', format('%s is required', p_field));
    END IF;
    IF jsonb_typeof(v) <> 'boolean' THEN
        PERFORM barnum.fail('BN422', format('%s must be true or false', p_field));
    END IF;
    RETURN v::boolean;
END
$$;

-- The appointment named by appointmentId, locked for the change.
CREATE OR REPLACE FUNCTION barnum.cb_appointment(p_body jsonb) RETURNS barnum.appointments
LANGUAGE plpgsql
AS $$
DECLARE
    a barnum.appointments;
    v_id uuid := barnum.cb_uuid(p_body, 'appointmentId');
BEGIN
    SELECT * INTO a FROM barnum.appointments x WHERE x.id = v_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('appointment %s not found', v_id));
    END IF;
    RETURN a;
END
$$;

-- Local date + time in the clinic's zone → instant.  Rejects impossible
-- dates, and wall-clock times that do not exist (the spring-forward gap).
CREATE OR REPLACE FUNCTION barnum.cb_local_instant(p_date text, p_time text, p_tz text) RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    d date;
    local_ts timestamp;
    instant timestamptz;
BEGIN
    IF p_date !~ '^\d{4}-\d{2}-\d{2}$' THEN
        PERFORM barnum.fail('BN422', format('newDate must be YYYY-MM-DD, got %L', p_date));
    END IF;
    IF p_time !~ '^([01]\d|2[0-3]):[0-5]\d$' THEN
        PERFORM barnum.fail('BN422', format('newTime must be HH:mm (00:00–23:59), got %L', p_time));
    END IF;
    BEGIN
        d := to_date(p_date, 'YYYY-MM-DD');
    EXCEPTION WHEN others THEN
        PERFORM barnum.fail('BN422', format('newDate %L is not a calendar date', p_date));
    END;
    IF to_char(d, 'YYYY-MM-DD') <> p_date THEN
        PERFORM barnum.fail('BN422', format('newDate %L is not a calendar date', p_date));
    END IF;
    local_ts := d + p_time::time;
    instant := local_ts AT TIME ZONE p_tz;
    IF instant AT TIME ZONE p_tz <> local_ts THEN
        PERFORM barnum.fail('BN422', format('%s %s does not exist in %s (clocks change that night)', p_date, p_time, p_tz));
    END IF;
    RETURN instant;
END
$$;

CREATE OR REPLACE FUNCTION barnum.cb_ok(p_message text, p_data jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$ SELECT jsonb_build_object('success', true, 'message', p_message, 'data', p_data) $$;

-- ------------------------------------------------------------ the six actions
-- The same rules as the action links (issue 12): whether an appointment may
-- still be confirmed, cancelled or rescheduled is action_blocked_reason's
-- answer for both (a past appointment can be neither confirmed nor
-- cancelled), and a workflow's first answer is final — a repeat of it is a
-- 200 that changes nothing, a different answer a BN409.
CREATE OR REPLACE FUNCTION barnum.cb_confirm(p_body jsonb, p_tz text) RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    a barnum.appointments := barnum.cb_appointment(p_body);
    answer text := coalesce(barnum.cb_text(p_body, 'patientResponse', false), 'confirmed');
    blocked text := barnum.action_blocked_reason('confirm', a, barnum.clock());
    wf uuid;
BEGIN
    IF blocked IS NOT NULL THEN
        PERFORM barnum.fail('BN409', format('cannot confirm: %s', blocked));
    END IF;
    wf := barnum.complete_workflow(a.id, ARRAY['pre_confirmation', 'reminder'], answer);
    IF a.status <> 'confirmed' THEN
        UPDATE barnum.appointments SET status = 'confirmed' WHERE id = a.id RETURNING * INTO a;
        RETURN barnum.cb_ok('Appointment confirmed successfully',
                            jsonb_build_object('appointment', barnum.appointment_json(a, p_tz), 'workflow_id', wf));
    END IF;
    RETURN barnum.cb_ok('Appointment was already confirmed',
                        jsonb_build_object('appointment', barnum.appointment_json(a, p_tz), 'workflow_id', wf));
END
$$;

CREATE OR REPLACE FUNCTION barnum.cb_cancel(p_body jsonb, p_tz text) RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    a barnum.appointments := barnum.cb_appointment(p_body);
    reason text := barnum.cb_text(p_body, 'reason', false);
    blocked text;
    wf uuid;
BEGIN
    -- Beyond the action link's rule, a no-show may be cancelled: that is the
    -- patient's "no" to the no-show follow-up, which only n8n carries.
    IF a.status <> 'no_show' THEN
        blocked := barnum.action_blocked_reason('cancel', a, barnum.clock());
    END IF;
    IF blocked IS NOT NULL THEN
        PERFORM barnum.fail('BN409', format('cannot cancel: %s', blocked));
    END IF;
    wf := barnum.complete_workflow(a.id, ARRAY['pre_confirmation', 'reminder', 'reschedule_prompt'], 'cancelled');
    UPDATE barnum.appointments
       SET status = 'cancelled', cancel_reason = coalesce(reason, 'cancelled by the patient (WhatsApp)')
     WHERE id = a.id RETURNING * INTO a;
    RETURN barnum.cb_ok('Appointment cancelled successfully',
                        jsonb_build_object('appointment', barnum.appointment_json(a, p_tz), 'workflow_id', wf));
END
$$;

CREATE OR REPLACE FUNCTION barnum.cb_reschedule(p_body jsonb, p_tz text) RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    a barnum.appointments := barnum.cb_appointment(p_body);
    new_date text := barnum.cb_text(p_body, 'newDate', true, 10);
    new_time text := barnum.cb_text(p_body, 'newTime', true, 5);
    new_at timestamptz := barnum.cb_local_instant(new_date, new_time, p_tz);
    blocked text := barnum.action_blocked_reason('reschedule', a, barnum.clock());
BEGIN
    IF new_at <= barnum.clock() THEN
        PERFORM barnum.fail('BN422', format('%s %s is in the past', new_date, new_time));
    END IF;
    IF blocked IS NOT NULL THEN
        PERFORM barnum.fail('BN409', format('cannot reschedule: %s', blocked));
    END IF;
    IF new_at = a.starts_at THEN
        PERFORM barnum.fail('BN409', 'the appointment is already at that time');
    END IF;
    PERFORM barnum.complete_workflow(a.id, ARRAY['reschedule_prompt'], 'rescheduled');
    UPDATE barnum.reschedule_requests SET status = 'done'
     WHERE appointment_id = a.id AND status = 'open';
    UPDATE barnum.appointments SET starts_at = new_at, status = 'scheduled'
     WHERE id = a.id RETURNING * INTO a;
    RETURN barnum.cb_ok('Appointment rescheduled successfully',
                        jsonb_build_object('appointment', barnum.appointment_json(a, p_tz)));
END
$$;

-- Only the answer to a no-show follow-up: the appointment must still be a
-- no-show (not cancelled or moved since), and its reschedule_prompt not yet
-- answered (a completed workflow is final).  A follow-up closed without an
-- answer — delivery failed (n8n may have sent it all the same, e.g. after a
-- timeout), skipped, expired — has no answer to protect and takes this one.
CREATE OR REPLACE FUNCTION barnum.cb_no_show_reschedule(p_body jsonb, p_tz text) RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    a barnum.appointments := barnum.cb_appointment(p_body);
    attempt int := barnum.cb_int(p_body, 'attempt', true, 1, 100);
    wf uuid;
    wf_status text;
    rr uuid;
BEGIN
    IF a.status <> 'no_show' THEN
        PERFORM barnum.fail('BN409', format('cannot record a no-show reschedule: the appointment is %s', a.status));
    END IF;
    SELECT id, status INTO wf, wf_status FROM barnum.whatsapp_workflows
     WHERE appointment_id = a.id AND workflow_type = 'reschedule_prompt'
     ORDER BY created_at DESC LIMIT 1 FOR UPDATE;
    IF wf IS NULL THEN
        PERFORM barnum.fail('BN409', 'this appointment has no no-show follow-up');
    ELSIF wf_status = 'completed' THEN
        PERFORM barnum.fail('BN409', 'the no-show follow-up of this appointment was already answered');
    END IF;
    UPDATE barnum.whatsapp_workflows
       SET status = 'completed', response = 'reschedule_requested', responded_at = barnum.clock(),
           metadata = metadata || jsonb_build_object('attempt', attempt)
     WHERE id = wf;
    rr := barnum.open_reschedule_request(a, 'no_show_callback');
    RETURN barnum.cb_ok('No-show reschedule recorded',
                        jsonb_build_object('appointment', barnum.appointment_json(a, p_tz),
                                           'workflow_id', wf, 'reschedule_request_id', rr, 'attempt', attempt));
END
$$;

-- Onto the patient's open reactivation workflow; without one, onto the
-- result already recorded in this campaign (answered less than
-- reactivation_after ago — tick() opens no new campaign sooner): the same
-- result is a repeat, another a BN409.  Only past that is a new row recorded
-- (n8n may run its own campaigns).
CREATE OR REPLACE FUNCTION barnum.cb_reactivation(p_body jsonb) RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    pid uuid := barnum.cb_uuid(p_body, 'patientId');
    wtype text := barnum.cb_text(p_body, 'workflowType', true, 100);
    result text := coalesce(barnum.cb_text(p_body, 'status', false, 100), 'completed');
    prior text;
    wf uuid;
BEGIN
    -- The patient row lock serialises concurrent callbacks for one patient.
    PERFORM 1 FROM barnum.patients WHERE id = pid FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('patient %s not found', pid));
    END IF;
    SELECT id INTO wf FROM barnum.whatsapp_workflows
     WHERE patient_id = pid AND workflow_type = 'reactivation' AND status IN ('pending', 'sent')
     ORDER BY created_at DESC LIMIT 1 FOR UPDATE;
    IF wf IS NOT NULL THEN
        UPDATE barnum.whatsapp_workflows
           SET status = 'completed', response = result, responded_at = barnum.clock(),
               metadata = metadata || jsonb_build_object('workflowType', wtype)
         WHERE id = wf;
        RETURN barnum.cb_ok('Reactivation recorded',
                            jsonb_build_object('patient_id', pid, 'workflow_id', wf, 'status', result));
    END IF;
    SELECT id, response INTO wf, prior FROM barnum.whatsapp_workflows
     WHERE patient_id = pid AND workflow_type = 'reactivation' AND status = 'completed'
       AND responded_at > barnum.clock() - barnum.setting_interval('reactivation_after')
     ORDER BY responded_at DESC LIMIT 1;
    IF wf IS NOT NULL THEN
        IF prior IS DISTINCT FROM result THEN
            PERFORM barnum.fail('BN409', format('a reactivation result was already recorded for this patient (%s)', prior));
        END IF;
        RETURN barnum.cb_ok('Reactivation was already recorded',
                            jsonb_build_object('patient_id', pid, 'workflow_id', wf, 'status', result));
    END IF;
    INSERT INTO barnum.whatsapp_workflows (workflow_type, patient_id, status, response, responded_at, metadata)
    VALUES ('reactivation', pid, 'completed', result, barnum.clock(),
            jsonb_build_object('workflowType', wtype, 'source', 'callback'))
    RETURNING id INTO wf;
    RETURN barnum.cb_ok('Reactivation recorded',
                        jsonb_build_object('patient_id', pid, 'workflow_id', wf, 'status', result));
END
$$;

-- One review per visit: the first answer is final.
CREATE OR REPLACE FUNCTION barnum.cb_review(p_body jsonb, p_tz text) RETURNS jsonb
LANGUAGE plpgsql
AS $$
DECLARE
    a barnum.appointments := barnum.cb_appointment(p_body);
    submitted boolean := barnum.cb_bool(p_body, 'reviewSubmitted');
    rating int := barnum.cb_int(p_body, 'rating', submitted, 1, 5);
    answer text := CASE WHEN submitted THEN rating::text ELSE 'declined' END;
    prior text;
    wf uuid;
BEGIN
    IF a.status <> 'completed' THEN
        PERFORM barnum.fail('BN409', format('only a completed appointment can be reviewed (it is %s)', a.status));
    END IF;
    SELECT id, response INTO wf, prior FROM barnum.whatsapp_workflows
     WHERE appointment_id = a.id AND workflow_type = 'review_request' AND status = 'completed'
       AND response IS NOT NULL
     ORDER BY responded_at DESC NULLS LAST LIMIT 1;
    IF wf IS NOT NULL THEN
        IF prior <> answer THEN
            PERFORM barnum.fail('BN409', format('a review was already recorded for this appointment (%s)', prior));
        END IF;
        RETURN barnum.cb_ok('Review was already recorded',
                            jsonb_build_object('appointment_id', a.id, 'workflow_id', wf,
                                               'review_submitted', submitted, 'rating', rating));
    END IF;
    wf := barnum.complete_workflow(a.id, ARRAY['review_request'], answer,
                                   jsonb_build_object('review_submitted', submitted, 'rating', rating));
    IF wf IS NULL THEN
        INSERT INTO barnum.whatsapp_workflows (workflow_type, appointment_id, patient_id, status, response, responded_at, metadata)
        VALUES ('review_request', a.id, a.patient_id, 'completed', answer, barnum.clock(),
                jsonb_build_object('review_submitted', submitted, 'rating', rating, 'source', 'callback'))
        RETURNING id INTO wf;
    END IF;
    RETURN barnum.cb_ok('Review recorded',
                        jsonb_build_object('appointment_id', a.id, 'workflow_id', wf,
                                           'review_submitted', submitted, 'rating', rating));
END
$$;

-- ------------------------------------------------------------ entry point
CREATE OR REPLACE FUNCTION barnum.handle_callback(
    p_action text, p_body jsonb, p_idempotency_key text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    act text;
    h bytea;
    prior barnum.inbound_callbacks;
    result jsonb;
    tz text := barnum.setting_text('timezone');
BEGIN
    IF p_body IS NULL OR jsonb_typeof(p_body) <> 'object' THEN
        PERFORM barnum.fail('BN400', 'the body must be a JSON object');
    END IF;
    IF p_body ? 'action' AND jsonb_typeof(p_body -> 'action') <> 'string' THEN
        PERFORM barnum.fail('BN422', 'action must be a string');
    END IF;
    act := coalesce(p_action, p_body ->> 'action');
    IF act IS NULL THEN
        PERFORM barnum.fail('BN400', 'action is required');
    END IF;
    IF p_action IS NOT NULL AND p_body ? 'action' AND p_body ->> 'action' <> p_action THEN
        PERFORM barnum.fail('BN400', format('body action %L does not match %L', p_body ->> 'action', p_action));
    END IF;
    IF act NOT IN ('confirm', 'cancel', 'reschedule', 'no_show_reschedule', 'reactivation', 'review') THEN
        PERFORM barnum.fail('BN400', format('unknown action %L (confirm, cancel, reschedule, no_show_reschedule, reactivation, review)', act));
    END IF;

    IF p_idempotency_key IS NOT NULL THEN
        IF length(p_idempotency_key) NOT BETWEEN 1 AND 255 THEN
            PERFORM barnum.fail('BN400', 'idempotency key must be 1–255 characters');
        END IF;
        h := pg_catalog.sha256(convert_to(act || ':' || p_body::text, 'UTF8'));
        -- Claim the key.  A concurrent request with the same key waits here
        -- until the first commits, then finds its stored response.
        INSERT INTO barnum.inbound_callbacks (idempotency_key, action, body_hash)
        VALUES (p_idempotency_key, act, h)
        ON CONFLICT (idempotency_key) DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO prior FROM barnum.inbound_callbacks WHERE idempotency_key = p_idempotency_key;
            IF prior.body_hash <> h THEN
                PERFORM barnum.fail('BN409', 'idempotency key was already used with a different request');
            END IF;
            RETURN prior.response;
        END IF;
    END IF;

    result := CASE act
        WHEN 'confirm' THEN barnum.cb_confirm(p_body, tz)
        WHEN 'cancel' THEN barnum.cb_cancel(p_body, tz)
        WHEN 'reschedule' THEN barnum.cb_reschedule(p_body, tz)
        WHEN 'no_show_reschedule' THEN barnum.cb_no_show_reschedule(p_body, tz)
        WHEN 'reactivation' THEN barnum.cb_reactivation(p_body)
        WHEN 'review' THEN barnum.cb_review(p_body, tz)
    END;

    IF p_idempotency_key IS NOT NULL THEN
        UPDATE barnum.inbound_callbacks SET response = result WHERE idempotency_key = p_idempotency_key;
    END IF;
    RETURN result;
END
$$;

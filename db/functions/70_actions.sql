-- 70_actions: patients' one-time action links (SPEC §4.1).  The shim only
-- renders; every rule — token checks, legal states, the change itself — is here.

-- Raise for an action page: DETAIL carries the clinic locale as JSON so the
-- shim renders the error page in the patient's language without a second query.
CREATE OR REPLACE FUNCTION barnum.action_fail(p_code text, p_message text) RETURNS void
LANGUAGE sql
AS $$
    SELECT barnum.fail(p_code, p_message,
                       jsonb_build_object('locale', barnum.setting_text('locale'))::text)
$$;

-- Why this action cannot be applied to the appointment now (NULL: it can).
CREATE OR REPLACE FUNCTION barnum.action_blocked_reason(
    p_type text, a barnum.appointments, p_now timestamptz)
RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT CASE
        WHEN p_type = 'reschedule' AND a.status IN ('cancelled', 'completed')
            THEN format('the appointment is %s', a.status)
        WHEN p_type = 'reschedule' THEN NULL
        WHEN a.status IN ('cancelled', 'completed', 'no_show')
            THEN format('the appointment is %s', a.status)
        WHEN a.starts_at <= p_now THEN 'the appointment time has passed'
    END
$$;

-- Find a token by its hash; raises the page's error when it cannot be used.
CREATE OR REPLACE FUNCTION barnum.usable_token(p_token text, p_lock boolean)
RETURNS barnum.whatsapp_action_tokens
LANGUAGE plpgsql
AS $$
DECLARE
    t barnum.whatsapp_action_tokens;
BEGIN
    IF p_token IS NULL OR p_token !~ '^[A-Za-z0-9_-]{16,128}$' THEN
        PERFORM barnum.action_fail('BN404', 'this link is not valid');
    END IF;
    IF p_lock THEN
        -- The row lock serialises concurrent uses: the second caller waits,
        -- then sees used_at and gets BN410.
        SELECT * INTO t FROM barnum.whatsapp_action_tokens
         WHERE token_hash = barnum.token_hash(p_token) FOR UPDATE;
    ELSE
        SELECT * INTO t FROM barnum.whatsapp_action_tokens WHERE token_hash = barnum.token_hash(p_token);
    END IF;
    IF NOT FOUND THEN
        PERFORM barnum.action_fail('BN404', 'this link is not valid');
    END IF;
    IF t.used_at IS NOT NULL THEN
        PERFORM barnum.action_fail('BN410', 'this link was already used');
    END IF;
    IF t.expires_at <= barnum.clock() THEN
        PERFORM barnum.action_fail('BN410', 'this link has expired');
    END IF;
    RETURN t;
END
$$;

CREATE OR REPLACE FUNCTION barnum.peek_action(p_token text) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    t barnum.whatsapp_action_tokens := barnum.usable_token(p_token, false);
    a barnum.appointments;
    blocked text;
BEGIN
    SELECT * INTO a FROM barnum.appointments WHERE id = t.appointment_id;
    blocked := barnum.action_blocked_reason(t.action_type, a, barnum.clock());
    IF blocked IS NOT NULL THEN
        PERFORM barnum.action_fail('BN409', blocked);
    END IF;
    RETURN jsonb_build_object(
        'action_type', t.action_type,
        'expires_at', t.expires_at,
        'appointment', barnum.appointment_json(a, barnum.setting_text('timezone')),
        'locale', barnum.setting_text('locale'),
        'one_click_actions', barnum.setting('one_click_actions'));
END
$$;

CREATE OR REPLACE FUNCTION barnum.perform_action(p_token text, p_type text) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    t barnum.whatsapp_action_tokens;
    a barnum.appointments;
    blocked text;
    v_now timestamptz := barnum.clock();
BEGIN
    IF p_type IS NULL OR p_type NOT IN ('confirm', 'cancel', 'reschedule') THEN
        PERFORM barnum.action_fail('BN400', 'unknown action (confirm, cancel or reschedule)');
    END IF;
    t := barnum.usable_token(p_token, true);
    IF t.action_type <> p_type THEN
        PERFORM barnum.action_fail('BN400', format('this link is for %s, not %s', t.action_type, p_type));
    END IF;
    SELECT * INTO a FROM barnum.appointments WHERE id = t.appointment_id FOR UPDATE;
    blocked := barnum.action_blocked_reason(p_type, a, v_now);
    IF blocked IS NOT NULL THEN
        PERFORM barnum.action_fail('BN409', blocked);
    END IF;

    -- The same change a WhatsApp reply makes (87_inbound).
    a := barnum.apply_patient_answer(a, p_type, t.workflow_id, 'action_link');

    UPDATE barnum.whatsapp_action_tokens SET used_at = v_now WHERE id = t.id;
    RETURN jsonb_build_object(
        'action', p_type,
        'status', a.status,
        'appointment', barnum.appointment_json(a, barnum.setting_text('timezone')),
        'locale', barnum.setting_text('locale'));
END
$$;

-- Open a reschedule request unless one is open already; tell the clinic
-- (event appointment.reschedule_requested) when a new one is opened.
CREATE OR REPLACE FUNCTION barnum.open_reschedule_request(
    a barnum.appointments, p_source text, p_requested timestamptz DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql
AS $$
DECLARE
    rr uuid;
BEGIN
    SELECT id INTO rr FROM barnum.reschedule_requests
     WHERE appointment_id = a.id AND status = 'open' LIMIT 1;
    IF rr IS NOT NULL THEN
        RETURN rr;
    END IF;
    INSERT INTO barnum.reschedule_requests (appointment_id, patient_id, source, requested_starts_at)
    VALUES (a.id, a.patient_id, p_source, p_requested)
    RETURNING id INTO rr;
    IF barnum.patient_block_reason(a.patient_id) IS NULL THEN
        PERFORM barnum.emit_event('appointment.reschedule_requested', 'appointment', a.id, NULL, barnum.clock());
    END IF;
    RETURN rr;
END
$$;

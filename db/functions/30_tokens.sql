-- 30_tokens: one-time action tokens for patients' links (seed-compatible API).
-- Only SHA-256(token) is stored; the plain token lives only in the rendered
-- payload that the relay sends, so a database dump cannot act for a patient.

-- STABLE, as convert_to is: an IMMUTABLE SQL function whose body is only
-- STABLE is never inlined, and each call went through the SQL-function executor.
CREATE OR REPLACE FUNCTION barnum.token_hash(p_token text) RETURNS bytea
LANGUAGE sql STABLE
AS $$ SELECT pg_catalog.sha256(convert_to(p_token, 'UTF8')) $$;

-- A new token's plain text: 32 random bytes, base64url without padding.
CREATE OR REPLACE FUNCTION barnum.new_token() RETURNS text
LANGUAGE sql VOLATILE
AS $$ SELECT rtrim(translate(encode(barnum.random_bytes(32), 'base64'), E'+/\n', '-_'), '=') $$;

-- Mint a token and store only its hash.
CREATE OR REPLACE FUNCTION barnum.mint_token(
    p_action_type text, p_appointment_id uuid, p_patient_id uuid,
    p_workflow_id uuid, p_metadata jsonb, p_expires_at timestamptz)
RETURNS text
LANGUAGE plpgsql
AS $$
DECLARE
    tok text := barnum.new_token();
BEGIN
    INSERT INTO barnum.whatsapp_action_tokens
        (token_hash, action_type, appointment_id, patient_id, workflow_id, metadata, expires_at)
    VALUES (barnum.token_hash(tok), p_action_type, p_appointment_id, p_patient_id,
            p_workflow_id, p_metadata, p_expires_at);
    RETURN tok;
END
$$;

CREATE OR REPLACE FUNCTION barnum.generate_action_token(
    p_action_type text, p_appointment_id uuid, p_patient_id uuid,
    p_workflow_id uuid DEFAULT NULL, p_metadata jsonb DEFAULT NULL,
    p_expires_in_days int DEFAULT 7)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    appt_patient uuid;
BEGIN
    IF p_action_type IS NULL OR p_appointment_id IS NULL OR p_patient_id IS NULL THEN
        PERFORM barnum.fail('BN400', 'action type, appointment id and patient id are required');
    END IF;
    IF p_action_type NOT IN ('confirm', 'cancel', 'reschedule') THEN
        PERFORM barnum.fail('BN400', format('unknown action type %L (confirm, cancel, reschedule)', p_action_type));
    END IF;
    IF p_expires_in_days IS NULL OR p_expires_in_days NOT BETWEEN 1 AND 365 THEN
        PERFORM barnum.fail('BN422', 'p_expires_in_days must be between 1 and 365');
    END IF;
    SELECT patient_id INTO appt_patient FROM barnum.appointments WHERE id = p_appointment_id;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', format('appointment %s not found', p_appointment_id));
    END IF;
    IF appt_patient <> p_patient_id THEN
        PERFORM barnum.fail('BN422', 'the patient does not own this appointment');
    END IF;
    IF p_workflow_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM barnum.whatsapp_workflows WHERE id = p_workflow_id) THEN
        PERFORM barnum.fail('BN404', format('workflow %s not found', p_workflow_id));
    END IF;
    RETURN barnum.mint_token(p_action_type, p_appointment_id, p_patient_id, p_workflow_id,
                             p_metadata, barnum.clock() + make_interval(days => p_expires_in_days));
END
$$;

-- Read-only check (seed parity): never raises for a bad token, says why.
CREATE OR REPLACE FUNCTION barnum.validate_action_token(p_token text)
RETURNS TABLE (valid boolean, appointment_id uuid, patient_id uuid, action_type text,
               metadata jsonb, error_message text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    t barnum.whatsapp_action_tokens;
BEGIN
    SELECT * INTO t FROM barnum.whatsapp_action_tokens WHERE token_hash = barnum.token_hash(coalesce(p_token, ''));
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::uuid, NULL::uuid, NULL::text, NULL::jsonb, 'Token not found'::text;
    ELSIF t.used_at IS NOT NULL THEN
        RETURN QUERY SELECT false, t.appointment_id, t.patient_id, t.action_type, t.metadata, 'Token already used'::text;
    ELSIF t.expires_at <= barnum.clock() THEN
        RETURN QUERY SELECT false, t.appointment_id, t.patient_id, t.action_type, t.metadata, 'Token expired'::text;
    ELSE
        RETURN QUERY SELECT true, t.appointment_id, t.patient_id, t.action_type, t.metadata, NULL::text;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION barnum.mark_token_used(p_token text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = barnum, pg_temp
AS $$
DECLARE
    t barnum.whatsapp_action_tokens;
BEGIN
    IF p_token IS NULL OR p_token = '' THEN
        PERFORM barnum.fail('BN400', 'token is required');
    END IF;
    SELECT * INTO t FROM barnum.whatsapp_action_tokens
     WHERE token_hash = barnum.token_hash(p_token) FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM barnum.fail('BN404', 'token not found');
    END IF;
    IF t.used_at IS NOT NULL THEN
        PERFORM barnum.fail('BN410', 'token already used');
    END IF;
    UPDATE barnum.whatsapp_action_tokens SET used_at = barnum.clock() WHERE id = t.id;
END
$$;

-- 55_whatsapp_render: what the native sender (endpoint kind whatsapp_cloud)
-- posts to the Graph API — a Cloud API message rendered at claim time from
-- the same documents as the webhook payload (SPEC-2 §E).  Appointment
-- requests carry their fresh action tokens in the button payloads
-- ("barnum:<action>:<token>"), which ingest_whatsapp acts on when tapped.

-- The patient-facing text of an event; the parts that are unknown (no
-- professional, no specialty) are left out rather than rendered blank.
CREATE OR REPLACE FUNCTION barnum.wa_text(p_event_type text, p_appt jsonb, p_patient jsonb, p_locale text)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN p_locale = 'en' THEN
        CASE p_event_type
            WHEN 'appointment.pre_confirmed' THEN format('Hello %s! You have an appointment%s on %s at %s%s. Can you confirm?',
                                                          first, spec_en, d, t, prof_en)
            WHEN 'appointment.reminder' THEN format('Reminder, %s: your appointment%s is on %s at %s%s. Will you come?',
                                                     first, spec_en, d, t, prof_en)
            WHEN 'appointment.rescheduled' THEN format('%s, your appointment%s was moved to %s at %s%s. Can you confirm?',
                                                        first, spec_en, d, t, prof_en)
            WHEN 'appointment.confirmed' THEN format('Thank you, %s! Your appointment on %s at %s is confirmed.', first, d, t)
            WHEN 'appointment.cancelled' THEN format('%s, your appointment on %s at %s was cancelled.', first, d, t)
            WHEN 'appointment.no_show' THEN format('%s, we missed you on %s at %s. Would you like a new date? Just reply here.',
                                                    first, d, t)
            WHEN 'appointment.completed' THEN format('Thank you for your visit, %s! How would you rate it from 1 to 5?', first)
            WHEN 'appointment.reschedule_requested' THEN format('%s, we got your request and will contact you with a new date.', first)
            WHEN 'patient.reactivation' THEN format('Hello %s! It has been a while since your last visit. Shall we book one?', first)
        END
    ELSE
        CASE p_event_type
            WHEN 'appointment.pre_confirmed' THEN format('Olá %s! Tem uma consulta%s a %s às %s%s. Confirma?',
                                                          first, spec_pt, d, t, prof_pt)
            WHEN 'appointment.reminder' THEN format('Lembrete, %s: a sua consulta%s é a %s às %s%s. Vem?',
                                                     first, spec_pt, d, t, prof_pt)
            WHEN 'appointment.rescheduled' THEN format('%s, a sua consulta%s passou para %s às %s%s. Confirma?',
                                                        first, spec_pt, d, t, prof_pt)
            WHEN 'appointment.confirmed' THEN format('Obrigado, %s! A sua consulta de %s às %s está confirmada.', first, d, t)
            WHEN 'appointment.cancelled' THEN format('%s, a sua consulta de %s às %s foi cancelada.', first, d, t)
            WHEN 'appointment.no_show' THEN format('%s, sentimos a sua falta a %s às %s. Quer marcar uma nova data? Responda aqui.',
                                                    first, d, t)
            WHEN 'appointment.completed' THEN format('Obrigado pela sua visita, %s! Como a avalia, de 1 a 5?', first)
            WHEN 'appointment.reschedule_requested' THEN format('%s, recebemos o seu pedido e vamos contactá-lo com uma nova data.', first)
            WHEN 'patient.reactivation' THEN format('Olá %s! Já passou algum tempo desde a sua última visita. Quer marcar uma consulta?', first)
        END
    END
      FROM (SELECT split_part(coalesce(p_appt #>> '{patient,name}', p_patient ->> 'name', ''), ' ', 1) AS first,
                   p_appt ->> 'date' AS d, p_appt ->> 'time' AS t,
                   coalesce(' de ' || (p_appt #>> '{specialty,name}'), '') AS spec_pt,
                   coalesce(' com ' || (p_appt #>> '{professional,name}'), '') AS prof_pt,
                   coalesce(' (' || (p_appt #>> '{specialty,name}') || ')', '') AS spec_en,
                   coalesce(' with ' || (p_appt #>> '{professional,name}'), '') AS prof_en) x
$$;

-- The Cloud API request body for one delivery to a whatsapp_cloud endpoint,
-- or NULL for an event that is no message to a patient (the claim skips it).
-- p_tokens: action type → the plain token minted for this delivery.
CREATE OR REPLACE FUNCTION barnum.wa_cloud_payload(
    e barnum.whatsapp_events, p_appt jsonb, p_patient jsonb, p_tokens jsonb, p_config jsonb, p_locale text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE
        WHEN e.event_type = 'message.send' THEN e.data -> 'whatsapp'
        WHEN to_ IS NULL OR body IS NULL THEN NULL
        WHEN tpl IS NOT NULL THEN head || jsonb_build_object('type', 'template', 'template', jsonb_build_object(
            'name', tpl ->> 'name', 'language', jsonb_build_object('code', coalesce(tpl ->> 'language', 'pt_PT')),
            'components', jsonb_build_array(jsonb_build_object('type', 'body', 'parameters', jsonb_build_array(
                    jsonb_build_object('type', 'text', 'text', coalesce(nullif(first, ''), '-')),
                    jsonb_build_object('type', 'text', 'text', coalesce(p_appt ->> 'date', '-')),
                    jsonb_build_object('type', 'text', 'text', coalesce(p_appt ->> 'time', '-')),
                    jsonb_build_object('type', 'text', 'text', coalesce(p_appt #>> '{professional,name}', '-')))))
                || coalesce((SELECT jsonb_agg(jsonb_build_object(
                                'type', 'button', 'sub_type', 'quick_reply', 'index', (i - 1)::text,
                                'parameters', jsonb_build_array(jsonb_build_object(
                                    'type', 'payload', 'payload', 'barnum:' || a || ':' || (p_tokens ->> a)))) ORDER BY i)
                               FROM unnest(ARRAY['confirm', 'cancel', 'reschedule']) WITH ORDINALITY AS b(a, i)
                              WHERE p_tokens ? a), '[]')))
        WHEN p_tokens ? 'confirm' THEN head || jsonb_build_object('type', 'interactive', 'interactive', jsonb_build_object(
            'type', 'button', 'body', jsonb_build_object('text', body),
            'action', jsonb_build_object('buttons', (
                SELECT jsonb_agg(jsonb_build_object('type', 'reply', 'reply', jsonb_build_object(
                           'id', 'barnum:' || a || ':' || (p_tokens ->> a),
                           'title', CASE WHEN p_locale = 'en' THEN initcap(a) ELSE
                                    CASE a WHEN 'confirm' THEN 'Confirmar' WHEN 'cancel' THEN 'Cancelar'
                                           ELSE 'Reagendar' END END)) ORDER BY i)
                  FROM unnest(ARRAY['confirm', 'cancel', 'reschedule']) WITH ORDINALITY AS b(a, i)
                 WHERE p_tokens ? a))))
        ELSE head || jsonb_build_object('type', 'text', 'text', jsonb_build_object('preview_url', false, 'body', body))
    END
      FROM (SELECT barnum.digits(coalesce(p_appt #>> '{patient,phone}', p_patient ->> 'phone')) AS to_,
                   barnum.wa_text(e.event_type, p_appt, p_patient, p_locale) AS body,
                   p_config -> 'templates' -> e.event_type AS tpl,
                   split_part(coalesce(p_appt #>> '{patient,name}', p_patient ->> 'name', ''), ' ', 1) AS first) x,
           LATERAL (SELECT jsonb_build_object('messaging_product', 'whatsapp', 'recipient_type', 'individual',
                                              'to', x.to_) AS head) h
$$;

-- A Graph API answer's JSON (NULL when it is not JSON).
CREATE OR REPLACE FUNCTION barnum.try_jsonb(p_text text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    RETURN p_text::jsonb;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;

-- Graph API error codes Meta says to retry later (throttling, temporary
-- failures); the HTTP status alone (often 400) would make them final.
CREATE OR REPLACE FUNCTION barnum.graph_retryable(p_code int) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$ SELECT p_code IN (1, 2, 4, 17, 341, 80007, 130429, 131000, 131016, 131056) $$;

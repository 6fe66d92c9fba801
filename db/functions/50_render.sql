-- 50_render: the payload an endpoint receives, rendered at claim time so it
-- carries the appointment as it is now and freshly minted action links.  A
-- delivery whose event no longer makes sense is skipped with the reason.
-- claim_deliveries_text (60_relay) applies these to a whole batch at once.

-- event_payload's arguments changed (the claim joins the rows it renders).
DROP FUNCTION IF EXISTS barnum.event_payload(barnum.whatsapp_events, barnum.appointments, jsonb, text);

-- An appointment as payloads and pages show it, times in the clinic's zone,
-- from the rows it names.  A bare expression (no sub-select) on purpose:
-- the claim's render query inlines it over a whole batch joined with its
-- patients, professionals and specialties — called per row with sub-selects
-- it was a third of a 50-row claim.
CREATE OR REPLACE FUNCTION barnum.appointment_doc(
    a barnum.appointments, p barnum.patients, p_professional text, p_specialty text, p_tz text)
RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
        'id', a.id,
        'date', barnum.local_date(a.starts_at, p_tz),
        'time', barnum.local_time(a.starts_at, p_tz),
        'starts_at', a.starts_at,
        'status', a.status,
        'patient', CASE WHEN p.id IS NOT NULL THEN jsonb_build_object('id', p.id, 'name', p.name, 'phone', p.phone) END,
        'professional', jsonb_build_object('name', p_professional),
        'specialty', jsonb_build_object('name', p_specialty))
$$;

-- One appointment, looked up (action pages, callback replies).  PL/pgSQL so
-- its lookups keep their plans for the session.
CREATE OR REPLACE FUNCTION barnum.appointment_json(a barnum.appointments, p_tz text) RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    p barnum.patients;
    v_professional text;
    v_specialty text;
BEGIN
    SELECT * INTO p FROM barnum.patients WHERE id = a.patient_id;
    SELECT name INTO v_professional FROM barnum.professionals WHERE id = a.professional_id;
    SELECT name INTO v_specialty FROM barnum.specialties WHERE id = a.specialty_id;
    RETURN barnum.appointment_doc(a, p, v_professional, v_specialty, p_tz);
END
$$;

-- A patient as patient events show it.
CREATE OR REPLACE FUNCTION barnum.patient_doc(p barnum.patients, p_tz text) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN p.id IS NOT NULL THEN jsonb_build_object(
               'id', p.id, 'name', p.name, 'phone', p.phone,
               'last_visit_date', barnum.local_date(p.last_visit_at, p_tz)) END
$$;

-- Which links each event type offers the patient.
CREATE OR REPLACE FUNCTION barnum.event_link_types(p_event_type text) RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE p_event_type
        WHEN 'appointment.pre_confirmed' THEN ARRAY['confirm', 'cancel', 'reschedule']
        WHEN 'appointment.reminder'      THEN ARRAY['confirm', 'cancel', 'reschedule']
        WHEN 'appointment.rescheduled'   THEN ARRAY['confirm', 'cancel', 'reschedule']
        WHEN 'appointment.confirmed'     THEN ARRAY['cancel', 'reschedule']
        WHEN 'appointment.no_show'       THEN ARRAY['reschedule']
        ELSE ARRAY[]::text[]
    END
$$;

-- Why an appointment event should not go out any more (NULL: send it).
CREATE OR REPLACE FUNCTION barnum.appointment_event_stale(
    p_event_type text, a barnum.appointments, w barnum.whatsapp_workflows, p_now timestamptz)
RETURNS text
LANGUAGE sql STABLE
AS $$
    SELECT CASE
        WHEN p_event_type IN ('appointment.pre_confirmed', 'appointment.reminder')
             AND a.status NOT IN ('scheduled', 'pre_confirmed', 'confirmed')
            THEN format('appointment is %s', a.status)
        WHEN p_event_type IN ('appointment.pre_confirmed', 'appointment.reminder') AND a.starts_at <= p_now
            THEN 'appointment already started'
        WHEN p_event_type = 'appointment.reminder' AND w.id IS NOT NULL
             AND (w.metadata ->> 'starts_at')::timestamptz IS DISTINCT FROM a.starts_at
            THEN 'appointment was rescheduled'
        WHEN p_event_type = 'appointment.no_show' AND a.status <> 'no_show'
            THEN format('appointment is %s, no longer a no-show', a.status)
        WHEN p_event_type = 'appointment.completed' AND a.status <> 'completed'
            THEN format('appointment is %s, not completed', a.status)
        WHEN w.id IS NOT NULL AND w.status NOT IN ('pending', 'sent')
            THEN format('workflow %s', w.status)
    END
$$;

-- The payload of one event (SPEC §3): the seed's shape plus event_id, the
-- appointment as it is now (or the patient, for patient events) and the
-- action links minted for this delivery.  Other events (endpoint.disabled)
-- carry only their data.  A bare expression, inlined into
-- the claim's render query like appointment_doc.
CREATE OR REPLACE FUNCTION barnum.event_payload(
    e barnum.whatsapp_events, p_appointment jsonb, p_patient jsonb, p_links jsonb)
RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
               'event_id', e.id, 'event_type', e.event_type, 'entity_id', e.entity_id,
               'created_at', to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
               'workflow_id', e.workflow_id)
        -- Conversation events carry the seed's flat payload (message_id, from, to, …).
        || CASE WHEN e.entity_type IN ('message', 'session') THEN e.data
                WHEN e.data <> '{}' THEN jsonb_build_object('data', e.data) ELSE '{}' END
        || CASE e.entity_type
                WHEN 'patient' THEN jsonb_build_object('patient', p_patient, 'action_links', '{}'::jsonb)
                WHEN 'appointment' THEN jsonb_build_object('appointment', p_appointment,
                                                           'action_links', coalesce(p_links, '{}'::jsonb))
                ELSE '{}'::jsonb
           END
$$;

-- 50_render: the payload an endpoint receives, rendered at claim time so it
-- carries the appointment as it is now and freshly minted action links.  A
-- delivery whose event no longer makes sense is skipped with the reason.
-- claim_deliveries_text (60_relay) applies these to a whole batch at once.

-- An appointment as payloads and pages show it, times in the clinic's zone.
CREATE OR REPLACE FUNCTION barnum.appointment_json(a barnum.appointments, p_tz text) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
        'id', a.id,
        'date', barnum.local_date(a.starts_at, p_tz),
        'time', barnum.local_time(a.starts_at, p_tz),
        'starts_at', a.starts_at,
        'status', a.status,
        'patient', (SELECT jsonb_build_object('id', p.id, 'name', p.name, 'phone', p.phone)
                      FROM barnum.patients p WHERE p.id = a.patient_id),
        'professional', jsonb_build_object('name',
            (SELECT name FROM barnum.professionals WHERE id = a.professional_id)),
        'specialty', jsonb_build_object('name',
            (SELECT name FROM barnum.specialties WHERE id = a.specialty_id)))
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
-- action links minted for this delivery.
CREATE OR REPLACE FUNCTION barnum.event_payload(
    e barnum.whatsapp_events, a barnum.appointments, p_links jsonb, p_tz text)
RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN jsonb_build_object(
               'event_id', e.id, 'event_type', e.event_type, 'entity_id', e.entity_id,
               'created_at', to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
               'workflow_id', e.workflow_id)
        || CASE WHEN e.data <> '{}' THEN jsonb_build_object('data', e.data) ELSE '{}' END
        || CASE WHEN e.entity_type = 'patient' THEN jsonb_build_object(
                   'patient', (SELECT jsonb_build_object(
                                   'id', p.id, 'name', p.name, 'phone', p.phone,
                                   'last_visit_date', barnum.local_date(p.last_visit_at, p_tz))
                                 FROM barnum.patients p WHERE p.id = e.entity_id),
                   'action_links', '{}'::jsonb)
           ELSE jsonb_build_object(
                   'appointment', barnum.appointment_json(a, p_tz),
                   'action_links', coalesce(p_links, '{}'::jsonb))
           END;
END
$$;

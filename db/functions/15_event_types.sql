-- 15_event_types: the event types Barnum emits (SPEC §3), in one place, so
-- every way of subscribing an endpoint checks its patterns against the same
-- list.  A new event type is added here.

CREATE OR REPLACE FUNCTION barnum.known_event_types() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT ARRAY[
        'appointment.pre_confirmed',
        'appointment.reminder',
        'appointment.no_show',
        'appointment.completed',
        'appointment.confirmed',
        'appointment.cancelled',
        'appointment.rescheduled',
        'appointment.reschedule_requested',
        'patient.reactivation',
        'endpoint.disabled',
        'message.received',
        'message.status',
        'message.needs_attention',
        'message.send',
        'session.handoff'
    ]
$$;

-- Endpoint filters: glob patterns ('*', 'appointment.*', an exact type).  A
-- pattern that matches no known type is refused rather than stored: it
-- would silently subscribe to nothing (a typo such as 'apointment.*').
-- DETAIL names the field and lists the known types for callers to show.
CREATE OR REPLACE FUNCTION barnum.check_event_patterns(p_patterns text[]) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
    known text[] := barnum.known_event_types();
    bad text;
BEGIN
    IF p_patterns IS NULL OR cardinality(p_patterns) = 0 THEN
        PERFORM barnum.fail('BN422', 'event types must be patterns like "appointment.*" or "*"',
                            jsonb_build_object('field', 'event_types', 'known', known)::text);
    END IF;
    SELECT t INTO bad FROM unnest(p_patterns) t
     WHERE t IS NULL OR t !~ '^[a-z_*?]+(\.[a-z_*?]+)?$'
        OR NOT EXISTS (SELECT 1 FROM unnest(known) k WHERE barnum.glob_match(ARRAY[t], k))
     LIMIT 1;
    IF FOUND THEN
        PERFORM barnum.fail('BN422', format(
            'event types must be patterns like "appointment.*" or "*" matching a known event type;'
            ' %L matches none (known: %s)', bad, array_to_string(known, ', ')),
            jsonb_build_object('field', 'event_types', 'pattern', bad, 'known', known)::text);
    END IF;
    RETURN p_patterns;
END
$$;

-- 99_grants: who may call what (SPEC §2.7).  Last in name order so it also
-- covers functions added by the files before it.  The roles reach data only
-- through these SECURITY DEFINER functions; they hold no table privilege.

REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA barnum FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA barnum FROM barnum_relay, barnum_shim;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA barnum FROM barnum_relay, barnum_shim;

-- barnum_relay: the delivery loop.
GRANT EXECUTE ON FUNCTION
    barnum.claim_deliveries(text, int, interval),
    barnum.claim_deliveries_text(text, int, interval),
    barnum.claim_deliveries_v2(text, int, interval),
    barnum.schema_compat(),
    barnum.record_attempts(jsonb),
    barnum.release_deliveries(text),
    barnum.next_due_at(),
    barnum.relay_idle(text, interval),
    barnum.tick(int),
    barnum.retry_dead_letters(uuid),
    barnum.queue_stats(),
    barnum.ensure_endpoint(text, text)
TO barnum_relay;

-- barnum_shim: patients' links and n8n's callbacks.
GRANT EXECUTE ON FUNCTION
    barnum.peek_action(text),
    barnum.perform_action(text, text),
    barnum.handle_callback(text, jsonb, text),
    barnum.validate_action_token(text),
    barnum.shim_config(),
    barnum.migrations_current(text[]),
    barnum.schema_compat(),
    barnum.queue_stats(),
    barnum.api_register_webhook(text, jsonb),
    barnum.api_list_webhooks(text),
    barnum.api_get_webhook(text, text),
    barnum.api_update_webhook(text, text, jsonb),
    barnum.api_delete_webhook(text, text),
    barnum.api_webhook_events(text, text, text, int),
    barnum.api_retry_event(text, text),
    barnum.api_replay_webhook(text, text, jsonb),
    barnum.ingest_whatsapp(jsonb)
TO barnum_shim;

-- barnum_shim: the realtime endpoint (Socket.IO, 89_realtime).
GRANT EXECUTE ON FUNCTION
    barnum.realtime_auth(text),
    barnum.realtime_can_join(text, text),
    barnum.realtime_event(text),
    barnum.realtime_events(text[]),
    barnum.notify_typing(uuid, boolean),
    barnum.realtime_listening(text, interval),
    barnum.realtime_quiet(text)
TO barnum_shim;

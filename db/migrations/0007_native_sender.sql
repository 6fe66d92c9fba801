-- 0007: the native WhatsApp sender (SPEC-2 §E).  An endpoint of kind
-- whatsapp_cloud is the Graph API's /{phone_number_id}/messages URL: the
-- relay sends it WhatsApp messages rendered in SQL (no n8n), authenticated
-- with an access token that stays outside the database — `secret` names
-- the environment variable that holds it.
ALTER TABLE barnum.webhook_endpoints
    ADD COLUMN kind text NOT NULL DEFAULT 'webhook' CHECK (kind IN ('webhook', 'whatsapp_cloud')),
    -- whatsapp_cloud: {"phone_number_id": …, "templates": {event type: {name, language}}}
    ADD COLUMN config jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object');

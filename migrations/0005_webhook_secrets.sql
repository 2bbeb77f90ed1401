-- Per-tenant webhook signing secrets (Standard Webhooks). A rotation gives the previous secrets
-- an expiry instead of deleting them, so both sign during the overlap.
CREATE TABLE webhook_secrets (
    id             bigserial PRIMARY KEY,
    virtual_key_id text NOT NULL,
    secret         text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz
);

CREATE INDEX webhook_secrets_virtual_key ON webhook_secrets (virtual_key_id, created_at DESC);

-- Whose secret signs a delivery: the tenant of the event it carries.
ALTER TABLE webhook_deliveries ADD COLUMN virtual_key_id text;

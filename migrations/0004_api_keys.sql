-- Per-tenant API keys for the HTTP API. Only a SHA-256 of the secret is kept: the key is shown
-- once, at creation. A fast hash is enough because the secret is 256 random bits, not a password.
CREATE TABLE api_keys (
    id             text PRIMARY KEY,
    virtual_key_id text NOT NULL,
    name           text NOT NULL DEFAULT '',
    admin          boolean NOT NULL DEFAULT false,
    secret_sha256  bytea NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_used_at   timestamptz,
    revoked_at     timestamptz
);

CREATE INDEX api_keys_virtual_key ON api_keys (virtual_key_id);

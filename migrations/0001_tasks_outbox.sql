-- Tasks, the transactional outbox, partition leases, parked messages and webhook deliveries.

CREATE TABLE video_tasks (
    request_id            TEXT PRIMARY KEY,
    virtual_key_id        TEXT NOT NULL,
    model                 TEXT NOT NULL DEFAULT '',
    prompt                TEXT NOT NULL DEFAULT '',
    duration_seconds      INTEGER,
    size                  TEXT,
    provider              TEXT NOT NULL DEFAULT '',
    provider_task_id      TEXT,
    callback_url          TEXT,
    metadata              JSONB,
    status                TEXT NOT NULL CHECK (status IN
                            ('pending', 'processing', 'completed', 'failed', 'cancelled', 'timed_out')),
    progress              SMALLINT NOT NULL DEFAULT 0,
    progress_status       TEXT,
    message               TEXT,
    video_url             TEXT,
    video_url_expires_at  TIMESTAMPTZ,
    video_seconds         DOUBLE PRECISION,
    error                 TEXT,
    retryable             BOOLEAN,
    traceparent           TEXT,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at            TIMESTAMPTZ,
    finished_at           TIMESTAMPTZ,
    -- Tracking columns, owned by the progress tracker.
    check_sequence        BIGINT NOT NULL DEFAULT 0,
    checks_count          BIGINT NOT NULL DEFAULT 0,
    next_check_at         TIMESTAMPTZ,
    last_check_at         TIMESTAMPTZ,
    tracking_stopped      BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE INDEX video_tasks_overdue ON video_tasks (next_check_at)
    WHERE status = 'processing' AND NOT tracking_stopped;
CREATE INDEX video_tasks_pending ON video_tasks (created_at) WHERE status = 'pending';
CREATE INDEX video_tasks_completed_by_model ON video_tasks (model, finished_at DESC)
    WHERE status = 'completed';

CREATE TABLE outbox (
    id              BIGSERIAL PRIMARY KEY,
    message_id      TEXT NOT NULL,
    exchange        TEXT NOT NULL,
    routing_key     TEXT NOT NULL,
    message_type    TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    virtual_key     TEXT NOT NULL,
    traceparent     TEXT,
    mandatory       BOOLEAN NOT NULL DEFAULT FALSE,
    body            BYTEA NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE partition_leases (
    topology_prefix TEXT NOT NULL,
    partition       INTEGER NOT NULL,
    owner           TEXT,
    expires_at      TIMESTAMPTZ NOT NULL DEFAULT 'epoch',
    PRIMARY KEY (topology_prefix, partition)
);

CREATE TABLE service_instances (
    topology_prefix TEXT NOT NULL,
    instance_id     TEXT NOT NULL,
    heartbeat_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (topology_prefix, instance_id)
);

CREATE TABLE parked_messages (
    id                BIGSERIAL PRIMARY KEY,
    message_id        TEXT,
    original_queue    TEXT NOT NULL,
    original_exchange TEXT NOT NULL DEFAULT '',
    routing_key       TEXT NOT NULL DEFAULT '',
    reason            TEXT NOT NULL,
    headers           JSONB NOT NULL DEFAULT '{}',
    body              BYTEA NOT NULL,
    parked_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    requeued_at       TIMESTAMPTZ
);

CREATE TABLE webhook_deliveries (
    id               BIGSERIAL PRIMARY KEY,
    request_id       TEXT NOT NULL,
    message_id       TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    url              TEXT NOT NULL,
    body             BYTEA NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    give_up_at       TIMESTAMPTZ NOT NULL,
    delivered_at     TIMESTAMPTZ,
    last_error       TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE delivered_at IS NULL;

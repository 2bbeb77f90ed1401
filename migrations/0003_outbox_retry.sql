-- A row the broker will not take must not hold up the rows behind it. A failed row waits
-- (next_attempt_at, with backoff) while other tasks' rows go on; the rows of its own task wait
-- behind it, so per-task order holds. A row that can never be published is moved to
-- parked_messages with the reason.
ALTER TABLE outbox
    ADD COLUMN attempts        INTEGER     NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN last_error      TEXT;
CREATE INDEX outbox_by_task ON outbox (correlation_id, id);

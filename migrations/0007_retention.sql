-- Indexes the retention cleanup walks, oldest first, a batch at a time.
CREATE INDEX video_tasks_finished ON video_tasks (finished_at)
    WHERE status NOT IN ('pending', 'processing');
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at);
CREATE INDEX parked_messages_parked_at ON parked_messages (parked_at);

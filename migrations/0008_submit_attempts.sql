-- Exactly-once submission: the intent is recorded before each POST to the provider, and the
-- provider's job id the moment it is known, so a crash or an unanswered request in between is
-- recognised (an attempt without a job) instead of submitting the job a second time.
ALTER TABLE video_tasks ADD COLUMN submit_attempt_id text;
ALTER TABLE video_tasks ADD COLUMN submit_attempted_at timestamptz;

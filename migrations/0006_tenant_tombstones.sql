-- A cancel for a request id nobody has used yet leaves a tombstone that refuses that tenant's
-- later request. Marked explicitly, so another tenant's request for the same id can take the
-- row over instead of being blocked by a stranger's cancel.
ALTER TABLE video_tasks ADD COLUMN tombstone boolean NOT NULL DEFAULT false;

UPDATE video_tasks SET tombstone = true
WHERE status = 'cancelled' AND started_at IS NULL AND model = '' AND prompt = '' AND provider = '';

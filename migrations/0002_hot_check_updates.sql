-- Every progress check advances its task row (check_sequence, next_check_at, progress, ...).
-- With next_check_at indexed (the sweeper's index), each of those updates wrote a new entry into
-- every index of the table and left dead index entries behind. Without an index on any column a
-- check writes, PostgreSQL can do it as a HOT update: the new row version goes on the same page,
-- no index is touched. The sweeper finds tracked tasks through an index on started_at instead,
-- which a check never changes, and filters on next_check_at in the heap (one pass over the
-- processing rows per sweep). Free space on each page (fillfactor) keeps HOT updates possible.
DROP INDEX IF EXISTS video_tasks_overdue;
CREATE INDEX video_tasks_tracked ON video_tasks (started_at)
    WHERE status = 'processing' AND NOT tracking_stopped;
ALTER TABLE video_tasks SET (fillfactor = 80);

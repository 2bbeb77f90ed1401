-- The input image of an image-to-video request (`imageUrl`: an https URL or a data URI), kept so
-- that a re-driven request submits the same job.
ALTER TABLE video_tasks ADD COLUMN image_url text;

-- Set while a running sandbox is paused: its processes are stopped and its
-- deadline is on hold (the paused time is added to it on resume).
ALTER TABLE sandboxes ADD COLUMN paused_at TEXT;

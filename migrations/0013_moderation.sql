-- Moderation: why a message was retracted by the review hook (docs/PROTOCOL.md,
-- "Moderation"). A retraction is the same tombstone as a delete (content
-- null, deleted_at set, version + 1), made by the system rather than the
-- sender; this column says why, for operators:
--   select id, deleted_at, deleted_reason from messages where deleted_reason is not null;
-- Null for messages their sender deleted, and for every message not deleted.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS deleted_reason text;

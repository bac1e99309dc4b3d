-- Real-time features: delivery receipts next to read markers, and versioned
-- edits/deletes with tombstones.

ALTER TABLE conversation_members
    ADD COLUMN last_delivered_seq bigint NOT NULL DEFAULT 0 CHECK (last_delivered_seq >= 0);

ALTER TABLE messages
    ADD COLUMN version    integer NOT NULL DEFAULT 1 CHECK (version >= 1),
    ADD COLUMN edited_at  timestamptz,
    ADD COLUMN deleted_at timestamptz;

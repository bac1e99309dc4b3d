-- Conversations (rooms), their members, and the durable message log.
-- Seq is assigned by the worker from conversations.last_seq under a row lock,
-- which is what keeps it gap-free per conversation with any number of workers.

CREATE TABLE conversations (
    id              uuid PRIMARY KEY,
    title           text CHECK (title IS NULL OR length(title) <= 200),
    created_by      uuid NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_message_at timestamptz,
    last_seq        bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0)
);

CREATE TABLE conversation_members (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL,
    joined_at       timestamptz NOT NULL DEFAULT now(),
    last_read_seq   bigint NOT NULL DEFAULT 0 CHECK (last_read_seq >= 0),
    PRIMARY KEY (conversation_id, user_id)
);

-- "My conversations" is looked up by user.
CREATE INDEX conversation_members_user_idx ON conversation_members (user_id);

CREATE TABLE messages (
    id                uuid PRIMARY KEY,  -- UUIDv7 minted by the gateway
    conversation_id   uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq               bigint NOT NULL CHECK (seq > 0),
    sender_id         uuid NOT NULL,
    client_message_id text NOT NULL CHECK (length(client_message_id) BETWEEN 1 AND 64),
    kind              text NOT NULL CHECK (kind IN ('text', 'image', 'file', 'system')),
    content           jsonb NOT NULL,
    created_at        timestamptz NOT NULL,  -- when the gateway accepted it
    persisted_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT messages_conversation_seq_key UNIQUE (conversation_id, seq),
    CONSTRAINT messages_client_dedup_key UNIQUE (conversation_id, sender_id, client_message_id)
);

-- Room presence: who is in a conversation right now (joined on some device,
-- on some gateway). One row per (conversation, user, gateway) with at least
-- one joined connection there. UNLOGGED like presence_sessions: it describes
-- live connections, which a crash ends anyway.
CREATE UNLOGGED TABLE room_presence (
    conversation_id uuid NOT NULL,
    user_id         uuid NOT NULL,
    gateway_id      uuid NOT NULL,
    entered_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, user_id, gateway_id)
);
CREATE INDEX room_presence_gateway_idx ON room_presence (gateway_id);

-- Several gateways on one Postgres.

-- Who is connected where. UNLOGGED: it is rebuilt from live connections, and
-- a crash that loses it only makes users reconnect-visible again.
CREATE UNLOGGED TABLE presence_sessions (
    user_id      uuid NOT NULL,
    gateway_id   uuid NOT NULL,
    connections  integer NOT NULL CHECK (connections >= 0),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, gateway_id)
);
CREATE INDEX presence_sessions_gateway_idx ON presence_sessions (gateway_id);
CREATE INDEX presence_sessions_heartbeat_idx ON presence_sessions (heartbeat_at);

-- Relay events too big for a NOTIFY payload (8000 bytes) travel by
-- reference: the row id is notified and receivers fetch it. Short-lived.
CREATE UNLOGGED TABLE relay_payloads (
    id         bigserial PRIMARY KEY,
    payload    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX relay_payloads_created_at_idx ON relay_payloads (created_at);

-- Which gateways are alive, for the dashboard and the "gateway missing"
-- alert on any process: one row per running gateway, refreshed by its
-- heartbeat and deleted when it shuts down cleanly. A row whose heartbeat
-- stopped (more than three intervals old) is a gateway that died without
-- saying so. presence_sessions cannot tell: a gateway with no users has no
-- rows there. UNLOGGED: rewritten by the next heartbeat after a crash.
CREATE UNLOGGED TABLE gateways (
    id                    uuid PRIMARY KEY,
    started_at            timestamptz NOT NULL DEFAULT now(),
    last_seen             timestamptz NOT NULL DEFAULT now(),
    -- Each gateway's own interval, so any process can judge its silence.
    heartbeat_interval_ms integer NOT NULL CHECK (heartbeat_interval_ms > 0)
);

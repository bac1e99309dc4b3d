-- Outgoing webhooks: one row per (event, endpoint). The row is the delivery's
-- state, readable with plain SQL (sql/webhooks.sql); the background job that
-- drives it carries only its id, so retries, backoff and dead letters are
-- the queue's, as for every other background job.
--
-- Order: within one (endpoint, conversation), ids are assigned in commit
-- order (producers take a per-conversation advisory lock before inserting,
-- held until commit), and a delivery is attempted only when no earlier
-- delivery of its (endpoint, conversation) is still pending.
CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    event_id        uuid NOT NULL,
    event_type      text NOT NULL,
    endpoint        text NOT NULL,
    conversation_id uuid NOT NULL,
    body            jsonb NOT NULL,
    -- pending: waiting or being retried; delivered: a 2xx was received;
    -- dead: attempts exhausted, its job is in dead_letters (a replay makes
    -- it pending again).
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    next_attempt_at timestamptz,
    delivered_at    timestamptz,
    UNIQUE (event_id, endpoint)
);
-- "Is an earlier delivery of this conversation still pending?"
CREATE INDEX webhook_deliveries_pending_idx
    ON webhook_deliveries (endpoint, conversation_id, id) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_created_at_idx ON webhook_deliveries (created_at);

-- The service API's idempotency: the first result of each (credential,
-- Idempotency-Key), returned again for a repeat. Kept a day.
CREATE TABLE service_requests (
    credential      text NOT NULL,
    idempotency_key text NOT NULL CHECK (octet_length(idempotency_key) BETWEEN 1 AND 200),
    method          text NOT NULL,
    path            text NOT NULL,
    status          smallint NOT NULL,
    response        jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (credential, idempotency_key)
);
CREATE INDEX service_requests_created_at_idx ON service_requests (created_at);

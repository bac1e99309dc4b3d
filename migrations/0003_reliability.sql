-- Queue reliability: a low-priority queue for background jobs, per-job
-- failure history (for backoff and for the dead-letter record), and the
-- dead-letter table itself. pgmq gives none of these; they are built on its
-- read_ct and set_vt.

-- Receipts, read markers, analytics: drained after chat messages.
SELECT pgmq.create('postline_background');

-- One row per job that has failed at least once and is still being retried.
CREATE TABLE job_failures (
    queue           text NOT NULL,
    msg_id          bigint NOT NULL,
    failures        integer NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    last_error      text NOT NULL,
    PRIMARY KEY (queue, msg_id)
);

-- Jobs that will not succeed by retrying: inspect, fix, replay or purge them
-- with `postline dlq`. The job is archived in pgmq in the same transaction.
CREATE TABLE dead_letters (
    id              bigserial PRIMARY KEY,
    queue           text NOT NULL,
    msg_id          bigint NOT NULL,
    payload         jsonb NOT NULL,
    error           text NOT NULL,
    attempts        integer NOT NULL,
    enqueued_at     timestamptz NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL,
    dead_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (queue, msg_id)
);
CREATE INDEX dead_letters_dead_at_idx ON dead_letters (dead_at);

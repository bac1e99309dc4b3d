-- A delivery that must wait for an earlier one of its (endpoint,
-- conversation) is parked: its job hidden for long, and woken by the
-- transaction that finishes the delivery before it. Before this, each
-- waiting job was read again every few seconds: with an endpoint down and
-- chat flowing, a read per waiting job, growing with the backlog, on the
-- same Postgres that chat commits to.
--
-- job_id: the queue job that drives the delivery (set at enqueue and at
-- each park, since a dead-letter replay gives it a new job), so a wake can
-- make exactly that job visible.
ALTER TABLE webhook_deliveries
    ADD COLUMN job_id bigint,
    ADD COLUMN parked boolean NOT NULL DEFAULT false;

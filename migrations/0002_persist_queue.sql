-- The durable persist queue. pgmq itself is installed from its SQL by
-- `postline migrate` before this runs (no CREATE EXTENSION: works on any
-- hosted Postgres). pgmq.create is idempotent.
SELECT pgmq.create('postline_persist');

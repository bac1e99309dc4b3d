-- Queueing webhook deliveries in one call. The worker's persist batch used
-- to make five round trips for it (lock the lanes, ask which are busy,
-- insert the rows, send the jobs, remember them on the rows): with a
-- receiver down and chat flowing, S1's latency was 1.4x the run without
-- webhooks on a 2-core machine. One call does the same work in Postgres.
--
-- Semantics unchanged (see src/queue/webhooks.rs): the lane locks, held
-- to commit, make ids follow commit order within an (endpoint,
-- conversation) and make parking and waking exclusive; only the first
-- pending delivery of a lane gets a job, later ones are inserted parked.

-- Give each delivery in `delivery_ids` a background job, remembered on
-- its row so a wake can make exactly that job visible.
CREATE OR REPLACE FUNCTION postline.webhook_give_jobs(delivery_ids bigint[])
RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    heads bigint[] := ARRAY(SELECT unnest(delivery_ids) ORDER BY 1);
    jobs  bigint[];
BEGIN
    IF cardinality(heads) = 0 THEN
        RETURN;
    END IF;
    -- Job ids are drawn in payload order, so sorted they pair with `heads`.
    SELECT array_agg(j ORDER BY j) INTO jobs
    FROM pgmq.send_batch('postline_background', ARRAY(
        SELECT jsonb_build_object('kind', 'webhook', 'v', 1, 'delivery_id', h)
        FROM unnest(heads) AS h ORDER BY h)) AS j;
    UPDATE webhook_deliveries d SET job_id = u.j
    FROM unnest(heads, jobs) AS u(d, j)
    WHERE d.id = u.d;
END
$fn$;

-- Queue the events (in array order; the four event arrays are parallel)
-- for every endpoint, in the caller's transaction.
CREATE OR REPLACE FUNCTION postline.webhook_enqueue(
    endpoints        text[],
    event_ids        uuid[],
    event_types      text[],
    conversation_ids uuid[],
    bodies           jsonb[])
RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    heads bigint[];
BEGIN
    IF coalesce(cardinality(endpoints), 0) = 0 OR coalesce(cardinality(event_ids), 0) = 0 THEN
        RETURN;
    END IF;
    -- Sorted, as every taker of several lane locks sorts them, so two
    -- transactions never wait for each other's lanes in a cycle.
    PERFORM pg_advisory_xact_lock(hashtextextended(
                'postline.webhook-lane:' || ep || ' ' || c::text, 0))
    FROM (SELECT DISTINCT ep, c
          FROM unnest(endpoints) AS ep, unnest(conversation_ids) AS c
          ORDER BY ep, c) AS lanes;
    -- A delivery is parked when its lane already has one pending or an
    -- earlier event of this call. The probe is a LATERAL ... LIMIT 1 so it
    -- stays one index probe per row, however long the backlog: written as
    -- EXISTS, Postgres may pick a hashed subplan that reads every pending
    -- delivery of every lane on each call (9 ms a call in S1 with a
    -- receiver down).
    WITH rows AS (
        SELECT e.n, x.m, e.event_id, e.event_type, x.ep, e.c, e.body,
               row_number() OVER (PARTITION BY x.ep, e.c ORDER BY e.n) > 1
               OR p.id IS NOT NULL AS parked
        FROM unnest(event_ids, event_types, conversation_ids, bodies)
                 WITH ORDINALITY AS e(event_id, event_type, c, body, n)
        CROSS JOIN unnest(endpoints) WITH ORDINALITY AS x(ep, m)
        LEFT JOIN LATERAL (SELECT d.id FROM webhook_deliveries d
                           WHERE d.endpoint = x.ep AND d.conversation_id = e.c
                             AND d.state = 'pending'
                           LIMIT 1) AS p ON true
    ), inserted AS (
        INSERT INTO webhook_deliveries (event_id, event_type, endpoint, conversation_id, body, parked)
        SELECT event_id, event_type, ep, c, body, parked FROM rows ORDER BY n, m
        RETURNING id, parked
    )
    SELECT array_agg(id) FILTER (WHERE NOT parked) INTO heads FROM inserted;
    IF heads IS NOT NULL THEN
        PERFORM postline.webhook_give_jobs(heads);
    END IF;
END
$fn$;

-- How old is the oldest job in each queue (a growing age means the worker is behind or stuck)?
SELECT 'postline_persist' AS queue,
       now() - min(enqueued_at) AS oldest_job_age,
       now() - min(enqueued_at) FILTER (WHERE vt <= now()) AS oldest_ready_job_age
FROM pgmq.q_postline_persist
UNION ALL
SELECT 'postline_background',
       now() - min(enqueued_at),
       now() - min(enqueued_at) FILTER (WHERE vt <= now())
FROM pgmq.q_postline_background;

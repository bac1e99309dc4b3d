-- Which jobs are invisible right now (read by a worker, or waiting out a retry backoff), and until when?
SELECT 'postline_persist' AS queue, q.msg_id, q.read_ct, q.enqueued_at, q.vt AS visible_again_at,
       q.vt - now() AS hidden_for, f.failures, f.last_error
FROM pgmq.q_postline_persist q
LEFT JOIN job_failures f ON f.queue = 'postline_persist' AND f.msg_id = q.msg_id
WHERE q.vt > now()
UNION ALL
SELECT 'postline_background', q.msg_id, q.read_ct, q.enqueued_at, q.vt, q.vt - now(), f.failures, f.last_error
FROM pgmq.q_postline_background q
LEFT JOIN job_failures f ON f.queue = 'postline_background' AND f.msg_id = q.msg_id
WHERE q.vt > now()
ORDER BY enqueued_at
LIMIT 100;

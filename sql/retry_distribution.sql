-- How many times have waiting jobs been read (1 = first attempt; more = retried)?
SELECT queue, read_ct AS attempts, count(*) AS jobs
FROM (
    SELECT 'postline_persist' AS queue, read_ct FROM pgmq.q_postline_persist
    UNION ALL
    SELECT 'postline_background', read_ct FROM pgmq.q_postline_background
) q
GROUP BY queue, read_ct
ORDER BY queue, read_ct;

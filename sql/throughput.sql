-- How many messages were stored per minute over the last 15 minutes, and how long did they take from send to storage?
SELECT date_trunc('minute', persisted_at)                           AS minute,
       count(*)                                                     AS messages,
       round(count(*) / 60.0, 1)                                    AS per_second,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY persisted_at - created_at) AS median_send_to_stored,
       max(persisted_at - created_at)                               AS max_send_to_stored
FROM messages
WHERE persisted_at > now() - interval '15 minutes'
GROUP BY 1
ORDER BY 1;

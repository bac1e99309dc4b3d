-- Are the webhook endpoints keeping up? Per endpoint: deliveries waiting (and how many of them have
-- failed at least once), delivered, dead (in dead_letters: `postline dlq list`), the oldest waiting,
-- the last success and the newest error. One delivery's story: select * from webhook_deliveries
-- where event_id = '...';
SELECT endpoint,
       count(*) FILTER (WHERE state = 'pending')                  AS pending,
       count(*) FILTER (WHERE state = 'pending' AND attempts > 0) AS failing,
       count(*) FILTER (WHERE state = 'delivered')                AS delivered,
       count(*) FILTER (WHERE state = 'dead')                     AS dead,
       min(created_at) FILTER (WHERE state = 'pending')           AS oldest_pending_at,
       max(delivered_at)                                          AS last_delivered_at,
       (array_agg(left(last_error, 120) ORDER BY last_attempt_at DESC)
            FILTER (WHERE state <> 'delivered' AND last_error IS NOT NULL))[1] AS last_error
FROM webhook_deliveries
GROUP BY endpoint
ORDER BY endpoint;

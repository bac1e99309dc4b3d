-- How many jobs wait in each queue, how many are ready now, how many are being worked on?
SELECT queue_name,
       queue_length                          AS total,
       queue_visible_length                  AS ready,
       queue_length - queue_visible_length   AS in_flight_or_delayed,
       total_messages                        AS ever_enqueued
FROM pgmq.metrics_all()
WHERE queue_name LIKE 'postline\_%'
ORDER BY queue_name;

-- Why do jobs end up dead, how many, and since when? (Inspect one with `postline dlq show <id>`.)
SELECT queue,
       left(error, 80)      AS error,
       count(*)             AS jobs,
       min(dead_at)         AS first_dead_at,
       max(dead_at)         AS last_dead_at,
       max(id)              AS newest_id
FROM dead_letters
GROUP BY queue, left(error, 80)
ORDER BY jobs DESC;

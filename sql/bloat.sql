-- Is autovacuum keeping up with the queue tables (every read updates a job row)?
SELECT schemaname || '.' || relname AS table_name,
       n_live_tup                   AS live_rows,
       n_dead_tup                   AS dead_rows,
       round(100.0 * n_dead_tup / greatest(n_live_tup + n_dead_tup, 1), 1) AS dead_pct,
       pg_size_pretty(pg_total_relation_size(relid)) AS total_size,
       last_autovacuum
FROM pg_stat_user_tables
WHERE schemaname = 'pgmq' OR relname IN ('messages', 'dead_letters', 'job_failures')
ORDER BY n_dead_tup DESC;

-- Which key is stored message content under, and how much of it? `(plain)`: stored before a key was
-- configured (or with none); `(deleted)`: tombstones, which hold no content. After `postline keys
-- rotate` finishes, only the active key and `(deleted)` remain, and older keys can be dropped.
SELECT CASE WHEN key_id IS NOT NULL THEN key_id
            WHEN deleted_at IS NOT NULL THEN '(deleted)'
            ELSE '(plain)' END         AS key_id,
       count(*)                        AS messages,
       min(created_at)                 AS oldest,
       max(created_at)                 AS newest
FROM messages
GROUP BY 1
ORDER BY 1;

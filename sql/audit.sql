-- The audit log's usual questions (table audit_log, migrations/0014_audit.sql), one query each.
-- Run all with psql; narrow them with variables, any of them, e.g.:
--   psql "$DATABASE_URL" -f sql/audit.sql -v user=<uuid> -v conversation=<uuid>
--   psql "$DATABASE_URL" -f sql/audit.sql -v message=<uuid> -v actor=shop -v since='7 days'
-- user: the member added or removed; conversation; message; actor: a user id, a service key's name
-- or an OS user; since: how far back "recent" goes (default 1 day). Unset: no filter.
\if :{?user}
\else
\set user ''
\endif
\if :{?conversation}
\else
\set conversation ''
\endif
\if :{?message}
\else
\set message ''
\endif
\if :{?actor}
\else
\set actor ''
\endif
\if :{?since}
\else
\set since '1 day'
\endif

\echo 'Who added or removed a member (user), in which conversation, and when? (newest first)'
SELECT at, action, conversation_id, user_id AS member,
       actor_kind, actor_id, ip, gateway_id
FROM audit_log
WHERE action IN ('member.add', 'member.remove', 'conversation.create')
  AND (:'conversation' = '' OR conversation_id = nullif(:'conversation', '')::uuid)
  AND (:'user' = ''
       OR user_id = nullif(:'user', '')::uuid
       -- a conversation's first members are listed in its creation's row
       OR (action = 'conversation.create' AND detail->'member_ids' ? :'user'))
ORDER BY at DESC, id DESC
LIMIT 50;

\echo 'Who deleted (or moderated) a message (message)? (newest first)'
SELECT at, action, message_id, conversation_id, user_id AS author,
       actor_kind, actor_id, ip, gateway_id
FROM audit_log
WHERE action IN ('message.delete', 'moderation.reject', 'moderation.mask', 'moderation.retract')
  AND (:'message' = '' OR message_id = nullif(:'message', '')::uuid)
ORDER BY at DESC, id DESC
LIMIT 50;

\echo 'Everything an actor (actor) did recently (since; newest first)'
SELECT at, actor_kind, actor_id, action, conversation_id, message_id, user_id, dead_letter_id,
       ip, gateway_id, left(detail::text, 120) AS detail
FROM audit_log
WHERE (:'actor' = '' OR actor_id = :'actor')
  AND at > now() - :'since'::interval
ORDER BY at DESC, id DESC
LIMIT 200;

\echo 'Dead-letter replays and purges: who, when, how many (newest first)'
SELECT at, action, actor_id AS operator, dead_letter_id,
       coalesce(detail->>'replayed', detail->>'purged') AS jobs,
       (detail->>'all')::boolean AS replay_all,
       detail->>'older_than_secs' AS purge_older_than_secs
FROM audit_log
WHERE action IN ('dlq.replay', 'dlq.purge')
ORDER BY at DESC, id DESC
LIMIT 50;

\echo 'Service-API calls per key, recently (since)'
SELECT actor_id AS service_key,
       count(*)                                                       AS calls,
       count(*) FILTER (WHERE (detail->>'status')::int BETWEEN 200 AND 299) AS ok,
       count(*) FILTER (WHERE (detail->>'status')::int >= 400)              AS refused_or_failed,
       count(*) FILTER (WHERE (detail->>'replayed')::boolean)               AS replays,
       count(DISTINCT ip)                                             AS addresses,
       max(at)                                                        AS last_call_at
FROM audit_log
WHERE action = 'service.call' AND at > now() - :'since'::interval
GROUP BY actor_id
ORDER BY calls DESC;

\echo 'Actions per day, last 30 days'
SELECT date_trunc('day', at) AS day, action, count(*) AS actions,
       count(DISTINCT actor_kind || ':' || actor_id) AS actors
FROM audit_log
WHERE at > now() - interval '30 days'
GROUP BY 1, 2
ORDER BY 1 DESC, 3 DESC;

-- Publish from SQL: an application posts into a conversation inside its own
-- transaction. Rolled back, nothing happened; committed, the message takes
-- the normal path: a job in the persist queue (the worker stores it with the
-- conversation's next seq and confirms it with message_persisted) and, at
-- commit, a relay notification that every gateway broadcasts as new_message.
-- Both are transactional: pgmq's queue is a table, NOTIFY is sent on commit.

CREATE SCHEMA IF NOT EXISTS postline;

-- What the gateways' validation depends on and SQL must agree with. Written
-- by `postline serve` at start (POSTLINE_MAX_CONTENT_BYTES); with several
-- gateways configured differently, the last one started wins.
CREATE TABLE postline.settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO postline.settings (key, value) VALUES ('max_content_bytes', '4096');

-- A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits, so
-- ids minted here sort with the gateways' by time.
CREATE FUNCTION postline.uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    placing substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- Post a message as `sender_id`. Returns the message id. Raises, with the
-- gateway's error code first in the message, when the gateway would refuse
-- the same message:
--   invalid (22023)   kind, content or client_message_id malformed
--   too_large (54000) content over max_content_bytes
--   not_found (P0002) no such conversation
--   forbidden (42501) the sender is not a member (any sender may post `system`)
-- A client_message_id already used by this sender in this conversation
-- (stored, or still in the queue) returns the first message's id and
-- publishes nothing again. Without one, a fresh one is made.
CREATE FUNCTION postline.publish(
    conversation_id   uuid,
    sender_id         uuid,
    kind              text,
    content           jsonb,
    client_message_id text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_conv    uuid := publish.conversation_id;
    v_sender  uuid := publish.sender_id;
    v_kind    text := publish.kind;
    v_content jsonb := publish.content;
    v_cmid    text := coalesce(publish.client_message_id, 'sql-' || gen_random_uuid()::text);
    v_max     integer;
    v_size    integer;
    v_id      uuid;
    v_message text;
    v_frame   text;
    v_event   text;
    v_batch   text;
    v_ref     bigint;
BEGIN
    IF v_conv IS NULL OR v_sender IS NULL OR v_kind IS NULL OR v_content IS NULL THEN
        RAISE EXCEPTION 'invalid: conversation_id, sender_id, kind and content are required'
            USING ERRCODE = '22023';
    END IF;
    IF v_kind NOT IN ('text', 'image', 'file', 'system') THEN
        RAISE EXCEPTION 'invalid: kind must be text, image, file or system, not %', v_kind
            USING ERRCODE = '22023';
    END IF;
    IF octet_length(v_cmid) NOT BETWEEN 1 AND 64 OR v_cmid ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid: client_message_id must be 1 to 64 bytes without control characters'
            USING ERRCODE = '22023';
    END IF;

    SELECT s.value::integer INTO v_max FROM postline.settings s WHERE s.key = 'max_content_bytes';
    v_max := coalesce(v_max, 4096);
    IF v_kind IN ('text', 'system') THEN
        IF jsonb_typeof(v_content) <> 'string' THEN
            RAISE EXCEPTION 'invalid: content of a % message must be a string', v_kind
                USING ERRCODE = '22023';
        END IF;
        IF (v_content #>> '{}') ~ '^[[:space:]]*$' THEN
            RAISE EXCEPTION 'invalid: content must not be empty' USING ERRCODE = '22023';
        END IF;
        v_size := octet_length(v_content #>> '{}');
    ELSE
        IF jsonb_typeof(v_content) <> 'object'
           OR jsonb_typeof(v_content -> 'url') IS DISTINCT FROM 'string'
           OR (v_content ->> 'url') ~ '^[[:space:]]*$'
           OR EXISTS (SELECT 1 FROM jsonb_object_keys(v_content) k WHERE k NOT IN ('url', 'name', 'size', 'mime'))
           OR (v_content ? 'name' AND jsonb_typeof(v_content -> 'name') <> 'string')
           OR (v_content ? 'mime' AND jsonb_typeof(v_content -> 'mime') <> 'string')
           OR (v_content ? 'size' AND (jsonb_typeof(v_content -> 'size') <> 'number'
                                       OR (v_content ->> 'size')::numeric < 0
                                       OR (v_content ->> 'size')::numeric <> trunc((v_content ->> 'size')::numeric)))
        THEN
            RAISE EXCEPTION 'invalid: content of an % message must be an object {url, name?, size?, mime?} with a non-empty url', v_kind
                USING ERRCODE = '22023';
        END IF;
        -- As the gateway counts it, compactly encoded: Postgres prints one
        -- space after each colon and comma of this flat object.
        v_size := octet_length(v_content::text)
                  - (2 * (SELECT count(*) FROM jsonb_object_keys(v_content)) - 1);
    END IF;
    IF v_size > v_max THEN
        RAISE EXCEPTION 'too_large: content is % bytes, the limit is %', v_size, v_max
            USING ERRCODE = '54000';
    END IF;

    PERFORM 1 FROM conversations c WHERE c.id = v_conv;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'not_found: no conversation %', v_conv USING ERRCODE = 'P0002';
    END IF;
    IF v_kind <> 'system' AND NOT EXISTS (
        SELECT 1 FROM conversation_members m
        WHERE m.conversation_id = v_conv AND m.user_id = v_sender
    ) THEN
        RAISE EXCEPTION 'forbidden: % is not a member of conversation %', v_sender, v_conv
            USING ERRCODE = '42501';
    END IF;

    -- The same key as the gateway's dedup and the table's unique constraint.
    -- The lock orders two transactions publishing the same key; the second
    -- then sees the first's job (or row) and returns its id.
    PERFORM pg_advisory_xact_lock(hashtextextended(v_conv::text || '/' || v_sender::text || '/' || v_cmid, 7));
    SELECT m.id INTO v_id FROM messages m
    WHERE m.conversation_id = v_conv AND m.sender_id = v_sender AND m.client_message_id = v_cmid;
    IF FOUND THEN
        RETURN v_id;
    END IF;
    SELECT (q.message ->> 'id')::uuid INTO v_id FROM pgmq.q_postline_persist q
    WHERE q.message ->> 'conversation_id' = v_conv::text
      AND q.message ->> 'sender_id' = v_sender::text
      AND q.message ->> 'client_message_id' = v_cmid
    LIMIT 1;
    IF FOUND THEN
        RETURN v_id;
    END IF;

    v_id := postline.uuid_v7();
    -- The message as a gateway encodes it (`new_message`), and as a persist
    -- job (version 1, the same fields). Built as text so `type` comes first,
    -- as in every server frame.
    v_message := '{"id":' || to_json(v_id)::text
        || ',"conversation_id":' || to_json(v_conv)::text
        || ',"sender_id":' || to_json(v_sender)::text
        || ',"client_message_id":' || to_json(v_cmid)::text
        || ',"kind":' || to_json(v_kind)::text
        || ',"content":' || v_content::text
        || ',"created_at":' || to_json(clock_timestamp())::text || '}';
    PERFORM pgmq.send('postline_persist', ('{"v":1,' || substr(v_message, 2))::jsonb);

    -- Relayed to every gateway at commit, from no gateway (the nil id).
    v_frame := '{"type":"new_message","message":' || v_message || '}';
    v_event := '{"t":"msg","c":"' || v_conv || '","m":"' || v_id || '","f":' || v_frame || '}';
    v_batch := '{"g":"00000000-0000-0000-0000-000000000000","e":[' || v_event || ']}';
    IF octet_length(v_batch) < 7800 THEN
        PERFORM pg_notify('postline_events', v_batch);
    ELSE
        -- Too big for a NOTIFY payload: by reference, as gateways do.
        INSERT INTO relay_payloads (payload) VALUES (v_batch) RETURNING id INTO v_ref;
        PERFORM pg_notify('postline_events',
            '{"g":"00000000-0000-0000-0000-000000000000","r":' || v_ref || '}');
    END IF;
    RETURN v_id;
END
$$;

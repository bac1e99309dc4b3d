-- The audit log: one row per action an operator may have to answer for —
-- who did what, when, and from where. Rows arrive through the low-priority
-- queue: the action's transaction writes an `audit` job, the worker inserts
-- the row (src/queue/audit.rs), so a row exists exactly when its action
-- committed. Questions it answers: sql/audit.sql.
--
-- Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE. The one way
-- rows leave is the retention, postline.audit_prune(keep), which the worker
-- calls (POSTLINE_AUDIT_RETENTION_HOURS). The trigger stops the
-- application's code and a mistyped `delete` in psql; a role that owns the
-- table can still drop the trigger. To stop that too, run the server as a
-- role that does not own the table and grant it only what it needs:
--   GRANT SELECT, INSERT ON audit_log TO app;
--   GRANT USAGE ON SEQUENCE audit_log_id_seq TO app;
--   GRANT EXECUTE ON FUNCTION postline.audit_prune(interval) TO app;
-- (audit_prune runs with its owner's rights, so pruning still works.)
CREATE TABLE audit_log (
    id              bigserial PRIMARY KEY,
    -- Minted where the action was recorded: a job applied twice is one row.
    event_id        uuid NOT NULL UNIQUE,
    -- When the action happened (its transaction's now()), not when the
    -- worker wrote the row (recorded_at).
    at              timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- user: a user id; service: a service key's name; operator: the OS user
    -- who ran `postline ...`; system: a component of Postline.
    actor_kind      text NOT NULL CHECK (actor_kind IN ('user', 'service', 'operator', 'system')),
    actor_id        text NOT NULL,
    action          text NOT NULL CONSTRAINT audit_log_action_check CHECK (action IN (
                        'conversation.create', 'member.add', 'member.remove',
                        'message.delete',
                        'moderation.reject', 'moderation.mask', 'moderation.retract',
                        'keys.rotate',
                        'dlq.replay', 'dlq.purge',
                        'service.call')),
    -- Targets, where they apply. user_id is the user acted upon (the member
    -- added or removed, the author of a deleted message), not the actor.
    conversation_id uuid,
    message_id      uuid,
    user_id         uuid,
    dead_letter_id  bigint,
    detail          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(detail) = 'object'),
    -- The TCP peer of the request or WebSocket; the gateway that served it.
    -- Both null for the command line.
    ip              inet,
    gateway_id      uuid
);
CREATE INDEX audit_log_at_idx ON audit_log (at);
CREATE INDEX audit_log_actor_idx ON audit_log (actor_kind, actor_id, at);
CREATE INDEX audit_log_conversation_idx ON audit_log (conversation_id, at)
    WHERE conversation_id IS NOT NULL;
CREATE INDEX audit_log_message_idx ON audit_log (message_id) WHERE message_id IS NOT NULL;
CREATE INDEX audit_log_user_idx ON audit_log (user_id, at) WHERE user_id IS NOT NULL;

-- Refuses every change but the retention's delete: audit_prune sets
-- postline.audit_prune_before (transaction-local) to its cutoff, and only
-- rows older than that cutoff may go.
CREATE FUNCTION postline.audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND OLD.at < coalesce(
           nullif(current_setting('postline.audit_prune_before', true), '')::timestamptz,
           '-infinity') THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'old rows are removed by postline.audit_prune(keep interval)';
END $$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION postline.audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION postline.audit_log_append_only();

-- Delete rows whose action is older than `keep` (at least an hour); returns
-- how many. SECURITY DEFINER so a server role without DELETE on the table
-- can still apply the retention; its search_path is fixed to the one the
-- migration ran with, where audit_log lives.
CREATE FUNCTION postline.audit_prune(keep interval) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    cutoff  timestamptz := now() - keep;
    deleted bigint;
BEGIN
    IF keep IS NULL OR keep < interval '1 hour' THEN
        RAISE EXCEPTION 'audit retention must be at least an hour, got %', keep
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM set_config('postline.audit_prune_before', cutoff::text, true);
    DELETE FROM audit_log WHERE at < cutoff;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    PERFORM set_config('postline.audit_prune_before', '', true);
    RETURN deleted;
END $$;
REVOKE EXECUTE ON FUNCTION postline.audit_prune(interval) FROM PUBLIC;

//! The audit log: who did what, when, and from where, for the actions an
//! operator may have to answer for (membership changes, deletions,
//! moderation, key rotations, dead-letter replays and purges, service-API
//! calls). One `audit_log` row per action (migrations/0014_audit.sql),
//! queried with `sql/audit.sql`.
//!
//! # Recording an action: one call
//!
//! Build an [`AuditEvent`] and pass it to [`record`] with the executor of
//! the transaction that performs the action:
//!
//! ```ignore
//! use postline::queue::audit::{self, Action, AuditEvent};
//!
//! // `by` is the Caller the handler was given: who, from which IP and gateway
//! // (`Origin::gateway(peer_ip, gateway_id).by(Actor::User(user))`).
//! audit::record(&mut *tx, &by.did(Action::ModerationMask).message(id).conversation(conv)
//!     .user(author).detail(serde_json::json!({"reason": reason}))).await?;
//! tx.commit().await?;
//! ```
//!
//! [`record`] writes a job to the low-priority queue in that transaction, so
//! the audit row exists exactly when the action committed: rolled back, no
//! row; committed, one row once the worker applies the job. The event id is
//! minted when the event is built; the worker inserts with `on conflict
//! (event_id) do nothing`, so a job read twice (a crash, a replay from the
//! dead-letter table) still leaves one row. `at`, when not given, is the
//! database's `now()` in the recording transaction: the action's own time,
//! on one clock for every gateway and operator machine, never the time the
//! worker got to it.
//!
//! A new kind of action is a variant of [`Action`] plus a migration that
//! replaces the `audit_log_action_check` constraint (a unit test keeps the
//! two lists equal).

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{QueueError, BACKGROUND_QUEUE};
use crate::domain::{ConversationId, MessageId, UserId};

/// Version of the `audit` background job.
pub const JOB_VERSION: u8 = 1;

/// What was done. Stored as its dotted name (`member.add`), checked by the
/// table's constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    /// A conversation created with its first members (`detail.member_ids`):
    /// one row for the creation, not one per member.
    #[serde(rename = "conversation.create")]
    ConversationCreate,
    /// `user_id` made a member of `conversation_id`.
    #[serde(rename = "member.add")]
    MemberAdd,
    /// `user_id` taken out of `conversation_id`.
    #[serde(rename = "member.remove")]
    MemberRemove,
    /// `message_id` (by `user_id`) deleted: a tombstone left in its place.
    #[serde(rename = "message.delete")]
    MessageDelete,
    /// A message refused by moderation.
    #[serde(rename = "moderation.reject")]
    ModerationReject,
    /// A message's content masked by moderation.
    #[serde(rename = "moderation.mask")]
    ModerationMask,
    /// A message withdrawn by moderation after it was delivered.
    #[serde(rename = "moderation.retract")]
    ModerationRetract,
    /// An encryption key rotated (which key, and to what: `detail`).
    #[serde(rename = "keys.rotate")]
    KeysRotate,
    /// Dead letters put back into their queue (`postline dlq replay`).
    #[serde(rename = "dlq.replay")]
    DlqReplay,
    /// Dead letters deleted (`postline dlq purge`).
    #[serde(rename = "dlq.purge")]
    DlqPurge,
    /// One request to `/v1/service/...` made with a valid service key,
    /// whatever its outcome (`detail`: method, path, status, idempotency
    /// key, whether it was a replay).
    #[serde(rename = "service.call")]
    ServiceCall,
}

impl Action {
    /// Every action, in the order of the migration's check constraint.
    pub const ALL: [Action; 11] = [
        Action::ConversationCreate,
        Action::MemberAdd,
        Action::MemberRemove,
        Action::MessageDelete,
        Action::ModerationReject,
        Action::ModerationMask,
        Action::ModerationRetract,
        Action::KeysRotate,
        Action::DlqReplay,
        Action::DlqPurge,
        Action::ServiceCall,
    ];

    /// The name stored in `audit_log.action`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::ConversationCreate => "conversation.create",
            Action::MemberAdd => "member.add",
            Action::MemberRemove => "member.remove",
            Action::MessageDelete => "message.delete",
            Action::ModerationReject => "moderation.reject",
            Action::ModerationMask => "moderation.mask",
            Action::ModerationRetract => "moderation.retract",
            Action::KeysRotate => "keys.rotate",
            Action::DlqReplay => "dlq.replay",
            Action::DlqPurge => "dlq.purge",
            Action::ServiceCall => "service.call",
        }
    }
}

/// Who acted: `audit_log.actor_kind` and `actor_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Actor {
    /// A user, by the `sub` of their token.
    User(UserId),
    /// An application's backend, by the name of its service key
    /// (`POSTLINE_SERVICE_KEYS`), never the secret.
    Service(String),
    /// Someone at the command line (`postline dlq ...`), by OS user name.
    Operator(String),
    /// Postline itself (an automatic moderation filter, a scheduled key
    /// rotation), by the component's name.
    System(String),
}

impl Actor {
    pub fn kind(&self) -> &'static str {
        match self {
            Actor::User(_) => "user",
            Actor::Service(_) => "service",
            Actor::Operator(_) => "operator",
            Actor::System(_) => "system",
        }
    }

    pub fn id(&self) -> String {
        match self {
            Actor::User(u) => u.to_string(),
            Actor::Service(s) | Actor::Operator(s) | Actor::System(s) => s.clone(),
        }
    }

    /// The user, if a user acted.
    pub fn user(&self) -> Option<UserId> {
        match self {
            Actor::User(u) => Some(*u),
            _ => None,
        }
    }

    /// The operator running this process: `$USER` (or `$LOGNAME`), else the
    /// numeric uid. Who ran a CLI command is only as trustworthy as the
    /// machine's accounts: the database sees one role for everyone.
    pub fn operator_from_env() -> Actor {
        let name = ["USER", "LOGNAME"]
            .into_iter()
            .filter_map(|v| std::env::var(v).ok())
            .find(|n| !n.is_empty());
        // SAFETY: getuid takes nothing, cannot fail and touches no memory of ours.
        Actor::Operator(name.unwrap_or_else(|| format!("uid:{}", unsafe { libc::getuid() })))
    }
}

/// Where a request came from: the TCP peer of the request or WebSocket
/// (behind a proxy, the proxy's address: X-Forwarded-For is not trusted)
/// and the gateway that took it. Both none from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Origin {
    pub ip: Option<IpAddr>,
    pub gateway_id: Option<Uuid>,
}

impl Origin {
    /// A request to gateway `gateway_id` from `ip`.
    pub fn gateway(ip: IpAddr, gateway_id: Uuid) -> Origin {
        Origin {
            ip: Some(ip),
            gateway_id: Some(gateway_id),
        }
    }

    pub fn by(self, actor: Actor) -> Caller {
        Caller { actor, from: self }
    }
}

/// Who is acting and from where: what a handler knows about its caller
/// before it does anything. Handed to the store, which records it with the
/// action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub actor: Actor,
    pub from: Origin,
}

impl Caller {
    /// An event of this caller doing `action`, to be given its targets.
    pub fn did(&self, action: Action) -> AuditEvent {
        AuditEvent {
            event_id: Uuid::now_v7(),
            at: None,
            actor: self.actor.clone(),
            action,
            conversation_id: None,
            message_id: None,
            user_id: None,
            dead_letter_id: None,
            detail: empty_object(),
            ip: self.from.ip,
            gateway_id: self.from.gateway_id,
        }
    }
}

/// One audit row, as carried by its job. Targets are set where they apply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unique per action: the row's key, so a repeated job writes nothing.
    pub event_id: Uuid,
    /// When the action happened; filled by [`record`] from the database
    /// clock (the transaction's `now()`) when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
    pub actor: Actor,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<ConversationId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<MessageId>,
    /// The user acted upon: the member added or removed, the author of the
    /// message deleted or moderated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<UserId>,
    /// The `dead_letters` row replayed or purged, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_id: Option<i64>,
    /// Anything else worth keeping, as a JSON object.
    #[serde(default = "empty_object")]
    pub detail: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_id: Option<Uuid>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl AuditEvent {
    pub fn conversation(mut self, id: ConversationId) -> Self {
        self.conversation_id = Some(id);
        self
    }

    pub fn message(mut self, id: MessageId) -> Self {
        self.message_id = Some(id);
        self
    }

    pub fn user(mut self, id: UserId) -> Self {
        self.user_id = Some(id);
        self
    }

    pub fn dead_letter(mut self, id: i64) -> Self {
        self.dead_letter_id = Some(id);
        self
    }

    /// Set `detail` (a JSON object; anything else is wrapped as `{"value": ...}`).
    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = match detail {
            serde_json::Value::Object(_) => detail,
            other => serde_json::json!({ "value": other }),
        };
        self
    }

    /// The job's payload.
    pub fn to_job(&self) -> serde_json::Value {
        serde_json::json!({"kind": "audit", "v": JOB_VERSION, "event": self})
    }
}

/// Record `event` in the transaction (or on the connection) `ex` performs
/// the action in: a job on the low-priority queue, applied by the worker as
/// one `audit_log` row. See the module docs.
pub async fn record<'e>(ex: impl PgExecutor<'e>, event: &AuditEvent) -> Result<(), QueueError> {
    record_all(ex, std::slice::from_ref(event)).await
}

/// [`record`] of several events, in one statement.
pub async fn record_all<'e>(
    ex: impl PgExecutor<'e>,
    events: &[AuditEvent],
) -> Result<(), QueueError> {
    if events.is_empty() {
        return Ok(());
    }
    let jobs: Vec<serde_json::Value> = events.iter().map(AuditEvent::to_job).collect();
    // `at` from this transaction's now(): the same instant as the action's
    // own now() (deleted_at, joined_at, dead_at).
    sqlx::query(
        "select pgmq.send_batch($1::text, array(
             select case when j->'event' ? 'at' then j
                         else jsonb_set(j, '{event,at}', to_jsonb(now())) end
             from unnest($2::jsonb[]) with ordinality as u(j, n) order by n))",
    )
    .bind(BACKGROUND_QUEUE)
    .bind(&jobs)
    .execute(ex)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::BackgroundJob;
    use serde_json::json;

    fn caller() -> Caller {
        Origin::gateway("203.0.113.7".parse().unwrap(), Uuid::new_v4())
            .by(Actor::User(UserId(Uuid::new_v4())))
    }

    #[test]
    fn an_event_round_trips_through_its_background_job() {
        let conv = ConversationId::new_v7();
        let mut e = caller()
            .did(Action::MemberRemove)
            .conversation(conv)
            .user(UserId(Uuid::new_v4()))
            .detail(json!({"why": "left the team"}));
        let job = e.to_job();
        assert_eq!(job["kind"], "audit");
        assert_eq!(job["event"]["action"], "member.remove");
        assert_eq!(job["event"]["actor"]["kind"], "user");
        assert_eq!(job["event"]["ip"], "203.0.113.7");
        assert!(job["event"].get("at").is_none(), "the database fills it");
        assert!(job["event"].get("message_id").is_none());
        let at = crate::domain::now_micros();
        let mut with_at = job.clone();
        with_at["event"]["at"] = json!(at);
        let BackgroundJob::Audit { event, .. } = BackgroundJob::decode(&with_at).unwrap() else {
            panic!("not an audit job")
        };
        e.at = Some(at);
        assert_eq!(event, e);
    }

    #[test]
    fn actors_encode_as_kind_and_id() {
        let cases = [
            (Actor::Service("shop".into()), "service", "shop"),
            (Actor::Operator("ana".into()), "operator", "ana"),
            (Actor::System("moderation".into()), "system", "moderation"),
        ];
        for (actor, kind, id) in cases {
            let v = serde_json::to_value(&actor).unwrap();
            assert_eq!(v, json!({"kind": kind, "id": id}));
            assert_eq!((actor.kind(), actor.id().as_str()), (kind, id));
            assert_eq!(serde_json::from_value::<Actor>(v).unwrap(), actor);
        }
        let u = UserId(Uuid::new_v4());
        assert_eq!(Actor::User(u).id(), u.to_string());
        assert!(serde_json::from_value::<Actor>(json!({"kind": "user", "id": "bob"})).is_err());
    }

    #[test]
    fn malformed_audit_jobs_are_refused() {
        let good = caller().did(Action::ServiceCall).to_job();
        assert!(BackgroundJob::decode(&good).is_ok());
        let mut bad = good.clone();
        bad["event"]["action"] = json!("member.promote");
        assert!(BackgroundJob::decode(&bad).is_err());
        let mut bad = good.clone();
        bad["event"]["ip"] = json!("not an address");
        assert!(BackgroundJob::decode(&bad).is_err());
        let mut bad = good;
        bad["v"] = json!(2);
        assert!(BackgroundJob::decode(&bad).unwrap_err().contains("version"));
    }

    #[test]
    fn action_names_are_their_serde_names_and_the_migrations_check_list() {
        let migration = include_str!("../../migrations/0014_audit.sql");
        for a in Action::ALL {
            assert_eq!(serde_json::to_value(a).unwrap(), json!(a.as_str()));
            assert!(
                migration.contains(&format!("'{}'", a.as_str())),
                "{} is missing from the check constraint",
                a.as_str()
            );
        }
    }

    #[test]
    fn detail_is_always_an_object() {
        let e = caller().did(Action::DlqPurge).detail(json!(3));
        assert_eq!(e.detail, json!({"value": 3}));
        assert_eq!(caller().did(Action::DlqPurge).detail, json!({}));
    }
}

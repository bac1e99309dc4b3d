//! The durable queue: pgmq's tables, installed from its SQL. Every call
//! takes an executor (a pool, a connection, or the caller's transaction).
//!
//! The hot calls (send, read, delete, set_vt) are pgmq's own statements,
//! prepared once per connection against the queue's table, rather than
//! pgmq's PL/pgSQL functions: each of those formats its SQL and EXECUTEs it,
//! so Postgres parses and plans it on every call. In an S1 profile
//! (pg_stat_statements, 1,000 msg/s) the functions took 4.1 s of
//! `send_batch` around 0.8 s of the insert itself. Everything else (queue
//! creation, metrics, archive) still goes through pgmq's functions.
//!
//! pgmq gives at-least-once delivery with a visibility timeout; the worker
//! turns that into exactly-once storage by deleting a job in the same
//! transaction that stores its message.

pub mod audit;
pub mod dead_letters;
mod enqueuer;
pub mod webhooks;

pub use crate::config::EnqueueConfig;
pub use enqueuer::{EnqueueError, Enqueuer, PersistBuffer, Rejected};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::LazyLock;

use sqlx::PgExecutor;

use crate::domain::{
    ClientMessageId, Content, ConversationId, Message, MessageId, MessageKind, Seq, UserId,
};

/// Chat messages waiting to be stored (high priority).
pub const PERSIST_QUEUE: &str = "postline_persist";
/// Receipts, read markers, webhook deliveries, audit rows (low priority).
pub const BACKGROUND_QUEUE: &str = "postline_background";

/// The queues a worker drains, in priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    Persist,
    Background,
}

impl Queue {
    pub const ALL: [Queue; 2] = [Queue::Persist, Queue::Background];

    pub fn name(self) -> &'static str {
        match self {
            Queue::Persist => PERSIST_QUEUE,
            Queue::Background => BACKGROUND_QUEUE,
        }
    }

    pub fn from_name(name: &str) -> Option<Queue> {
        Queue::ALL.into_iter().find(|q| q.name() == name)
    }

    fn statements(self) -> &'static Statements {
        static PERSIST: LazyLock<Statements> = LazyLock::new(|| Statements::new(PERSIST_QUEUE));
        static BACKGROUND: LazyLock<Statements> =
            LazyLock::new(|| Statements::new(BACKGROUND_QUEUE));
        match self {
            Queue::Persist => &PERSIST,
            Queue::Background => &BACKGROUND,
        }
    }
}

/// pgmq's statements for one queue (those its `send_batch`, `read`,
/// `delete` and `set_vt` format and run, for pgmq 1.11 as pinned), with the
/// table named once: the same text each call, so sqlx prepares it once per
/// connection and Postgres plans it once.
struct Statements {
    send: String,
    read: String,
    claim: String,
    delete: String,
    set_vt: String,
}

impl Statements {
    fn new(queue: &str) -> Statements {
        let table = format!("pgmq.q_{queue}");
        Statements {
            // pgmq.send_batch(queue, msgs): vt = clock_timestamp(), no
            // headers; ids drawn in array order.
            send: format!(
                "insert into {table} (vt, message)
                 select clock_timestamp(), m from unnest($1::text[]::jsonb[]) with ordinality as u(m, n)
                 order by n
                 returning msg_id"
            ),
            // pgmq.read(queue, vt, qty) without a condition.
            read: format!(
                "with cte as (
                     select msg_id from {table}
                     where vt <= clock_timestamp()
                     order by msg_id asc
                     limit $1
                     for update skip locked)
                 update {table} m
                 set last_read_at = clock_timestamp(),
                     vt = clock_timestamp() + make_interval(secs => $2::float8),
                     read_ct = read_ct + 1
                 from cte where m.msg_id = cte.msg_id
                 returning m.msg_id, m.read_ct, m.enqueued_at, m.message"
            ),
            // The visible jobs locked by the caller's transaction, with the
            // attempt this is (read_ct + 1) but nothing written: see `claim`.
            claim: format!(
                "select msg_id, read_ct + 1 as read_ct, enqueued_at, message
                 from {table}
                 where vt <= clock_timestamp()
                 order by msg_id asc
                 limit $1
                 for update skip locked"
            ),
            delete: format!("delete from {table} where msg_id = any($1) returning msg_id"),
            set_vt: format!(
                "update {table}
                 set vt = clock_timestamp() + make_interval(secs => $2::float8)
                 where msg_id = any($1)
                 returning msg_id, read_ct, enqueued_at, message"
            ),
        }
    }
}

/// The statements of the queue named `queue`, one of ours.
fn statements(queue: &str) -> Result<&'static Statements, QueueError> {
    Queue::from_name(queue)
        .map(Queue::statements)
        .ok_or_else(|| QueueError::UnknownQueue(queue.to_owned()))
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A queue name from outside the code (a dead letter's row) that is
    /// none of ours.
    #[error("no such queue: {0:?}")]
    UnknownQueue(String),
}

/// A failure of the database or the connection (worth retrying as is), as
/// opposed to one caused by the data sent.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // connection exceptions, operator intervention (shutdown, crash
            // recovery), insufficient resources, serialization failure,
            // deadlock, lock not available, statement timeout
            c.starts_with("08")
                || c.starts_with("57P")
                || c.starts_with("53")
                || c == "40001"
                || c == "40P01"
                || c == "55P03"
                || c == "57014"
        }),
        _ => false,
    }
}

/// A job as read from pgmq.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RawJob {
    pub msg_id: i64,
    pub read_ct: i32,
    pub enqueued_at: DateTime<Utc>,
    pub message: serde_json::Value,
}

/// A job's payload, serialized once where the job is made: the enqueuer
/// hands these bytes to Postgres without building a JSON tree again.
pub type Payload = Box<RawValue>;

/// The payload of a persist job: the message exactly as the gateway accepted
/// and broadcast it, borrowed, so encoding it copies nothing but bytes.
/// Versioned so a worker can refuse a format it does not know. Its fields
/// match `protocol::server::MessageView` today, on purpose as a type of its
/// own: jobs outlive deploys in the queue, so their format changes only with
/// `v`, never because the client protocol did.
#[derive(Debug, Serialize)]
pub struct PersistJob<'a> {
    v: u8,
    id: MessageId,
    conversation_id: ConversationId,
    sender_id: UserId,
    client_message_id: &'a ClientMessageId,
    kind: MessageKind,
    content: &'a Content,
    created_at: DateTime<Utc>,
}

/// [`PersistJob`] as read back by the worker.
#[derive(Deserialize)]
struct PersistJobOwned {
    v: u8,
    id: MessageId,
    conversation_id: ConversationId,
    sender_id: UserId,
    client_message_id: String,
    kind: MessageKind,
    content: serde_json::Value,
    created_at: DateTime<Utc>,
}

impl<'a> PersistJob<'a> {
    pub const VERSION: u8 = 1;

    pub fn from_message(m: &'a Message) -> Self {
        PersistJob {
            v: Self::VERSION,
            id: m.id,
            conversation_id: m.conversation_id,
            sender_id: m.sender_id,
            client_message_id: &m.client_message_id,
            kind: m.kind,
            content: &m.content,
            created_at: m.created_at,
        }
    }

    /// The job's payload for the enqueuer.
    pub fn encode(m: &Message) -> Result<Payload, serde_json::Error> {
        serde_json::value::to_raw_value(&PersistJob::from_message(m))
    }

    /// Read a job's payload back into a message; an error means the job is
    /// malformed (written by something other than a gateway) and can never succeed.
    pub fn decode(payload: &serde_json::Value) -> Result<Message, String> {
        let job = PersistJobOwned::deserialize(payload)
            .map_err(|e| format!("malformed persist job: {e}"))?;
        if job.v != Self::VERSION {
            return Err(format!("unknown persist job version {}", job.v));
        }
        Ok(Message {
            id: job.id,
            conversation_id: job.conversation_id,
            sender_id: job.sender_id,
            client_message_id: ClientMessageId::parse(&job.client_message_id)
                .map_err(|e| e.to_string())?,
            kind: job.kind,
            content: Content::from_stored(job.content),
            created_at: job.created_at,
        })
    }
}

/// A low-priority job. Versioned like [`PersistJob`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackgroundJob {
    /// Move a member's read marker forward (never back).
    ReadMarker {
        v: u8,
        conversation_id: ConversationId,
        user_id: UserId,
        seq: Seq,
    },
    /// A delivery and/or read receipt: positions move forward, never back.
    Receipt {
        v: u8,
        conversation_id: ConversationId,
        user_id: UserId,
        #[serde(default)]
        delivered_seq: Seq,
        #[serde(default)]
        read_seq: Seq,
    },
    /// Deliver one `webhook_deliveries` row to its endpoint (see [`webhooks`]).
    Webhook { v: u8, delivery_id: i64 },
    /// Append one `audit_log` row (see [`audit`]).
    Audit { v: u8, event: audit::AuditEvent },
    /// Ask the moderation hook about one version of a stored message (see
    /// `crate::moderation`); stale once the message changed again.
    Review {
        v: u8,
        message_id: MessageId,
        version: i32,
    },
}

impl BackgroundJob {
    /// The review of `message_id` as it is at `version`, as a job payload.
    pub fn review(message_id: MessageId, version: i32) -> serde_json::Value {
        serde_json::json!({"kind": "review", "v": PersistJob::VERSION, "message_id": message_id, "version": version})
    }
}

impl BackgroundJob {
    pub fn decode(payload: &serde_json::Value) -> Result<Self, String> {
        let job: BackgroundJob = serde_json::from_value(payload.clone())
            .map_err(|e| format!("malformed background job: {e}"))?;
        let (v, seqs) = match &job {
            BackgroundJob::ReadMarker { v, seq, .. } => (*v, [seq.0, 0]),
            BackgroundJob::Receipt {
                v,
                delivered_seq,
                read_seq,
                ..
            } => (*v, [delivered_seq.0, read_seq.0]),
            BackgroundJob::Webhook { v, .. }
            | BackgroundJob::Audit { v, .. }
            | BackgroundJob::Review { v, .. } => (*v, [0, 0]),
        };
        if v != PersistJob::VERSION {
            return Err(format!("unknown background job version {v}"));
        }
        if let Some(seq) = seqs.into_iter().find(|s| *s < 0) {
            return Err(format!("read marker seq must not be negative (got {seq})"));
        }
        Ok(job)
    }
}

/// pgmq's send_batch: one round trip, one transaction for many jobs.
pub async fn send_batch<'e>(
    ex: impl PgExecutor<'e>,
    queue: &str,
    payloads: &[serde_json::Value],
) -> Result<Vec<i64>, QueueError> {
    let encoded: Vec<String> = payloads.iter().map(|p| p.to_string()).collect();
    send_batch_text(ex, queue, &encoded).await
}

/// [`send_batch`] of payloads already serialized (what the enqueuer sends).
pub async fn send_batch_encoded<'e>(
    ex: impl PgExecutor<'e>,
    queue: &str,
    payloads: &[Payload],
) -> Result<Vec<i64>, QueueError> {
    let texts: Vec<&str> = payloads.iter().map(|p| p.get()).collect();
    send_batch_text(ex, queue, &texts).await
}

async fn send_batch_text<'e, T>(
    ex: impl PgExecutor<'e>,
    queue: &str,
    payloads: &[T],
) -> Result<Vec<i64>, QueueError>
where
    T: AsRef<str>,
{
    let texts: Vec<&str> = payloads.iter().map(AsRef::as_ref).collect();
    Ok(
        // Postgres parses the text into jsonb: the bytes made at the gateway
        // are the only encoding of the job.
        sqlx::query_scalar(&statements(queue)?.send)
            .bind(texts)
            .fetch_all(ex)
            .await?,
    )
}

/// pgmq's read: up to `qty` visible jobs, oldest first, hidden from other readers for `vt_secs`.
pub async fn read<'e>(
    ex: impl PgExecutor<'e>,
    queue: &str,
    vt_secs: i32,
    qty: i32,
) -> Result<Vec<RawJob>, QueueError> {
    let mut jobs = sqlx::query_as::<_, RawJob>(&statements(queue)?.read)
        .bind(qty)
        .bind(f64::from(vt_secs))
        .fetch_all(ex)
        .await?;
    // In queue order: the worker stores a conversation's messages with seqs
    // in the order read, and an UPDATE ... RETURNING has no order of its
    // own (a hash join in its plan returned them shuffled).
    jobs.sort_unstable_by_key(|j| j.msg_id);
    Ok(jobs)
}

/// Up to `qty` visible jobs, oldest first, locked by the caller's
/// transaction instead of hidden by a visibility timeout: the transaction
/// that applies them deletes them and commits once, where [`read`] commits
/// on its own first (and writes every row it reads). If that transaction
/// rolls back or its connection dies, the jobs are visible again at once,
/// and no attempt was counted (`read_ct` is what it would be after a read,
/// but is not stored), so a worker reads the careful way after a failure.
pub async fn claim(
    tx: &mut sqlx::PgConnection,
    queue: &str,
    qty: i32,
) -> Result<Vec<RawJob>, QueueError> {
    Ok(sqlx::query_as::<_, RawJob>(&statements(queue)?.claim)
        .bind(qty)
        .fetch_all(tx)
        .await?)
}

/// pgmq's delete of several jobs; returns how many existed.
pub async fn delete<'e>(
    ex: impl PgExecutor<'e>,
    queue: &str,
    msg_ids: &[i64],
) -> Result<usize, QueueError> {
    let deleted: Vec<i64> = sqlx::query_scalar(&statements(queue)?.delete)
        .bind(msg_ids)
        .fetch_all(ex)
        .await?;
    Ok(deleted.len())
}

/// `pgmq.archive` of several jobs: out of the queue, kept in its archive table.
pub async fn archive<'e>(
    ex: impl PgExecutor<'e>,
    queue: &str,
    msg_ids: &[i64],
) -> Result<usize, QueueError> {
    let archived: Vec<i64> =
        sqlx::query_scalar("select * from pgmq.archive($1::text, $2::bigint[])")
            .bind(queue)
            .bind(msg_ids)
            .fetch_all(ex)
            .await?;
    Ok(archived.len())
}

/// Hide jobs until `delay` from now (pgmq's set_vt), returning those that
/// still exist: a job deleted meanwhile is simply absent.
pub async fn set_vt<'e>(
    ex: impl PgExecutor<'e>,
    queue: &str,
    msg_ids: &[i64],
    delay: std::time::Duration,
) -> Result<Vec<RawJob>, QueueError> {
    let mut jobs = sqlx::query_as::<_, RawJob>(&statements(queue)?.set_vt)
        .bind(msg_ids)
        .bind(delay.as_secs_f64())
        .fetch_all(ex)
        .await?;
    jobs.sort_unstable_by_key(|j| j.msg_id);
    Ok(jobs)
}

/// Depth and age of a queue, from pgmq.metrics.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueueStats {
    pub queue_name: String,
    pub queue_length: i64,
    pub queue_visible_length: i64,
    pub oldest_msg_age_sec: Option<i32>,
    pub total_messages: i64,
}

pub async fn stats<'e>(ex: impl PgExecutor<'e>) -> Result<Vec<QueueStats>, QueueError> {
    Ok(sqlx::query_as::<_, QueueStats>(
        "select queue_name, queue_length, queue_visible_length, oldest_msg_age_sec, total_messages
         from pgmq.metrics_all() where queue_name like 'postline\\_%' order by queue_name",
    )
    .fetch_all(ex)
    .await?)
}

/// Jobs in the queue, visible or not (for tests and /metrics).
pub async fn depth<'e>(ex: impl PgExecutor<'e>, queue: &str) -> Result<i64, QueueError> {
    Ok(
        sqlx::query_scalar("select queue_length from pgmq.metrics($1::text)")
            .bind(queue)
            .fetch_one(ex)
            .await?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn job_round_trips_a_message() {
        let m = Message {
            id: MessageId::new_v7(),
            conversation_id: ConversationId::new_v7(),
            sender_id: UserId(uuid::Uuid::new_v4()),
            client_message_id: ClientMessageId::parse("c-1").unwrap(),
            kind: MessageKind::File,
            content: Content::parse(MessageKind::File, json!({"url": "u"}), 100).unwrap(),
            created_at: crate::domain::now_micros(),
        };
        let payload = serde_json::to_value(PersistJob::from_message(&m)).unwrap();
        assert_eq!(PersistJob::decode(&payload).unwrap(), m);
    }

    #[test]
    fn malformed_jobs_are_refused() {
        assert!(PersistJob::decode(&json!({"hello": 1})).is_err());
        let m = Message {
            id: MessageId::new_v7(),
            conversation_id: ConversationId::new_v7(),
            sender_id: UserId(uuid::Uuid::new_v4()),
            client_message_id: ClientMessageId::parse("c").unwrap(),
            kind: MessageKind::Text,
            content: Content::parse(MessageKind::Text, json!("x"), 100).unwrap(),
            created_at: Utc::now(),
        };
        let encoded = PersistJob::encode(&m).unwrap();
        let mut ok: serde_json::Value = serde_json::from_str(encoded.get()).unwrap();
        assert!(PersistJob::decode(&ok).is_ok());
        ok["v"] = json!(9);
        assert!(PersistJob::decode(&ok).unwrap_err().contains("version"));
        ok["v"] = json!(1);
        ok["kind"] = json!("video");
        assert!(PersistJob::decode(&ok).is_err());
    }

    #[test]
    fn a_review_job_round_trips() {
        let id = MessageId::new_v7();
        assert_eq!(
            BackgroundJob::decode(&BackgroundJob::review(id, 3)).unwrap(),
            BackgroundJob::Review {
                v: 1,
                message_id: id,
                version: 3
            }
        );
    }
}

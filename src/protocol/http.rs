//! The JSON bodies of the HTTP API (`/v1`, health, errors). Handlers build
//! one of these and never a JSON object by hand, so docs/PROTOCOL.md and this
//! file change together.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::server::StoredView;
use crate::domain::{ConversationId, Seq, UserId};

/// `{"error":{"code","message"}}`, the body of every error response.
#[derive(Serialize)]
pub struct ErrorResponse<'a> {
    pub error: super::server::ErrorBody<'a>,
}

/// `POST /v1/conversations` (201).
#[derive(Serialize)]
pub struct Conversation<'a> {
    pub id: ConversationId,
    pub title: Option<&'a str>,
    pub member_ids: &'a [UserId],
    pub created_at: DateTime<Utc>,
}

/// One entry of `GET /v1/conversations`, with the caller's own positions.
#[derive(Serialize)]
pub struct ConversationSummary<'a> {
    pub id: ConversationId,
    pub title: Option<&'a str>,
    pub member_ids: &'a [UserId],
    pub created_at: DateTime<Utc>,
    pub last_message_at: Option<DateTime<Utc>>,
    pub last_seq: Seq,
    pub last_delivered_seq: Seq,
    pub last_read_seq: Seq,
    pub unread_count: i64,
}

#[derive(Serialize)]
pub struct Conversations<'a> {
    pub conversations: Vec<ConversationSummary<'a>>,
}

/// `POST .../members` (201 when added, 200 when already a member).
#[derive(Serialize)]
pub struct MemberAdded {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    pub added: bool,
}

/// `DELETE .../members/{user_id}`.
#[derive(Serialize)]
pub struct MemberRemoved {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    pub removed: bool,
}

/// `GET .../messages`: a page in seq order.
#[derive(Serialize)]
pub struct History<'a> {
    pub messages: Vec<StoredView<'a>>,
    pub has_more: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Online,
    Offline,
}

#[derive(Serialize)]
pub struct UserPresence {
    pub user_id: UserId,
    pub status: Status,
}

/// `GET /v1/presence`.
#[derive(Serialize)]
pub struct Presence {
    pub presence: Vec<UserPresence>,
}

/// `GET /healthz`.
#[derive(Serialize)]
pub struct Health {
    pub status: &'static str,
}

/// `GET /readyz`: each dependency's state, and the verdict.
#[derive(Serialize)]
pub struct Ready {
    pub status: &'static str,
    pub database: &'static str,
    pub worker: &'static str,
    pub persist_buffer: PersistBuffer,
}

#[derive(Serialize)]
pub struct PersistBuffer {
    pub buffered: usize,
    pub capacity: usize,
    pub state: &'static str,
}

/// `GET /dashboard/stats`: one poll of the live dashboard. Rates and
/// percentiles are over the last `window_secs`; `*_total` since this
/// process started; queues, dead letters and gateways are read from
/// Postgres, so every process shows the whole cluster (null if unreadable).
#[derive(Serialize)]
pub struct DashboardStats {
    pub at: DateTime<Utc>,
    /// This gateway's id (absent on a standalone worker).
    pub gateway_id: Option<uuid::Uuid>,
    pub uptime_secs: u64,
    pub window_secs: f64,
    pub connections: i64,
    pub connections_total: u64,
    pub messages_per_sec: f64,
    pub messages_sent_total: u64,
    /// Jobs of the persist queue stored by this process's worker, per second.
    pub persisted_per_sec: f64,
    pub send_broadcast_ms: Percentiles,
    pub persist_ms: Percentiles,
    pub queues: Option<Vec<QueueView>>,
    pub retries_per_sec: f64,
    pub retries_total: u64,
    pub dead_letters: Option<DeadLetterCounts>,
    pub gateways: Option<Vec<GatewayView>>,
    pub gateways_alive: Option<usize>,
    pub rate_limited_per_sec: f64,
    pub rate_limited: Vec<RateLimitView>,
    pub alerts_firing: usize,
}

/// p50/p99 in milliseconds over the window (null without observations).
#[derive(Serialize)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub count: u64,
}

#[derive(Serialize)]
pub struct QueueView {
    pub queue: String,
    pub depth: i64,
    pub visible: i64,
    pub oldest_age_secs: i64,
}

#[derive(Serialize)]
pub struct DeadLetterCounts {
    /// Rows in `dead_letters`.
    pub total: i64,
    /// Of those, dead within the alert window.
    pub recent: i64,
}

#[derive(Serialize)]
pub struct GatewayView {
    pub id: uuid::Uuid,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub alive: bool,
}

#[derive(Serialize)]
pub struct RateLimitView {
    pub limiter: &'static str,
    pub total: u64,
    pub per_sec: f64,
}

/// `GET /alerts`: every rule, and every alert that fired since start.
#[derive(Serialize)]
pub struct Alerts<'a> {
    /// Which process evaluated them (`gateway <id>` or `worker <pid>`).
    pub source: &'a str,
    pub evaluated_at: Option<DateTime<Utc>>,
    pub firing: usize,
    pub rules: Vec<AlertRule>,
    pub alerts: Vec<Alert>,
}

#[derive(Serialize)]
pub struct AlertRule {
    pub name: &'static str,
    pub threshold: f64,
    pub unit: &'static str,
    pub summary: &'static str,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Firing,
    Resolved,
}

/// One alert: a rule for one subject (a queue, a gateway; none for
/// process-wide rules), in the state it entered at `since`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Alert {
    pub name: &'static str,
    pub subject: Option<String>,
    pub state: AlertState,
    pub since: DateTime<Utc>,
    /// The value that made it fire or resolve (null: no data any more).
    pub value: Option<f64>,
    pub threshold: f64,
    pub unit: &'static str,
    pub summary: &'static str,
}

/// The webhook's body, POSTed once per transition.
#[derive(Serialize)]
pub struct AlertEvent<'a> {
    pub source: &'a str,
    pub alert: &'a Alert,
}

/// `POST /dev/token` (`--dev` only): which demo user to sign a token for.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevTokenRequest {
    pub user_id: UserId,
}

/// A demo user: a fixed id and a display name.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct DemoUser {
    pub user_id: UserId,
    pub name: &'static str,
}

/// `GET /dev/users` (`--dev` only).
#[derive(Serialize)]
pub struct DemoUsers {
    pub users: &'static [DemoUser],
}

/// `POST /dev/token` (201): a token signed with the public dev secret.
#[derive(Serialize)]
pub struct DevToken {
    pub token: String,
    pub user_id: UserId,
    pub name: &'static str,
    pub expires_at: DateTime<Utc>,
}

/// `POST /v1/service/conversations`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCreateConversation {
    pub title: Option<String>,
    pub member_ids: Vec<uuid::Uuid>,
    /// Recorded as the creator (a service or bot id); not made a member.
    pub created_by: Option<uuid::Uuid>,
}

/// `POST /v1/service/conversations/{id}/members`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceMember {
    pub user_id: uuid::Uuid,
}

/// `POST /v1/service/conversations/{id}/messages`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePost {
    pub sender_id: uuid::Uuid,
    /// `system` unless said otherwise.
    pub kind: Option<String>,
    pub content: serde_json::Value,
    /// Defaults to one made from the Idempotency-Key.
    pub client_message_id: Option<String>,
}

/// A member added (`changed`: was not one yet) or removed by the service API.
#[derive(Serialize)]
pub struct MemberChange {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    pub changed: bool,
}

/// A message posted by the service API (stored and delivered as any other).
#[derive(Serialize)]
pub struct Posted<'a> {
    pub message_id: uuid::Uuid,
    pub conversation_id: ConversationId,
    pub client_message_id: &'a str,
}

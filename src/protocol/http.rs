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

//! The bodies POSTed to webhook endpoints (docs/INTEGRATION.md, "Webhooks"):
//! `{"id", "type", "created_at", "data"}`, one typed `data` per event. Built
//! once where the event is committed and stored with its deliveries, so every
//! endpoint and every retry gets the same bytes to sign.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::server::StoredView;
use crate::domain::{ConversationId, MessageId, StoredMessage, UserId};

/// One event, as delivered.
#[derive(Serialize)]
pub struct Event<'a> {
    /// Also sent as `Postline-Event-Id`: receivers dedupe on it (delivery
    /// is at least once).
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub created_at: DateTime<Utc>,
    pub data: Data<'a>,
}

/// What happened; `type` on the wire is [`Data::kind`].
#[derive(Serialize)]
#[serde(untagged)]
pub enum Data<'a> {
    /// `message.created` (stored, with its seq) and `message.updated`.
    Message { message: StoredView<'a> },
    MessageDeleted {
        conversation_id: ConversationId,
        message_id: MessageId,
        version: i32,
        /// Set when moderation retracted it (absent when the sender deleted it).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    /// `member.joined` and `member.left`.
    Member {
        conversation_id: ConversationId,
        user_id: UserId,
        /// Who added or removed them.
        actor_id: UserId,
    },
    ConversationCreated {
        conversation_id: ConversationId,
        title: Option<&'a str>,
        created_by: UserId,
        member_ids: &'a [UserId],
    },
}

/// Every event type, as named in `type`.
pub const TYPES: [&str; 6] = [
    "message.created",
    "message.updated",
    "message.deleted",
    "member.joined",
    "member.left",
    "conversation.created",
];

impl<'a> Event<'a> {
    fn new(kind: &'static str, data: Data<'a>) -> Self {
        Event {
            id: Uuid::now_v7(),
            kind,
            created_at: crate::domain::now_micros(),
            data,
        }
    }

    pub fn message_created(m: &'a StoredMessage) -> Self {
        Self::new("message.created", Data::Message { message: m.into() })
    }

    pub fn message_updated(m: &'a StoredMessage) -> Self {
        Self::new("message.updated", Data::Message { message: m.into() })
    }

    /// `reason`: why moderation retracted it; None when the sender deleted it.
    pub fn message_deleted(m: &StoredMessage, reason: Option<&'a str>) -> Self {
        Self::new(
            "message.deleted",
            Data::MessageDeleted {
                conversation_id: m.message.conversation_id,
                message_id: m.message.id,
                version: m.version,
                reason,
            },
        )
    }

    pub fn member(joined: bool, conv: ConversationId, user: UserId, actor: UserId) -> Self {
        Self::new(
            if joined {
                "member.joined"
            } else {
                "member.left"
            },
            Data::Member {
                conversation_id: conv,
                user_id: user,
                actor_id: actor,
            },
        )
    }

    pub fn conversation_created(
        conv: ConversationId,
        title: Option<&'a str>,
        created_by: UserId,
        member_ids: &'a [UserId],
    ) -> Self {
        Self::new(
            "conversation.created",
            Data::ConversationCreated {
                conversation_id: conv,
                title,
                created_by,
                member_ids,
            },
        )
    }

    /// The conversation the event belongs to: deliveries are ordered per
    /// conversation.
    pub fn conversation_id(&self) -> ConversationId {
        match &self.data {
            Data::Message { message } => message.conversation_id,
            Data::MessageDeleted {
                conversation_id, ..
            }
            | Data::Member {
                conversation_id, ..
            }
            | Data::ConversationCreated {
                conversation_id, ..
            } => *conversation_id,
        }
    }
}

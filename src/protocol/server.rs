//! Encoding of server events. Each function returns the finished frame as
//! `Bytes`: a broadcast is encoded once and every recipient gets a clone.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::ErrorCode;
use crate::domain::{
    ClientMessageId, Content, ConversationId, Message, MessageId, MessageKind, Seq, StoredMessage,
    UserId,
};

fn encode<T: Serialize>(value: &T) -> Bytes {
    // Serializing these derive-only structs to a Vec cannot fail: no maps with
    // non-string keys, no failing Serialize impls.
    Bytes::from(serde_json::to_vec(value).expect("server events always serialize"))
}

/// The length of `value` encoded, without building it: what a reply is
/// charged against a connection's outbox before it is shaped to fit.
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(0);
    // Cannot fail, as in `encode`; a failure would only undercount.
    let _ = serde_json::to_writer(&mut n, value);
    n.0
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    Hello {
        user_id: UserId,
        connection_id: &'a str,
        server_time: DateTime<Utc>,
    },
    NewMessage {
        message: MessageView<'a>,
    },
    MessageUpdated {
        message: StoredView<'a>,
    },
    MessagePersisted {
        conversation_id: ConversationId,
        message_id: MessageId,
        seq: Seq,
    },
    MemberJoined {
        conversation_id: ConversationId,
        user_id: UserId,
    },
    MemberLeft {
        conversation_id: ConversationId,
        user_id: UserId,
    },
    UserJoined {
        conversation_id: ConversationId,
        user_id: UserId,
    },
    UserLeft {
        conversation_id: ConversationId,
        user_id: UserId,
    },
    Typing {
        conversation_id: ConversationId,
        user_id: UserId,
        is_typing: bool,
    },
    Receipt {
        conversation_id: ConversationId,
        user_id: UserId,
        delivered_seq: Seq,
        read_seq: Seq,
    },
    Presence {
        user_id: UserId,
        status: &'a str,
    },
    MessageDeleted {
        conversation_id: ConversationId,
        message_id: MessageId,
        version: i32,
        /// Only when moderation retracted it: why.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    Joined {
        conversation_id: ConversationId,
        last_seq: Seq,
    },
    Left {
        conversation_id: ConversationId,
    },
    Reconnect {
        after_ms: u64,
    },
    Resync {},
}

#[derive(Serialize)]
struct Ack<'a, T: Serialize> {
    r#type: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    r#ref: Option<&'a str>,
    #[serde(flatten)]
    result: &'a T,
}

/// `{"type":"ack","ref",...result}`; `result` is one of the ack shapes below.
pub fn ack<T: AckBody>(r#ref: Option<&str>, result: &T) -> Bytes {
    encode(&Ack {
        r#type: "ack",
        r#ref,
        result,
    })
}

/// The result of a client event, flattened into its `ack`. Only the shapes
/// in this module implement it, so an ack can never carry an ad-hoc object.
pub trait AckBody: Serialize {}

/// `join_conversation`.
#[derive(Serialize)]
pub struct Joined {
    pub conversation_id: ConversationId,
    pub last_seq: Seq,
    /// Users in the conversation now (joined on some device, on any
    /// gateway), the joining user included.
    pub present: Vec<UserId>,
}

/// `leave_conversation`.
#[derive(Serialize)]
pub struct Left {
    pub conversation_id: ConversationId,
}

/// `send_message`: `duplicate` when the client_message_id was seen before,
/// with the original's id.
#[derive(Serialize)]
pub struct Sent<'a> {
    pub message_id: MessageId,
    pub client_message_id: &'a ClientMessageId,
    pub duplicate: bool,
}

/// Acks with nothing to say (`typing`).
#[derive(Serialize)]
pub struct Done {}

/// `delivered` / `read`: the member's positions after the receipt.
#[derive(Serialize)]
pub struct Receipted {
    pub conversation_id: ConversationId,
    pub delivered_seq: Seq,
    pub read_seq: Seq,
}

/// `sync`: one page of a conversation's history.
#[derive(Serialize)]
pub struct SyncPage<'a> {
    pub conversation_id: ConversationId,
    pub messages: Vec<StoredView<'a>>,
    pub has_more: bool,
    pub last_seq: Seq,
}

/// One conversation's outcome inside a `resume` ack.
#[derive(Serialize)]
#[serde(untagged)]
pub enum Resumed<'a> {
    Page(SyncPage<'a>),
    Failed {
        conversation_id: ConversationId,
        error: ErrorBody<'a>,
    },
}

/// `resume`: one entry per conversation named, in the order named.
#[derive(Serialize)]
pub struct Resume<'a> {
    pub conversations: Vec<Resumed<'a>>,
}

/// `edit_message` / `delete_message`.
#[derive(Serialize)]
pub struct Changed {
    pub message_id: MessageId,
    pub version: i32,
}

/// `ping`.
#[derive(Serialize)]
pub struct Pong {
    pub server_time: DateTime<Utc>,
}

/// `refresh_token`: when the connection now expires.
#[derive(Serialize)]
pub struct TokenRefreshed {
    pub expires_at: DateTime<Utc>,
}

impl AckBody for Joined {}
impl AckBody for TokenRefreshed {}
impl AckBody for Left {}
impl AckBody for Sent<'_> {}
impl AckBody for Done {}
impl AckBody for Receipted {}
impl AckBody for SyncPage<'_> {}
impl AckBody for Resume<'_> {}
impl AckBody for Changed {}
impl AckBody for Pong {}

/// An error nested in a larger reply (a `resume` entry).
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub code: ErrorCode,
    pub message: &'a str,
}

/// Fields some errors carry beside code and message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ErrorDetail {
    /// `rate_limited`: when the same request may succeed.
    RetryAfter { retry_after_ms: u64 },
    /// `conflict` of an edit or delete.
    Conflict { current_version: i32, deleted: bool },
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    r#type: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    r#ref: Option<&'a str>,
    code: ErrorCode,
    message: &'a str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    detail: Option<ErrorDetail>,
}

pub fn error(r#ref: Option<&str>, code: ErrorCode, message: &str) -> Bytes {
    error_with(r#ref, code, message, None)
}

/// An error with the extra fields its code documents.
pub fn error_with(
    r#ref: Option<&str>,
    code: ErrorCode,
    message: &str,
    detail: Option<ErrorDetail>,
) -> Bytes {
    encode(&ErrorFrame {
        r#type: "error",
        r#ref,
        code,
        message,
        detail,
    })
}

/// A message as pushed live in `new_message`: what the gateway accepted,
/// before storage gave it a seq.
#[derive(Serialize)]
pub struct MessageView<'a> {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub sender_id: UserId,
    pub client_message_id: &'a ClientMessageId,
    pub kind: MessageKind,
    pub content: &'a Content,
    pub created_at: DateTime<Utc>,
}

impl<'a> From<&'a Message> for MessageView<'a> {
    fn from(m: &'a Message) -> Self {
        MessageView {
            id: m.id,
            conversation_id: m.conversation_id,
            sender_id: m.sender_id,
            client_message_id: &m.client_message_id,
            kind: m.kind,
            content: &m.content,
            created_at: m.created_at,
        }
    }
}

/// A stored message, as in history pages, `sync` and `message_updated`.
#[derive(Serialize)]
pub struct StoredView<'a> {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub seq: Seq,
    pub sender_id: UserId,
    pub client_message_id: &'a ClientMessageId,
    pub kind: MessageKind,
    pub content: &'a Content,
    pub created_at: DateTime<Utc>,
    pub version: i32,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted: bool,
}

impl<'a> From<&'a StoredMessage> for StoredView<'a> {
    fn from(s: &'a StoredMessage) -> Self {
        let m = &s.message;
        StoredView {
            id: m.id,
            conversation_id: m.conversation_id,
            seq: s.seq,
            sender_id: m.sender_id,
            client_message_id: &m.client_message_id,
            kind: m.kind,
            content: &m.content,
            created_at: m.created_at,
            version: s.version,
            edited_at: s.edited_at,
            deleted: s.deleted,
        }
    }
}

pub fn receipt(
    conversation_id: ConversationId,
    user_id: UserId,
    delivered_seq: Seq,
    read_seq: Seq,
) -> Bytes {
    encode(&Event::Receipt {
        conversation_id,
        user_id,
        delivered_seq,
        read_seq,
    })
}

pub fn presence(user_id: UserId, online: bool) -> Bytes {
    encode(&Event::Presence {
        user_id,
        status: if online { "online" } else { "offline" },
    })
}

pub fn message_updated(message: &StoredMessage) -> Bytes {
    encode(&Event::MessageUpdated {
        message: message.into(),
    })
}

/// `reason`: set when moderation retracted the message, None when its
/// sender deleted it (the field is then absent, as before it existed).
pub fn message_deleted(
    conversation_id: ConversationId,
    message_id: MessageId,
    version: i32,
    reason: Option<&str>,
) -> Bytes {
    encode(&Event::MessageDeleted {
        conversation_id,
        message_id,
        version,
        reason,
    })
}

/// To a user's other connections: this user joined / left a conversation.
pub fn joined(conversation_id: ConversationId, last_seq: Seq) -> Bytes {
    encode(&Event::Joined {
        conversation_id,
        last_seq,
    })
}

pub fn left(conversation_id: ConversationId) -> Bytes {
    encode(&Event::Left { conversation_id })
}

/// Shutdown: reconnect (to any gateway) after this pause, then sync.
pub fn reconnect(after_ms: u64) -> Bytes {
    encode(&Event::Reconnect { after_ms })
}

/// Live hints may have been missed (the gateway's LISTEN connection dropped):
/// sync the joined conversations from the last seq seen.
pub fn resync() -> Bytes {
    encode(&Event::Resync {})
}

pub fn hello(user_id: UserId, connection_id: &str, server_time: DateTime<Utc>) -> Bytes {
    encode(&Event::Hello {
        user_id,
        connection_id,
        server_time,
    })
}

pub fn new_message(message: &Message) -> Bytes {
    encode(&Event::NewMessage {
        message: message.into(),
    })
}

pub fn message_persisted(
    conversation_id: ConversationId,
    message_id: MessageId,
    seq: Seq,
) -> Bytes {
    encode(&Event::MessagePersisted {
        conversation_id,
        message_id,
        seq,
    })
}

pub fn member_joined(conversation_id: ConversationId, user_id: UserId) -> Bytes {
    encode(&Event::MemberJoined {
        conversation_id,
        user_id,
    })
}

/// Room presence: `user_id` is now in the conversation (its first device
/// joined it, on any gateway). Not membership: see `member_joined`.
pub fn user_joined(conversation_id: ConversationId, user_id: UserId) -> Bytes {
    encode(&Event::UserJoined {
        conversation_id,
        user_id,
    })
}

/// Room presence: `user_id` left the conversation (its last device left it,
/// or disconnected and did not come back within the grace period).
pub fn user_left(conversation_id: ConversationId, user_id: UserId) -> Bytes {
    encode(&Event::UserLeft {
        conversation_id,
        user_id,
    })
}

pub fn member_left(conversation_id: ConversationId, user_id: UserId) -> Bytes {
    encode(&Event::MemberLeft {
        conversation_id,
        user_id,
    })
}

pub fn typing(conversation_id: ConversationId, user_id: UserId, is_typing: bool) -> Bytes {
    encode(&Event::Typing {
        conversation_id,
        user_id,
        is_typing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ClientMessageId, Content, MessageKind};
    use serde_json::{json, Value};

    fn parse(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn ack_flattens_result_and_keeps_ref() {
        let conv = ConversationId::new_v7();
        let v = parse(&ack(
            Some("r"),
            &Left {
                conversation_id: conv,
            },
        ));
        assert_eq!(
            v,
            json!({"type": "ack", "ref": "r", "conversation_id": conv})
        );
        let v = parse(&ack(None, &Done {}));
        assert_eq!(v, json!({"type": "ack"}));
    }

    #[test]
    fn error_has_code_and_message() {
        let v = parse(&error(Some("r"), ErrorCode::NotJoined, "join first"));
        assert_eq!(
            v,
            json!({"type": "error", "ref": "r", "code": "not_joined", "message": "join first"})
        );
        let v = parse(&error_with(
            None,
            ErrorCode::RateLimited,
            "slow down",
            Some(ErrorDetail::RetryAfter {
                retry_after_ms: 250,
            }),
        ));
        assert_eq!(
            v,
            json!({"type": "error", "code": "rate_limited", "message": "slow down", "retry_after_ms": 250})
        );
    }

    #[test]
    fn message_deleted_carries_a_reason_only_when_moderation_retracted_it() {
        let (conv, id) = (ConversationId::new_v7(), MessageId::new_v7());
        let v = parse(&message_deleted(conv, id, 2, None));
        assert_eq!(
            v,
            json!({"type": "message_deleted", "conversation_id": conv, "message_id": id, "version": 2})
        );
        let v = parse(&message_deleted(conv, id, 2, Some("spam")));
        assert_eq!(v["reason"], "spam");
    }

    #[test]
    fn new_message_carries_the_whole_message() {
        let m = Message {
            id: MessageId::new_v7(),
            conversation_id: ConversationId::new_v7(),
            sender_id: UserId(uuid::Uuid::new_v4()),
            client_message_id: ClientMessageId::parse("c").unwrap(),
            kind: MessageKind::Text,
            content: Content::parse(MessageKind::Text, json!("hi"), 10).unwrap(),
            created_at: crate::domain::now_micros(),
        };
        let v = parse(&new_message(&m));
        assert_eq!(v["type"], "new_message");
        assert_eq!(v["message"]["id"], m.id.to_string());
        assert_eq!(v["message"]["kind"], "text");
        assert_eq!(v["message"]["content"], "hi");
        assert_eq!(v["message"]["client_message_id"], "c");
    }
}

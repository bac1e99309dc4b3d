//! Encoding of server events. Each function returns the finished frame as
//! `Bytes`: a broadcast is encoded once and every recipient gets a clone.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::ErrorCode;
use crate::domain::{ConversationId, Message, MessageId, Seq, UserId};

fn encode<T: Serialize>(value: &T) -> Bytes {
    // Serializing these derive-only structs to a Vec cannot fail: no maps with
    // non-string keys, no failing Serialize impls.
    Bytes::from(serde_json::to_vec(value).expect("server events always serialize"))
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    Hello {
        user_id: UserId,
        connection_id: &'a str,
        server_time: DateTime<Utc>,
    },
    Error {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        r#ref: Option<&'a str>,
        code: ErrorCode,
        message: &'a str,
    },
    NewMessage {
        message: &'a Message,
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
    Typing {
        conversation_id: ConversationId,
        user_id: UserId,
        is_typing: bool,
    },
    Receipt {
        conversation_id: ConversationId,
        user_id: UserId,
        delivered_seq: i64,
        read_seq: i64,
    },
    Presence {
        user_id: UserId,
        status: &'a str,
    },
    MessageDeleted {
        conversation_id: ConversationId,
        message_id: MessageId,
        version: i32,
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

/// `{"type":"ack","ref",...result}`; `result` must serialize as an object.
pub fn ack<T: Serialize>(r#ref: Option<&str>, result: &T) -> Bytes {
    encode(&Ack {
        r#type: "ack",
        r#ref,
        result,
    })
}

pub fn error(r#ref: Option<&str>, code: ErrorCode, message: &str) -> Bytes {
    encode(&Event::Error {
        r#ref,
        code,
        message,
    })
}

/// An error with extra fields (e.g. `current_version` of a `conflict`).
pub fn error_with(
    r#ref: Option<&str>,
    code: ErrorCode,
    message: &str,
    extra: serde_json::Value,
) -> Bytes {
    let mut v = serde_json::json!({"type": "error", "code": code, "message": message});
    if let Some(r) = r#ref {
        v["ref"] = serde_json::Value::from(r);
    }
    if let (Some(obj), serde_json::Value::Object(more)) = (v.as_object_mut(), extra) {
        obj.extend(more);
    }
    encode(&v)
}

pub fn receipt(
    conversation_id: ConversationId,
    user_id: UserId,
    delivered_seq: i64,
    read_seq: i64,
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

/// `message` is the stored row (its latest version); the store's type is not
/// named here so the protocol stays below the store.
pub fn message_updated<T: Serialize>(message: &T) -> Bytes {
    #[derive(Serialize)]
    struct Updated<'a, T: Serialize> {
        r#type: &'static str,
        message: &'a T,
    }
    encode(&Updated {
        r#type: "message_updated",
        message,
    })
}

pub fn message_deleted(
    conversation_id: ConversationId,
    message_id: MessageId,
    version: i32,
) -> Bytes {
    encode(&Event::MessageDeleted {
        conversation_id,
        message_id,
        version,
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
    encode(&Event::NewMessage { message })
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
        let v = parse(&ack(Some("r"), &json!({"server_time": "t"})));
        assert_eq!(v, json!({"type": "ack", "ref": "r", "server_time": "t"}));
        let v = parse(&ack(None, &json!({"x": 1})));
        assert_eq!(v, json!({"type": "ack", "x": 1}));
    }

    #[test]
    fn error_has_code_and_message() {
        let v = parse(&error(Some("r"), ErrorCode::NotJoined, "join first"));
        assert_eq!(
            v,
            json!({"type": "error", "ref": "r", "code": "not_joined", "message": "join first"})
        );
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

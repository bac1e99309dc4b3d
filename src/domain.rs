//! Identifiers and validated values shared by every layer.
//!
//! Nothing here knows about sockets, SQL or async: a value of one of these
//! types has passed its checks, so code that receives it does not re-check.

use std::fmt;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name)
            }
        }
    };
}

uuid_id!(
    /// A conversation (a room).
    ConversationId
);
uuid_id!(
    /// A user, as named by the `sub` claim of their token.
    UserId
);
uuid_id!(
    /// A message; always a UUIDv7 minted by the gateway, so ids sort by time.
    MessageId
);

impl MessageId {
    pub fn new_v7() -> Self {
        MessageId(Uuid::now_v7())
    }
}

impl ConversationId {
    pub fn new_v7() -> Self {
        ConversationId(Uuid::now_v7())
    }
}

/// Position of a persisted message in its conversation: 1, 2, 3, ... with no gap.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub i64);

/// Current time truncated to microseconds, the precision Postgres stores, so a
/// timestamp broadcast live equals the one read back from history.
pub fn now_micros() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A number in [0, 1) that differs from call to call, for jitter (retry
/// backoff, reconnect spreading). Spread, not cryptographic quality: std's
/// randomly keyed hasher over a counter is enough.
pub fn random_unit() -> f64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let h = std::collections::hash_map::RandomState::new().hash_one(n);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Why a client-supplied value was refused. Maps to the wire codes `invalid`
/// and `too_large`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
}

fn invalid(msg: impl Into<String>) -> ValidationError {
    ValidationError::Invalid(msg.into())
}

/// The client's own id for a message, used to make retries idempotent.
/// 1 to 64 bytes, no control characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ClientMessageId(String);

impl ClientMessageId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        if s.is_empty() {
            return Err(invalid("client_message_id must not be empty"));
        }
        if s.len() > Self::MAX_LEN {
            return Err(invalid(format!(
                "client_message_id is longer than {} bytes",
                Self::MAX_LEN
            )));
        }
        if s.chars().any(char::is_control) {
            return Err(invalid("client_message_id contains control characters"));
        }
        Ok(ClientMessageId(s.to_owned()))
    }

    /// Trust an id that was validated before it was stored.
    pub fn from_stored(s: String) -> Self {
        ClientMessageId(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a message is. `System` is minted by the server only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Text,
    Image,
    File,
    System,
}

impl MessageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Text => "text",
            MessageKind::Image => "image",
            MessageKind::File => "file",
            MessageKind::System => "system",
        }
    }

    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        match s {
            "text" => Ok(MessageKind::Text),
            "image" => Ok(MessageKind::Image),
            "file" => Ok(MessageKind::File),
            "system" => Ok(MessageKind::System),
            other => Err(invalid(format!(
                "kind must be one of text, image, file (got {other:?})"
            ))),
        }
    }
}

/// An attachment's description; the bytes themselves live elsewhere (a URL).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime: Option<String>,
}

/// A message body that matches its kind and fits the size limit. Stored as
/// jsonb: a JSON string for text, an object for attachments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content(serde_json::Value);

impl Content {
    /// Validate `raw` (already parsed JSON) as content of `kind`, at most
    /// `max_bytes` when encoded.
    pub fn parse(
        kind: MessageKind,
        raw: serde_json::Value,
        max_bytes: usize,
    ) -> Result<Self, ValidationError> {
        let value = match kind {
            MessageKind::Text | MessageKind::System => match raw {
                serde_json::Value::String(s) => {
                    if s.contains('\0') {
                        return Err(invalid("content must not contain NUL characters"));
                    }
                    if s.trim().is_empty() {
                        return Err(invalid("content must not be empty"));
                    }
                    if s.len() > max_bytes {
                        return Err(ValidationError::TooLarge(format!(
                            "content is {} bytes, the limit is {max_bytes}",
                            s.len()
                        )));
                    }
                    serde_json::Value::String(s)
                }
                _ => return Err(invalid("content of a text message must be a string")),
            },
            MessageKind::Image | MessageKind::File => {
                let att: Attachment = serde_json::from_value(raw).map_err(|e| {
                    invalid(format!(
                        "content of an {} message must be an object {{url, name?, size?, mime?}}: {e}",
                        kind.as_str()
                    ))
                })?;
                if att.url.trim().is_empty() {
                    return Err(invalid("content.url must not be empty"));
                }
                let strings = [Some(&att.url), att.name.as_ref(), att.mime.as_ref()];
                if strings.into_iter().flatten().any(|s| s.contains('\0')) {
                    return Err(invalid("content must not contain NUL characters"));
                }
                let value = serde_json::to_value(&att)
                    .map_err(|e| invalid(format!("content could not be encoded: {e}")))?;
                let encoded_len = value.to_string().len();
                if encoded_len > max_bytes {
                    return Err(ValidationError::TooLarge(format!(
                        "content is {encoded_len} bytes, the limit is {max_bytes}"
                    )));
                }
                value
            }
        };
        Ok(Content(value))
    }

    /// Trust content that was validated before it was stored.
    pub fn from_stored(value: serde_json::Value) -> Self {
        Content(value)
    }

    pub fn as_json(&self) -> &serde_json::Value {
        &self.0
    }
}

impl Serialize for Content {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// A message accepted by a gateway: everything but its `seq`, which the worker
/// assigns when it stores it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Message {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub sender_id: UserId,
    pub client_message_id: ClientMessageId,
    pub kind: MessageKind,
    pub content: Content,
    pub created_at: DateTime<Utc>,
}

/// A message as stored: what the gateway accepted, plus what storing and
/// later changes decided. A deleted message is a tombstone: `deleted` true
/// and its content JSON null.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredMessage {
    pub message: Message,
    pub seq: Seq,
    pub version: i32,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted: bool,
}

/// A message made durable: what `message_persisted` tells clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub seq: Seq,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn client_message_id_bounds() {
        assert!(ClientMessageId::parse("a").is_ok());
        assert!(ClientMessageId::parse(&"x".repeat(64)).is_ok());
        assert!(matches!(
            ClientMessageId::parse(&"x".repeat(65)),
            Err(ValidationError::Invalid(_))
        ));
        assert!(ClientMessageId::parse("").is_err());
        assert!(ClientMessageId::parse("a\nb").is_err());
    }

    #[test]
    fn text_content_checks_type_emptiness_and_size() {
        assert!(Content::parse(MessageKind::Text, json!("hi"), 10).is_ok());
        assert!(matches!(
            Content::parse(MessageKind::Text, json!(5), 10),
            Err(ValidationError::Invalid(_))
        ));
        assert!(matches!(
            Content::parse(MessageKind::Text, json!("   "), 10),
            Err(ValidationError::Invalid(_))
        ));
        assert!(matches!(
            Content::parse(MessageKind::Text, json!("12345678901"), 10),
            Err(ValidationError::TooLarge(_))
        ));
        // Postgres cannot store NUL in text or jsonb: refuse it at the door.
        assert!(matches!(
            Content::parse(MessageKind::Text, json!("a\0b"), 10),
            Err(ValidationError::Invalid(_))
        ));
        assert!(
            Content::parse(MessageKind::File, json!({"url": "u", "name": "a\0"}), 100).is_err()
        );
    }

    #[test]
    fn attachment_content_needs_url_and_known_fields() {
        let ok = Content::parse(
            MessageKind::Image,
            json!({"url": "https://x/y.png", "size": 10, "mime": "image/png"}),
            1000,
        )
        .unwrap();
        assert_eq!(ok.as_json()["url"], "https://x/y.png");
        assert!(Content::parse(MessageKind::File, json!("just text"), 1000).is_err());
        assert!(Content::parse(MessageKind::File, json!({"name": "a"}), 1000).is_err());
        assert!(Content::parse(MessageKind::File, json!({"url": "u", "evil": 1}), 1000).is_err());
        assert!(Content::parse(MessageKind::File, json!({"url": ""}), 1000).is_err());
        assert!(matches!(
            Content::parse(MessageKind::File, json!({"url": "u".repeat(100)}), 50),
            Err(ValidationError::TooLarge(_))
        ));
    }

    #[test]
    fn kinds_parse_by_name() {
        assert_eq!(MessageKind::parse("text").unwrap(), MessageKind::Text);
        assert!(MessageKind::parse("video").is_err());
    }
}

//! Decoding of client frames (simd-json into a borrowed DOM, then serde into
//! one struct per event), with the checks of [`crate::domain`] applied.

use serde::Deserialize;
use simd_json::prelude::*;
use simd_json::BorrowedValue;

use super::ErrorCode;
use crate::domain::{
    ClientMessageId, Content, ConversationId, MessageId, MessageKind, Seq, ValidationError,
};

/// Most messages one `sync` page returns.
pub const MAX_SYNC_PAGE: i64 = 200;
/// Default page size of `sync` and `resume`.
pub const DEFAULT_SYNC_PAGE: i64 = 50;
/// Most conversations one `resume` names.
pub const MAX_RESUME: usize = 100;

/// A client's correlation id, echoed on the one reply to its frame.
pub type Ref = String;

/// Longest `ref` accepted; longer ones are refused so replies stay small.
pub const MAX_REF_LEN: usize = 128;

/// Longest token `refresh_token` takes: ours are about 200 bytes; 4 KiB
/// leaves room for an issuer's extra claims and bounds what is verified.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Limits that depend on configuration.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Largest message content in bytes (text length, or encoded attachment).
    pub max_content_bytes: usize,
}

#[derive(Debug, PartialEq)]
pub struct Request {
    pub r#ref: Option<Ref>,
    pub event: ClientEvent,
}

#[derive(Debug, PartialEq)]
pub enum ClientEvent {
    JoinConversation {
        conversation_id: ConversationId,
    },
    LeaveConversation {
        conversation_id: ConversationId,
    },
    SendMessage(SendMessage),
    Typing {
        conversation_id: ConversationId,
        is_typing: bool,
    },
    /// The client has received the conversation up to `seq`.
    Delivered {
        conversation_id: ConversationId,
        seq: Seq,
    },
    /// The client has read the conversation up to `seq`.
    Read {
        conversation_id: ConversationId,
        seq: Seq,
    },
    /// Messages after `after_seq`, then live delivery (joins if needed).
    Sync {
        conversation_id: ConversationId,
        after_seq: Seq,
        limit: i64,
    },
    /// `sync` for several conversations at once, after a reconnect.
    Resume {
        conversations: Vec<(ConversationId, Seq)>,
        limit: i64,
    },
    EditMessage {
        message_id: MessageId,
        content: Content,
        version: i32,
    },
    DeleteMessage {
        message_id: MessageId,
        version: i32,
    },
    Ping,
    /// A fresh token for the same user, so the connection outlives the one
    /// it was opened with.
    RefreshToken {
        token: String,
    },
}

#[derive(Debug, PartialEq)]
pub struct SendMessage {
    pub conversation_id: ConversationId,
    pub client_message_id: ClientMessageId,
    pub kind: MessageKind,
    pub content: Content,
}

/// Why a frame was refused; `ref` is kept whenever it could be read so the
/// error reply still correlates.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct DecodeError {
    pub r#ref: Option<Ref>,
    pub code: ErrorCode,
    pub message: String,
}

impl DecodeError {
    fn new(r#ref: Option<Ref>, code: ErrorCode, message: impl Into<String>) -> Self {
        DecodeError {
            r#ref,
            code,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
struct ConversationWire {
    conversation_id: uuid::Uuid,
}

#[derive(Deserialize)]
struct SendWire {
    conversation_id: uuid::Uuid,
    client_message_id: String,
    #[serde(default)]
    kind: Option<String>,
    content: serde_json::Value,
}

#[derive(Deserialize)]
struct SeqWire {
    conversation_id: uuid::Uuid,
    seq: i64,
}

#[derive(Deserialize)]
struct SyncWire {
    conversation_id: uuid::Uuid,
    #[serde(default)]
    after_seq: i64,
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Deserialize)]
struct ResumeItem {
    conversation_id: uuid::Uuid,
    #[serde(default)]
    after_seq: i64,
}

#[derive(Deserialize)]
struct ResumeWire {
    conversations: Vec<ResumeItem>,
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Deserialize)]
struct EditWire {
    message_id: uuid::Uuid,
    content: serde_json::Value,
    version: i32,
}

#[derive(Deserialize)]
struct DeleteWire {
    message_id: uuid::Uuid,
    version: i32,
}

#[derive(Deserialize)]
struct RefreshWire {
    token: String,
}

#[derive(Deserialize)]
struct TypingWire {
    conversation_id: uuid::Uuid,
    is_typing: bool,
}

/// Decode one text frame. simd-json parses in place, hence `&mut`.
pub fn decode(buf: &mut [u8], limits: DecodeLimits) -> Result<Request, DecodeError> {
    // Before any parse: the parser and serde recurse per level.
    super::depth::check(buf, super::depth::MAX_DEPTH).map_err(|_| {
        DecodeError::new(
            None,
            ErrorCode::BadRequest,
            format!("JSON nested deeper than {} levels", super::depth::MAX_DEPTH),
        )
    })?;
    let value = simd_json::to_borrowed_value(buf)
        .map_err(|e| DecodeError::new(None, ErrorCode::BadRequest, not_json(&e)))?;
    let obj = value.as_object().ok_or_else(|| {
        DecodeError::new(None, ErrorCode::BadRequest, "a frame must be a JSON object")
    })?;

    let r#ref = match obj.get("ref") {
        None | Some(BorrowedValue::Static(simd_json::StaticNode::Null)) => None,
        Some(v) => match v.as_str() {
            Some(s) if s.len() <= MAX_REF_LEN => Some(s.to_owned()),
            Some(_) => {
                return Err(DecodeError::new(
                    None,
                    ErrorCode::BadRequest,
                    format!("ref is longer than {MAX_REF_LEN} bytes"),
                ))
            }
            None => {
                return Err(DecodeError::new(
                    None,
                    ErrorCode::BadRequest,
                    "ref must be a string",
                ))
            }
        },
    };

    let ty = match obj.get("type").and_then(|v| v.as_str()) {
        Some(t) => t.to_owned(),
        None => {
            return Err(DecodeError::new(
                r#ref,
                ErrorCode::BadRequest,
                "missing string field `type`",
            ))
        }
    };

    let event = match decode_event(&ty, value, limits) {
        Ok(ev) => ev,
        Err((code, message)) => return Err(DecodeError::new(r#ref, code, message)),
    };
    Ok(Request { r#ref, event })
}

fn fields<'de, T: Deserialize<'de>>(
    ty: &str,
    value: BorrowedValue<'de>,
) -> Result<T, (ErrorCode, String)> {
    T::deserialize(value).map_err(|e| (ErrorCode::Invalid, format!("{ty}: {}", wrong_field(&e))))
}

/// Why a frame is not JSON, in words, with the byte simd-json stopped at
/// (its own text is the name of an internal enum: "ExpectedNull at character 0").
fn not_json(e: &simd_json::Error) -> String {
    use simd_json::ErrorType as E;
    let reason = match e.error() {
        E::Eof => "unexpected end of input",
        E::UnterminatedString => "unterminated string",
        E::InvalidEscape | E::InvalidUnicodeEscape | E::InvalidUnicodeCodepoint => {
            "invalid escape in a string"
        }
        E::InvalidNumber | E::InvalidExponent | E::Overflow => "invalid number",
        E::InvalidUtf8 => "invalid UTF-8",
        E::TrailingData => "more data after the JSON value",
        E::ExpectedObjectKey | E::KeyMustBeAString | E::BadKeyType => {
            "expected an object key (a string)"
        }
        E::ExpectedObjectColon => "expected ':' after an object key",
        E::ExpectedMapComma | E::ExpectedMapEnd => "expected ',' or '}' in an object",
        E::ExpectedArrayComma => "expected ',' or ']' in an array",
        E::InputTooLarge => "input too large",
        E::ExpectedNull
        | E::ExpectedTrue
        | E::ExpectedFalse
        | E::ExpectedNumber
        | E::ExpectedArrayContent
        | E::ExpectedObjectContent
        | E::UnexpectedCharacter
        | E::Syntax
        | E::Parser
        | E::NoStructure => "unexpected character",
        _ => return "not valid JSON".to_owned(),
    };
    format!("not JSON: {reason} at byte {}", e.index())
}

/// serde's sentence about a field ("missing field `seq`", "invalid type:
/// string \"x\", expected i64"), out of simd-json's wrapper and with Rust
/// type names put in words.
fn wrong_field(e: &simd_json::Error) -> String {
    let text = match e.error() {
        simd_json::ErrorType::Serde(s) => s.clone(),
        simd_json::ErrorType::ExpectedString => "expected a string".to_owned(),
        simd_json::ErrorType::ExpectedMap => "expected an object".to_owned(),
        simd_json::ErrorType::ExpectedArray => "expected an array".to_owned(),
        simd_json::ErrorType::ExpectedBoolean => "expected true or false".to_owned(),
        simd_json::ErrorType::ExpectedInteger
        | simd_json::ErrorType::ExpectedSigned
        | simd_json::ErrorType::ExpectedUnsigned => "expected an integer".to_owned(),
        _ => "a field is missing or of the wrong type".to_owned(),
    };
    text.replace("expected i64", "expected a 64-bit integer")
        .replace("expected i32", "expected a 32-bit integer")
}

fn decode_event(
    ty: &str,
    value: BorrowedValue<'_>,
    limits: DecodeLimits,
) -> Result<ClientEvent, (ErrorCode, String)> {
    match ty {
        "join_conversation" => {
            let w: ConversationWire = fields(ty, value)?;
            Ok(ClientEvent::JoinConversation {
                conversation_id: ConversationId(w.conversation_id),
            })
        }
        "leave_conversation" => {
            let w: ConversationWire = fields(ty, value)?;
            Ok(ClientEvent::LeaveConversation {
                conversation_id: ConversationId(w.conversation_id),
            })
        }
        "send_message" => {
            let w: SendWire = fields(ty, value)?;
            let kind = match w.kind.as_deref() {
                None => MessageKind::Text,
                Some(k) => MessageKind::parse(k).map_err(validation)?,
            };
            if kind == MessageKind::System {
                return Err((
                    ErrorCode::Invalid,
                    "kind \"system\" is reserved to the server".to_owned(),
                ));
            }
            let client_message_id =
                ClientMessageId::parse(&w.client_message_id).map_err(validation)?;
            let content =
                Content::parse(kind, w.content, limits.max_content_bytes).map_err(validation)?;
            Ok(ClientEvent::SendMessage(SendMessage {
                conversation_id: ConversationId(w.conversation_id),
                client_message_id,
                kind,
                content,
            }))
        }
        "typing" => {
            let w: TypingWire = fields(ty, value)?;
            Ok(ClientEvent::Typing {
                conversation_id: ConversationId(w.conversation_id),
                is_typing: w.is_typing,
            })
        }
        "delivered" | "read" => {
            let w: SeqWire = fields(ty, value)?;
            let seq = non_negative("seq", w.seq)?;
            let conversation_id = ConversationId(w.conversation_id);
            Ok(if ty == "read" {
                ClientEvent::Read {
                    conversation_id,
                    seq,
                }
            } else {
                ClientEvent::Delivered {
                    conversation_id,
                    seq,
                }
            })
        }
        "sync" => {
            let w: SyncWire = fields(ty, value)?;
            Ok(ClientEvent::Sync {
                conversation_id: ConversationId(w.conversation_id),
                after_seq: non_negative("after_seq", w.after_seq)?,
                limit: page_limit(w.limit)?,
            })
        }
        "resume" => {
            let w: ResumeWire = fields(ty, value)?;
            if w.conversations.len() > MAX_RESUME {
                return Err((
                    ErrorCode::Invalid,
                    format!("resume names at most {MAX_RESUME} conversations"),
                ));
            }
            let mut conversations = Vec::with_capacity(w.conversations.len());
            for item in w.conversations {
                conversations.push((
                    ConversationId(item.conversation_id),
                    non_negative("after_seq", item.after_seq)?,
                ));
            }
            Ok(ClientEvent::Resume {
                conversations,
                limit: page_limit(w.limit)?,
            })
        }
        "edit_message" => {
            let w: EditWire = fields(ty, value)?;
            // Only text is edited; an attachment is replaced by a new message.
            let content = Content::parse(MessageKind::Text, w.content, limits.max_content_bytes)
                .map_err(validation)?;
            Ok(ClientEvent::EditMessage {
                message_id: MessageId(w.message_id),
                content,
                version: version(w.version)?,
            })
        }
        "delete_message" => {
            let w: DeleteWire = fields(ty, value)?;
            Ok(ClientEvent::DeleteMessage {
                message_id: MessageId(w.message_id),
                version: version(w.version)?,
            })
        }
        "ping" => Ok(ClientEvent::Ping),
        "refresh_token" => {
            let w: RefreshWire = fields(ty, value)?;
            if w.token.is_empty() {
                return Err((ErrorCode::Invalid, "token must not be empty".to_owned()));
            }
            if w.token.len() > MAX_TOKEN_LEN {
                return Err((
                    ErrorCode::TooLarge,
                    format!("token is longer than {MAX_TOKEN_LEN} bytes"),
                ));
            }
            Ok(ClientEvent::RefreshToken { token: w.token })
        }
        other => Err((
            ErrorCode::BadRequest,
            format!("unknown event type {other:?}"),
        )),
    }
}

fn non_negative(name: &str, v: i64) -> Result<Seq, (ErrorCode, String)> {
    if v < 0 {
        return Err((ErrorCode::Invalid, format!("{name} must not be negative")));
    }
    Ok(Seq(v))
}

fn page_limit(limit: Option<i64>) -> Result<i64, (ErrorCode, String)> {
    match limit {
        None => Ok(DEFAULT_SYNC_PAGE),
        Some(l) if (1..=MAX_SYNC_PAGE).contains(&l) => Ok(l),
        Some(_) => Err((
            ErrorCode::Invalid,
            format!("limit must be between 1 and {MAX_SYNC_PAGE}"),
        )),
    }
}

fn version(v: i32) -> Result<i32, (ErrorCode, String)> {
    if v < 1 {
        return Err((ErrorCode::Invalid, "version must be at least 1".into()));
    }
    Ok(v)
}

fn validation(e: ValidationError) -> (ErrorCode, String) {
    match e {
        ValidationError::Invalid(m) => (ErrorCode::Invalid, m),
        ValidationError::TooLarge(m) => (ErrorCode::TooLarge, m),
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;

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
        .map_err(|e| DecodeError::new(None, ErrorCode::BadRequest, format!("not JSON: {e}")))?;
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
    T::deserialize(value).map_err(|e| (ErrorCode::Invalid, format!("{ty}: {e}")))
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
mod tests {
    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits {
        max_content_bytes: 16,
    };
    const CONV: &str = "0190f3a4-3b1c-7cc2-9d1e-1a2b3c4d5e6f";

    fn dec(s: &str) -> Result<Request, DecodeError> {
        let mut buf = s.as_bytes().to_vec();
        decode(&mut buf, LIMITS)
    }

    fn err(s: &str) -> DecodeError {
        dec(s).expect_err("expected a decode error")
    }

    #[test]
    fn decodes_every_event() {
        let r = dec(&format!(
            r#"{{"type":"join_conversation","ref":"1","conversation_id":"{CONV}"}}"#
        ))
        .unwrap();
        assert_eq!(r.r#ref.as_deref(), Some("1"));
        assert!(matches!(r.event, ClientEvent::JoinConversation { .. }));

        let r = dec(&format!(
            r#"{{"type":"leave_conversation","conversation_id":"{CONV}"}}"#
        ))
        .unwrap();
        assert_eq!(r.r#ref, None);
        assert!(matches!(r.event, ClientEvent::LeaveConversation { .. }));

        let r = dec(&format!(
            r#"{{"type":"send_message","ref":"a","conversation_id":"{CONV}","client_message_id":"c1","content":"hi"}}"#
        ))
        .unwrap();
        match r.event {
            ClientEvent::SendMessage(m) => {
                assert_eq!(m.kind, MessageKind::Text);
                assert_eq!(m.client_message_id.as_str(), "c1");
                assert_eq!(m.content.as_json(), "hi");
            }
            other => panic!("unexpected {other:?}"),
        }

        let r = dec(&format!(
            r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":"c1","kind":"image","content":{{"url":"u"}}}}"#
        ))
        .unwrap();
        assert!(matches!(
            r.event,
            ClientEvent::SendMessage(SendMessage {
                kind: MessageKind::Image,
                ..
            })
        ));

        let r = dec(&format!(
            r#"{{"type":"typing","conversation_id":"{CONV}","is_typing":true}}"#
        ))
        .unwrap();
        assert!(matches!(
            r.event,
            ClientEvent::Typing {
                is_typing: true,
                ..
            }
        ));

        assert_eq!(
            dec(r#"{"type":"ping","ref":"p"}"#).unwrap().event,
            ClientEvent::Ping
        );
    }

    #[test]
    fn not_json_is_bad_request() {
        for s in ["", "hello", "{", "{\"type\":", "[1,2", "nul"] {
            let e = err(s);
            assert_eq!(e.code, ErrorCode::BadRequest, "input {s:?}");
            assert_eq!(e.r#ref, None);
        }
    }

    #[test]
    fn non_object_is_bad_request() {
        for s in ["[]", "1", "\"send_message\"", "null", "true"] {
            assert_eq!(err(s).code, ErrorCode::BadRequest, "input {s:?}");
        }
    }

    #[test]
    fn missing_or_unknown_type_is_bad_request_and_keeps_ref() {
        let e = err(r#"{"ref":"r1"}"#);
        assert_eq!(
            (e.code, e.r#ref.as_deref()),
            (ErrorCode::BadRequest, Some("r1"))
        );
        let e = err(r#"{"type":5,"ref":"r2"}"#);
        assert_eq!(
            (e.code, e.r#ref.as_deref()),
            (ErrorCode::BadRequest, Some("r2"))
        );
        let e = err(r#"{"type":"dance","ref":"r3"}"#);
        assert_eq!(
            (e.code, e.r#ref.as_deref()),
            (ErrorCode::BadRequest, Some("r3"))
        );
        assert!(e.message.contains("dance"));
    }

    #[test]
    fn bad_ref_is_bad_request() {
        assert_eq!(
            err(r#"{"type":"ping","ref":7}"#).code,
            ErrorCode::BadRequest
        );
        let long = "r".repeat(MAX_REF_LEN + 1);
        assert_eq!(
            err(&format!(r#"{{"type":"ping","ref":"{long}"}}"#)).code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn missing_fields_are_invalid() {
        let e = err(r#"{"type":"join_conversation","ref":"x"}"#);
        assert_eq!(
            (e.code, e.r#ref.as_deref()),
            (ErrorCode::Invalid, Some("x"))
        );
        assert!(e.message.contains("conversation_id"), "{}", e.message);
        let e = err(&format!(
            r#"{{"type":"send_message","conversation_id":"{CONV}","content":"hi"}}"#
        ));
        assert_eq!(e.code, ErrorCode::Invalid);
        assert!(e.message.contains("client_message_id"), "{}", e.message);
        let e = err(&format!(
            r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":"c"}}"#
        ));
        assert_eq!(e.code, ErrorCode::Invalid);
        assert_eq!(
            err(&format!(
                r#"{{"type":"typing","conversation_id":"{CONV}"}}"#
            ))
            .code,
            ErrorCode::Invalid
        );
    }

    #[test]
    fn wrong_types_are_invalid() {
        for s in [
            r#"{"type":"join_conversation","conversation_id":"not-a-uuid"}"#.to_owned(),
            r#"{"type":"join_conversation","conversation_id":42}"#.to_owned(),
            format!(r#"{{"type":"typing","conversation_id":"{CONV}","is_typing":"yes"}}"#),
            format!(
                r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":5,"content":"hi"}}"#
            ),
            format!(
                r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":"c","content":12}}"#
            ),
            format!(
                r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":"c","kind":"video","content":"x"}}"#
            ),
            format!(
                r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":"c","kind":"system","content":"x"}}"#
            ),
            format!(
                r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":"","content":"x"}}"#
            ),
            format!(
                r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":"{}","content":"x"}}"#,
                "c".repeat(65)
            ),
        ] {
            assert_eq!(err(&s).code, ErrorCode::Invalid, "input {s}");
        }
    }

    #[test]
    fn oversize_content_is_too_large() {
        let e = err(&format!(
            r#"{{"type":"send_message","ref":"big","conversation_id":"{CONV}","client_message_id":"c","content":"{}"}}"#,
            "x".repeat(17)
        ));
        assert_eq!(
            (e.code, e.r#ref.as_deref()),
            (ErrorCode::TooLarge, Some("big"))
        );
    }

    #[test]
    fn decodes_realtime_events_and_checks_them() {
        let r = dec(&format!(
            r#"{{"type":"read","conversation_id":"{CONV}","seq":7}}"#
        ))
        .unwrap();
        assert!(matches!(r.event, ClientEvent::Read { seq: Seq(7), .. }));
        let r = dec(&format!(
            r#"{{"type":"delivered","conversation_id":"{CONV}","seq":0}}"#
        ))
        .unwrap();
        assert!(matches!(
            r.event,
            ClientEvent::Delivered { seq: Seq(0), .. }
        ));
        assert_eq!(
            err(&format!(
                r#"{{"type":"read","conversation_id":"{CONV}","seq":-1}}"#
            ))
            .code,
            ErrorCode::Invalid
        );
        let r = dec(&format!(r#"{{"type":"sync","conversation_id":"{CONV}"}}"#)).unwrap();
        assert!(matches!(
            r.event,
            ClientEvent::Sync {
                after_seq: Seq(0),
                limit: DEFAULT_SYNC_PAGE,
                ..
            }
        ));
        assert_eq!(
            err(&format!(
                r#"{{"type":"sync","conversation_id":"{CONV}","limit":0}}"#
            ))
            .code,
            ErrorCode::Invalid
        );
        let r = dec(&format!(
            r#"{{"type":"resume","conversations":[{{"conversation_id":"{CONV}","after_seq":3}}]}}"#
        ))
        .unwrap();
        assert!(
            matches!(r.event, ClientEvent::Resume { ref conversations, .. } if conversations.len() == 1)
        );
        let many: Vec<String> = (0..=MAX_RESUME)
            .map(|_| format!(r#"{{"conversation_id":"{CONV}"}}"#))
            .collect();
        assert_eq!(
            err(&format!(
                r#"{{"type":"resume","conversations":[{}]}}"#,
                many.join(",")
            ))
            .code,
            ErrorCode::Invalid
        );
        let r = dec(&format!(
            r#"{{"type":"edit_message","message_id":"{CONV}","content":"new","version":1}}"#
        ))
        .unwrap();
        assert!(matches!(
            r.event,
            ClientEvent::EditMessage { version: 1, .. }
        ));
        assert_eq!(
            err(&format!(
                r#"{{"type":"edit_message","message_id":"{CONV}","content":"new","version":0}}"#
            ))
            .code,
            ErrorCode::Invalid
        );
        assert_eq!(
            err(&format!(
                r#"{{"type":"edit_message","message_id":"{CONV}","content":"","version":1}}"#
            ))
            .code,
            ErrorCode::Invalid
        );
        let r = dec(&format!(
            r#"{{"type":"delete_message","message_id":"{CONV}","version":2}}"#
        ))
        .unwrap();
        assert!(matches!(
            r.event,
            ClientEvent::DeleteMessage { version: 2, .. }
        ));
        assert_eq!(
            err(&format!(
                r#"{{"type":"delete_message","message_id":"{CONV}"}}"#
            ))
            .code,
            ErrorCode::Invalid
        );
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        // Each of these aborted the process with a stack overflow when parsed.
        let frame = "[".repeat(16_000);
        assert_eq!(err(&frame).code, ErrorCode::BadRequest);
        let content = format!(
            r#"{{"type":"send_message","ref":"d","conversation_id":"{CONV}","client_message_id":"c","content":{}}}"#,
            "[".repeat(4000)
        );
        let e = err(&content);
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("nested deeper"), "{}", e.message);
        // Nesting within the limit still reaches the event's own checks.
        let nested = format!(
            r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":"c","kind":"image","content":{{"url":"u","meta":{}{}}}}}"#,
            "[".repeat(20),
            "]".repeat(20)
        );
        assert_ne!(err(&nested).code, ErrorCode::BadRequest);
    }

    #[test]
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let r = dec(r#"{"type":"ping","future_field":{"a":1}}"#).unwrap();
        assert_eq!(r.event, ClientEvent::Ping);
    }
}

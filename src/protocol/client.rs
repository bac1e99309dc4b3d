//! Decoding of client frames (simd-json into a borrowed DOM, then serde into
//! one struct per event), with the checks of [`crate::domain`] applied.

use serde::Deserialize;
use simd_json::prelude::*;
use simd_json::BorrowedValue;

use super::ErrorCode;
use crate::domain::{ClientMessageId, Content, ConversationId, MessageKind, ValidationError};

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
struct TypingWire {
    conversation_id: uuid::Uuid,
    is_typing: bool,
}

/// Decode one text frame. simd-json parses in place, hence `&mut`.
pub fn decode(buf: &mut [u8], limits: DecodeLimits) -> Result<Request, DecodeError> {
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
        "ping" => Ok(ClientEvent::Ping),
        other => Err((
            ErrorCode::BadRequest,
            format!("unknown event type {other:?}"),
        )),
    }
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
    fn unknown_fields_are_ignored_for_forward_compatibility() {
        let r = dec(r#"{"type":"ping","future_field":{"a":1}}"#).unwrap();
        assert_eq!(r.event, ClientEvent::Ping);
    }
}

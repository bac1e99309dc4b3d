//! Decoding tests, kept beside the decoder they exercise.
use super::*;
use crate::protocol::fuzz::{self, json_like};
use proptest::prelude::*;

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

proptest! {
    #![proptest_config(fuzz::config())]

    /// No frame a client can send panics or aborts the decoder; whatever it
    /// refuses, it refuses with a contract code.
    #[test]
    fn any_frame_decodes_or_is_refused(mut frame in json_like()) {
        let deep = crate::protocol::depth::check(&frame, crate::protocol::depth::MAX_DEPTH).is_err();
        match decode(&mut frame, LIMITS) {
            Ok(_) => prop_assert!(!deep),
            Err(e) => {
                prop_assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::Invalid | ErrorCode::TooLarge), "{e:?}");
                prop_assert!(!e.message.is_empty());
            }
        }
    }
}

#[test]
fn error_messages_are_sentences_not_library_enums() {
    let cases = [
        (
            "not json".to_owned(),
            "not JSON: unexpected character at byte 0",
        ),
        (
            "{\"a\":1,}".to_owned(),
            "not JSON: expected an object key (a string) at byte 7",
        ),
        (
            format!(
                r#"{{"type":"send_message","conversation_id":"{CONV}","client_message_id":5,"content":"hi"}}"#
            ),
            "send_message: invalid type: integer `5`, expected a string",
        ),
        (
            format!(r#"{{"type":"send_message","conversation_id":"{CONV}","content":"hi"}}"#),
            "send_message: missing field `client_message_id`",
        ),
        (
            format!(r#"{{"type":"delivered","conversation_id":"{CONV}","seq":1.5}}"#),
            "delivered: invalid type: floating point `1.5`, expected a 64-bit integer",
        ),
        (
            format!(r#"{{"type":"delete_message","message_id":"{CONV}","version":99999999999}}"#),
            "delete_message: invalid value: integer `99999999999`, expected a 32-bit integer",
        ),
    ];
    for (frame, want) in cases {
        let e = err(&frame);
        assert_eq!(e.message, want, "{frame}");
        for internal in ["Serde(", "Expected", "at character", "i64", "i32"] {
            assert!(!e.message.contains(internal), "{}", e.message);
        }
    }
}

#[test]
fn refresh_token_decodes_and_is_checked() {
    let r = dec(r#"{"type":"refresh_token","ref":"t","token":"a.b.c"}"#).unwrap();
    assert_eq!(r.r#ref.as_deref(), Some("t"));
    assert_eq!(
        r.event,
        ClientEvent::RefreshToken {
            token: "a.b.c".into()
        }
    );
    let e = err(r#"{"type":"refresh_token","ref":"t"}"#);
    assert_eq!(
        (e.code, e.r#ref.as_deref(), e.message.as_str()),
        (
            ErrorCode::Invalid,
            Some("t"),
            "refresh_token: missing field `token`"
        )
    );
    assert_eq!(
        err(r#"{"type":"refresh_token","token":""}"#).code,
        ErrorCode::Invalid
    );
    assert_eq!(
        err(r#"{"type":"refresh_token","token":7}"#).code,
        ErrorCode::Invalid
    );
    let long = format!(
        r#"{{"type":"refresh_token","token":"{}"}}"#,
        "a".repeat(MAX_TOKEN_LEN + 1)
    );
    assert_eq!(err(&long).code, ErrorCode::TooLarge);
}

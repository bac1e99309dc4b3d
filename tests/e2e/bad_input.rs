use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_errors_and_the_connection_survives() {
    let app = TestApp::spawn().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let mut c = app.ws(a).await;
    c.join(conv).await;

    c.send_raw(WsMessage::Text("this is not json".into())).await;
    let e = c.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{e}"
    );

    c.send_raw(WsMessage::Text("[1,2,3]".into())).await;
    assert_eq!(c.recv().await["code"], "bad_request");

    let e = c.request(json!({"type": "fly_to_the_moon"})).await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("fly_to_the_moon"));

    let e = c
        .request(json!({"type": "join_conversation", "conversation_id": "nope"}))
        .await;
    assert_eq!(e["code"], "invalid", "{e}");

    let e = c
        .request(json!({"type": "send_message", "conversation_id": conv, "content": "no id"}))
        .await;
    assert_eq!(e["code"], "invalid");
    assert!(e["message"].as_str().unwrap().contains("client_message_id"));

    let e = c
        .request(json!({"type": "send_message", "conversation_id": conv, "client_message_id": "k", "kind": "system", "content": "spoof"}))
        .await;
    assert_eq!(e["code"], "invalid");

    let e = c
        .request(json!({"type": "send_message", "conversation_id": conv, "client_message_id": "big", "content": "x".repeat(5000)}))
        .await;
    assert_eq!(e["code"], "too_large", "{e}");

    // Postgres cannot store NUL: refused here, so it never poisons the queue.
    let e = c
        .request(json!({"type": "send_message", "conversation_id": conv, "client_message_id": "nul", "content": "a\u{0}b"}))
        .await;
    assert_eq!(e["code"], "invalid", "{e}");

    c.send_raw(WsMessage::Binary(vec![1u8, 2, 3].into())).await;
    assert_eq!(c.recv().await["code"], "bad_request");

    // Still usable: nothing above was stored or broadcast, and a good send works.
    let ack = c.send_text(conv, "good", "fine").await;
    assert_eq!(ack["type"], "ack");
    let m = c.recv_type("new_message").await;
    assert_eq!(m["message"]["content"], "fine");
    let rows = eventually("the one good message stored", || async {
        let rows = stored(&app.pool, conv).await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].2, "good");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_size_limit_closes_with_1009() {
    let app = TestApp::spawn().await;
    let mut c = app.ws(uid()).await;
    c.send_raw(WsMessage::Text("y".repeat(70 * 1024).into()))
        .await;
    assert_eq!(c.expect_close().await, 1009);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_messages_are_reassembled_within_the_limit() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let app = TestApp::spawn().await;
    let mut c = app.ws(uid()).await;
    let text = br#"{"type":"ping","ref":"frag"}"#;
    let (head, tail) = text.split_at(10);
    c.send_raw(WsMessage::Frame(Frame::message(
        head.to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    c.send_raw(WsMessage::Frame(Frame::message(
        tail.to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    let r = c.recv().await;
    assert_eq!(
        (r["type"].as_str(), r["ref"].as_str()),
        (Some("ack"), Some("frag")),
        "{r}"
    );

    // Fragments adding up past the limit close the connection.
    let chunk = vec![b' '; 40 * 1024];
    c.send_raw(WsMessage::Frame(Frame::message(
        chunk.clone(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await;
    c.send_raw(WsMessage::Frame(Frame::message(
        chunk,
        OpCode::Data(Data::Continue),
        true,
    )))
    .await;
    assert_eq!(c.expect_close().await, 1009);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_refused_and_nothing_crashes() {
    let app = TestApp::spawn().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let mut c = app.ws(a).await;
    c.join(conv).await;

    // 16,000 nested arrays in a 32 KB frame once overflowed a runtime thread's
    // stack and aborted the process.
    c.send_raw(WsMessage::Text("[".repeat(16_000).into())).await;
    let e = c.recv().await;
    assert_eq!(e["code"], "bad_request", "{e}");
    assert!(e["message"].as_str().unwrap().contains("nested"), "{e}");

    // The same inside send_message and edit_message content.
    for ty in ["send_message", "edit_message"] {
        let frame = format!(
            r#"{{"type":"{ty}","ref":"deep","conversation_id":"{conv}","message_id":"{conv}","version":1,"client_message_id":"d","content":{}}}"#,
            "[".repeat(4000)
        );
        c.send_raw(WsMessage::Text(frame.into())).await;
        let e = c.recv().await;
        // Refused before parsing, so like unparseable JSON it carries no ref.
        assert_eq!(e["code"], "bad_request", "{e}");
        assert!(e.get("ref").is_none(), "{e}");
    }

    // HTTP bodies are guarded the same way.
    let body = format!(r#"{{"member_ids":{}}}"#, "[".repeat(10_000));
    let (status, v) = app
        .http("POST", "/v1/conversations", Some(a), Some(&body))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "bad_request", "{v}");

    // The connection, and the process, are still there.
    let ack = c.send_text(conv, "after", "still here").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (status, _) = app.http("GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    app.stop().await;
}

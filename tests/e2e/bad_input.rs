use postline::config::Config;
use serde_json::json;
use tokio::io::AsyncWriteExt;
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
    // In words, not the parser's internal enum.
    assert_eq!(e["message"], "not JSON: unexpected character at byte 0");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_exactly_the_maximum_size_is_accepted() {
    let app = TestApp::spawn().await;
    let max = Config::with_secret(SECRET).gateway.max_frame_bytes;
    let mut c = app.ws(uid()).await;
    let head = r#"{"type":"ping","ref":"max","pad":""#;
    let tail = r#""}"#;
    let frame = format!("{head}{}{tail}", "x".repeat(max - head.len() - tail.len()));
    assert_eq!(frame.len(), max);
    c.send_raw(WsMessage::Text(frame.into())).await;
    let r = c.recv().await;
    assert_eq!(
        (r["type"].as_str(), r["ref"].as_str()),
        (Some("ack"), Some("max")),
        "{r}"
    );
    // One byte more is over the limit.
    c.send_raw(WsMessage::Text("y".repeat(max + 1).into()))
        .await;
    assert_eq!(c.expect_close().await, 1009);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_one_frame_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let app = TestApp::spawn().await;
    let mut c = app.ws(uid()).await;
    c.send_raw(WsMessage::Frame(Frame::message(
        vec![b'"', 0xff, 0xfe, b'"'],
        OpCode::Data(Data::Text),
        true,
    )))
    .await;
    assert_eq!(c.expect_close().await, 1007);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmasked_client_frame_closes_with_1002() {
    let app = TestApp::spawn().await;
    let mut s = raw_ws(app.addr, &app.token(uid())).await;
    let payload = br#"{"type":"ping","ref":"bare"}"#;
    let mut frame = vec![0x81, payload.len() as u8];
    frame.extend_from_slice(payload);
    s.write_all(&frame).await.unwrap();
    // Frames until the close: hello, then a close frame with 1002 (no ack).
    let code = loop {
        let (opcode, body) = read_server_frame(&mut s).await;
        match opcode {
            0x8 => break u16::from_be_bytes([body[0], body[1]]),
            0x1 => assert!(
                !String::from_utf8_lossy(&body).contains("bare"),
                "an unmasked frame was answered"
            ),
            _ => {}
        }
    };
    assert_eq!(code, 1002);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_pings_never_drops_the_connection() {
    let app = TestApp::spawn().await;
    let mut c = app.ws(uid()).await;
    for i in 0..200u32 {
        c.send_raw(WsMessage::Ping(i.to_be_bytes().to_vec().into()))
            .await;
    }
    let r = c.request(json!({"type": "ping"})).await;
    assert_eq!(r["type"], "ack", "{r}");
    app.stop().await;
}

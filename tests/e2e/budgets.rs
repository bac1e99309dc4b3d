//! Byte budgets of each connection's outbox: a client that pipelines while
//! it reads loses nothing, one that stalls is closed 4008 (the close
//! replacing what was still queued), and a sync page is cut to fit.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::harness::*;
use crate::realtime::wait_stored;

/// An app whose connections have a small outbox budget.
async fn small_budget(bytes: usize) -> TestApp {
    let mut opts = Options::default();
    opts.config.gateway.outbox_bytes = bytes;
    TestApp::spawn_with(opts).await
}

fn text(v: Value) -> WsMessage {
    WsMessage::Text(v.to_string().into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_2000_pings_while_reading_gets_2000_acks_and_no_close() {
    // 16 KiB of replies is about 110 pongs: the client is far ahead of it.
    let app = small_budget(16 * 1024).await;
    let url = format!("ws://{}/ws?token={}", app.addr, app.token(uid()));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    let n = 2000;
    let writer = tokio::spawn(async move {
        for i in 0..n {
            tx.send(text(json!({"type": "ping", "ref": format!("p{i}")})))
                .await
                .unwrap();
        }
        tx
    });
    let mut acks = 0;
    while acks < n {
        let msg = tokio::time::timeout(WAIT, rx.next())
            .await
            .expect("an ack within the wait")
            .expect("the connection stays open")
            .unwrap();
        match msg {
            WsMessage::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "hello" {
                    continue;
                }
                assert_eq!(
                    (v["type"].as_str(), v["ref"].as_str()),
                    (Some("ack"), Some(format!("p{acks}").as_str())),
                    "replies come in order, none dropped"
                );
                acks += 1;
            }
            WsMessage::Close(c) => panic!("closed after {acks} acks: {c:?}"),
            _ => {}
        }
    }
    // Still open and answering.
    let mut tx = writer.await.unwrap();
    tx.send(text(json!({"type": "ping", "ref": "last"})))
        .await
        .unwrap();
    let last = tokio::time::timeout(WAIT, rx.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&last, Ok(WsMessage::Text(t)) if t.contains("\"last\"")),
        "{last:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_closed_4008_after_an_in_order_prefix_of_its_frames() {
    // Room for the sender's burst of message_persisted, far less than what
    // the stalled client is sent; large messages, so that takes few sends.
    let mut opts = Options::default();
    opts.config.gateway.outbox_bytes = 128 * 1024;
    opts.config.gateway.max_content_bytes = 60_000;
    // Its typing indicator must not expire by itself during the test.
    opts.config.gateway.typing_ttl = Duration::from_secs(60);
    let app = TestApp::spawn_with(opts).await;
    let (a, s) = (uid(), uid());
    let conv = app.conversation(a, &[s]).await;
    let mut sender = app.ws(a).await;
    sender.join(conv).await;
    // The stalled client: a tiny receive buffer; it shows itself typing,
    // then reads nothing.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(app.addr).await.unwrap();
    let url = format!("ws://{}/ws?token={}", app.addr, app.token(s));
    let (ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    let mut stalled = Client::from_stream(ws);
    stalled.recv_type("hello").await;
    stalled.join(conv).await;
    let ack = stalled
        .request(json!({"type": "typing", "conversation_id": conv, "is_typing": true}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    sender.recv_type("typing").await;

    // 60 KB a message until the server gives up on it, which the sender sees
    // as its typing indicator turned off when its session ends. One send at
    // a time: the sender reads its acks (echoes kept aside) as a browser would.
    let payload = "z".repeat(59_000);
    let ended = |v: &Value| v["type"] == "typing" && v["is_typing"] == false;
    let mut sent = 0;
    while !sender.pending_has(ended) {
        assert!(
            sent < 500,
            "30 MB sent and the stalled client is still open"
        );
        let ack = sender.send_text(conv, &format!("s{sent}"), &payload).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        sent += 1;
    }

    // It reads again, well within the 2 s the server gives a closing writer:
    // frames in the order queued, with no gap, then 4008; what was still
    // queued at the overflow was dropped for the close.
    let mut seen = 0;
    let code = loop {
        match stalled.recv_or_close().await {
            Ok(v) if v["type"] == "new_message" => {
                assert_eq!(v["message"]["client_message_id"], format!("s{seen}"));
                seen += 1;
            }
            Ok(_) => {}
            Err(code) => break code,
        }
    };
    assert_eq!(code, Some(4008), "after {seen} of {sent} messages");
    assert!(seen < sent, "all {sent} arrived: nothing was dropped");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_page_larger_than_the_budget_is_cut_and_pages_on() {
    let app = small_budget(16 * 1024).await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let mut alice = app.ws(a).await;
    alice.join(conv).await;
    let n = 12;
    for i in 0..n {
        let ack = alice
            .send_text(conv, &format!("m{i}"), &"q".repeat(3000))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    wait_stored(&app, conv, n).await;

    // A fresh connection, so nothing reached it live.
    let mut c = app.ws(a).await;
    let mut after = 0;
    let mut got = 0;
    let mut pages = 0;
    loop {
        let page = c
            .request(
                json!({"type": "sync", "conversation_id": conv, "after_seq": after, "limit": 200}),
            )
            .await;
        assert_eq!(page["type"], "ack", "{page}");
        let msgs = page["messages"].as_array().unwrap();
        assert!(
            !msgs.is_empty(),
            "a page always carries one message: {page}"
        );
        // 12 * 3 KB over a 16 KiB budget: no page carries all of it.
        assert!(
            page.to_string().len() < 16 * 1024 + 4096,
            "a page is cut to the budget"
        );
        for m in msgs {
            got += 1;
            assert_eq!(m["seq"], got, "in order, no gap");
        }
        after = page["last_seq"].as_i64().unwrap();
        pages += 1;
        if page["has_more"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(got, n as i64);
    assert!(pages >= 3, "{pages} pages");
    app.stop().await;
}

//! Typing, presence, receipts, sync and recovery, multi-device, edits and
//! slow consumers, over real sockets and real Postgres.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::*;

fn quick() -> Options {
    let mut o = Options::default();
    o.config.gateway.typing_ttl = Duration::from_millis(300);
    // Long enough that a reconnect on a loaded CI machine is still a flap.
    o.config.gateway.presence_grace = Duration::from_millis(1000);
    o
}

pub(crate) async fn send_n(
    c: &mut Client,
    conv: uuid::Uuid,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let ack = c
            .send_text(conv, &format!("{prefix}{i}"), &format!("{prefix} {i}"))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        ids.push(ack["message_id"].as_str().unwrap().to_owned());
    }
    ids
}

pub(crate) async fn wait_stored(app: &TestApp, conv: uuid::Uuid, n: usize) {
    eventually("messages stored", || async {
        (stored(&app.pool, conv).await.len() >= n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_others_is_rate_limited_and_expires_by_itself() {
    let app = TestApp::spawn_with(quick()).await;
    let Pair {
        a,
        conv,
        mut alice,
        mut bob,
        ..
    } = app.pair().await;

    let ack = alice
        .request(json!({"type": "typing", "conversation_id": conv, "is_typing": true}))
        .await;
    assert_eq!(ack["type"], "ack");
    let t = bob.recv_type("typing").await;
    assert_eq!(
        (t["user_id"].as_str(), t["is_typing"].as_bool()),
        (Some(a.to_string().as_str()), Some(true))
    );
    // A refresh sooner than the interval is refused with a hint.
    let e = alice
        .request(json!({"type": "typing", "conversation_id": conv, "is_typing": true}))
        .await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    assert!(
        e["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0 && ms <= 1000),
        "{e}"
    );
    // Not refreshed: the server turns it off for everyone.
    let started = Instant::now();
    let t = bob.recv_type("typing").await;
    assert_eq!(t["is_typing"], false);
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "expired after the ttl, not at once"
    );
    // Never persisted.
    assert!(stored(&app.pool, conv).await.is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_devices_once_absorbs_flapping_and_is_queryable() {
    let app = TestApp::spawn_with(quick()).await;
    let (a, b, stranger) = (uid(), uid(), uid());
    let conv = app.conversation(a, &[b]).await;
    let mut bob = app.ws(b).await;
    bob.join(conv).await;
    let mut outsider = app.ws(stranger).await;

    let a1 = app.ws(a).await;
    let p = bob.recv_type("presence").await;
    assert_eq!(
        (p["user_id"].as_str(), p["status"].as_str()),
        (Some(a.to_string().as_str()), Some("online"))
    );
    let a2 = app.ws(a).await;
    drop(a1);
    // A page reload: gone and back within the grace period.
    drop(a2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut a3 = app.ws(a).await;
    a3.join(conv).await;
    a3.send_text(conv, "marker", "still here").await;
    let next = bob
        .recv_where(|v| v["type"] == "presence" || v["type"] == "new_message")
        .await;
    assert_eq!(
        next["type"], "new_message",
        "no offline/online flap: {next}"
    );

    let (status, v) = app
        .http(
            "GET",
            &format!("/v1/presence?user_ids={a},{stranger}"),
            Some(b),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["presence"][0]["status"], "online");
    // The outsider is connected, but shares nothing with bob: not his to see.
    assert_eq!(v["presence"][1]["status"], "offline");
    drop(a3);
    let p = bob.recv_type("presence").await;
    assert_eq!(p["status"], "offline");
    let (_, v) = app
        .http("GET", &format!("/v1/presence?user_ids={a}"), Some(b), None)
        .await;
    assert_eq!(v["presence"][0]["status"], "offline");
    // Someone who shares no conversation hears nothing.
    let pong = outsider.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "ack");
    let (status, v) = app
        .http("GET", "/v1/presence?user_ids=nope", Some(b), None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("invalid"))
    );
    let (status, _) = app.http("GET", "/v1/presence", Some(b), None).await;
    assert_eq!(status, 422);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_move_forward_only_reach_the_room_and_drive_unread_counts() {
    let app = TestApp::spawn().await;
    let Pair {
        a,
        b,
        conv,
        mut alice,
        mut bob,
    } = app.pair().await;
    send_n(&mut alice, conv, "m", 5).await;
    wait_stored(&app, conv, 5).await;

    let ack = bob
        .request(json!({"type": "read", "conversation_id": conv, "seq": 3}))
        .await;
    assert_eq!(
        (ack["read_seq"].as_i64(), ack["delivered_seq"].as_i64()),
        (Some(3), Some(3)),
        "{ack}"
    );
    let r = alice.recv_type("receipt").await;
    assert_eq!(
        (
            r["user_id"].as_str(),
            r["delivered_seq"].as_i64(),
            r["read_seq"].as_i64()
        ),
        (Some(b.to_string().as_str()), Some(3), Some(3))
    );
    bob.request(json!({"type": "delivered", "conversation_id": conv, "seq": 5}))
        .await;
    let r = alice.recv_type("receipt").await;
    assert_eq!(
        (r["delivered_seq"].as_i64(), r["read_seq"].as_i64()),
        (Some(5), Some(3))
    );
    // Going back is a no-op.
    let ack = bob
        .request(json!({"type": "read", "conversation_id": conv, "seq": 1}))
        .await;
    assert_eq!(ack["read_seq"], 3);
    let e = bob
        .request(json!({"type": "read", "conversation_id": conv, "seq": -1}))
        .await;
    assert_eq!(e["code"], "invalid");

    let row = eventually("receipt stored", || async {
        let row: (i64, i64) = sqlx::query_as(
            "select last_delivered_seq, last_read_seq from conversation_members where conversation_id = $1 and user_id = $2",
        )
        .bind(conv)
        .bind(b.0)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (row == (5, 3)).then_some(row)
    })
    .await;
    assert_eq!(row, (5, 3));
    let (_, v) = app.http("GET", "/v1/conversations", Some(b), None).await;
    let c = &v["conversations"][0];
    assert_eq!(
        (
            c["unread_count"].as_i64(),
            c["last_read_seq"].as_i64(),
            c["last_delivered_seq"].as_i64()
        ),
        (Some(2), Some(3), Some(5)),
        "{c}"
    );
    let (_, v) = app.http("GET", "/v1/conversations", Some(a), None).await;
    assert_eq!(v["conversations"][0]["unread_count"], 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_of_one_user_converge() {
    let app = TestApp::spawn().await;
    let (a, b) = (uid(), uid());
    let conv = app.conversation(a, &[b]).await;
    let mut phone = app.ws(a).await;
    let mut laptop = app.ws(a).await;
    let mut bob = app.ws(b).await;
    bob.join(conv).await;

    phone.join(conv).await;
    let j = laptop.recv_type("joined").await;
    assert_eq!(
        (j["conversation_id"].as_str(), j["last_seq"].as_i64()),
        (Some(conv.to_string().as_str()), Some(0))
    );
    laptop.join(conv).await;

    let sent = phone.send_text(conv, "p1", "from my phone").await;
    let m = laptop.recv_type("new_message").await;
    assert_eq!(
        m["message"]["id"], sent["message_id"],
        "the other device sees what I sent"
    );
    bob.send_text(conv, "b1", "hi").await;
    wait_stored(&app, conv, 2).await;

    phone
        .request(json!({"type": "read", "conversation_id": conv, "seq": 2}))
        .await;
    let r = laptop.recv_type("receipt").await;
    assert_eq!(
        (r["user_id"].as_str(), r["read_seq"].as_i64()),
        (Some(a.to_string().as_str()), Some(2)),
        "my read marker moved everywhere"
    );
    bob.recv_type("receipt").await;

    phone
        .request(json!({"type": "leave_conversation", "conversation_id": conv}))
        .await;
    let l = laptop.recv_type("left").await;
    assert_eq!(l["conversation_id"], conv.to_string());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_deletes_use_versions_and_history_keeps_tombstones() {
    let app = TestApp::spawn().await;
    let Pair {
        a,
        b,
        conv,
        mut alice,
        mut bob,
    } = app.pair().await;
    let id = alice.send_text(conv, "e1", "first draft").await["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_stored(&app, conv, 1).await;

    let ack = alice
        .request(
            json!({"type": "edit_message", "message_id": id, "content": "final", "version": 1}),
        )
        .await;
    assert_eq!(
        (ack["type"].as_str(), ack["version"].as_i64()),
        (Some("ack"), Some(2)),
        "{ack}"
    );
    let u = bob.recv_type("message_updated").await;
    assert_eq!(
        (
            u["message"]["content"].as_str(),
            u["message"]["version"].as_i64()
        ),
        (Some("final"), Some(2))
    );
    assert!(u["message"]["edited_at"].is_string());

    let stale = alice
        .request(
            json!({"type": "edit_message", "message_id": id, "content": "other", "version": 1}),
        )
        .await;
    assert_eq!(
        (stale["code"].as_str(), stale["current_version"].as_i64()),
        (Some("conflict"), Some(2)),
        "{stale}"
    );
    let e = bob
        .request(
            json!({"type": "edit_message", "message_id": id, "content": "mine now", "version": 2}),
        )
        .await;
    assert_eq!(e["code"], "forbidden");
    let e = bob
        .request(json!({"type": "delete_message", "message_id": id, "version": 2}))
        .await;
    assert_eq!(e["code"], "forbidden");
    let e = alice
        .request(json!({"type": "edit_message", "message_id": uuid::Uuid::now_v7(), "content": "x", "version": 1}))
        .await;
    assert_eq!(e["code"], "not_found");

    let ack = alice
        .request(json!({"type": "delete_message", "message_id": id, "version": 2}))
        .await;
    assert_eq!(ack["version"], 3, "{ack}");
    let d = bob.recv_type("message_deleted").await;
    assert_eq!(
        (d["message_id"].as_str(), d["version"].as_i64()),
        (Some(id.as_str()), Some(3))
    );
    let e = alice
        .request(json!({"type": "edit_message", "message_id": id, "content": "undo", "version": 3}))
        .await;
    assert_eq!(
        (e["code"].as_str(), e["deleted"].as_bool()),
        (Some("conflict"), Some(true)),
        "{e}"
    );

    // Someone removed from the conversation may not change what they said there.
    let mine = alice.send_text(conv, "e2", "before I go").await["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_stored(&app, conv, 2).await;
    let (status, _) = app
        .http(
            "DELETE",
            &format!("/v1/conversations/{conv}/members/{a}"),
            Some(b),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let e = alice
        .request(
            json!({"type": "edit_message", "message_id": mine, "content": "rewrite", "version": 1}),
        )
        .await;
    assert_eq!(e["code"], "forbidden", "{e}");

    let (_, v) = app.history(b, conv).await;
    let m = &v["messages"][0];
    assert_eq!(
        (
            m["deleted"].as_bool(),
            m["version"].as_i64(),
            m["seq"].as_i64()
        ),
        (Some(true), Some(3), Some(1)),
        "{m}"
    );
    assert!(m["content"].is_null(), "a tombstone keeps no content");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_closed_and_does_not_hold_up_the_room() {
    let mut opts = Options::default();
    // The default: small enough to overflow soon, large enough for a burst
    // of message_persisted (a worker batch of 500, ~110 KB) to a reader that
    // keeps up.
    opts.config.gateway.outbox_bytes = 256 * 1024;
    let app = TestApp::spawn_with(opts).await;
    let (a, b, s) = (uid(), uid(), uid());
    let conv = app.conversation(a, &[b, s]).await;
    let mut alice = app.ws(a).await;
    let mut bob = app.ws(b).await;
    alice.join(conv).await;
    bob.join(conv).await;
    // The slow client: a tiny receive buffer, and it stops reading after joining.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(app.addr).await.unwrap();
    let url = format!("ws://{}/ws?token={}", app.addr, app.token(s));
    let (slow_ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    let mut slow = Client::from_stream(slow_ws);
    slow.recv_type("hello").await;
    slow.join(conv).await;

    // More than the server's socket send buffer can absorb (tcp_wmem max is
    // 4 MiB here), so the slow client's outbox must fill.
    let n = 1500;
    let payload = "z".repeat(3900);
    let mut worst = Duration::ZERO;
    for i in 0..n {
        let t = Instant::now();
        let ack = alice
            .request(json!({"type": "send_message", "conversation_id": conv, "client_message_id": format!("s{i}"), "content": payload}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let m = bob.recv_type("new_message").await;
        worst = worst.max(t.elapsed());
        assert_eq!(m["message"]["client_message_id"], format!("s{i}"));
    }
    // A bound generous enough to be stable on a loaded 2-core machine; the
    // precise number is the benchmark's job.
    assert!(
        worst < Duration::from_secs(1),
        "the fast reader waited {worst:?} for one message"
    );
    // The server let go of it: a reader that stopped entirely may not even
    // get the 4008 close frame through its full buffers, but it is dropped.
    eventually("the slow connection closed by the server", || async {
        let mut s = tokio::net::TcpStream::connect(app.addr).await.ok()?;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        text.contains("postline_connections_open 2\n").then_some(())
    })
    .await;
    let code = slow.close_or_reset().await;
    assert!(code.is_none() || code == Some(4008), "closed with {code:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_past_the_last_stored_seq_are_capped_and_freeze_nothing() {
    let app = TestApp::spawn().await;
    let Pair {
        b,
        conv,
        mut alice,
        mut bob,
        ..
    } = app.pair().await;
    send_n(&mut alice, conv, "m", 1).await;
    wait_stored(&app, conv, 1).await;

    // The conversation is at seq 1; a receipt for 2^62 counts as 1.
    let ack = bob
        .request(json!({"type": "read", "conversation_id": conv, "seq": 1i64 << 62}))
        .await;
    assert_eq!(
        (ack["read_seq"].as_i64(), ack["delivered_seq"].as_i64()),
        (Some(1), Some(1)),
        "{ack}"
    );
    let r = alice.recv_type("receipt").await;
    assert_eq!(
        (r["read_seq"].as_i64(), r["delivered_seq"].as_i64()),
        (Some(1), Some(1)),
        "{r}"
    );

    // Later, real reads still move the position and the unread count.
    send_n(&mut alice, conv, "n", 2).await;
    wait_stored(&app, conv, 3).await;
    let ack = bob
        .request(json!({"type": "read", "conversation_id": conv, "seq": 3}))
        .await;
    assert_eq!(ack["read_seq"], 3, "{ack}");
    let unread = eventually("bob's unread count back to 0", || async {
        let (_, list) = app.http("GET", "/v1/conversations", Some(b), None).await;
        let c = &list["conversations"][0];
        (c["last_read_seq"] == 3).then(|| c["unread_count"].as_i64())
    })
    .await;
    assert_eq!(unread, Some(0));
    app.stop().await;
}

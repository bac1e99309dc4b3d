//! Rate limits and the fair share of the persist buffer, each with tight
//! values set through `Options` (the other tests run with loose ones).

use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::harness::*;

fn with(tweak: impl FnOnce(&mut postline::config::Config)) -> Options {
    let mut o = Options::default();
    tweak(&mut o.config);
    o
}

fn send(conv: uuid::Uuid, r: &str) -> Value {
    json!({"type": "send_message", "ref": r, "conversation_id": conv,
           "client_message_id": r, "content": format!("text {r}")})
}

fn retry_after_ms(v: &Value) -> u64 {
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str()),
        (Some("error"), Some("rate_limited")),
        "{v}"
    );
    v["retry_after_ms"].as_u64().expect("retry_after_ms")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_past_the_per_user_limit_are_rate_limited_then_allowed_after_the_wait() {
    // 5/s, burst 3: the fourth send at once waits about 200 ms.
    let app = TestApp::spawn_with(with(|c| c.limits.send_per_user = rate(5, 3))).await;
    let Pair {
        conv, mut alice, ..
    } = app.pair().await;
    for i in 0..3 {
        let ack = alice.request(send(conv, &format!("m{i}"))).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let refused = alice.request(send(conv, "m3")).await;
    let wait = retry_after_ms(&refused);
    assert!((1..=200).contains(&wait), "{refused}");
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let ack = alice.request(send(conv, "m3")).await;
    assert_eq!(
        (ack["type"].as_str(), ack["duplicate"].as_bool()),
        (Some("ack"), Some(false)),
        "a refused send is not a duplicate: {ack}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_conversation_limit_counts_every_sender() {
    let app = TestApp::spawn_with(with(|c| c.limits.send_per_conversation = rate(1, 2))).await;
    let Pair {
        conv,
        mut alice,
        mut bob,
        ..
    } = app.pair().await;
    for i in 0..2 {
        let ack = alice.request(send(conv, &format!("a{i}"))).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let refused = bob.request(send(conv, "b0")).await;
    assert!(retry_after_ms(&refused) <= 1000, "{refused}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_flooding_is_rate_limited_and_http_history_shares_the_budget() {
    let app = TestApp::spawn_with(with(|c| c.limits.history_per_user = rate(1, 3))).await;
    let Pair {
        a, conv, mut alice, ..
    } = app.pair().await;
    let sync = json!({"type": "sync", "conversation_id": conv, "after_seq": 0, "limit": 200});
    for _ in 0..3 {
        let page = alice.request(sync.clone()).await;
        assert_eq!(page["type"], "ack", "{page}");
    }
    let refused = alice.request(sync.clone()).await;
    assert!(retry_after_ms(&refused) <= 1000, "{refused}");
    let resume = alice
        .request(
            json!({"type": "resume", "conversations": [{"conversation_id": conv, "after_seq": 0}]}),
        )
        .await;
    retry_after_ms(&resume);
    let (status, body) = app.history(a, conv).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_past_the_per_user_limit_is_429_with_retry_after() {
    let app = TestApp::spawn_with(with(|c| c.limits.http_per_user = rate(1, 3))).await;
    let (alice, bob) = (uid(), uid());
    let auth = format!("Authorization: Bearer {}\r\n", app.token(alice));
    for _ in 0..3 {
        let (status, _, body) =
            raw_http_with_head(app.addr, "GET", "/v1/conversations", &auth, None).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, head, body) =
        raw_http_with_head(app.addr, "GET", "/v1/conversations", &auth, None).await;
    assert_eq!(status, 429, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nretry-after: 1\r\n"),
        "{head}"
    );
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    // Another user from the same address is not held back by alice's limit.
    let (status, _) = app.http("GET", "/v1/conversations", Some(bob), None).await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_past_the_per_ip_limit_is_429_whoever_asks() {
    let app = TestApp::spawn_with(with(|c| c.limits.http_per_ip = rate(1, 3))).await;
    for _ in 0..3 {
        let (status, _) = app
            .http("GET", "/v1/conversations", Some(uid()), None)
            .await;
        assert_eq!(status, 200);
    }
    // Counted before authentication: a bad token is refused as fast as a good one.
    let (status, head, body) =
        raw_http_with_head(app.addr, "GET", "/v1/conversations", "", None).await;
    assert_eq!(status, 429, "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    assert_eq!(body["error"]["code"], "rate_limited");
    // Probes are never limited.
    let (status, _) = app.http("GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_past_the_per_ip_limit_are_refused_with_429() {
    let app = TestApp::spawn_with(with(|c| c.limits.upgrade_per_ip = rate(1, 2))).await;
    let _first = app.ws(uid()).await;
    let _second = app.ws(uid()).await;
    let url = format!("ws://{}/ws?token={}", app.addr, app.token(uid()));
    match tokio_tungstenite::connect_async(url).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429);
            assert!(resp.headers().contains_key("retry-after"));
        }
        Ok(_) => panic!("a third upgrade at once was accepted"),
        Err(e) => panic!("unexpected error {e}"),
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_ignores_rate_limited_is_closed_with_1008() {
    let app = TestApp::spawn_with(with(|c| {
        c.limits.send_per_user = rate(1, 1);
        c.limits.max_refusals = 5.try_into().unwrap();
    }))
    .await;
    let Pair {
        conv,
        mut alice,
        mut bob,
        ..
    } = app.pair().await;
    // One allowed, then six refusals: one past the five tolerated. No more,
    // so the test never writes to a socket the server has already closed.
    for i in 0..7 {
        alice.send(send(conv, &format!("f{i}"))).await;
    }
    assert_eq!(alice.expect_close().await, 1008);
    // Only the flooder's connection is closed.
    let pong = bob.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "ack", "{pong}");
    app.stop().await;
}

/// Found from outside: one client flooding while Postgres was slow filled
/// the shared persist buffer, and another user's sends all got
/// `unavailable`. With a buffer of 256 the flooder's share is 64 (the
/// floor), so the polite user's ten still fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_during_a_postgres_lock_is_refused_and_a_polite_user_is_stored() {
    let app = TestApp::spawn_with(with(|c| c.enqueue.capacity = 256)).await;
    let Pair {
        conv,
        mut alice,
        mut bob,
        ..
    } = app.pair().await;
    // Nothing can be committed to the persist queue while this is open.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE pgmq.q_postline_persist IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

    let flood = 400;
    for i in 0..flood {
        alice.send(send(conv, &format!("f{i}"))).await;
    }
    // Refusals come at once; at most a share (64) of the flood is held.
    let mut refused = 0;
    while refused < flood - 64 {
        let r = alice.recv_where(|v| v["type"] == "error").await;
        retry_after_ms(&r);
        refused += 1;
    }

    for i in 0..10 {
        bob.send(send(conv, &format!("p{i}"))).await;
    }
    let early = bob.frames_for(Duration::from_millis(500)).await;
    assert!(
        !early
            .iter()
            .any(|v| v["type"] == "error" || v["type"] == "ack"),
        "the polite user's sends are buffered, not refused nor acked yet: {:?}",
        early
            .iter()
            .filter(|v| v["type"] != "new_message")
            .collect::<Vec<_>>()
    );

    lock.rollback().await.unwrap();
    for i in 0..10 {
        let r = format!("p{i}");
        let ack = bob.recv_where(|v| v["ref"] == r.as_str()).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let rows = eventually("the polite user's messages stored", || async {
        let rows = stored(&app.pool, conv).await;
        let polite = rows.iter().filter(|r| r.2.starts_with('p')).count();
        (polite == 10).then_some(rows)
    })
    .await;
    let flooded = rows.iter().filter(|r| r.2.starts_with('f')).count();
    assert!(
        flooded <= 64,
        "at most the flooder's share was kept: {flooded}"
    );
    app.stop().await;
}

//! Liveness and admission: idle, slow and vanished clients are reaped, and
//! connection caps refuse the excess fast while health probes and real
//! clients still get in. Timeouts are shortened per test; every wait is
//! bounded, and no assertion is on timing beyond hang detection.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::harness::*;

/// Long enough that none of these tests' short deadlines is near it.
const REAPED_WITHIN: Duration = Duration::from_secs(10);

fn short_http_timeouts() -> Options {
    let mut o = Options::default();
    o.config.admission.header_read_timeout = Duration::from_millis(400);
    o.config.admission.request_timeout = Duration::from_millis(400);
    o
}

fn short_ws_deadlines() -> Options {
    let mut o = Options::default();
    o.config.gateway.ping_interval = Duration::from_millis(150);
    o.config.gateway.ws_read_timeout = Duration::from_millis(500);
    o.config.gateway.presence_grace = Duration::ZERO;
    o
}

/// The status line's code and the response's JSON body (Null if none).
fn parse(response: &str) -> (u16, Value) {
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_and_a_slowloris_header_sender_are_closed() {
    let app = TestApp::spawn_with(short_http_timeouts()).await;
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(TcpStream::connect(app.addr).await.unwrap());
    }
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    let slowloris = async {
        // One byte at a time, never reaching the end of the head.
        for b in
            b"GET /healthz HTTP/1.1\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        {
            if slow.write_all(&[*b]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        closed_within(&mut slow, REAPED_WITHIN).await
    };
    assert!(slowloris.await, "the slowloris sender was closed");
    for s in &mut silent {
        assert!(
            closed_within(s, REAPED_WITHIN).await,
            "a silent socket was closed"
        );
    }
    // The server is fine for everyone else.
    assert_eq!(app.http("GET", "/healthz", None, None).await.0, 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_silent_after_its_response_is_closed() {
    let app = TestApp::spawn_with(short_http_timeouts()).await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The response arrives, then nothing more is sent: the idle wait for the
    // next head runs out and the server closes.
    assert!(closed_within(&mut s, REAPED_WITHIN).await);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_sent_too_slowly_gets_408_and_the_connection_closes() {
    let app = TestApp::spawn_with(short_http_timeouts()).await;
    let a = uid();
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"ti",
        app.token(a)
    );
    let response = exchange(&mut s, &head).await;
    let (status, body) = parse(&response);
    assert_eq!(status, 408, "{response}");
    assert_eq!(body["error"]["code"], "unavailable");
    app.stop().await;
}

/// Read server frames from a raw WebSocket until its close frame: the pings
/// seen on the way and the close code.
async fn pings_then_close(s: &mut TcpStream) -> (usize, u16) {
    let mut pings = 0;
    loop {
        let (op, body) = read_server_frame(s).await;
        match op {
            0x9 => pings += 1,
            0x8 => return (pings, u16::from_be_bytes([body[0], body[1]])),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_that_never_answers_pings_is_pinged_then_closed_with_4000() {
    let app = TestApp::spawn_with(short_ws_deadlines()).await;
    // raw_ws reads every frame but never sends one: no pong, ever.
    let mut s = raw_ws(app.addr, &app.token(uid())).await;
    let (pings, code) = pings_then_close(&mut s).await;
    assert!(pings >= 1, "the server pinged before giving up");
    assert_eq!(code, 4000);
    assert!(closed_within(&mut s, REAPED_WITHIN).await);

    // One that answers is kept: tungstenite pongs while it is being read.
    let mut alive = app.ws(uid()).await;
    assert!(alive
        .frames_for(Duration::from_millis(1500))
        .await
        .is_empty());
    assert_eq!(alive.request(json!({"type": "ping"})).await["type"], "ack");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_client_is_reaped_and_goes_offline() {
    let app = TestApp::spawn_with(short_ws_deadlines()).await;
    let (a, b) = (uid(), uid());
    app.conversation(b, &[a]).await;
    let online = |status: &'static str| {
        let app = &app;
        async move {
            let (code, v) = app
                .http("GET", &format!("/v1/presence?user_ids={a}"), Some(b), None)
                .await;
            assert_eq!(code, 200, "{v}");
            (v["presence"][0]["status"] == status).then_some(())
        }
    };
    // The client vanishes: it neither reads nor writes, nor closes.
    let mut gone = raw_ws(app.addr, &app.token(a)).await;
    eventually("a is online", || online("online")).await;
    eventually("the half-open client is reaped", || online("offline")).await;
    // What the server sent meanwhile ends with the 4000 close.
    let (_, code) = pings_then_close(&mut gone).await;
    assert_eq!(code, 4000);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_per_user_cap_the_upgrade_is_refused_with_429() {
    let mut o = Options::default();
    o.config.gateway.max_connections_per_user = 2;
    let app = TestApp::spawn_with(o).await;
    let a = uid();
    let first = app.ws(a).await;
    let _second = app.ws(a).await;
    let url = format!("ws://{}/ws?token={}", app.addr, app.token(a));
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status().as_u16(), 429);
            let body: Value = serde_json::from_slice(res.body().as_deref().unwrap_or(b"{}"))
                .unwrap_or(Value::Null);
            assert_eq!(body["error"]["code"], "rate_limited", "{body}");
        }
        other => panic!("a third connection was not refused: {:?}", other.is_ok()),
    }
    // Another user is not affected, and a closed connection frees its slot.
    let _other = app.ws(uid()).await;
    drop(first);
    eventually("the slot is given back", || {
        let url = url.clone();
        async move {
            tokio_tungstenite::connect_async(&url)
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_per_connection_cap_a_join_is_refused_with_invalid() {
    let mut o = Options::default();
    o.config.gateway.max_joined_per_connection = 2;
    let app = TestApp::spawn_with(o).await;
    let a = uid();
    let c1 = app.conversation(a, &[]).await;
    let c2 = app.conversation(a, &[]).await;
    let c3 = app.conversation(a, &[]).await;
    let mut alice = app.ws(a).await;
    alice.join(c1).await;
    alice.join(c2).await;
    let refused = alice
        .request(json!({"type": "join_conversation", "conversation_id": c3}))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "invalid");
    assert!(
        refused["message"].as_str().unwrap().contains("leave one"),
        "{refused}"
    );
    // Joining one it is in is not a new join; leaving makes room.
    alice.join(c2).await;
    let left = alice
        .request(json!({"type": "leave_conversation", "conversation_id": c1}))
        .await;
    assert_eq!(left["type"], "ack", "{left}");
    alice.join(c3).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_probes_are_answered_and_the_rest_get_503() {
    let mut o = Options::default();
    o.config.admission.max_connections = 8;
    let app = TestApp::spawn_with(o).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from([127, 0, 0, 2], app.addr).await.unwrap());
    }
    // Wait until the server has accepted all eight (the ninth is refused).
    let addr = app.addr;
    eventually("the cap is reached", || async move {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let (status, _) = parse(&exchange(&mut s, &get("/v1/conversations")).await);
        (status == 503).then_some(())
    })
    .await;

    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let response = exchange(&mut s, &get("/healthz")).await;
    assert_eq!(parse(&response).0, 200, "a probe at the cap: {response}");

    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let response = exchange(&mut s, &get("/v1/conversations")).await;
    let (status, body) = parse(&response);
    assert_eq!(status, 503, "{response}");
    assert!(
        response.to_ascii_lowercase().contains("retry-after: 5"),
        "{response}"
    );
    assert_eq!(body["error"]["code"], "unavailable");

    // Below the cap again, everyone is served.
    held.clear();
    let a = uid();
    let app_ref = &app;
    eventually("served again below the cap", || async move {
        let url = format!("ws://{}/ws?token={}", app_ref.addr, app_ref.token(a));
        tokio_tungstenite::connect_async(url).await.ok().map(|_| ())
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_every_slot_with_token_less_sockets() {
    let mut o = Options::default();
    o.config.admission.max_pending_per_ip = 4;
    let app = TestApp::spawn_with(o).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from([127, 0, 0, 2], app.addr).await.unwrap());
    }
    let addr = app.addr;
    eventually("127.0.0.2 is at its cap", || async move {
        let mut s = connect_from([127, 0, 0, 2], addr).await.ok()?;
        let (status, _) = parse(&exchange(&mut s, &get("/v1/conversations")).await);
        (status == 503).then_some(())
    })
    .await;
    // Another address is unaffected, over HTTP and WebSocket.
    assert_eq!(app.http("GET", "/healthz", None, None).await.0, 200);
    let mut c = app.ws(uid()).await;
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "ack");
    app.stop().await;
}

/// The process as deployed with a 1,024 open-file limit: a flood of idle,
/// token-less sockets from one address is refused fast and costs it no
/// descriptors it needs; /healthz and a WebSocket from elsewhere still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_at_1024_open_files_survives_1100_idle_sockets() {
    let need = 1100 + 64;
    if raise_own_nofile() < need {
        panic!("this test needs an open-file limit of {need} for its own sockets");
    }
    let (db_url, _pool) = fresh_database().await;
    let port = free_port();
    let child = spawn_postline_with_nofile(&["serve"], &db_url, port, &[], 1024);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_healthy(addr).await;

    let mut flood = Vec::with_capacity(1100);
    for _ in 0..1100 {
        match connect_from([127, 0, 0, 2], addr).await {
            Ok(s) => flood.push(s),
            Err(e) => panic!("connect failed after {}: {e}", flood.len()),
        }
    }
    // The refused are closed within a second (triage's bound); only the
    // address's pending allowance (64 by default) is still held after that.
    let ended = futures_util::future::join_all(
        flood
            .iter_mut()
            .map(|s| closed_within(s, Duration::from_secs(3))),
    )
    .await;
    let held = ended.iter().filter(|e| !**e).count();
    assert!(held <= 64, "{held} idle sockets still held");

    assert_eq!(raw_http(addr, "GET", "/healthz", "", None).await.0, 200);
    let jwt = postline::auth::Jwt::new(SECRET.as_bytes());
    let mut c = Client::connect(addr, &jwt.issue(uid(), Duration::from_secs(60))).await;
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "ack");
    let mut child = child;
    assert!(
        child.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the server is still running"
    );
    drop(flood);
    signal(&child, "-TERM");
    assert!(wait_exit(child).await.success());
}

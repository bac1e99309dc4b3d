use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::harness::*;

async fn ws_status(app: &TestApp, query: &str, header: Option<String>) -> (u16, serde_json::Value) {
    let mut req = format!("ws://{}/ws{query}", app.addr)
        .into_client_request()
        .unwrap();
    if let Some(h) = header {
        req.headers_mut()
            .insert("authorization", h.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => (101, serde_json::Value::Null),
        Err(WsError::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (
                resp.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or_default(),
            )
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_requires_a_valid_token() {
    let app = TestApp::spawn().await;
    let user = uid();

    let (status, body) = ws_status(&app, "", None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");

    let forged = postline::auth::Jwt::new(b"another-secret-entirely")
        .issue(user, std::time::Duration::from_secs(60));
    let (status, body) = ws_status(&app, &format!("?token={forged}"), None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = app.jwt.issue_with_exp(user, now - 7200, now - 3600);
    let (status, body) = ws_status(&app, &format!("?token={expired}"), None).await;
    assert_eq!(status, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );

    let (status, _) = ws_status(&app, "?token=not.a.jwt", None).await;
    assert_eq!(status, 401);

    // Both ways of presenting a good token work.
    let (status, _) = ws_status(&app, &format!("?token={}", app.token(user)), None).await;
    assert_eq!(status, 101);
    let (status, _) = ws_status(&app, "", Some(format!("Bearer {}", app.token(user)))).await;
    assert_eq!(status, 101);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_requires_a_valid_token() {
    let app = TestApp::spawn().await;
    let (status, v) = app.http("GET", "/v1/conversations", None, None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, v) = raw_http(
        app.addr,
        "GET",
        "/v1/conversations",
        "Authorization: Bearer nope\r\n",
        None,
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = raw_http(
        app.addr,
        "GET",
        "/v1/conversations",
        "Authorization: Basic Zm9vOmJhcg==\r\n",
        None,
    )
    .await;
    assert_eq!(status, 401);
    // Health endpoints are public.
    let (status, v) = app.http("GET", "/healthz", None, None).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")));
    app.stop().await;
}

fn now() -> u64 {
    postline::auth::unix_now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_say_why_in_words() {
    let app = TestApp::spawn().await;
    let user = uid();
    let cases = [
        (
            app.jwt.issue_not_before(user, now() + 600, now() + 1200),
            "token not valid yet (its nbf is in the future)",
        ),
        (
            // Two days, over the default maximum of one.
            app.jwt.issue(user, std::time::Duration::from_secs(2 * 86_400)),
            "token lifetime of 172800 s is over this server's maximum of 86400 s: use a shorter-lived token",
        ),
        (
            postline::auth::Jwt::new(b"another-secret-entirely")
                .issue(user, std::time::Duration::from_secs(60)),
            "bad signature",
        ),
        (
            "not.a.jwt".to_owned(),
            "malformed token: expected a JWT (three base64url parts)",
        ),
    ];
    for (token, message) in cases {
        let (status, body) = ws_status(&app, &format!("?token={token}"), None).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert_eq!(body["error"]["message"], message);
        // The HTTP API says the same.
        let (status, body) = raw_http(
            app.addr,
            "GET",
            "/v1/conversations",
            &format!("Authorization: Bearer {token}\r\n"),
            None,
        )
        .await;
        assert_eq!(
            (status, body["error"]["message"].as_str()),
            (401, Some(message))
        );
    }
    app.stop().await;
}

/// A token that expired 3 s ago: still accepted within the 5 s leeway, so
/// the socket it opens is closed about 2 s later.
fn nearly_expired(app: &TestApp, user: postline::domain::UserId) -> String {
    app.jwt.issue_with_exp(user, now() - 60, now() - 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_socket_is_closed_4001_when_its_token_expires() {
    let app = TestApp::spawn().await;
    let user = uid();
    let mut c = Client::connect(app.addr, &nearly_expired(&app, user)).await;
    let started = std::time::Instant::now();
    let r = c.request(serde_json::json!({"type": "ping"})).await;
    assert_eq!(r["type"], "ack");
    assert_eq!(c.expect_close().await, 4001);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_keeps_the_socket_open_past_the_first_expiry() {
    let app = TestApp::spawn().await;
    let user = uid();
    let mut c = Client::connect(app.addr, &nearly_expired(&app, user)).await;

    // Another user's token, or one that does not verify, changes nothing.
    let e = c
        .request(serde_json::json!({"type": "refresh_token", "token": app.token(uid())}))
        .await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{e}"
    );
    let e = c
        .request(serde_json::json!({"type": "refresh_token", "token": "x.y.z"}))
        .await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    assert_eq!(
        e["message"],
        "malformed token: expected a JWT (three base64url parts); the connection keeps its current token"
    );

    let fresh = app.jwt.issue(user, std::time::Duration::from_secs(60));
    let ack = c
        .request(serde_json::json!({"type": "refresh_token", "token": fresh}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let expires_at = chrono::DateTime::from_timestamp((now() + 60) as i64, 0).unwrap();
    let got: chrono::DateTime<chrono::Utc> = ack["expires_at"].as_str().unwrap().parse().unwrap();
    assert!((got - expires_at).num_seconds().abs() <= 1, "{ack}");

    // Past the first token's end (2 s from the start), still open.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let r = c.request(serde_json::json!({"type": "ping"})).await;
    assert_eq!(r["type"], "ack", "{r}");
    app.stop().await;
}

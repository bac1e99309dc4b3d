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

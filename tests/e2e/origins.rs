//! Browser origins: an allowlist on `/ws`, CORS on the HTTP API.

use postline::config::Origins;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::*;

const ALLOWED: &str = "https://chat.example";

async fn with_allowed_origin() -> TestApp {
    let mut opts = Options::default();
    opts.config.allowed_origins = Origins::List(vec![ALLOWED.to_owned()]);
    TestApp::spawn_with(opts).await
}

/// One raw request; returns the response head (status line and headers,
/// lowercased) and the body as JSON (Null if none).
async fn request(app: &TestApp, head: &str) -> (String, Value) {
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(format!("{head}Host: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("response within the wait")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.to_ascii_lowercase(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// A WebSocket upgrade carrying `origin`: 101, or the status and JSON body.
async fn upgrade_from(app: &TestApp, origin: Option<&str>) -> (u16, Value) {
    let mut req = format!("ws://{}/ws?token={}", app.addr, app.token(uid()))
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => (101, Value::Null),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            serde_json::from_slice(&resp.body().clone().unwrap_or_default()).unwrap_or_default(),
        ),
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_upgrade_from_a_disallowed_origin_is_403_and_an_allowed_one_works() {
    let app = with_allowed_origin().await;
    let (status, body) = upgrade_from(&app, Some("https://evil.example")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(
        body["error"]["message"],
        "requests from origin \"https://evil.example\" are not allowed"
    );
    assert_eq!(upgrade_from(&app, Some(ALLOWED)).await.0, 101);
    // Non-browser clients send no Origin: always allowed.
    assert_eq!(upgrade_from(&app, None).await.0, 101);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_no_browser_origin_may_open_a_socket() {
    let app = TestApp::spawn().await;
    assert_eq!(upgrade_from(&app, Some(ALLOWED)).await.0, 403);
    assert_eq!(upgrade_from(&app, None).await.0, 101);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_cors_preflight_and_reads_for_allowed_origins_only() {
    let app = with_allowed_origin().await;
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /v1/conversations HTTP/1.1\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: authorization, content-type\r\n"
        )
    };
    let (head, _) = request(&app, &preflight(ALLOWED)).await;
    assert!(head.starts_with("http/1.1 204"), "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://chat.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-methods: get, post, delete, options"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: authorization, content-type"),
        "{head}"
    );
    assert!(head.contains("access-control-max-age: 600"), "{head}");

    let (head, body) = request(&app, &preflight("https://evil.example")).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    assert_eq!(body["error"]["code"], "forbidden");

    // An actual request: the allowed origin may read the answer, others not.
    let get = |origin: &str| {
        format!(
            "GET /v1/conversations HTTP/1.1\r\nOrigin: {origin}\r\nAuthorization: Bearer {}\r\n",
            app.token(uid())
        )
    };
    let (head, body) = request(&app, &get(ALLOWED)).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://chat.example"),
        "{head}"
    );
    assert!(head.contains("vary: origin"), "{head}");
    assert!(body["conversations"].is_array());
    let (head, _) = request(&app, &get("https://evil.example")).await;
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    app.stop().await;
}

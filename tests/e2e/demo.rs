//! The demo web client at `/` and its `--dev` sign-in (`/dev/users`,
//! `/dev/token`), which exists only with the public dev secret.

use postline::config::{DevLogin, DEV_JWT_SECRET};
use serde_json::json;

use crate::harness::*;

/// A server as `serve --dev` runs it: the public dev secret, demo sign-in on.
async fn dev_app() -> TestApp {
    let mut opts = Options::default();
    opts.config.jwt_secret = DEV_JWT_SECRET.to_owned();
    opts.config.dev_login = DevLogin::DemoUsers;
    TestApp::spawn_with(opts).await
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Status, head and raw body of one request.
async fn get_raw(app: &TestApp, method: &str, path: &str) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        app.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("http timed out")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, head.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_and_its_assets_are_served_with_a_strict_policy() {
    let app = TestApp::spawn().await;
    let (status, head, body) = get_raw(&app, "GET", "/").await;
    assert_eq!(status, 200, "{head}");
    assert!(header(&head, "content-type")
        .unwrap()
        .starts_with("text/html"));
    let csp = header(&head, "content-security-policy").expect("a CSP");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&head, "cache-control"), Some("no-cache"));
    assert!(body.contains("/demo/app.js"), "the page loads its script");
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "nothing from elsewhere"
    );

    for (path, ty) in [
        ("/demo/app.js", "text/javascript"),
        ("/demo/style.css", "text/css"),
        ("/demo/icon.svg", "image/svg+xml"),
    ] {
        let (status, head, body) = get_raw(&app, "GET", path).await;
        assert_eq!(status, 200, "{path}: {head}");
        assert!(
            header(&head, "content-type").unwrap().starts_with(ty),
            "{head}"
        );
        assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
        assert!(!body.is_empty());
    }

    let (status, v) = app.http("POST", "/", None, Some("")).await;
    assert_eq!(status, 405, "{v}");
    assert_eq!(v["error"]["code"], "method_not_allowed");
    let (status, _) = app.http("DELETE", "/demo/app.js", None, None).await;
    assert_eq!(status, 405);
    let (status, v) = app.http("GET", "/demo/missing.js", None, None).await;
    assert_eq!(status, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_may_open_a_socket_to_its_own_origin_but_not_another() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = TestApp::spawn().await;
    let token = app.token(uid());
    let upgrade = |origin: String| {
        let mut req = format!("ws://{}/ws?token={token}", app.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    // No allowed origins are configured: only the server's own page may.
    let own = upgrade(format!("http://{}", app.addr)).await;
    assert!(own.is_ok(), "{:?}", own.err());
    let other = upgrade("http://evil.example".into()).await;
    assert!(other.is_err(), "a page on another site is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_dev_there_is_no_dev_sign_in() {
    let app = TestApp::spawn().await;
    let alice = r#"{"user_id":"0190f3a4-0000-7000-8000-00000000a11c"}"#;
    let (status, v) = app.http("POST", "/dev/token", None, Some(alice)).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "not_found");
    let (status, _) = app.http("GET", "/dev/users", None, None).await;
    assert_eq!(status, 404);

    // Not even with the dev secret, unless it was turned on for --dev.
    let mut opts = Options::default();
    opts.config.jwt_secret = DEV_JWT_SECRET.to_owned();
    let app = TestApp::spawn_with(opts).await;
    let (status, _) = app.http("POST", "/dev/token", None, Some(alice)).await;
    assert_eq!(status, 404);
    // Nor with --dev's switch on a server that signs with a real secret.
    let mut opts = Options::default();
    opts.config.dev_login = DevLogin::DemoUsers;
    let app = TestApp::spawn_with(opts).await;
    let (status, _) = app.http("POST", "/dev/token", None, Some(alice)).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_dev_a_demo_user_gets_a_token_that_works() {
    let app = dev_app().await;
    let (status, v) = app.http("GET", "/dev/users", None, None).await;
    assert_eq!(status, 200, "{v}");
    let names: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Alice", "Bob", "Carol", "Dave"]);
    let bob = v["users"][1]["user_id"].as_str().unwrap().to_owned();

    let body = json!({ "user_id": bob }).to_string();
    let (status, v) = app.http("POST", "/dev/token", None, Some(&body)).await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["user_id"], bob.as_str());
    assert_eq!(v["name"], "Bob");
    assert!(v["expires_at"].is_string());
    let token = v["token"].as_str().unwrap();

    // The token is Bob's: he creates a conversation and is its first member.
    let auth = format!("Authorization: Bearer {token}\r\n");
    let (status, created) = raw_http(
        app.addr,
        "POST",
        "/v1/conversations",
        &auth,
        Some(r#"{"title":"demo","member_ids":[]}"#),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["member_ids"], json!([bob]));
    // And it opens a socket (Client::connect checks the hello).
    Client::connect(app.addr, token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_dev_bad_token_requests_are_refused_with_reasons() {
    let app = dev_app().await;
    let cases = [
        ("not json", 400, "bad_request", "not valid JSON"),
        ("{}", 422, "invalid", "user_id"),
        (r#"{"user_id":"nope"}"#, 422, "invalid", ""),
        (
            r#"{"user_id":"0190f3a4-0000-7000-8000-00000000a11c","admin":true}"#,
            422,
            "invalid",
            "unknown field",
        ),
        (
            r#"{"user_id":"00000000-0000-4000-8000-000000000001"}"#,
            422,
            "invalid",
            "is not a demo user",
        ),
    ];
    for (body, status, code, says) in cases {
        let (got, v) = app.http("POST", "/dev/token", None, Some(body)).await;
        assert_eq!(got, status, "{body}: {v}");
        assert_eq!(v["error"]["code"], code, "{body}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    let (status, v) = app.http("GET", "/dev/token", None, None).await;
    assert_eq!(status, 405, "{v}");
    assert_eq!(v["error"]["code"], "method_not_allowed");
    let (status, _) = app.http("POST", "/dev/users", None, Some("{}")).await;
    assert_eq!(status, 405);
    let (status, _) = app.http("GET", "/dev/nothing", None, None).await;
    assert_eq!(status, 404);
}

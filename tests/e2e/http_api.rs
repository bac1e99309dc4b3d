use serde_json::json;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_are_created_and_listed_for_their_members() {
    let app = TestApp::spawn().await;
    let (a, b, c) = (uid(), uid(), uid());
    let body = json!({"title": "team", "member_ids": [b, b, a]}).to_string();
    let (status, v) = app
        .http("POST", "/v1/conversations", Some(a), Some(&body))
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["title"], "team");
    assert_eq!(
        v["member_ids"],
        json!([a, b]),
        "caller first, duplicates dropped"
    );
    assert!(v["created_at"].is_string());
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(id.chars().nth(14), Some('7'), "a UUIDv7: {id}");

    let (status, v) = app.http("GET", "/v1/conversations", Some(b), None).await;
    assert_eq!(status, 200);
    let list = v["conversations"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["last_seq"], 0);
    let (_, v) = app.http("GET", "/v1/conversations", Some(c), None).await;
    assert_eq!(v["conversations"], json!([]));

    // Title is optional; member_ids may be empty.
    let (status, v) = app
        .http(
            "POST",
            "/v1/conversations",
            Some(c),
            Some(r#"{"member_ids":[]}"#),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["title"], serde_json::Value::Null);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_json_errors() {
    let app = TestApp::spawn().await;
    let (a, stranger) = (uid(), uid());
    let conv = app.conversation(a, &[]).await;
    let long_title = format!(r#"{{"title":"{}","member_ids":[]}}"#, "t".repeat(201));
    let cases: Vec<(&str, String, Option<&str>, u16, &str)> = vec![
        (
            "POST",
            "/v1/conversations".into(),
            Some("{not json"),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/conversations".into(),
            Some(r#"{"title":"x"}"#),
            422,
            "invalid",
        ),
        (
            "POST",
            "/v1/conversations".into(),
            Some(r#"{"member_ids":["nope"]}"#),
            422,
            "invalid",
        ),
        (
            "POST",
            "/v1/conversations".into(),
            Some(r#"{"member_ids":[],"colour":"red"}"#),
            422,
            "invalid",
        ),
        (
            "POST",
            "/v1/conversations".into(),
            Some(&long_title),
            422,
            "invalid",
        ),
        (
            "POST",
            "/v1/conversations".into(),
            Some(r#"{"title":"a\u0000b","member_ids":[]}"#),
            422,
            "invalid",
        ),
        (
            "PUT",
            "/v1/conversations".into(),
            None,
            405,
            "method_not_allowed",
        ),
        ("GET", "/v1/nowhere".into(), None, 404, "not_found"),
        ("GET", "/nowhere".into(), None, 404, "not_found"),
        (
            "GET",
            "/v1/conversations/not-a-uuid/messages".into(),
            None,
            400,
            "bad_request",
        ),
        (
            "GET",
            format!("/v1/conversations/{}/messages", uuid::Uuid::now_v7()),
            None,
            404,
            "not_found",
        ),
        (
            "GET",
            format!("/v1/conversations/{conv}/messages?limit=0"),
            None,
            422,
            "invalid",
        ),
        (
            "GET",
            format!("/v1/conversations/{conv}/messages?after_seq=abc"),
            None,
            422,
            "invalid",
        ),
        (
            "POST",
            format!("/v1/conversations/{conv}/members"),
            Some(r#"{"user_id":"x"}"#),
            422,
            "invalid",
        ),
        (
            "DELETE",
            format!("/v1/conversations/{conv}/members/not-a-uuid"),
            None,
            400,
            "bad_request",
        ),
        ("POST", "/healthz".into(), None, 405, "method_not_allowed"),
    ];
    for (method, path, body, status, code) in cases {
        let (got, v) = app.http(method, &path, Some(a), body).await;
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {v}"
        );
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // Non-members can neither add nor remove.
    let body = json!({"user_id": stranger}).to_string();
    let (status, _) = app
        .http(
            "POST",
            &format!("/v1/conversations/{conv}/members"),
            Some(stranger),
            Some(&body),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = app
        .http(
            "DELETE",
            &format!("/v1/conversations/{conv}/members/{a}"),
            Some(stranger),
            None,
        )
        .await;
    assert_eq!(status, 403);
    // A body over the limit is refused.
    let huge = format!(r#"{{"member_ids":[],"title":"{}"}}"#, "x".repeat(70 * 1024));
    let (status, v) = app
        .http("POST", "/v1/conversations", Some(a), Some(&huge))
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("too_large"))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_metrics_report_state() {
    let app = TestApp::spawn().await;
    let (status, v) = app.http("GET", "/readyz", None, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["database"], "ok");
    assert_eq!(v["worker"], "ok");
    assert_eq!(v["persist_buffer"]["state"], "ok");
    assert_eq!(v["persist_buffer"]["buffered"], 0);
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let mut c = app.ws(a).await;
    c.join(conv).await;
    c.send_text(conv, "m", "count me").await;
    c.recv_type("message_persisted").await;
    // Creating the conversation queued its audit row on the background
    // queue: applied by now, or soon.
    background_drained(&app.pool, "the background queue drained").await;
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.contains("postline_connections_open 1\n"), "{text}");
    assert!(text.contains("postline_messages_sent_total 1\n"), "{text}");
    assert!(
        text.contains("postline_messages_persisted_notified_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("postline_queue_depth{queue=\"postline_persist\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("postline_queue_depth{queue=\"postline_background\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("postline_jobs_processed_total{queue=\"postline_persist\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("postline_persist_latency_seconds_count 1\n"),
        "{text}"
    );
    app.stop().await;
}

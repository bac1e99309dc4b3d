//! The service API (`/v1/service/...`): an application's backend, with a
//! service key, managing conversations and posting into them; every
//! request idempotent by its key.

use serde_json::{json, Value};

use postline::config::ServiceKeys;

use crate::harness::*;

const KEY: &str = "shop-secret-0123456789";
const NEXT_KEY: &str = "next-secret-9876543210";

async fn app() -> TestApp {
    let mut o = Options::default();
    o.config.service_keys = ServiceKeys::parse(&format!("shop={KEY},next={NEXT_KEY}")).unwrap();
    TestApp::spawn_with(o).await
}

/// A service request: (status, response head, body).
async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    secret: &str,
    idempotency_key: Option<&str>,
    body: Option<Value>,
) -> (u16, String, Value) {
    let mut headers = format!("Authorization: Bearer {secret}\r\n");
    if let Some(k) = idempotency_key {
        headers.push_str(&format!("Idempotency-Key: {k}\r\n"));
    }
    let body = body.map(|b| b.to_string());
    raw_http_with_head(app.addr, method, path, &headers, body.as_deref()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_idempotency_key_returns_the_first_result_and_stores_once() {
    let app = app().await;
    let (alice, bob, bot) = (uid(), uid(), uid());
    let (status, _, conv) = call(
        &app,
        "POST",
        "/v1/service/conversations",
        KEY,
        Some("ticket-42"),
        Some(json!({"title": "Ticket 42", "member_ids": [alice.0, bob.0], "created_by": bot.0})),
    )
    .await;
    assert_eq!(status, 201, "{conv}");
    let conv_id: uuid::Uuid = conv["id"].as_str().unwrap().parse().unwrap();
    // The bot is the creator, not a member.
    assert_eq!(conv["member_ids"].as_array().unwrap().len(), 2);

    let mut a = app.ws(alice).await;
    a.join(conv_id).await;
    let post = json!({"sender_id": bot.0, "content": "Your ticket was received"});
    let path = format!("/v1/service/conversations/{conv_id}/messages");
    let (status, head, first) = call(
        &app,
        "POST",
        &path,
        KEY,
        Some("ticket-42-ack"),
        Some(post.clone()),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert!(!head.to_ascii_lowercase().contains("idempotent-replayed"));
    let (status, head, again) =
        call(&app, "POST", &path, KEY, Some("ticket-42-ack"), Some(post)).await;
    assert_eq!(status, 201);
    assert!(
        head.to_ascii_lowercase()
            .contains("idempotent-replayed: true"),
        "{head}"
    );
    assert_eq!(again, first);

    let m = a.recv_type("new_message").await;
    assert_eq!(m["message"]["kind"], "system");
    assert_eq!(m["message"]["id"], first["message_id"]);
    a.recv_type("message_persisted").await;
    let frames = a.frames_for(std::time::Duration::from_millis(400)).await;
    assert!(
        !frames.iter().any(|f| f["type"] == "new_message"),
        "once: {frames:?}"
    );
    assert_eq!(stored(&app.pool, conv_id).await.len(), 1);

    // The same key for another request is a mistake, said so.
    let (status, _, e) = call(
        &app,
        "POST",
        &format!("/v1/service/conversations/{conv_id}/members"),
        KEY,
        Some("ticket-42-ack"),
        Some(json!({"user_id": uid().0})),
    )
    .await;
    assert_eq!(status, 422, "{e}");
    // Keys are per credential: the other key's "ticket-42" is its own.
    let (status, _, other) = call(
        &app,
        "POST",
        "/v1/service/conversations",
        NEXT_KEY,
        Some("ticket-42"),
        Some(json!({"member_ids": [alice.0]})),
    )
    .await;
    assert_eq!(status, 201);
    assert_ne!(other["id"], conv["id"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_added_and_removed_by_the_service_take_effect_on_live_connections() {
    let app = app().await;
    let (alice, bob) = (uid(), uid());
    let conv = app.conversation(alice, &[bob]).await;
    let mut a = app.ws(alice).await;
    a.join(conv).await;
    let mut b = app.ws(bob).await;
    b.join(conv).await;

    let carol = uid();
    let (status, _, added) = call(
        &app,
        "POST",
        &format!("/v1/service/conversations/{conv}/members"),
        KEY,
        Some("add-carol"),
        Some(json!({"user_id": carol.0})),
    )
    .await;
    assert_eq!((status, added["changed"].clone()), (201, json!(true)));
    a.recv_where(|f| f["type"] == "member_joined" && f["user_id"] == carol.0.to_string())
        .await;

    // Bob is removed: his live connection stops receiving at once.
    let (status, _, removed) = call(
        &app,
        "DELETE",
        &format!("/v1/service/conversations/{conv}/members/{}", bob.0),
        KEY,
        Some("remove-bob"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{removed}");
    a.recv_where(|f| f["type"] == "member_left" && f["user_id"] == bob.0.to_string())
        .await;
    a.send_text(conv, "after", "bob must not see this").await;
    let frames = b.frames_for(std::time::Duration::from_millis(500)).await;
    assert!(
        !frames.iter().any(|f| f["type"] == "new_message"),
        "{frames:?}"
    );
    // Repeating the removal returns its first result, not a 404.
    let (status, head, again) = call(
        &app,
        "DELETE",
        &format!("/v1/service/conversations/{conv}/members/{}", bob.0),
        KEY,
        Some("remove-bob"),
        None,
    )
    .await;
    assert_eq!((status, again), (200, removed));
    assert!(head.to_ascii_lowercase().contains("idempotent-replayed"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_requests_without_a_valid_key_or_with_bad_input_are_refused() {
    let app = app().await;
    let alice = uid();
    let conv = app.conversation(alice, &[]).await;
    let path = format!("/v1/service/conversations/{conv}/messages");
    let post = json!({"sender_id": alice.0, "kind": "text", "content": "hi"});
    // No key, a wrong one, a user's token: 401.
    for secret in ["", "shop-secret-0123456788", &app.token(alice)] {
        let (status, _, e) = call(&app, "POST", &path, secret, Some("k"), Some(post.clone())).await;
        assert_eq!(status, 401, "{secret}: {e}");
    }
    // No or a bad Idempotency-Key: 400.
    for key in [None, Some(""), Some("has space")] {
        let (status, _, e) = call(&app, "POST", &path, KEY, key, Some(post.clone())).await;
        assert_eq!(status, 400, "{key:?}: {e}");
    }
    let long = "k".repeat(201);
    let (status, _, _) = call(&app, "POST", &path, KEY, Some(&long), Some(post.clone())).await;
    assert_eq!(status, 400);
    // Bodies and routes.
    let cases = [
        ("POST", path.clone(), json!({"sender_id": alice.0}), 422),
        (
            "POST",
            path.clone(),
            json!({"sender_id": alice.0, "content": "x", "extra": 1}),
            422,
        ),
        (
            "POST",
            path.clone(),
            json!({"sender_id": alice.0, "kind": "shout", "content": "x"}),
            422,
        ),
        (
            "POST",
            path.clone(),
            json!({"sender_id": uid().0, "kind": "text", "content": "x"}),
            403,
        ),
        (
            "POST",
            format!(
                "/v1/service/conversations/{}/messages",
                uuid::Uuid::new_v4()
            ),
            json!({"sender_id": alice.0, "content": "x"}),
            404,
        ),
        (
            "POST",
            "/v1/service/conversations".into(),
            json!({"member_ids": []}),
            422,
        ),
        (
            "POST",
            "/v1/service/conversations/not-a-uuid/members".into(),
            json!({"user_id": alice.0}),
            400,
        ),
        (
            "POST",
            format!("/v1/service/conversations/{}/members", uuid::Uuid::new_v4()),
            json!({"user_id": alice.0}),
            404,
        ),
        ("GET", "/v1/service/conversations".into(), json!({}), 405),
        ("POST", "/v1/service/nothing".into(), json!({}), 404),
    ];
    for (i, (method, p, body, want)) in cases.into_iter().enumerate() {
        let (status, _, e) = call(
            &app,
            method,
            &p,
            KEY,
            Some(&format!("case-{i}")),
            Some(body),
        )
        .await;
        assert_eq!(status, want, "case {i} {method} {p}: {e}");
    }
    let (status, _, _) = call(&app, "POST", &path, KEY, Some("bad-json"), None).await;
    assert_eq!(status, 400);
    // A refusal is remembered as the result of its key, too.
    let (status, head, _) = call(
        &app,
        "POST",
        "/v1/service/conversations",
        KEY,
        Some("case-5"),
        Some(json!({"member_ids": []})),
    )
    .await;
    assert_eq!(status, 422);
    assert!(head.to_ascii_lowercase().contains("idempotent-replayed"));
    app.stop().await;

    // Without POSTLINE_SERVICE_KEYS the API is off: 403 naming the variable.
    let off = TestApp::spawn().await;
    let (status, e) = raw_http(
        off.addr,
        "POST",
        "/v1/service/conversations",
        "Authorization: Bearer x\r\nIdempotency-Key: k\r\n",
        Some("{}"),
    )
    .await;
    assert_eq!(status, 403);
    assert!(e.to_string().contains("POSTLINE_SERVICE_KEYS"), "{e}");
    off.stop().await;
}

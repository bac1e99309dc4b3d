//! `postline.publish()`: an application posts into a conversation inside its
//! own transaction; the message takes the normal path at commit, and
//! nothing at all happens on rollback.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::*;

async fn publish(
    pool: &PgPool,
    conv: Uuid,
    sender: Uuid,
    kind: &str,
    content: serde_json::Value,
    cmid: Option<&str>,
) -> Result<Uuid, String> {
    sqlx::query_scalar("select postline.publish($1, $2, $3, $4, $5)")
        .bind(conv)
        .bind(sender)
        .bind(kind)
        .bind(content)
        .bind(cmid)
        .fetch_one(pool)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_publish_never_appears_anywhere() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (uid(), uid());
    let conv = app.conversation(alice, &[bob]).await;
    let mut b = app.ws(bob).await;
    b.join(conv).await;

    let mut tx = app.pool.begin().await.unwrap();
    let id: Uuid =
        sqlx::query_scalar("select postline.publish($1, $2, 'text', '\"never\"'::jsonb)")
            .bind(conv)
            .bind(alice.0)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    // The application's own write fails: everything goes back.
    tx.rollback().await.unwrap();

    let frames = b.frames_for(Duration::from_millis(700)).await;
    assert!(
        !frames
            .iter()
            .any(|f| f["type"] == "new_message" || f["type"] == "message_persisted"),
        "{frames:?}"
    );
    assert_eq!(
        count(&app.pool, "select count(*) from pgmq.q_postline_persist").await,
        0
    );
    assert_eq!(
        count(
            &app.pool,
            &format!("select count(*) from messages where id = '{id}'")
        )
        .await,
        0
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_publish_reaches_members_on_two_gateways_and_history_gap_free() {
    let (db_url, pool) = fresh_database().await;
    let one = TestApp::spawn_on(db_url.clone(), pool.clone(), Options::default()).await;
    let two = TestApp::spawn_on(
        db_url,
        pool.clone(),
        Options {
            run_worker: false,
            ..Options::default()
        },
    )
    .await;
    let (alice, bob, bot) = (uid(), uid(), uid());
    let conv = one.conversation(alice, &[bob]).await;
    let mut a = one.ws(alice).await;
    a.join(conv).await;
    let mut b = two.ws(bob).await;
    b.join(conv).await;
    a.send_text(conv, "w1", "from the socket").await;

    // Inside the application's own transaction, beside its own write.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("create table if not exists orders (id int primary key)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("insert into orders values (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let id: Uuid = sqlx::query_scalar(
        "select postline.publish($1, $2, 'system', '\"your order shipped\"'::jsonb, 'order-1-shipped')",
    )
    .bind(conv)
    .bind(bot.0)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    for c in [&mut a, &mut b] {
        let m = c
            .recv_where(|f| f["type"] == "new_message" && f["message"]["id"] == id.to_string())
            .await;
        assert_eq!(m["message"]["kind"], "system");
        assert_eq!(m["message"]["content"], "your order shipped");
        assert_eq!(m["message"]["sender_id"], bot.0.to_string());
        let p = c
            .recv_where(|f| f["type"] == "message_persisted" && f["message_id"] == id.to_string())
            .await;
        assert_eq!(p["seq"], 2);
    }
    // A member posts too, as a user would, and it lands after.
    let mine = publish(&pool, conv, alice.0, "text", json!("and from SQL"), None)
        .await
        .unwrap();
    b.recv_where(|f| f["type"] == "message_persisted" && f["message_id"] == mine.to_string())
        .await;
    let rows = stored(&pool, conv).await;
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "gap-free"
    );
    assert_eq!(rows[1].1, id);
    assert_eq!(rows[2].1, mine);
    one.stop().await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_returns_the_first_id_and_stores_once() {
    let app = TestApp::spawn().await;
    let alice = uid();
    let conv = app.conversation(alice, &[]).await;
    let first = publish(&app.pool, conv, alice.0, "text", json!("once"), Some("k1"))
        .await
        .unwrap();
    // Still in the queue, then stored: the same id both times.
    let again = publish(&app.pool, conv, alice.0, "text", json!("once"), Some("k1"))
        .await
        .unwrap();
    assert_eq!(again, first);
    eventually("stored", || async {
        (stored(&app.pool, conv).await.len() == 1).then_some(())
    })
    .await;
    let later = publish(&app.pool, conv, alice.0, "text", json!("once"), Some("k1"))
        .await
        .unwrap();
    assert_eq!(later, first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored(&app.pool, conv).await.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publishes_are_refused_with_the_gateway_s_codes() {
    let app = TestApp::spawn().await;
    let (alice, stranger) = (uid(), uid());
    let conv = app.conversation(alice, &[]).await;
    let p = &app.pool;
    let a = alice.0;
    let cases: Vec<(&str, Result<Uuid, String>)> = vec![
        (
            "forbidden",
            publish(p, conv, stranger.0, "text", json!("hi"), None).await,
        ),
        (
            "not_found",
            publish(p, Uuid::new_v4(), a, "text", json!("hi"), None).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "shout", json!("hi"), None).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "text", json!("   "), None).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "text", json!({"url": "x"}), None).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "image", json!("x"), None).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "image", json!({"url": ""}), None).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "file", json!({"url": "u", "evil": 1}), None).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "file", json!({"url": "u", "size": -1}), None).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "file", json!({"url": "u", "size": 1.5}), None).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "text", json!("hi"), Some(&"x".repeat(65))).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "text", json!("hi"), Some("")).await,
        ),
        (
            "invalid",
            publish(p, conv, a, "text", json!("hi"), Some("tab\there")).await,
        ),
        (
            "too_large",
            publish(p, conv, a, "text", json!("x".repeat(4097)), None).await,
        ),
        (
            "too_large",
            publish(p, conv, a, "file", json!({"url": "u".repeat(4100)}), None).await,
        ),
    ];
    for (code, result) in cases {
        let e = result.expect_err(code);
        assert!(e.contains(&format!("{code}: ")), "{code}: {e}");
    }
    // At the limit exactly, and a well-formed attachment: accepted.
    publish(p, conv, a, "text", json!("x".repeat(4096)), None)
        .await
        .unwrap();
    publish(
        p,
        conv,
        a,
        "file",
        json!({"url": "https://x/y.pdf", "name": "y.pdf", "size": 10, "mime": "application/pdf"}),
        None,
    )
    .await
    .unwrap();
    // Anyone may post `system`: a bot is no member.
    publish(p, conv, stranger.0, "system", json!("welcome"), None)
        .await
        .unwrap();
    // Nothing refused reached the queue.
    eventually("the three accepted are stored", || async {
        (stored(p, conv).await.len() == 3).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_applies_the_content_limit_the_gateway_started_with() {
    let mut o = Options::default();
    o.config.gateway.max_content_bytes = 100;
    let app = TestApp::spawn_with(o).await;
    let alice = uid();
    let conv = app.conversation(alice, &[]).await;
    let e = publish(
        &app.pool,
        conv,
        alice.0,
        "text",
        json!("x".repeat(101)),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("too_large: content is 101 bytes, the limit is 100"),
        "{e}"
    );
    publish(
        &app.pool,
        conv,
        alice.0,
        "text",
        json!("x".repeat(100)),
        None,
    )
    .await
    .unwrap();
    app.stop().await;
}

//! Webhooks: real HTTP to a receiver on 127.0.0.1 that each test scripts
//! (fail, hang, succeed), signatures checked as a receiver would.

pub mod receiver;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use postline::config::{SigningSecret, WebhookConfig, WebhookUrl};
use serde_json::json;
use tokio::sync::mpsc;

use crate::harness::*;
use receiver::{receiver, Received, Reply, HOOK_SECRET};

/// The server's options with webhooks to `url`, retried fast.
fn options(url: WebhookUrl, max_attempts: i32) -> Options {
    let mut o = Options::default();
    o.config.worker.retry.base = Duration::from_millis(20);
    o.config.worker.retry.cap = Duration::from_millis(200);
    o.config.worker.retry.max_attempts = max_attempts;
    o.config.webhooks = Some(WebhookConfig {
        endpoints: vec![url],
        secret: SigningSecret::new(HOOK_SECRET).unwrap(),
        timeout: Duration::from_secs(10),
        concurrency: 4,
    });
    o
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a webhook POST in time")
        .expect("the receiver runs")
}

/// The next request whose event is of type `ty` (others of the
/// conversation's setup are skipped).
async fn next_of(rx: &mut mpsc::UnboundedReceiver<Received>, ty: &str) -> Received {
    loop {
        let r = next(rx).await;
        if r.json["type"] == ty {
            return r;
        }
    }
}

/// Run the binary; success and stdout + stderr.
fn postline(args: &[&str], db_url: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_postline"))
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "error")
        .env_remove("POSTLINE_WEBHOOK_URLS")
        .env_remove("POSTLINE_WEBHOOK_SECRET")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn bad_webhook_settings_stop_serve_and_worker_at_start_naming_the_variable() {
    let url = "postgres://127.0.0.1:1/never-reached";
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[
                ("POSTLINE_WEBHOOK_URLS", "https://hooks.example.com/x"),
                ("POSTLINE_WEBHOOK_SECRET", HOOK_SECRET),
            ],
            "POSTLINE_WEBHOOK_URLS: https is not supported",
        ),
        (
            &[
                ("POSTLINE_WEBHOOK_URLS", "hooks.example.com/x"),
                ("POSTLINE_WEBHOOK_SECRET", HOOK_SECRET),
            ],
            "POSTLINE_WEBHOOK_URLS",
        ),
        (
            &[("POSTLINE_WEBHOOK_URLS", "http://hooks.internal/x")],
            "POSTLINE_WEBHOOK_SECRET is required",
        ),
        (
            &[
                ("POSTLINE_WEBHOOK_URLS", "http://hooks.internal/x"),
                ("POSTLINE_WEBHOOK_SECRET", "short"),
            ],
            "POSTLINE_WEBHOOK_SECRET must be at least 16 bytes",
        ),
    ];
    for command in ["serve", "worker"] {
        for (env, expected) in cases {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_postline"));
            cmd.arg(command)
                .env("DATABASE_URL", url)
                .env("POSTLINE_JWT_SECRET", SECRET)
                .env_remove("POSTLINE_WEBHOOK_URLS")
                .env_remove("POSTLINE_WEBHOOK_SECRET");
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = cmd.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{command} {env:?} started");
            assert!(err.contains(expected), "{command} {env:?}: {err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_three_times_gets_the_event_on_the_fourth_try_signed_and_in_order() {
    let (url, mut rx) = receiver(|n| {
        if n < 3 {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let app = TestApp::spawn_with(options(url, 8)).await;
    let (a, b) = (uid(), uid());
    let conv = app.conversation(a, &[b]).await;
    let mut alice = app.ws(a).await;
    alice.join(conv).await;
    // Sent while the first event (conversation.created) is being retried.
    for i in 1..=3 {
        alice
            .send_text(conv, &format!("w{i}"), &format!("m{i}"))
            .await;
    }

    let mut tries = Vec::new();
    for _ in 0..4 {
        tries.push(next(&mut rx).await);
    }
    let first_id = tries[0].event_id.clone();
    for (i, t) in tries.iter().enumerate() {
        assert_eq!(t.json["type"], "conversation.created", "try {i}");
        assert_eq!(t.event_id, first_id, "every try is the same event");
        assert_eq!(t.json["id"], first_id);
        assert!(t.signed_correctly(), "try {i}: bad signature");
    }
    assert_eq!(
        tries[3].answered,
        Reply::Status(200),
        "the fourth try succeeds"
    );
    assert_eq!(
        tries[0].json["data"]["conversation_id"],
        conv.to_string(),
        "{}",
        tries[0].json
    );
    // Then the messages, in seq order, each once, each signed.
    for seq in 1..=3 {
        let r = next(&mut rx).await;
        assert_eq!(r.json["type"], "message.created", "{}", r.json);
        assert_eq!(r.json["data"]["message"]["seq"], seq, "{}", r.json);
        assert_eq!(r.json["data"]["message"]["content"], format!("m{seq}"));
        assert!(r.signed_correctly());
    }
    // Recorded once the 2xx is in (just after the receiver saw the request).
    eventually("every delivery recorded as delivered", || async {
        let states: Vec<(String, i32)> =
            sqlx::query_as("select state, attempts from webhook_deliveries order by id")
                .fetch_all(&app.pool)
                .await
                .unwrap();
        let expected = [
            ("delivered", 4),
            ("delivered", 1),
            ("delivered", 1),
            ("delivered", 1),
        ];
        (states.len() == expected.len()
            && states
                .iter()
                .zip(expected)
                .all(|((s, a), (es, ea))| s == es && *a == ea))
        .then_some(())
    })
    .await;
    app.stop().await;
}

/// A receiver that answers 503 until `open` is set, then 200.
async fn gated_receiver() -> (
    Arc<std::sync::atomic::AtomicBool>,
    WebhookUrl,
    mpsc::UnboundedReceiver<Received>,
) {
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = open.clone();
    let (url, rx) = receiver(move |_| {
        if gate.load(Ordering::SeqCst) {
            Reply::Status(200)
        } else {
            Reply::Status(503)
        }
    })
    .await;
    (open, url, rx)
}

/// A `member.left` delivery of `conv` to `endpoint` written straight into
/// the table, parked or not, created `age_secs` ago: states the code
/// reaches only through a replay or a bug. Returns its id and body.
async fn insert_delivery(
    pool: &sqlx::PgPool,
    endpoint: &str,
    conv: uuid::Uuid,
    parked: bool,
    age_secs: f64,
) -> (i64, serde_json::Value) {
    let event_id = uuid::Uuid::now_v7();
    let body = json!({"id": event_id, "type": "member.left", "data": {"conversation_id": conv}});
    let (id,): (i64,) = sqlx::query_as(
        "insert into webhook_deliveries
             (event_id, event_type, endpoint, conversation_id, body, parked, created_at)
         values ($1, 'member.left', $2, $3, $4, $5, now() - make_interval(secs => $6))
         returning id",
    )
    .bind(event_id)
    .bind(endpoint)
    .bind(conv)
    .bind(&body)
    .bind(parked)
    .bind(age_secs)
    .fetch_one(pool)
    .await
    .unwrap();
    (id, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_waiting_behind_a_failing_one_are_parked_without_a_job_then_woken() {
    let (open, url, mut rx) = gated_receiver().await;
    // Attempts enough that the first event keeps failing, never dies.
    let app = TestApp::spawn_with(options(url, 1_000)).await;
    let (a, b) = (uid(), uid());
    let conv = app.conversation(a, &[b]).await;
    let mut alice = app.ws(a).await;
    alice.join(conv).await;
    for i in 1..=3 {
        alice
            .send_text(conv, &format!("p{i}"), &format!("m{i}"))
            .await;
    }
    eventually(
        "the messages' deliveries parked behind conversation.created",
        || async {
            let parked: i64 = sqlx::query_scalar(
                "select count(*) from webhook_deliveries
             where event_type = 'message.created' and parked and job_id is null",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            (parked == 3).then_some(())
        },
    )
    .await;
    // Let the first event fail several more times: the parked deliveries
    // have no job meanwhile, so nothing reads them (before parking, each
    // job was read every 50 ms to 5 s), and the queue holds only the
    // failing one's.
    let mut failures = 0;
    while failures < 5 {
        let r = next(&mut rx).await;
        assert_eq!(r.json["type"], "conversation.created", "{}", r.json);
        failures += 1;
    }
    let (jobs, jobless): (i64, i64) = sqlx::query_as(
        "select (select count(*) from pgmq.q_postline_background where message->>'kind' = 'webhook'),
                (select count(*) from webhook_deliveries
                 where event_type = 'message.created' and parked and job_id is null)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((jobs, jobless), (1, 3), "one job, for the failing head");

    open.store(true, Ordering::SeqCst);
    // Woken by the delivery before each, well before the park's own limit
    // (minutes): in order, each once.
    next_of(&mut rx, "conversation.created").await;
    for seq in 1..=3 {
        let r = next(&mut rx).await;
        assert_eq!(r.json["type"], "message.created", "{}", r.json);
        assert_eq!(r.json["data"]["message"]["seq"], seq, "{}", r.json);
    }
    eventually("all delivered, none left parked", || async {
        let (delivered, parked): (i64, i64) = sqlx::query_as(
            "select count(*) filter (where state = 'delivered'), count(*) filter (where parked)
             from webhook_deliveries",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        (delivered == 4 && parked == 0).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_read_behind_a_pending_delivery_of_its_lane_is_parked_until_that_one_finishes() {
    let (open, url, mut rx) = gated_receiver().await;
    let endpoint = url.to_string();
    let app = TestApp::spawn_with(options(url, 1_000)).await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    // conversation.created, failing, heads the lane.
    next_of(&mut rx, "conversation.created").await;
    // A delivery behind it that has a job of its own, as a dead letter
    // replayed behind newer events has (or one queued before parking).
    let (id, body) = insert_delivery(&app.pool, &endpoint, conv, false, 0.0).await;
    let (job,): (i64,) = sqlx::query_as(
        "select * from pgmq.send('postline_background',
                                 jsonb_build_object('kind', 'webhook', 'v', 1, 'delivery_id', $1::bigint))",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    eventually("the job read and parked, not attempted", || async {
        let (parked, job_id, attempts): (bool, Option<i64>, i32) =
            sqlx::query_as("select parked, job_id, attempts from webhook_deliveries where id = $1")
                .bind(id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        assert_eq!(attempts, 0, "attempted before the one ahead of it");
        (parked && job_id == Some(job)).then_some(())
    })
    .await;
    for _ in 0..3 {
        let r = next(&mut rx).await;
        assert_eq!(r.json["type"], "conversation.created", "{}", r.json);
    }
    open.store(true, Ordering::SeqCst);
    next_of(&mut rx, "conversation.created").await;
    let r = next(&mut rx).await;
    assert_eq!(
        r.json, body,
        "woken by the finish ahead of it, then delivered"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_parked_with_nothing_before_it_is_woken_by_the_workers_cleanup() {
    let (url, mut rx) = receiver(|_| Reply::Status(200)).await;
    let endpoint = url.to_string();
    let mut o = options(url, 3);
    o.config.worker.cleanup_interval = Duration::from_millis(200);
    let app = TestApp::spawn_with(o).await;
    // What no code path should leave (every finish wakes its lane): the
    // first pending delivery of a lane parked, with no job and nothing
    // before it, old enough to be past the cleanup's grace minute.
    let (id, body) = insert_delivery(&app.pool, &endpoint, uuid::Uuid::now_v7(), true, 120.0).await;
    let r = next(&mut rx).await;
    assert_eq!(r.json, body, "the stranded delivery, as stored");
    eventually("delivered, unparked, given a job", || async {
        let (state, parked, job): (String, bool, Option<i64>) =
            sqlx::query_as("select state, parked, job_id from webhook_deliveries where id = $1")
                .bind(id)
                .fetch_one(&app.pool)
                .await
                .unwrap();
        (state == "delivered" && !parked && job.is_some()).then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_is_delivered_in_the_conversations_order() {
    let (url, mut rx) = receiver(|_| Reply::Status(204)).await;
    let app = TestApp::spawn_with(options(url, 8)).await;
    let (a, b, c) = (uid(), uid(), uid());
    let conv = app.conversation(a, &[b]).await;
    let body = json!({ "user_id": c }).to_string();
    let (status, _) = app
        .http(
            "POST",
            &format!("/v1/conversations/{conv}/members"),
            Some(a),
            Some(&body),
        )
        .await;
    assert_eq!(status, 201);
    let mut alice = app.ws(a).await;
    alice.join(conv).await;
    let id = alice.send_text(conv, "e1", "draft").await["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    alice.recv_type("message_persisted").await;
    let ack = alice
        .request(
            json!({"type": "edit_message", "message_id": id, "content": "final", "version": 1}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let ack = alice
        .request(json!({"type": "delete_message", "message_id": id, "version": 2}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (status, _) = app
        .http(
            "DELETE",
            &format!("/v1/conversations/{conv}/members/{c}"),
            Some(a),
            None,
        )
        .await;
    assert_eq!(status, 200);

    let mut got = Vec::new();
    for _ in 0..6 {
        let r = next(&mut rx).await;
        assert!(r.signed_correctly());
        assert_eq!(
            r.json["data"]["conversation_id"]
                .as_str()
                .or(r.json["data"]["message"]["conversation_id"].as_str()),
            Some(conv.to_string().as_str())
        );
        got.push(r.json);
    }
    let types: Vec<&str> = got.iter().map(|v| v["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "conversation.created",
            "member.joined",
            "message.created",
            "message.updated",
            "message.deleted",
            "member.left"
        ]
    );
    assert_eq!(got[0]["data"]["member_ids"], json!([a, b]));
    assert_eq!(got[1]["data"]["user_id"], json!(c));
    assert_eq!(got[2]["data"]["message"]["id"], json!(id));
    assert_eq!(got[3]["data"]["message"]["content"], "final");
    assert_eq!(got[3]["data"]["message"]["version"], 2);
    assert_eq!(got[4]["data"]["message_id"], json!(id));
    assert_eq!(got[4]["data"]["version"], 3);
    assert_eq!(got[5]["data"]["user_id"], json!(c));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_receiver_does_not_delay_message_persisted() {
    let (url, mut rx) = receiver(|_| Reply::Hang).await;
    let app = TestApp::spawn_with(options(url, 8)).await;
    let Pair {
        conv, mut alice, ..
    } = app.pair().await;
    // The receiver now holds conversation.created unanswered (10 s timeout).
    next_of(&mut rx, "conversation.created").await;
    for i in 0..5 {
        let started = tokio::time::Instant::now();
        alice.send_text(conv, &format!("h{i}"), "hello").await;
        alice.recv_type("message_persisted").await;
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "message_persisted took {took:?} behind a hanging webhook"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_deliveries_are_dead_lettered_and_a_replay_delivers_them() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = failing.clone();
    let (url, mut rx) = receiver(move |_| {
        if f.load(Ordering::SeqCst) {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let app = TestApp::spawn_with(options(url, 3)).await;
    let conv = app.conversation(uid(), &[uid()]).await;
    for _ in 0..3 {
        assert_eq!(next(&mut rx).await.answered, Reply::Status(503));
    }
    let dead = eventually("the delivery in dead_letters", || async {
        postline::queue::dead_letters::list(&app.pool, 10)
            .await
            .unwrap()
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(dead.queue, "postline_background");
    assert_eq!(dead.attempts, 3);
    assert!(dead.error.contains("503"), "{}", dead.error);
    assert_eq!(dead.payload["kind"], "webhook");
    let (state, last_error): (String, Option<String>) =
        sqlx::query_as("select state, last_error from webhook_deliveries")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(state, "dead");
    assert!(last_error.unwrap_or_default().contains("503"));
    // The operators' query reads it.
    let rows = sqlx::raw_sql(include_str!("../../sql/webhooks.sql"))
        .fetch_all(&app.pool)
        .await
        .expect("sql/webhooks.sql runs");
    assert!(!rows.is_empty());

    // `postline dlq` sees it, and replays it once the receiver is fixed.
    let (ok, out) = postline(&["dlq", "list"], &app.db_url);
    assert!(
        ok && out.contains("postline_background") && out.contains("503"),
        "{out}"
    );
    let (ok, out) = postline(&["dlq", "show", &dead.id.to_string()], &app.db_url);
    assert!(ok && out.contains("\"webhook\""), "{out}");
    failing.store(false, Ordering::SeqCst);
    let (ok, out) = postline(&["dlq", "replay", &dead.id.to_string()], &app.db_url);
    assert!(ok && out.contains("replayed 1"), "{out}");
    let r = next(&mut rx).await;
    assert_eq!(r.answered, Reply::Status(200));
    assert_eq!(r.json["type"], "conversation.created");
    assert_eq!(r.json["data"]["conversation_id"], conv.to_string());
    assert!(r.signed_correctly());
    eventually("the delivery marked delivered", || async {
        let s: String = sqlx::query_scalar("select state from webhook_deliveries")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        (s == "delivered").then_some(())
    })
    .await;
    app.stop().await;
}

/// What the application does from its own side — the service API and
/// `postline.publish()` — is announced like what users do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_api_and_sql_publishes_emit_their_events_too() {
    let (url, mut rx) = receiver(|_| Reply::Status(204)).await;
    let mut o = options(url, 5);
    let key = "service-key-for-webhooks-0123";
    o.config.service_keys = postline::config::ServiceKeys::parse(&format!("app={key}")).unwrap();
    let app = TestApp::spawn_with(o).await;
    let (alice, bob) = (uid(), uid());
    let service =
        |idem: &str| format!("Authorization: Bearer {key}\r\nIdempotency-Key: {idem}\r\n");
    let body = json!({"member_ids": [alice.0]}).to_string();
    let (status, conv) = raw_http(
        app.addr,
        "POST",
        "/v1/service/conversations",
        &service("c1"),
        Some(&body),
    )
    .await;
    assert_eq!(status, 201, "{conv}");
    let conv_id = conv["id"].as_str().unwrap().to_owned();
    let created = next_of(&mut rx, "conversation.created").await;
    assert_eq!(created.json["data"]["conversation_id"], conv_id);

    let members = format!("/v1/service/conversations/{conv_id}/members");
    let body = json!({"user_id": bob.0}).to_string();
    assert_eq!(
        raw_http(app.addr, "POST", &members, &service("m1"), Some(&body))
            .await
            .0,
        201
    );
    let joined = next_of(&mut rx, "member.joined").await;
    assert_eq!(joined.json["data"]["user_id"], bob.0.to_string());

    let id: uuid::Uuid =
        sqlx::query_scalar("select postline.publish($1, $2, 'system', '\"from SQL\"'::jsonb)")
            .bind(conv_id.parse::<uuid::Uuid>().unwrap())
            .bind(alice.0)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let posted = next_of(&mut rx, "message.created").await;
    assert_eq!(
        posted.json["data"]["message"]["id"],
        id.to_string(),
        "{}",
        posted.body
    );
    assert_eq!(posted.json["data"]["message"]["kind"], "system");
    assert!(posted.signed_correctly());

    let gone = format!("{members}/{}", bob.0);
    assert_eq!(
        raw_http(app.addr, "DELETE", &gone, &service("m2"), None)
            .await
            .0,
        200
    );
    let left = next_of(&mut rx, "member.left").await;
    assert_eq!(left.json["data"]["user_id"], bob.0.to_string());
    app.stop().await;
}

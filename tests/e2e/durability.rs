use std::sync::Arc;
use std::time::Duration;

use postline::domain::{ClientMessageId, Content, ConversationId, Message, MessageId, MessageKind};
use postline::queue::Queue;
use postline::queue::{self, PersistJob, PERSIST_QUEUE};
use postline::worker::{BatchReport, Outcome, Worker, WorkerConfig};
use serde_json::json;
use tokio::sync::Notify;

use crate::harness::*;

pub fn worker(app: &TestApp, batch: i32) -> Worker {
    let mut cfg = WorkerConfig {
        batch_size: batch,
        visibility_timeout: Duration::from_secs(1),
        poll_interval: Duration::from_millis(20),
        ..WorkerConfig::default()
    };
    cfg.retry.base = Duration::from_millis(10);
    cfg.retry.cap = Duration::from_millis(40);
    cfg.retry.max_attempts = 3;
    Worker::new(app.pool.clone(), cfg, Arc::new(Notify::new()))
}

pub fn processed(jobs: usize, persisted: usize, duplicates: usize, dead: usize) -> Outcome {
    Outcome::Processed(
        Queue::Persist,
        BatchReport {
            jobs,
            persisted,
            duplicates,
            dead,
            ..BatchReport::default()
        },
    )
}

pub async fn gateway_only() -> TestApp {
    TestApp::spawn_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_between_enqueue_and_persist_loses_nothing() {
    let app = gateway_only().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let mut alice = app.ws(a).await;
    alice.join(conv).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let ack = alice
            .send_text(conv, &format!("k{i}"), &format!("m{i}"))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        acked.push(ack["message_id"].as_str().unwrap().to_owned());
    }
    // Acked means queued durably: all 20 jobs are in pgmq, none stored yet.
    assert_eq!(queue::depth(&app.pool, PERSIST_QUEUE).await.unwrap(), 20);
    assert!(stored(&app.pool, conv).await.is_empty());

    // A worker reads a batch and dies before doing anything with it.
    let taken = queue::read(&app.pool, PERSIST_QUEUE, 1, 8).await.unwrap();
    assert_eq!(taken.len(), 8);
    // Another dies mid-transaction, after inserting, before commit.
    let mut batch = queue::read(&app.pool, PERSIST_QUEUE, 1, 100).await.unwrap();
    assert_eq!(batch.len(), 12, "the first batch is invisible for now");
    let messages: Vec<Message> = batch
        .drain(..)
        .map(|j| PersistJob::decode(&j.message).unwrap())
        .collect();
    let mut tx = app.pool.begin().await.unwrap();
    let outcome =
        postline::store::persist_batch(&mut tx, &messages, &postline::crypto::Keyring::plain())
            .await
            .unwrap();
    assert_eq!(outcome.persisted.len(), 12);
    drop(tx); // the crash: rolled back
    assert!(stored(&app.pool, conv).await.is_empty());

    // A fresh worker picks everything up once the visibility timeout passes.
    let w = worker(&app, 7);
    let rows = eventually("all acked messages stored", || async {
        let _ = w.run_once().await.unwrap();
        let rows = stored(&app.pool, conv).await;
        (rows.len() >= 20).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 20, "stored exactly once");
    let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "gap-free");
    let mut ids: Vec<String> = rows.iter().map(|r| r.1.to_string()).collect();
    ids.sort();
    acked.sort();
    assert_eq!(ids, acked, "the stored ids are the acked ids");
    assert_eq!(w.run_once().await.unwrap(), Outcome::Idle);
    assert_eq!(queue::depth(&app.pool, PERSIST_QUEUE).await.unwrap(), 0);

    // And the gateway tells the room, through NOTIFY.
    let mut persisted = Vec::new();
    for _ in 0..20 {
        persisted.push(
            alice.recv_type("message_persisted").await["seq"]
                .as_i64()
                .unwrap(),
        );
    }
    persisted.sort();
    assert_eq!(persisted, (1..=20).collect::<Vec<_>>());
    app.stop().await;
}

pub fn message(conv: uuid::Uuid, sender: postline::domain::UserId, cmid: &str) -> Message {
    Message {
        id: MessageId::new_v7(),
        conversation_id: ConversationId(conv),
        sender_id: sender,
        client_message_id: ClientMessageId::parse(cmid).unwrap(),
        kind: MessageKind::Text,
        content: Content::parse(MessageKind::Text, json!("hi"), 100).unwrap(),
        created_at: postline::domain::now_micros(),
    }
}

/// Store `batch` in a transaction that must fail as an invariant (and is
/// rolled back); the reason given.
async fn refused_as_invariant(app: &TestApp, batch: &[Message]) -> String {
    let mut tx = app.pool.begin().await.unwrap();
    let err = postline::store::persist_batch(&mut tx, batch, &postline::crypto::Keyring::plain())
        .await
        .expect_err("the batch must fail");
    match err {
        postline::store::StoreError::Invariant(why) => why,
        other => panic!("not an invariant failure: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_written_past_the_conversation_lock_fails_the_batch_and_stores_nothing() {
    let app = gateway_only().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    // Another writer stored seq 1 without taking the conversation's lock
    // (last_seq still says 0): the next seq the batch assigns is taken.
    sqlx::query(
        "insert into messages (id, conversation_id, seq, sender_id, client_message_id, kind, content, created_at)
         values ($1, $2, 1, $3, 'rogue', 'text', '\"rogue\"', now())",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(conv)
    .bind(a.0)
    .execute(&app.pool)
    .await
    .unwrap();
    let batch = [message(conv, a, "one"), message(conv, a, "two")];
    // The unique (conversation_id, seq) refuses a second seq 1.
    let why = refused_as_invariant(&app, &batch).await;
    assert!(why.contains("bypassed the conversation lock"), "{why}");
    let rows = stored(&app.pool, conv).await;
    assert_eq!(rows.len(), 1, "only the rogue row: {rows:?}");
    assert_eq!(rows[0].2, "rogue");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_skipped_by_a_trigger_fails_the_batch_rather_than_leave_a_seq_gap() {
    let app = gateway_only().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    sqlx::raw_sql(
        r#"create function skip_second() returns trigger language plpgsql as $$
           begin
             if new.client_message_id = 'two' then return null; end if;
             return new;
           end $$;
           create trigger skip_second before insert on messages
             for each row execute function skip_second();"#,
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let batch = [
        message(conv, a, "one"),
        message(conv, a, "two"),
        message(conv, a, "three"),
    ];
    // Stored as is, seq 2 would be a gap.
    let why = refused_as_invariant(&app, &batch).await;
    assert!(why.contains("inserted 2 of 3"), "{why}");
    assert!(stored(&app.pool, conv).await.is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_two_connections_serves_the_enqueuer_the_worker_and_requests_alike() {
    // POSTLINE_DB_MAX_CONNECTIONS=2, the smallest accepted: LISTEN holds
    // one, so the enqueuer must not keep the other between batches.
    let (db_url, setup) = fresh_database().await;
    setup.close().await;
    let pool = postline::store::connect(&db_url, 2).await.unwrap();
    let app = TestApp::spawn_on(db_url, pool, Options::default()).await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let mut alice = app.ws(a).await;
    alice.join(conv).await;
    for i in 1..=3 {
        let ack = alice.send_text(conv, &format!("k{i}"), "hi").await;
        assert_eq!(ack["type"], "ack", "{ack}");
        // Stored by the worker, through the same connection.
        let persisted = alice.recv_type("message_persisted").await;
        assert_eq!(persisted["seq"], i, "{persisted}");
        // And a request that reads the database is answered too.
        let (status, page) = app.history(a, conv).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            page["messages"].as_array().map(Vec::len),
            Some(i as usize),
            "{page}"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_enqueued_twice_is_stored_once() {
    let app = gateway_only().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let m = message(conv, a, "twice");
    // The same job twice (a retried enqueue), and the same client id under a
    // new message id (a gateway whose dedup cache forgot it), in separate batches.
    let job = serde_json::to_value(PersistJob::from_message(&m)).unwrap();
    queue::send_batch(&app.pool, PERSIST_QUEUE, &[job.clone(), job])
        .await
        .unwrap();
    let w = worker(&app, 100);
    assert_eq!(w.run_once().await.unwrap(), processed(2, 1, 1, 0));
    let mut again = m.clone();
    again.id = MessageId::new_v7();
    let job = serde_json::to_value(PersistJob::from_message(&again)).unwrap();
    queue::send_batch(&app.pool, PERSIST_QUEUE, &[job])
        .await
        .unwrap();
    assert_eq!(w.run_once().await.unwrap(), processed(1, 0, 1, 0));
    let rows = stored(&app.pool, conv).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, m.id.0);
    assert_eq!(queue::depth(&app.pool, PERSIST_QUEUE).await.unwrap(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_can_never_succeed_are_dead_lettered_at_once_without_blocking_the_batch() {
    let app = gateway_only().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let good = serde_json::to_value(PersistJob::from_message(&message(conv, a, "good"))).unwrap();
    let orphan = serde_json::to_value(PersistJob::from_message(&message(
        uuid::Uuid::now_v7(),
        a,
        "orphan",
    )))
    .unwrap();
    let malformed = json!({"v": 1, "what": "is this"});
    queue::send_batch(&app.pool, PERSIST_QUEUE, &[malformed, good, orphan])
        .await
        .unwrap();
    let w = worker(&app, 100);
    assert_eq!(w.run_once().await.unwrap(), processed(3, 1, 0, 2));
    assert_eq!(stored(&app.pool, conv).await.len(), 1);
    assert_eq!(queue::depth(&app.pool, PERSIST_QUEUE).await.unwrap(), 0);
    let archived = count(&app.pool, "select count(*) from pgmq.a_postline_persist").await;
    assert_eq!(archived, 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_keep_seqs_gap_free() {
    let app = gateway_only().await;
    let a = uid();
    let convs = [
        app.conversation(a, &[]).await,
        app.conversation(a, &[]).await,
        app.conversation(a, &[]).await,
    ];
    let jobs: Vec<serde_json::Value> = (0..300)
        .map(|i| {
            serde_json::to_value(PersistJob::from_message(&message(
                convs[i % 3],
                a,
                &format!("c{i}"),
            )))
            .unwrap()
        })
        .collect();
    queue::send_batch(&app.pool, PERSIST_QUEUE, &jobs)
        .await
        .unwrap();
    let drain = |w: Worker| async move {
        loop {
            if w.run_once().await.unwrap() == Outcome::Idle {
                break;
            }
        }
    };
    tokio::join!(
        drain(worker(&app, 7)),
        drain(worker(&app, 11)),
        drain(worker(&app, 5))
    );
    for conv in convs {
        let seqs: Vec<i64> = stored(&app.pool, conv).await.iter().map(|r| r.0).collect();
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
        let last: i64 = sqlx::query_scalar("select last_seq from conversations where id = $1")
            .bind(conv)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(last, 100);
    }
    app.stop().await;
}

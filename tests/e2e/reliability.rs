//! Retries, dead letters, replay, priority and cleanup, against real Postgres.

use std::process::Command;

use postline::queue::{self, BackgroundJob, PersistJob, Queue, BACKGROUND_QUEUE, PERSIST_QUEUE};
use postline::worker::Outcome;
use serde_json::json;

use crate::durability::{gateway_only, message, worker};
use crate::harness::*;

/// A stand-in for a real poison message: the database itself refuses this
/// row, every time, as a check or a moderation trigger would.
async fn install_poison_trigger(pool: &sqlx::PgPool) {
    sqlx::raw_sql(
        r#"create function reject_poison() returns trigger language plpgsql as $$
           begin
             if new.content = '"poison"'::jsonb then
               raise exception 'poison message rejected (test trigger)';
             end if;
             return new;
           end $$;
           create trigger reject_poison before insert on messages
             for each row execute function reject_poison();"#,
    )
    .execute(pool)
    .await
    .unwrap();
}

fn job_with(
    conv: uuid::Uuid,
    sender: postline::domain::UserId,
    cmid: &str,
    text: &str,
) -> serde_json::Value {
    let mut job =
        serde_json::to_value(PersistJob::from_message(&message(conv, sender, cmid))).unwrap();
    job["content"] = json!(text);
    job
}

/// The next chat batch `w` processes, background batches on the way
/// applied (the audit rows of the conversation's creation and of the
/// operator's replay are background jobs too).
async fn next_chat_batch(w: &postline::worker::Worker) -> Outcome {
    loop {
        match w.run_once().await.unwrap() {
            Outcome::Processed(Queue::Background, _) => continue,
            other => return other,
        }
    }
}

/// A worker that has applied the background jobs of the setup (the
/// conversation's audit row), so the test's own are counted alone.
async fn worker_past_setup(app: &TestApp, batch: i32) -> postline::worker::Worker {
    let w = worker(app, batch);
    while let Outcome::Processed(..) = w.run_once().await.unwrap() {}
    w
}

fn postline_cli(args: &[&str], db_url: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_postline"))
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_is_retried_then_dead_lettered_while_its_batch_persists_and_replay_stores_it_once(
) {
    let app = gateway_only().await;
    install_poison_trigger(&app.pool).await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let poison = job_with(conv, a, "p", "poison");
    let jobs = vec![
        job_with(conv, a, "a", "first"),
        poison.clone(),
        job_with(conv, a, "b", "second"),
    ];
    queue::send_batch(&app.pool, PERSIST_QUEUE, &jobs)
        .await
        .unwrap();

    let w = worker(&app, 100);
    let first = w.run_once().await.unwrap();
    let Outcome::Processed(Queue::Persist, report) = first else {
        panic!("{first:?}")
    };
    assert_eq!(
        (report.jobs, report.persisted, report.retried, report.dead),
        (3, 2, 1, 0),
        "{report:?}"
    );
    let rows = stored(&app.pool, conv).await;
    let order: Vec<(i64, String)> = rows.iter().map(|r| (r.0, r.2.clone())).collect();
    assert_eq!(
        order,
        vec![(1, "a".into()), (2, "b".into())],
        "the others are not held hostage"
    );
    let (failures, error): (i32, String) =
        sqlx::query_as("select failures, last_error from job_failures")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(failures, 1);
    assert!(error.contains("poison message rejected"), "{error}");

    // Backoff, retry, and after max_attempts (3) the dead-letter table.
    let dead = eventually("the poison job is dead-lettered", || async {
        match w.run_once().await.unwrap() {
            Outcome::Processed(_, r) if r.dead == 1 => Some(r),
            _ => None,
        }
    })
    .await;
    assert_eq!(dead.persisted, 0);
    let (id, attempts, err, payload, first, last): (
        i64,
        i32,
        String,
        serde_json::Value,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    ) = sqlx::query_as(
        "select id, attempts, error, payload, first_failed_at, last_failed_at from dead_letters",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 3);
    assert!(err.contains("poison message rejected"));
    assert_eq!(payload, poison);
    assert!(first < last, "first failure {first} before the last {last}");
    assert_eq!(queue::depth(&app.pool, PERSIST_QUEUE).await.unwrap(), 0);
    let left = count(&app.pool, "select count(*) from job_failures").await;
    assert_eq!(left, 0, "failure history moves with the dead letter");
    let archived = count(&app.pool, "select count(*) from pgmq.a_postline_persist").await;
    assert_eq!(archived, 1);
    assert_eq!(stored(&app.pool, conv).await.len(), 2);

    // The operator looks, fixes the cause, and replays.
    let (ok, out) = postline_cli(&["dlq", "list"], &app.db_url);
    assert!(
        ok && out.contains("1 dead letter(s)") && out.contains("poison message rejected"),
        "{out}"
    );
    let (ok, out) = postline_cli(&["dlq", "show", &id.to_string()], &app.db_url);
    assert!(ok && out.contains("\"poison\""), "{out}");
    sqlx::query("drop trigger reject_poison on messages")
        .execute(&app.pool)
        .await
        .unwrap();
    let (ok, out) = postline_cli(&["dlq", "replay", &id.to_string()], &app.db_url);
    assert!(ok && out.contains("replayed 1"), "{out}");
    let (ok, out) = postline_cli(&["dlq", "replay", &id.to_string()], &app.db_url);
    assert!(
        !ok && out.contains("no dead letter"),
        "replaying twice is refused: {out}"
    );
    assert_eq!(
        next_chat_batch(&w).await,
        crate::durability::processed(1, 1, 0, 0)
    );
    // Even if the same payload came back once more, it is stored once.
    queue::send_batch(&app.pool, PERSIST_QUEUE, std::slice::from_ref(&poison))
        .await
        .unwrap();
    assert_eq!(
        next_chat_batch(&w).await,
        crate::durability::processed(1, 0, 1, 0)
    );
    let rows = stored(&app.pool, conv).await;
    assert_eq!(rows.len(), 3);
    assert_eq!((rows[2].0, rows[2].2.as_str()), (3, "p"));
    assert_eq!(
        rows[2].1.to_string(),
        poison["id"].as_str().unwrap(),
        "the message id is stable"
    );

    // Purge removes only what is old enough.
    queue::send_batch(&app.pool, PERSIST_QUEUE, &[json!({"v": 1, "junk": true})])
        .await
        .unwrap();
    w.run_once().await.unwrap();
    queue::send_batch(
        &app.pool,
        PERSIST_QUEUE,
        &[json!({"v": 1, "junk": "recent"})],
    )
    .await
    .unwrap();
    w.run_once().await.unwrap();
    sqlx::query("update dead_letters set dead_at = now() - interval '2 days' where payload->>'junk' = 'true'")
        .execute(&app.pool)
        .await
        .unwrap();
    let (ok, out) = postline_cli(&["dlq", "purge", "--older-than", "1d"], &app.db_url);
    assert!(ok && out.contains("purged 1"), "{out}");
    let (ok, out) = postline_cli(&["dlq", "list"], &app.db_url);
    assert!(ok && out.contains("1 dead letter(s)"), "{out}");
    let (ok, out) = postline_cli(&["dlq", "purge", "--older-than", "soon"], &app.db_url);
    assert!(!ok && out.contains("bad duration"), "{out}");
    app.stop().await;
}

fn marker(conv: uuid::Uuid, user: postline::domain::UserId, seq: i64) -> serde_json::Value {
    serde_json::to_value(BackgroundJob::ReadMarker {
        v: 1,
        conversation_id: postline::domain::ConversationId(conv),
        user_id: user,
        seq: postline::domain::Seq(seq),
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_messages_are_drained_before_background_jobs() {
    let app = gateway_only().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let w = worker_past_setup(&app, 10).await;
    // Background work is queued first, chat second.
    let low: Vec<_> = (1..=30).map(|s| marker(conv, a, s)).collect();
    queue::send_batch(&app.pool, BACKGROUND_QUEUE, &low)
        .await
        .unwrap();
    let high: Vec<_> = (0..30)
        .map(|i| job_with(conv, a, &format!("h{i}"), "hi"))
        .collect();
    queue::send_batch(&app.pool, PERSIST_QUEUE, &high)
        .await
        .unwrap();

    let mut order = Vec::new();
    loop {
        match w.run_once().await.unwrap() {
            Outcome::Idle => break,
            Outcome::Processed(q, _) => order.push(q),
        }
    }
    use Queue::{Background as L, Persist as H};
    assert_eq!(order, vec![H, H, H, L, L, L]);
    // The markers moved forward to the highest seq, capped at the last message.
    let read: i64 =
        sqlx::query_scalar("select last_read_seq from conversation_members where user_id = $1")
            .bind(a.0)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(read, 30);
    // A lower marker never moves it back.
    queue::send_batch(&app.pool, BACKGROUND_QUEUE, &[marker(conv, a, 3)])
        .await
        .unwrap();
    w.run_once().await.unwrap();
    let read: i64 =
        sqlx::query_scalar("select last_read_seq from conversation_members where user_id = $1")
            .bind(a.0)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(read, 30);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_jobs_make_progress_under_constant_chat_load() {
    let app = gateway_only().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let w = worker_past_setup(&app, 10).await;
    let low: Vec<_> = (1..=20).map(|s| marker(conv, a, s)).collect();
    queue::send_batch(&app.pool, BACKGROUND_QUEUE, &low)
        .await
        .unwrap();
    let mut order = Vec::new();
    for round in 0..15 {
        // The chat queue never runs dry.
        let high: Vec<_> = (0..10)
            .map(|i| job_with(conv, a, &format!("r{round}-{i}"), "busy"))
            .collect();
        queue::send_batch(&app.pool, PERSIST_QUEUE, &high)
            .await
            .unwrap();
        match w.run_once().await.unwrap() {
            Outcome::Processed(q, _) => order.push(q),
            Outcome::Idle => panic!("there is always work"),
        }
    }
    let low_turns: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, q)| **q == Queue::Background)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        low_turns,
        vec![4, 9],
        "one background batch after every 4 chat batches: {order:?}"
    );
    assert_eq!(queue::depth(&app.pool, BACKGROUND_QUEUE).await.unwrap(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_archived_jobs_stale_failures_and_old_delivered_webhooks() {
    let app = gateway_only().await;
    let w = worker(&app, 10);
    queue::send_batch(
        &app.pool,
        PERSIST_QUEUE,
        &[json!({"bad": 1}), json!({"bad": 2})],
    )
    .await
    .unwrap();
    w.run_once().await.unwrap();
    sqlx::query("update pgmq.a_postline_persist set archived_at = now() - interval '8 days' where message->>'bad' = '1'")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("insert into job_failures (queue, msg_id, last_error) values ('postline_persist', 987654, 'gone')")
        .execute(&app.pool)
        .await
        .unwrap();
    // Webhook deliveries: only those delivered before the retention go.
    sqlx::query(
        "insert into webhook_deliveries
             (event_id, event_type, endpoint, conversation_id, body, state, created_at, delivered_at)
         select gen_random_uuid(), 'member.joined', 'http://h:80/', gen_random_uuid(), '{}', s, now() - interval '9 days', d
         from (values ('delivered', now() - interval '8 days'), ('delivered', now()),
                      ('pending', null), ('dead', null)) as v(s, d)",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let report = w.cleanup_once().await.unwrap();
    assert_eq!((report.archived_rows, report.stale_failures), (1, 1));
    assert_eq!(report.webhook_deliveries, 1);
    let kept = count(&app.pool, "select count(*) from webhook_deliveries").await;
    assert_eq!(kept, 3, "recent, pending and dead deliveries stay");
    let left = count(&app.pool, "select count(*) from pgmq.a_postline_persist").await;
    assert_eq!(left, 1, "the recent archive row stays");
    // The dead-letter table is the operator's, not the cleaner's.
    let dead = count(&app.pool, "select count(*) from dead_letters").await;
    assert_eq!(dead, 2);
    app.stop().await;
}

/// Enqueue `job` alone and have `w` store it.
async fn store_one(app: &TestApp, w: &postline::worker::Worker, job: serde_json::Value) {
    queue::send_batch(&app.pool, PERSIST_QUEUE, &[job])
        .await
        .unwrap();
    assert_eq!(
        next_chat_batch(w).await,
        crate::durability::processed(1, 1, 0, 0)
    );
}

/// (seq, client_message_id) of what `conv` holds, in seq order.
async fn stored_order(pool: &sqlx::PgPool, conv: uuid::Uuid) -> Vec<(i64, String)> {
    stored(pool, conv)
        .await
        .into_iter()
        .map(|r| (r.0, r.2))
        .collect()
}

/// Counts the writes a worker makes to the persist queue's rows other than
/// deleting them (pgmq's `read` and `set_vt` update them).
async fn count_queue_updates(pool: &sqlx::PgPool) {
    sqlx::raw_sql(
        r#"create table queue_updates (msg_id bigint, read_ct int);
           create function note_queue_update() returns trigger language plpgsql as $$
           begin
             insert into queue_updates values (new.msg_id, new.read_ct);
             return new;
           end $$;
           create trigger note_queue_update before update on pgmq.q_postline_persist
             for each row execute function note_queue_update();"#,
    )
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reads_its_first_batch_then_claims_batches_in_the_transaction_that_stores_them() {
    let app = gateway_only().await;
    count_queue_updates(&app.pool).await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let w = worker_past_setup(&app, 100).await;

    // A fresh worker reads the careful way: the attempt is written first.
    store_one(&app, &w, job_with(conv, a, "a", "first")).await;
    let updates = count(&app.pool, "select count(*) from queue_updates").await;
    assert_eq!(updates, 1, "the first batch was read (read_ct written)");

    // Then: claimed, stored and deleted in one transaction, no write to take it.
    let jobs = vec![
        job_with(conv, a, "b", "second"),
        job_with(conv, a, "c", "third"),
    ];
    queue::send_batch(&app.pool, PERSIST_QUEUE, &jobs)
        .await
        .unwrap();
    assert_eq!(
        next_chat_batch(&w).await,
        crate::durability::processed(2, 2, 0, 0)
    );
    let updates = count(&app.pool, "select count(*) from queue_updates").await;
    assert_eq!(updates, 1, "claimed jobs are not updated, only deleted");
    let order = stored_order(&app.pool, conv).await;
    assert_eq!(
        order,
        vec![(1, "a".into()), (2, "b".into()), (3, "c".into())]
    );
    assert_eq!(queue::depth(&app.pool, PERSIST_QUEUE).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_batch_that_fails_leaves_no_trace_and_its_jobs_are_read_again_with_the_attempt_counted(
) {
    let app = gateway_only().await;
    install_poison_trigger(&app.pool).await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let w = worker_past_setup(&app, 100).await;
    store_one(&app, &w, job_with(conv, a, "a", "first")).await;

    // Claimed (the worker is past its first batch); the insert fails, the
    // claim rolls back, and the same jobs are read, counted and split.
    let jobs = vec![
        job_with(conv, a, "b", "second"),
        job_with(conv, a, "p", "poison"),
        job_with(conv, a, "c", "third"),
    ];
    queue::send_batch(&app.pool, PERSIST_QUEUE, &jobs)
        .await
        .unwrap();
    let outcome = next_chat_batch(&w).await;
    let Outcome::Processed(Queue::Persist, report) = &outcome else {
        panic!("expected a persist batch, got {outcome:?}")
    };
    assert_eq!(
        (report.jobs, report.persisted, report.retried, report.dead),
        (3, 2, 1, 0),
        "{report:?}"
    );
    let (read_ct, failures): (i32, i32) = sqlx::query_as(
        "select q.read_ct, f.failures from pgmq.q_postline_persist q
         join job_failures f on f.msg_id = q.msg_id",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (read_ct, failures),
        (1, 1),
        "one attempt counted: the failed claim wrote nothing"
    );
    let order = stored_order(&app.pool, conv).await;
    assert_eq!(
        order,
        vec![(1, "a".into()), (2, "b".into()), (3, "c".into())],
        "no seq was spent on the rolled-back claim"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_jobs_are_skipped_by_other_workers_and_visible_again_at_once_if_the_claim_dies() {
    let app = gateway_only().await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    queue::send_batch(&app.pool, PERSIST_QUEUE, &[job_with(conv, a, "a", "first")])
        .await
        .unwrap();

    let mut first = app.pool.begin().await.unwrap();
    let claimed = queue::claim(&mut first, PERSIST_QUEUE, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].read_ct, 1, "the attempt this is");
    let mut second = app.pool.begin().await.unwrap();
    let other = queue::claim(&mut second, PERSIST_QUEUE, 10).await.unwrap();
    assert!(other.is_empty(), "locked jobs are skipped, not waited for");
    let read = queue::read(&app.pool, PERSIST_QUEUE, 30, 10).await.unwrap();
    assert!(read.is_empty(), "nor read by a careful worker");
    drop(second);

    // The claiming worker dies: its transaction goes, the job stays, unread.
    first.rollback().await.unwrap();
    let (read_ct, hidden): (i32, bool) = sqlx::query_as(
        "select read_ct, vt > clock_timestamp() from pgmq.q_postline_persist where msg_id = $1",
    )
    .bind(claimed[0].msg_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        (read_ct, hidden),
        (0, false),
        "visible at once, no attempt stored"
    );
    let w = worker(&app, 100);
    assert_eq!(
        next_chat_batch(&w).await,
        crate::durability::processed(1, 1, 0, 0)
    );
    assert_eq!(stored(&app.pool, conv).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persist_batches_stay_claimed_when_the_background_queue_s_turn_finds_nothing() {
    let app = gateway_only().await;
    count_queue_updates(&app.pool).await;
    let a = uid();
    let conv = app.conversation(a, &[]).await;
    let w = worker_past_setup(&app, 1).await;
    store_one(&app, &w, job_with(conv, a, "a", "first")).await;
    // Batches of one: more than `starvation_limit` (4) in a row, so the
    // background queue gets its turns on the way.
    let jobs: Vec<_> = (0..10)
        .map(|i| job_with(conv, a, &format!("m{i}"), "busy"))
        .collect();
    queue::send_batch(&app.pool, PERSIST_QUEUE, &jobs)
        .await
        .unwrap();
    for _ in 0..10 {
        assert_eq!(
            next_chat_batch(&w).await,
            crate::durability::processed(1, 1, 0, 0)
        );
    }
    let updates = count(&app.pool, "select count(*) from queue_updates").await;
    assert_eq!(
        updates, 1,
        "only the first batch was read; every later one claimed"
    );
    assert_eq!(stored(&app.pool, conv).await.len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_that_died_while_idle_is_replaced_not_handed_out() {
    let app = gateway_only().await;
    let pool = postline::store::connect(&app.db_url, 1).await.unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    // Postgres ends it while it waits in the pool (a restart, an idle timeout).
    let ended: bool = sqlx::query_scalar("select pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(ended);
    // Idle long enough to be tested before it is handed out again.
    tokio::time::sleep(postline::store::TEST_IDLE_AFTER + std::time::Duration::from_millis(200))
        .await;
    let again: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .expect("the dead connection was handed out instead of replaced");
    assert_ne!(again, pid);
}

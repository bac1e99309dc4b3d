//! The audit log's own guarantees: operators' dead-letter replays and
//! purges through the binary are recorded with their OS user; a job applied
//! twice is one row; every action kind is accepted; the time is the
//! action's; the table refuses updates and deletes except the retention.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use postline::queue::audit::{self, Action, Actor, Origin};
use postline::queue::{self, BACKGROUND_QUEUE, PERSIST_QUEUE};
use postline::worker::{Outcome, Worker, WorkerConfig};
use serde_json::json;
use tokio::sync::Notify;

use crate::audit::rows;
use crate::durability::{gateway_only, worker};
use crate::harness::*;

/// Run `w` until both queues are empty of visible jobs.
async fn drain(w: &Worker) {
    eventually("the worker drained the queues", || async {
        matches!(w.run_once().await.unwrap(), Outcome::Idle).then_some(())
    })
    .await;
}

fn dlq(db_url: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_postline"))
        .arg("dlq")
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("USER", "ops-ana")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replays_and_purges_through_the_binary_leave_one_row_each_naming_the_os_user() {
    let app = gateway_only().await;
    let w = worker(&app, 10);
    let junk = [json!({"junk": 1}), json!({"junk": 2}), json!({"junk": 3})];
    queue::send_batch(&app.pool, PERSIST_QUEUE, &junk)
        .await
        .unwrap();
    drain(&w).await;
    let dead: Vec<(i64, i64)> = sqlx::query_as("select id, msg_id from dead_letters order by id")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(dead.len(), 3);
    sqlx::query("update dead_letters set dead_at = now() - interval '2 days' where id = $1")
        .bind(dead[1].0)
        .execute(&app.pool)
        .await
        .unwrap();

    let (ok, out) = dlq(&app.db_url, &["replay", &dead[0].0.to_string()]);
    assert!(ok && out.contains("replayed 1"), "{out}");
    let (ok, _) = dlq(&app.db_url, &["replay", "999999"]);
    assert!(!ok, "nothing to replay: refused, and nothing recorded");
    let (ok, out) = dlq(&app.db_url, &["purge", "--older-than", "1d"]);
    assert!(ok && out.contains("purged 1"), "{out}");
    let (ok, out) = dlq(&app.db_url, &["purge", "--older-than", "1d"]);
    assert!(ok && out.contains("purged 0"), "{out}");
    let (ok, out) = dlq(&app.db_url, &["replay", "--all"]);
    assert!(ok && out.contains("replayed 1"), "{out}");
    // The replayed junk dies again; the audit jobs are applied.
    drain(&w).await;

    let rows = rows(&app.pool).await;
    let got: Vec<(&str, &str, &str, Option<i64>)> = rows
        .iter()
        .map(|r| {
            (
                r.action.as_str(),
                r.actor_kind.as_str(),
                r.actor_id.as_str(),
                r.dead_letter_id,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("dlq.replay", "operator", "ops-ana", Some(dead[0].0)),
            ("dlq.purge", "operator", "ops-ana", None),
            ("dlq.replay", "operator", "ops-ana", None),
        ]
    );
    for r in &rows {
        assert_eq!(
            (r.ip.as_deref(), r.gateway_id),
            (None, None),
            "no gateway, no client address"
        );
    }
    assert_eq!(rows[0].detail["jobs"][0]["msg_id"], dead[0].1);
    assert_eq!(
        (
            rows[0].detail["all"].clone(),
            rows[0].detail["replayed"].clone()
        ),
        (json!(false), json!(1))
    );
    assert_eq!(rows[1].detail["purged"], 1);
    assert_eq!(rows[1].detail["older_than_secs"], 86_400);
    assert_eq!(rows[1].detail["jobs"][0]["id"], dead[1].0);
    assert_eq!(rows[2].detail["all"], true);
    assert_eq!(rows[2].detail["jobs"][0]["id"], dead[2].0);
    let out = crate::audit::psql_audit(&app.db_url, &[]);
    assert!(
        out.lines()
            .any(|l| l.contains("dlq.purge") && l.contains("ops-ana")),
        "{out}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_job_applied_twice_is_one_row_and_every_action_kind_is_accepted() {
    let app = gateway_only().await;
    let w = worker(&app, 10);
    let by = Origin::default().by(Actor::System("test".into()));
    // Recorded in a transaction: the row's time is that transaction's now().
    let mut tx = app.pool.begin().await.unwrap();
    let rotated = by.did(Action::KeysRotate).detail(json!({"key": "k2"}));
    audit::record(&mut *tx, &rotated).await.unwrap();
    let acted_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("select now()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // The same job again, twice in one batch (a crash after the enqueue
    // retried, a replay from the dead-letter table) ...
    let (job,): (serde_json::Value,) =
        sqlx::query_as("select message from pgmq.q_postline_background")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(job["event"]["event_id"], json!(rotated.event_id));
    queue::send_batch(&app.pool, BACKGROUND_QUEUE, &[job.clone(), job.clone()])
        .await
        .unwrap();
    drain(&w).await;
    // ... and once more in a later batch.
    queue::send_batch(&app.pool, BACKGROUND_QUEUE, &[job])
        .await
        .unwrap();
    drain(&w).await;
    let once = rows(&app.pool).await;
    assert_eq!(once.len(), 1, "{once:?}");
    assert_eq!(once[0].at, acted_at, "the action's time");
    assert!(once[0].recorded_at > once[0].at);

    // Every kind in the type is one the table accepts, moderation and keys included.
    let all: Vec<_> = Action::ALL.iter().map(|a| by.did(*a)).collect();
    audit::record_all(&app.pool, &all).await.unwrap();
    drain(&w).await;
    let stored: Vec<String> = rows(&app.pool)
        .await
        .into_iter()
        .skip(1)
        .map(|r| r.action)
        .collect();
    let want: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
    assert_eq!(stored, want);
    let dead = count(&app.pool, "select count(*) from dead_letters").await;
    assert_eq!(dead, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_refuses_updates_and_deletes_and_retention_removes_only_old_rows() {
    let app = gateway_only().await;
    let by = Origin::default().by(Actor::System("test".into()));
    audit::record(&app.pool, &by.did(Action::KeysRotate))
        .await
        .unwrap();
    drain(&worker(&app, 10)).await;
    sqlx::query(
        "insert into audit_log (event_id, at, actor_kind, actor_id, action)
         values (gen_random_uuid(), now() - interval '100 days', 'system', 'test', 'keys.rotate')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    for sql in [
        "update audit_log set actor_id = 'someone else'",
        "delete from audit_log",
        "delete from audit_log where at < now() - interval '90 days'",
        "truncate audit_log",
    ] {
        let e = sqlx::raw_sql(sql).execute(&app.pool).await.unwrap_err();
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {e}");
        assert!(e.to_string().contains("append-only"), "{e}");
    }
    let e = sqlx::raw_sql("select postline.audit_prune('1 minute')")
        .execute(&app.pool)
        .await;
    assert!(e.unwrap_err().to_string().contains("at least an hour"));
    assert_eq!(count(&app.pool, "select count(*) from audit_log").await, 2);

    // POSTLINE_AUDIT_RETENTION_HOURS=0: kept forever.
    let forever = WorkerConfig {
        audit_retention: None,
        ..WorkerConfig::default()
    };
    let w = Worker::new(app.pool.clone(), forever, Arc::new(Notify::new()));
    assert_eq!(w.cleanup_once().await.unwrap().audit_rows, 0);
    // The default, 90 days: the old row goes, the recent one stays.
    let w = Worker::new(
        app.pool.clone(),
        WorkerConfig::default(),
        Arc::new(Notify::new()),
    );
    assert_eq!(
        WorkerConfig::default().audit_retention,
        Some(Duration::from_secs(90 * 86_400))
    );
    assert_eq!(w.cleanup_once().await.unwrap().audit_rows, 1);
    let left = rows(&app.pool).await;
    assert_eq!(left.len(), 1);
    assert!(left[0].at > chrono::Utc::now() - chrono::Duration::days(1));
    app.stop().await;
}

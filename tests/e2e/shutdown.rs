//! Shutdown is bounded by one deadline, whatever hangs.

use std::time::Duration;

use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::io::AsyncWriteExt;

use crate::harness::*;

/// Backends waiting on a lock whose query matches `pattern`.
async fn waiting(pool: &PgPool, pattern: &str) -> i64 {
    sqlx::query_scalar(
        "select count(*) from pg_stat_activity \
         where wait_event_type = 'Lock' and query like $1",
    )
    .bind(pattern)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_returns_by_the_shutdown_deadline_while_requests_and_the_persist_flush_hang() {
    let grace = Duration::from_secs(2);
    let mut opts = Options::default();
    opts.config.shutdown_grace = grace;
    let app = TestApp::spawn_with(opts).await;
    let Pair {
        a, conv, mut alice, ..
    } = app.pair().await;

    // From a connection of its own, hold the persist queue's table and the
    // messages table: every enqueue into it (the persist flush), the
    // worker's reads and any history request now wait.
    let mut locker = PgConnection::connect(&app.db_url).await.unwrap();
    let mut lock = locker.begin().await.unwrap();
    sqlx::query("lock table pgmq.q_postline_persist, messages in access exclusive mode")
        .execute(&mut *lock)
        .await
        .unwrap();
    for i in 0..3 {
        alice
            .send(json!({
                "type": "send_message", "ref": format!("s{i}"), "conversation_id": conv,
                "client_message_id": format!("stuck-{i}"), "content": "never flushed in time"
            }))
            .await;
    }
    // An HTTP request in flight: its handler waits on the messages table.
    let mut request = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "GET /v1/conversations/{conv}/messages?after_seq=0 HTTP/1.1\r\nHost: postline\r\n\
         Authorization: Bearer {}\r\n\r\n",
        app.token(a)
    );
    request.write_all(head.as_bytes()).await.unwrap();

    // Both stages are stuck for real before shutdown is requested.
    let pool = app.pool.clone();
    eventually(
        "an enqueue and a history query waiting on the lock",
        || async {
            (waiting(&pool, "%insert into pgmq.q_postline_persist%").await > 0
                && waiting(&pool, "%from messages%").await > 0)
                .then_some(())
        },
    )
    .await;

    // A hang detector, not a latency test: the bound is loose on purpose.
    let took = app.stop_within(grace + Duration::from_secs(4)).await;
    eprintln!("serve() returned {took:?} after shutdown (grace {grace:?})");

    drop(request);
    lock.rollback().await.unwrap();
}

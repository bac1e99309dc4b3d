//! Dead letters: jobs that retrying will not fix. A job is buried in one
//! transaction (row in `dead_letters`, archived in pgmq, failure history
//! dropped), and can be inspected, replayed into its queue, or purged;
//! replays and purges are audited (`queue::audit`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{PgConnection, PgExecutor, PgPool};

use super::audit::{self, Action, Caller};
use super::{QueueError, RawJob};

/// Record one failed attempt of a job that will be retried.
pub async fn record_failure<'e>(
    ex: impl PgExecutor<'e>,
    queue: &str,
    msg_id: i64,
    error: &str,
) -> Result<(), QueueError> {
    sqlx::query(
        "insert into job_failures (queue, msg_id, last_error) values ($1, $2, $3)
         on conflict (queue, msg_id) do update
         set failures = job_failures.failures + 1, last_failed_at = now(), last_error = excluded.last_error",
    )
    .bind(queue)
    .bind(msg_id)
    .bind(error)
    .execute(ex)
    .await?;
    Ok(())
}

/// How many attempts of a job failed so far (0 if none did): attempts
/// counted apart from `read_ct`, which also counts reads that only found a
/// pool beside the worker full.
pub async fn failures<'e>(
    ex: impl PgExecutor<'e>,
    queue: &str,
    msg_id: i64,
) -> Result<i32, QueueError> {
    let n: Option<i32> =
        sqlx::query_scalar("select failures from job_failures where queue = $1 and msg_id = $2")
            .bind(queue)
            .bind(msg_id)
            .fetch_optional(ex)
            .await?;
    Ok(n.unwrap_or(0))
}

/// Move a job to the dead-letter table and archive it in pgmq, in the
/// caller's transaction.
pub async fn bury(
    conn: &mut PgConnection,
    queue: &str,
    job: &RawJob,
    error: &str,
) -> Result<(), QueueError> {
    sqlx::query(
        "with history as (
             delete from job_failures where queue = $1 and msg_id = $2
             returning first_failed_at
         )
         insert into dead_letters (queue, msg_id, payload, error, attempts, enqueued_at, first_failed_at, last_failed_at)
         values ($1, $2, $3, $4, $5, $6, coalesce((select first_failed_at from history), now()), now())
         on conflict (queue, msg_id) do nothing",
    )
    .bind(queue)
    .bind(job.msg_id)
    .bind(&job.message)
    .bind(error)
    .bind(job.read_ct)
    .bind(job.enqueued_at)
    .execute(&mut *conn)
    .await?;
    super::archive(&mut *conn, queue, &[job.msg_id]).await?;
    Ok(())
}

/// Forget the failure history of jobs that finally succeeded.
pub async fn forget_failures<'e>(
    ex: impl PgExecutor<'e>,
    queue: &str,
    msg_ids: &[i64],
) -> Result<(), QueueError> {
    sqlx::query("delete from job_failures where queue = $1 and msg_id = any($2)")
        .bind(queue)
        .bind(msg_ids)
        .execute(ex)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub queue: String,
    pub msg_id: i64,
    pub payload: serde_json::Value,
    pub error: String,
    pub attempts: i32,
    pub enqueued_at: DateTime<Utc>,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    pub dead_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, queue, msg_id, payload, error, attempts, enqueued_at, first_failed_at, last_failed_at, dead_at";

/// The newest dead letters first.
pub async fn list(pool: &PgPool, limit: i64) -> Result<Vec<DeadLetter>, QueueError> {
    Ok(sqlx::query_as::<_, DeadLetter>(&format!(
        "select {COLUMNS} from dead_letters order by id desc limit $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<DeadLetter>, QueueError> {
    Ok(sqlx::query_as::<_, DeadLetter>(&format!(
        "select {COLUMNS} from dead_letters where id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Dead letters named one by one in an audit row's `detail.jobs`; past
/// this many the list is cut (`detail.truncated`), the count stays exact.
const AUDITED_JOBS: usize = 100;

/// Put dead letters back into their queues (as new jobs) and remove them
/// from the table, in one transaction; `None` replays all. Replaying is
/// idempotent for messages: their ids are stable and the worker stores a
/// message once. Audited as done `by` (one `dlq.replay` row, in the same
/// transaction) when anything was replayed. Returns how many were replayed.
pub async fn replay(pool: &PgPool, id: Option<i64>, by: &Caller) -> Result<u64, QueueError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, String, i64, serde_json::Value)> = sqlx::query_as(
        "delete from dead_letters where ($1::bigint is null or id = $1)
         returning id, queue, msg_id, payload",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    for (_, queue, _, payload) in &rows {
        super::send_batch(&mut *tx, queue, std::slice::from_ref(payload)).await?;
    }
    if !rows.is_empty() {
        let mut event = by.did(Action::DlqReplay).detail(json!({
            "all": id.is_none(),
            "replayed": rows.len(),
            "jobs": audited_jobs(&rows),
            "truncated": rows.len() > AUDITED_JOBS,
        }));
        if let Some(id) = id {
            event = event.dead_letter(id);
        }
        audit::record(&mut *tx, &event).await?;
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// Delete dead letters older than `age`, audited as done `by` (one
/// `dlq.purge` row, in the same transaction) when any went. Returns how many.
pub async fn purge_older_than(
    pool: &PgPool,
    age: Duration,
    by: &Caller,
) -> Result<u64, QueueError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(
        "delete from dead_letters where dead_at < now() - make_interval(secs => $1::float8)
         returning id, queue, msg_id",
    )
    .bind(age.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    if !rows.is_empty() {
        let jobs: Vec<_> = rows
            .iter()
            .take(AUDITED_JOBS)
            .map(|(id, queue, msg_id)| json!({"id": id, "queue": queue, "msg_id": msg_id}))
            .collect();
        let event = by.did(Action::DlqPurge).detail(json!({
            "older_than_secs": age.as_secs(),
            "purged": rows.len(),
            "jobs": jobs,
            "truncated": rows.len() > AUDITED_JOBS,
        }));
        audit::record(&mut *tx, &event).await?;
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

fn audited_jobs(rows: &[(i64, String, i64, serde_json::Value)]) -> Vec<serde_json::Value> {
    rows.iter()
        .take(AUDITED_JOBS)
        .map(|(id, queue, msg_id, _)| json!({"id": id, "queue": queue, "msg_id": msg_id}))
        .collect()
}

/// Rows in the dead-letter table, and how many of them died within `window`
/// (the dead-letter growth the alert watches; replayed and purged rows are
/// gone from both).
pub async fn counts(pool: &PgPool, window: Duration) -> Result<(i64, i64), QueueError> {
    Ok(sqlx::query_as(
        "select count(*), count(*) filter (where dead_at > now() - make_interval(secs => $1::float8))
         from dead_letters",
    )
    .bind(window.as_secs_f64())
    .fetch_one(pool)
    .await?)
}

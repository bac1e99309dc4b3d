//! Webhook deliveries: one `webhook_deliveries` row per (event, endpoint)
//! and one background job per row, written in the caller's transaction so
//! an event exists exactly when what it reports was committed.
//!
//! One job per (event, endpoint) rather than one per event fanned out at
//! delivery: each endpoint then has its own attempts, backoff, order and
//! dead letter, so a failing endpoint never holds back or repeats deliveries
//! to a healthy one, and `postline dlq replay` re-sends to the one that failed.

use std::time::Duration;

use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

use super::{QueueError, BACKGROUND_QUEUE};
use crate::domain::ConversationId;
use crate::protocol::webhook::Event;

/// An event to deliver to every endpoint: its body already encoded.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event_type: &'static str,
    pub conversation_id: ConversationId,
    pub body: serde_json::Value,
}

impl NewEvent {
    pub fn from_event(e: &Event<'_>) -> Result<NewEvent, serde_json::Error> {
        Ok(NewEvent {
            event_id: e.id,
            event_type: e.kind,
            conversation_id: e.conversation_id(),
            body: serde_json::to_value(e)?,
        })
    }
}

/// Queue `events` (in their order) for every endpoint, in the caller's
/// transaction. Only the first pending delivery of each (endpoint,
/// conversation) has a job: the rest are inserted parked, with none, and
/// get theirs when the one before them finishes ([`wake_next`]). A backlog
/// behind a failing endpoint so costs one row per event, not a job to
/// write, read, park and hide again.
///
/// One call to `postline.webhook_enqueue` (migrations/0015), one round
/// trip: it takes the lane locks (see [`lock_lanes`]), held until commit,
/// which make delivery ids follow commit order within a lane, and make the
/// "is one pending already?" question there and the wake of a finishing
/// delivery exclusive: an event is never parked behind a delivery that
/// finished unseen.
pub async fn enqueue(
    conn: &mut PgConnection,
    endpoints: &[String],
    events: &[NewEvent],
) -> Result<(), QueueError> {
    if endpoints.is_empty() || events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type).collect();
    let convs: Vec<Uuid> = events.iter().map(|e| e.conversation_id.0).collect();
    let bodies: Vec<&serde_json::Value> = events.iter().map(|e| &e.body).collect();
    sqlx::query("select postline.webhook_enqueue($1, $2, $3, $4, $5)")
        .bind(endpoints)
        .bind(&ids)
        .bind(&types)
        .bind(&convs)
        .bind(&bodies)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Write a job for each delivery and remember it on the row.
async fn give_jobs(conn: &mut PgConnection, delivery_ids: &[i64]) -> Result<(), QueueError> {
    sqlx::query("select postline.webhook_give_jobs($1)")
        .bind(delivery_ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Serializes, per (endpoint, conversation), the two sides of a wait:
/// parking a delivery because an earlier one is pending, and finishing that
/// earlier one (which wakes the next). Either the park sees the earlier one
/// finished, or the finish sees the park: a wake is never lost. Lanes are
/// locked in sorted order, so two batches never wait for each other in a cycle.
async fn lock_lanes(conn: &mut PgConnection, delivery_ids: &[i64]) -> Result<(), QueueError> {
    sqlx::query(
        "select pg_advisory_xact_lock(hashtextextended(
                    'postline.webhook-lane:' || endpoint || ' ' || conversation_id::text, 0))
         from (select distinct endpoint, conversation_id from webhook_deliveries
               where id = any($1) order by endpoint, conversation_id) lanes",
    )
    .bind(delivery_ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Of the deliveries whose jobs were just read (`delivery_ids[i]` driven by
/// job `job_ids[i]`), park those an earlier pending delivery of their
/// (endpoint, conversation) must precede, and return their ids: the caller
/// hides their jobs for [`PARK_MAX`]. The rest are free to attempt now.
///
/// Only a job that is not its lane's head needs parking here (one queued
/// before parking existed, a dead letter replayed behind newer ones): a
/// lane's head is the common case, every retry of a failing receiver, so it
/// is found with a probe that takes no lock; the lanes are locked, and the
/// question asked again under the locks, only when something looks blocked.
pub async fn park_blocked(
    conn: &mut PgConnection,
    delivery_ids: &[i64],
    job_ids: &[i64],
) -> Result<Vec<i64>, QueueError> {
    if delivery_ids.is_empty() {
        return Ok(Vec::new());
    }
    let blocked = blocked(&mut *conn, delivery_ids).await?;
    if blocked.is_empty() {
        return Ok(blocked);
    }
    lock_lanes(conn, &blocked).await?;
    let blocked = self::blocked(&mut *conn, &blocked).await?;
    Ok(sqlx::query_scalar(
        "update webhook_deliveries d set parked = true, job_id = u.j
         from unnest($1::bigint[], $2::bigint[]) as u(d, j)
         where d.id = u.d and d.id = any($3)
         returning d.id",
    )
    .bind(delivery_ids)
    .bind(job_ids)
    .bind(&blocked)
    .fetch_all(&mut *conn)
    .await?)
}

/// Those of `delivery_ids` pending behind an earlier pending delivery of
/// their lane. LATERAL ... LIMIT 1 keeps it an index probe per id: as
/// EXISTS, Postgres may hash every pending delivery instead (59 ms a call
/// in S1 with a receiver down and a backlog of 25,000).
async fn blocked(conn: &mut PgConnection, delivery_ids: &[i64]) -> Result<Vec<i64>, QueueError> {
    Ok(sqlx::query_scalar(
        "select d.id from unnest($1::bigint[]) as u(id)
         join webhook_deliveries d on d.id = u.id and d.state = 'pending'
         cross join lateral (select 1 from webhook_deliveries e
                             where e.endpoint = d.endpoint and e.conversation_id = d.conversation_id
                               and e.state = 'pending' and e.id < d.id
                             limit 1) as earlier",
    )
    .bind(delivery_ids)
    .fetch_all(&mut *conn)
    .await?)
}

/// The longest a parked job stays hidden. Its wake normally comes first;
/// this only bounds the wait of one whose wake could not name its job
/// (a delivery queued before parking existed).
pub const PARK_MAX: Duration = Duration::from_secs(300);

/// Take `d`'s lane lock, first thing in the transaction that finishes it,
/// so that transaction waits for a batch parking in that lane rather than
/// the two locking rows in opposite orders.
pub async fn lock_lane(conn: &mut PgConnection, d: &Delivery) -> Result<(), QueueError> {
    lock_lanes(conn, &[d.id]).await
}

/// `d` has left `pending` (delivered or dead) in the caller's transaction,
/// which holds [`lock_lane`]: the next delivery of its (endpoint,
/// conversation), if parked, is unparked and made ready now: given its job
/// (parked at enqueue) or its hidden job made visible (parked after a read).
pub async fn wake_next(conn: &mut PgConnection, d: &Delivery) -> Result<(), QueueError> {
    wake_lane(conn, &d.endpoint, d.conversation_id).await
}

async fn wake_lane(conn: &mut PgConnection, endpoint: &str, conv: Uuid) -> Result<(), QueueError> {
    let next: Option<(i64, Option<i64>)> = sqlx::query_as(
        "update webhook_deliveries set parked = false
         where id = (select id from webhook_deliveries
                     where endpoint = $1 and conversation_id = $2 and state = 'pending'
                     order by id limit 1)
           and parked
         returning id, job_id",
    )
    .bind(endpoint)
    .bind(conv)
    .fetch_optional(&mut *conn)
    .await?;
    match next {
        None => Ok(()),
        Some((_, Some(job))) => {
            super::set_vt(&mut *conn, BACKGROUND_QUEUE, &[job], Duration::ZERO).await?;
            Ok(())
        }
        Some((id, None)) => give_jobs(conn, &[id]).await,
    }
}

/// Wake lanes whose first pending delivery is parked: a wake that should
/// not be needed (every finish wakes its lane), run from the worker's
/// cleanup so no delivery could wait forever on a bug. Returns how many
/// lanes it woke.
pub async fn wake_stranded(pool: &sqlx::PgPool, limit: i64) -> Result<usize, QueueError> {
    let heads: Vec<(i64, String, Uuid)> = sqlx::query_as(
        "select d.id, d.endpoint, d.conversation_id from webhook_deliveries d
         where d.state = 'pending' and d.parked
           and d.created_at < now() - interval '1 minute'
           and not exists (select 1 from webhook_deliveries e
                           where e.endpoint = d.endpoint and e.conversation_id = d.conversation_id
                             and e.state = 'pending' and e.id < d.id)
         limit $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    for (id, endpoint, conv) in &heads {
        let mut tx = pool.begin().await?;
        lock_lanes(&mut tx, &[*id]).await?;
        wake_lane(&mut tx, endpoint, *conv).await?;
        tx.commit().await?;
    }
    Ok(heads.len())
}

/// A delivery as the deliverer needs it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Delivery {
    pub id: i64,
    pub event_id: Uuid,
    pub endpoint: String,
    pub conversation_id: Uuid,
    pub body: serde_json::Value,
    pub attempts: i32,
}

/// The delivery, unless it was delivered already (a repeated job) or does
/// not exist. A dead one (its job replayed from the dead-letter table)
/// becomes pending again with fresh attempts.
pub async fn take<'e>(ex: impl PgExecutor<'e>, id: i64) -> Result<Option<Delivery>, QueueError> {
    Ok(sqlx::query_as::<_, Delivery>(
        "update webhook_deliveries
         set attempts = case when state = 'dead' then 0 else attempts end, state = 'pending',
             parked = false
         where id = $1 and state <> 'delivered'
         returning id, event_id, endpoint, conversation_id, body, attempts",
    )
    .bind(id)
    .fetch_optional(ex)
    .await?)
}

/// The endpoint answered 2xx.
pub async fn mark_delivered<'e>(ex: impl PgExecutor<'e>, id: i64) -> Result<(), QueueError> {
    sqlx::query(
        "update webhook_deliveries
         set state = 'delivered', attempts = attempts + 1, last_attempt_at = now(),
             delivered_at = now(), next_attempt_at = null, last_error = null
         where id = $1",
    )
    .bind(id)
    .execute(ex)
    .await?;
    Ok(())
}

/// An attempt failed: `retry_in` is when the next one is due, `None` if the
/// delivery is dead.
pub async fn mark_failed<'e>(
    ex: impl PgExecutor<'e>,
    id: i64,
    error: &str,
    retry_in: Option<Duration>,
) -> Result<(), QueueError> {
    sqlx::query(
        "update webhook_deliveries
         set attempts = attempts + 1, last_attempt_at = now(), last_error = $2,
             state = case when $3::float8 is null then 'dead' else 'pending' end,
             next_attempt_at = now() + make_interval(secs => $3::float8)
         where id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(retry_in.map(|d| d.as_secs_f64()))
    .execute(ex)
    .await?;
    Ok(())
}

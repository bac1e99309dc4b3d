//! The `audit_log` table: the worker's append of the rows recorded by
//! `queue::audit::record`, and the retention.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::queue::audit::AuditEvent;

impl Store {
    /// Record `event` on its own (autocommit): for what is not a
    /// transaction of ours, such as a refused service call.
    pub async fn record_audit(&self, event: &AuditEvent) -> Result<(), StoreError> {
        crate::queue::audit::record(&self.pool, event).await?;
        Ok(())
    }
}

/// Append `events` (each with its time, `fallback` where it has none) in
/// the caller's transaction, in one statement. An event already there (its
/// job applied before) is skipped. Returns how many rows were added.
pub async fn append_audit(
    conn: &mut PgConnection,
    events: &[(AuditEvent, DateTime<Utc>)],
) -> Result<u64, StoreError> {
    if events.is_empty() {
        return Ok(0);
    }
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    let mut ats = Vec::with_capacity(n);
    let mut actor_kinds = Vec::with_capacity(n);
    let mut actor_ids = Vec::with_capacity(n);
    let mut actions = Vec::with_capacity(n);
    let mut convs: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut messages: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut users: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut dead_letters: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut details = Vec::with_capacity(n);
    let mut ips: Vec<Option<String>> = Vec::with_capacity(n);
    let mut gateways: Vec<Option<Uuid>> = Vec::with_capacity(n);
    for (e, fallback) in events {
        ids.push(e.event_id);
        ats.push(e.at.unwrap_or(*fallback));
        actor_kinds.push(e.actor.kind());
        actor_ids.push(e.actor.id());
        actions.push(e.action.as_str());
        convs.push(e.conversation_id.map(|c| c.0));
        messages.push(e.message_id.map(|m| m.0));
        users.push(e.user_id.map(|u| u.0));
        dead_letters.push(e.dead_letter_id);
        details.push(&e.detail);
        ips.push(e.ip.map(|ip| ip.to_string()));
        gateways.push(e.gateway_id);
    }
    let added = sqlx::query(
        "insert into audit_log (event_id, at, actor_kind, actor_id, action, conversation_id,
                                message_id, user_id, dead_letter_id, detail, ip, gateway_id)
         select e, a, ak, ai, act, c, m, u, d, det, ip::inet, g
         from unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                     $6::uuid[], $7::uuid[], $8::uuid[], $9::bigint[], $10::jsonb[],
                     $11::text[], $12::uuid[])
              with ordinality as t(e, a, ak, ai, act, c, m, u, d, det, ip, g, n)
         order by n
         on conflict (event_id) do nothing",
    )
    .bind(&ids)
    .bind(&ats)
    .bind(&actor_kinds)
    .bind(&actor_ids)
    .bind(&actions)
    .bind(&convs)
    .bind(&messages)
    .bind(&users)
    .bind(&dead_letters)
    .bind(&details)
    .bind(&ips)
    .bind(&gateways)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(added)
}

/// Delete audit rows whose action is older than `keep`, through the one
/// door the append-only trigger leaves open (`postline.audit_prune`).
pub async fn prune_audit(pool: &PgPool, keep: Duration) -> Result<u64, StoreError> {
    let deleted: i64 =
        sqlx::query_scalar("select postline.audit_prune(make_interval(secs => $1::float8))")
            .bind(keep.as_secs_f64())
            .fetch_one(pool)
            .await?;
    Ok(deleted.max(0) as u64)
}

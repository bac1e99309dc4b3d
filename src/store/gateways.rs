//! The `gateways` table: one heartbeat row per running gateway, so any
//! process can say which gateways are alive and which went silent.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Store, StoreError};

/// A gateway silent for this many of its heartbeat intervals is taken for dead
/// (the same rule presence uses for its sessions).
pub const MISSED_BEATS: i32 = 3;

/// A silent gateway's row is deleted after this long: a crashed gateway that
/// never comes back is reported missing for an hour, then forgotten.
pub const FORGET_SILENT_AFTER: Duration = Duration::from_secs(3600);

/// One row of `gateways`, with the verdict computed by Postgres' clock.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct GatewayRow {
    pub id: Uuid,
    pub started_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Heard from within [`MISSED_BEATS`] intervals.
    pub alive: bool,
}

impl Store {
    /// (Re)announce `id`, and forget gateways silent for longer than
    /// [`FORGET_SILENT_AFTER`]. Called at start and on every heartbeat; a
    /// restart under the same id keeps its `started_at` only if it was alive.
    /// Returns whether any other gateway is alive.
    pub async fn gateway_heartbeat(
        &self,
        id: Uuid,
        interval: Duration,
    ) -> Result<bool, StoreError> {
        let ms = interval.as_millis().clamp(1, i32::MAX as u128) as i32;
        sqlx::query(
            "insert into gateways (id, heartbeat_interval_ms) values ($1, $2)
             on conflict (id) do update set last_seen = now(),
                 heartbeat_interval_ms = excluded.heartbeat_interval_ms",
        )
        .bind(id)
        .bind(ms)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "delete from gateways where last_seen < now() - make_interval(secs => $1::float8)",
        )
        .bind(FORGET_SILENT_AFTER.as_secs_f64())
        .execute(&self.pool)
        .await?;
        let others: bool = sqlx::query_scalar(&format!(
            "select exists (select 1 from gateways where id <> $1 and {})",
            alive()
        ))
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        Ok(others)
    }

    /// A clean shutdown: this gateway is gone on purpose, not missing.
    pub async fn remove_gateway(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query("delete from gateways where id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// A row heard from within [`MISSED_BEATS`] of its own heartbeat interval,
/// by Postgres' clock.
fn alive() -> String {
    format!("last_seen >= now() - make_interval(secs => {MISSED_BEATS} * heartbeat_interval_ms / 1000.0)")
}

/// Every known gateway, oldest first.
pub async fn gateways(pool: &PgPool) -> Result<Vec<GatewayRow>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "select id, started_at, last_seen, {} as alive
         from gateways order by started_at, id",
        alive()
    ))
    .fetch_all(pool)
    .await?)
}

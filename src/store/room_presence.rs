//! Room presence rows: who is in which conversation on which gateway. The
//! gateway decides when a user enters or leaves (its own connections, the
//! grace period); these queries make the answer cluster-wide.

use std::time::Duration;

use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::{ConversationId, UserId};

impl Store {
    /// `user` is in `conv` on `gateway`. Returns whether they were already
    /// in it through another gateway, and everyone in it now.
    pub async fn enter_room(
        &self,
        conv: ConversationId,
        user: UserId,
        gateway: Uuid,
    ) -> Result<(bool, Vec<UserId>), StoreError> {
        // One statement: the select reads the snapshot before the insert,
        // so `user` is added to `present` below when this is their first row.
        let (elsewhere, present): (bool, Vec<Uuid>) = sqlx::query_as(
            "with entered as (
                 insert into room_presence (conversation_id, user_id, gateway_id)
                 values ($1, $2, $3)
                 on conflict (conversation_id, user_id, gateway_id)
                 do update set entered_at = now()
             )
             select exists (select 1 from room_presence
                            where conversation_id = $1 and user_id = $2 and gateway_id <> $3),
                    array(select distinct user_id from room_presence where conversation_id = $1)",
        )
        .bind(conv.0)
        .bind(user.0)
        .bind(gateway)
        .fetch_one(&self.pool)
        .await?;
        let mut present: Vec<UserId> = present.into_iter().map(UserId).collect();
        if !present.contains(&user) {
            present.push(user);
        }
        Ok((elsewhere, present))
    }

    /// `user` left `conv` on `gateway`. Returns whether that ended their
    /// presence in it: their row here was still there (not reaped or
    /// cleared meanwhile, which announced it already) and no other gateway
    /// has one.
    pub async fn exit_room(
        &self,
        conv: ConversationId,
        user: UserId,
        gateway: Uuid,
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "with gone as (
                 delete from room_presence
                 where conversation_id = $1 and user_id = $2 and gateway_id = $3
                 returning 1
             )
             select exists (select 1 from gone)
                and not exists (select 1 from room_presence
                                where conversation_id = $1 and user_id = $2 and gateway_id <> $3)",
        )
        .bind(conv.0)
        .bind(user.0)
        .bind(gateway)
        .fetch_one(&self.pool)
        .await?)
    }

    /// `user` is no longer a member of `conv`: out of its room everywhere.
    /// Returns whether they were in it.
    pub async fn clear_room_user(
        &self,
        conv: ConversationId,
        user: UserId,
    ) -> Result<bool, StoreError> {
        let done =
            sqlx::query("delete from room_presence where conversation_id = $1 and user_id = $2")
                .bind(conv.0)
                .bind(user.0)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Rows of connections that no longer exist: their gateway's presence
    /// session is gone (it died, and the presence heartbeat reaped it). Rows
    /// younger than `min_age` are left alone: their session may not be
    /// written yet. Returns who thereby left a room altogether.
    pub async fn reap_room_presence(
        &self,
        min_age: Duration,
    ) -> Result<Vec<(ConversationId, UserId)>, StoreError> {
        let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "with gone as (
                 delete from room_presence rp
                 where rp.entered_at < now() - make_interval(secs => $1)
                   and not exists (select 1 from presence_sessions ps
                                   where ps.user_id = rp.user_id and ps.gateway_id = rp.gateway_id)
                 returning conversation_id, user_id, gateway_id
             )
             select distinct g.conversation_id, g.user_id from gone g
             where not exists (
                 select 1 from room_presence r
                 where r.conversation_id = g.conversation_id and r.user_id = g.user_id
                   and not exists (select 1 from gone g2
                                   where g2.conversation_id = r.conversation_id
                                     and g2.user_id = r.user_id
                                     and g2.gateway_id = r.gateway_id))",
        )
        .bind(min_age.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(c, u)| (ConversationId(c), UserId(u)))
            .collect())
    }
}

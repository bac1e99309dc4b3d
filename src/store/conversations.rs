//! Conversations and their members.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::{ConversationId, Seq, UserId};
use crate::protocol::webhook::Event;
use crate::queue::audit::{self, Action, Actor, Caller, Origin};

/// Upper bound on members named at creation, so one request cannot insert
/// an unbounded number of rows.
pub const MAX_INITIAL_MEMBERS: usize = 1000;

#[derive(Debug, Clone)]
pub struct NewConversation {
    pub id: ConversationId,
    pub title: Option<String>,
    pub member_ids: Vec<UserId>,
    pub created_at: DateTime<Utc>,
}

/// A conversation as one of its members sees it in a list.
#[derive(Debug, Clone)]
pub struct ConversationSummary {
    pub id: ConversationId,
    pub title: Option<String>,
    pub member_ids: Vec<UserId>,
    pub created_at: DateTime<Utc>,
    pub last_message_at: Option<DateTime<Utc>>,
    pub last_seq: Seq,
    /// The caller's own positions, and what they have not read.
    pub last_delivered_seq: Seq,
    pub last_read_seq: Seq,
    pub unread_count: i64,
}

#[derive(sqlx::FromRow)]
struct SummaryRow {
    id: Uuid,
    title: Option<String>,
    member_ids: Vec<Uuid>,
    created_at: DateTime<Utc>,
    last_message_at: Option<DateTime<Utc>>,
    last_seq: i64,
    last_delivered_seq: i64,
    last_read_seq: i64,
    unread_count: i64,
}

impl From<SummaryRow> for ConversationSummary {
    fn from(r: SummaryRow) -> Self {
        ConversationSummary {
            id: ConversationId(r.id),
            title: r.title,
            member_ids: r.member_ids.into_iter().map(UserId).collect(),
            created_at: r.created_at,
            last_message_at: r.last_message_at,
            last_seq: Seq(r.last_seq),
            last_delivered_seq: Seq(r.last_delivered_seq),
            last_read_seq: Seq(r.last_read_seq),
            unread_count: r.unread_count,
        }
    }
}

/// What a user may do with a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    NotFound,
    NotMember,
    Member { last_seq: Seq },
}

impl Access {
    /// The member's view of the conversation, or the error to return.
    pub fn require_member(self) -> Result<Seq, StoreError> {
        match self {
            Access::Member { last_seq } => Ok(last_seq),
            Access::NotMember => Err(StoreError::Forbidden),
            Access::NotFound => Err(StoreError::NotFound),
        }
    }
}

impl Store {
    /// Create a conversation whose members are `creator` and `members`,
    /// on a request `from` there (audited).
    pub async fn create_conversation(
        &self,
        creator: UserId,
        title: Option<String>,
        members: &[UserId],
        from: Origin,
    ) -> Result<NewConversation, StoreError> {
        let id = ConversationId::new_v7();
        let member_ids = distinct(std::iter::once(&creator).chain(members));
        let mut tx = self.pool.begin().await?;
        let created_at: DateTime<Utc> = sqlx::query_scalar(
            "insert into conversations (id, title, created_by) values ($1, $2, $3) returning created_at",
        )
        .bind(id.0)
        .bind(&title)
        .bind(creator.0)
        .fetch_one(&mut *tx)
        .await?;
        let by = from.by(Actor::User(creator));
        self.insert_members_announced(&mut tx, id, title.as_deref(), creator, &member_ids, &by)
            .await?;
        tx.commit().await?;
        Ok(NewConversation {
            id,
            title,
            member_ids,
            created_at,
        })
    }

    /// The first members of the new conversation `id`, its
    /// `conversation.created` event and its audit row (done `by`), in the
    /// creating transaction.
    pub(super) async fn insert_members_announced(
        &self,
        tx: &mut sqlx::PgConnection,
        id: ConversationId,
        title: Option<&str>,
        creator: UserId,
        member_ids: &[UserId],
        by: &Caller,
    ) -> Result<(), StoreError> {
        let raw_ids: Vec<Uuid> = member_ids.iter().map(|u| u.0).collect();
        sqlx::query(
            "insert into conversation_members (conversation_id, user_id)
             select $1, u from unnest($2::uuid[]) as u",
        )
        .bind(id.0)
        .bind(&raw_ids)
        .execute(&mut *tx)
        .await?;
        let event = by.did(Action::ConversationCreate).conversation(id).detail(
            serde_json::json!({"title": title, "created_by": creator, "member_ids": member_ids}),
        );
        audit::record(&mut *tx, &event).await?;
        self.emit(
            tx,
            &[Event::conversation_created(id, title, creator, member_ids)],
        )
        .await
    }

    /// The conversations `user` is a member of, most recently active first.
    pub async fn list_conversations(
        &self,
        user: UserId,
    ) -> Result<Vec<ConversationSummary>, StoreError> {
        let rows = sqlx::query_as::<_, SummaryRow>(
            "select c.id, c.title, c.created_at, c.last_message_at, c.last_seq,
                    m.last_delivered_seq, m.last_read_seq,
                    greatest(c.last_seq - m.last_read_seq, 0) as unread_count,
                    array(select m2.user_id from conversation_members m2
                          where m2.conversation_id = c.id order by m2.joined_at, m2.user_id) as member_ids
             from conversations c
             join conversation_members m on m.conversation_id = c.id and m.user_id = $1
             order by coalesce(c.last_message_at, c.created_at) desc, c.id
             limit 1000",
        )
        .bind(user.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(ConversationSummary::from).collect())
    }

    /// Whether the conversation exists and `user` belongs to it; one indexed
    /// lookup that also returns the last persisted seq.
    pub async fn access(&self, conv: ConversationId, user: UserId) -> Result<Access, StoreError> {
        let row: Option<(i64, bool)> = sqlx::query_as(
            "select c.last_seq,
                    exists(select 1 from conversation_members m
                           where m.conversation_id = c.id and m.user_id = $2)
             from conversations c where c.id = $1",
        )
        .bind(conv.0)
        .bind(user.0)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Access::NotFound,
            Some((_, false)) => Access::NotMember,
            Some((last_seq, true)) => Access::Member {
                last_seq: Seq(last_seq),
            },
        })
    }

    /// `actor` (a member) adds `user`, on a request `from` there. Returns
    /// false if `user` already was one.
    pub async fn add_member(
        &self,
        conv: ConversationId,
        actor: UserId,
        user: UserId,
        from: Origin,
    ) -> Result<bool, StoreError> {
        self.access(conv, actor).await?.require_member()?;
        self.put_member(conv, user, &from.by(Actor::User(actor)))
            .await
    }

    /// Make `user` a member of `conv` (which exists), announcing and
    /// auditing it as done `by` that caller (the webhook event names a
    /// user as actor, or the nil id for anyone else). Returns false if
    /// `user` already was one: nothing changed, nothing is recorded.
    pub(super) async fn put_member(
        &self,
        conv: ConversationId,
        user: UserId,
        by: &Caller,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "insert into conversation_members (conversation_id, user_id) values ($1, $2)
             on conflict do nothing",
        )
        .bind(conv.0)
        .bind(user.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 1 {
            let actor = by.actor.user().unwrap_or(UserId(Uuid::nil()));
            self.emit(&mut tx, &[Event::member(true, conv, user, actor)])
                .await?;
            let event = by.did(Action::MemberAdd).conversation(conv).user(user);
            audit::record(&mut *tx, &event).await?;
        }
        tx.commit().await?;
        Ok(inserted == 1)
    }

    /// Users who share at least one conversation with `user` (for presence).
    ///
    /// Run each time a user comes online or goes offline, so it must cost the user's
    /// conversations, not the table: written as a self-join, Postgres
    /// hashed the user's few memberships and scanned every membership row
    /// against them (4.4 ms at 10,000 rows, 62 s of Postgres CPU for S2's
    /// 10,000 connects); `= any(array(...))` probes the primary key per
    /// conversation (0.35 ms).
    pub async fn contacts(&self, user: UserId) -> Result<Vec<UserId>, StoreError> {
        let rows: Vec<Uuid> = sqlx::query_scalar(
            "select distinct user_id from conversation_members
             where conversation_id = any(array(
                       select conversation_id from conversation_members where user_id = $1))
               and user_id <> $1",
        )
        .bind(user.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(UserId).collect())
    }

    /// Record how many connections `user` has on `gateway` (0 removes the
    /// row). Returns how many gateways still have the user connected.
    pub async fn set_presence(
        &self,
        user: UserId,
        gateway: Uuid,
        connections: usize,
    ) -> Result<i64, StoreError> {
        if connections == 0 {
            sqlx::query("delete from presence_sessions where user_id = $1 and gateway_id = $2")
                .bind(user.0)
                .bind(gateway)
                .execute(&self.pool)
                .await?;
        } else {
            sqlx::query(
                "insert into presence_sessions (user_id, gateway_id, connections) values ($1, $2, $3)
                 on conflict (user_id, gateway_id)
                 do update set connections = excluded.connections, heartbeat_at = now()",
            )
            .bind(user.0)
            .bind(gateway)
            .bind(connections as i32)
            .execute(&self.pool)
            .await?;
        }
        Ok(
            sqlx::query_scalar("select count(*) from presence_sessions where user_id = $1")
                .bind(user.0)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Refresh this gateway's sessions, and remove those of gateways silent
    /// for longer than `expiry`. Returns the users left with no session
    /// anywhere: they just went offline. The delete is atomic, so when several
    /// gateways reap at once each user is returned to exactly one of them.
    ///
    /// `local` is who is connected here: their rows are (re)written, so the
    /// table heals after Postgres lost it (unlogged) or another gateway reaped
    /// this one during an outage.
    pub async fn presence_heartbeat(
        &self,
        gateway: Uuid,
        expiry: std::time::Duration,
        local: &[(UserId, usize)],
    ) -> Result<Vec<UserId>, StoreError> {
        sqlx::query(
            "insert into presence_sessions (user_id, gateway_id, connections)
             select u, $1, c from unnest($2::uuid[], $3::int[]) as t(u, c)
             on conflict (user_id, gateway_id)
             do update set heartbeat_at = now(), connections = excluded.connections",
        )
        .bind(gateway)
        .bind(local.iter().map(|(u, _)| u.0).collect::<Vec<_>>())
        .bind(local.iter().map(|(_, c)| *c as i32).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        let gone: Vec<Uuid> = sqlx::query_scalar(
            "with dead as (
                 delete from presence_sessions
                 where heartbeat_at < now() - make_interval(secs => $1::float8)
                 returning user_id
             )
             -- The statement sees the table as it was before the CTE's delete,
             -- so what remains is what has not expired.
             select distinct d.user_id from dead d
             where not exists (
                 select 1 from presence_sessions p
                 where p.user_id = d.user_id
                   and p.heartbeat_at >= now() - make_interval(secs => $1::float8))",
        )
        .bind(expiry.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(gone.into_iter().map(UserId).collect())
    }

    /// Forget every session of `gateway` (at start, or when it shuts down).
    pub async fn clear_presence(&self, gateway: Uuid) -> Result<Vec<UserId>, StoreError> {
        let gone: Vec<Uuid> = sqlx::query_scalar(
            "with mine as (delete from presence_sessions where gateway_id = $1 returning user_id)
             -- The statement sees the rows the CTE deletes, hence the gateway filter.
             select m.user_id from mine m
             where not exists (
                 select 1 from presence_sessions p where p.user_id = m.user_id and p.gateway_id <> $1)",
        )
        .bind(gateway)
        .fetch_all(&self.pool)
        .await?;
        Ok(gone.into_iter().map(UserId).collect())
    }

    /// Which of `users` are connected to some gateway.
    pub async fn online_users(&self, users: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        let ids: Vec<Uuid> = users.iter().map(|u| u.0).collect();
        let rows: Vec<Uuid> = sqlx::query_scalar(
            "select distinct user_id from presence_sessions where user_id = any($1)",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(UserId).collect())
    }

    /// `actor` (a member) removes `user`, on a request `from` there.
    /// `NotFound` if `user` was not a member.
    pub async fn remove_member(
        &self,
        conv: ConversationId,
        actor: UserId,
        user: UserId,
        from: Origin,
    ) -> Result<(), StoreError> {
        self.access(conv, actor).await?.require_member()?;
        self.drop_member(conv, user, &from.by(Actor::User(actor)))
            .await
    }

    /// Take `user` out of `conv`, announcing and auditing it as done `by`
    /// that caller. `NotFound` if `user` was not a member.
    pub(super) async fn drop_member(
        &self,
        conv: ConversationId,
        user: UserId,
        by: &Caller,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query(
            "delete from conversation_members where conversation_id = $1 and user_id = $2",
        )
        .bind(conv.0)
        .bind(user.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound);
        }
        let actor = by.actor.user().unwrap_or(UserId(Uuid::nil()));
        self.emit(&mut tx, &[Event::member(false, conv, user, actor)])
            .await?;
        let event = by.did(Action::MemberRemove).conversation(conv).user(user);
        audit::record(&mut *tx, &event).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// `members` in order, each once.
pub(super) fn distinct<'a>(members: impl IntoIterator<Item = &'a UserId>) -> Vec<UserId> {
    let mut out: Vec<UserId> = Vec::new();
    for m in members {
        if !out.contains(m) {
            out.push(*m);
        }
    }
    out
}

//! What the service API does that users cannot: manage any conversation
//! (no membership of the caller checked), post through `postline.publish()`,
//! and remember each request's first result by its idempotency key.

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{NewConversation, Store, StoreError};
use crate::domain::{ConversationId, UserId};
use crate::queue::audit::{self, AuditEvent, Caller};

/// A result already given for an idempotency key.
pub struct StoredResponse {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub response: serde_json::Value,
}

/// Why `postline.publish()` refused, as the gateway's code it names first.
#[derive(Debug)]
pub enum PublishRefusal {
    Invalid(String),
    TooLarge(String),
    NotFound(String),
    Forbidden(String),
}

impl Store {
    /// Begin a transaction holding the lock of (`credential`, `key`), and
    /// what it answered before if anything: a repeat waits here until the
    /// first request is done, then reads its result.
    pub async fn idempotency_begin(
        &self,
        credential: &str,
        key: &str,
    ) -> Result<(Transaction<'static, Postgres>, Option<StoredResponse>), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("select pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 11))")
            .bind(credential)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        let row: Option<(String, String, i16, serde_json::Value)> = sqlx::query_as(
            "select method, path, status, response from service_requests
             where credential = $1 and idempotency_key = $2",
        )
        .bind(credential)
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        Ok((
            tx,
            row.map(|(method, path, status, response)| StoredResponse {
                method,
                path,
                status: status as u16,
                response,
            }),
        ))
    }

    /// Record the result of a request under its key, and the `call`'s
    /// audit row, in the transaction [`Store::idempotency_begin`] opened;
    /// drop records a day old.
    pub async fn idempotency_record(
        mut tx: Transaction<'static, Postgres>,
        credential: &str,
        key: &str,
        stored: &StoredResponse,
        call: &AuditEvent,
    ) -> Result<(), StoreError> {
        audit::record(&mut *tx, call).await?;
        sqlx::query(
            "insert into service_requests (credential, idempotency_key, method, path, status, response)
             values ($1, $2, $3, $4, $5, $6)",
        )
        .bind(credential)
        .bind(key)
        .bind(&stored.method)
        .bind(&stored.path)
        .bind(stored.status as i16)
        .bind(&stored.response)
        .execute(&mut *tx)
        .await?;
        sqlx::query("delete from service_requests where created_at < now() - interval '1 day'")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// End the transaction of a request answered without a new record (a
    /// replay of the first result, or a key reused for another request),
    /// recording its `call`'s audit row in it.
    pub async fn idempotency_audited(
        mut tx: Transaction<'static, Postgres>,
        call: &AuditEvent,
    ) -> Result<(), StoreError> {
        audit::record(&mut *tx, call).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A conversation with exactly `members`, created by `created_by` (a
    /// service or bot id, not made a member). `id` is derived from the
    /// idempotency key, so even a repeat that lost its record finds the
    /// first one instead of creating a second (and audits nothing again).
    pub async fn service_create_conversation(
        &self,
        id: ConversationId,
        created_by: UserId,
        title: Option<String>,
        members: &[UserId],
        by: &Caller,
    ) -> Result<NewConversation, StoreError> {
        let member_ids = super::conversations::distinct(members);
        let mut tx = self.pool.begin().await?;
        let inserted: Option<DateTime<Utc>> = sqlx::query_scalar(
            "insert into conversations (id, title, created_by) values ($1, $2, $3)
             on conflict (id) do nothing returning created_at",
        )
        .bind(id.0)
        .bind(&title)
        .bind(created_by.0)
        .fetch_optional(&mut *tx)
        .await?;
        let created_at = match inserted {
            Some(at) => {
                self.insert_members_announced(
                    &mut tx,
                    id,
                    title.as_deref(),
                    created_by,
                    &member_ids,
                    by,
                )
                .await?;
                at
            }
            None => {
                sqlx::query_scalar("select created_at from conversations where id = $1")
                    .bind(id.0)
                    .fetch_one(&mut *tx)
                    .await?
            }
        };
        tx.commit().await?;
        Ok(NewConversation {
            id,
            title,
            member_ids,
            created_at,
        })
    }

    /// Add `user` to `conv`; whether they were not a member yet. The actor
    /// of the webhook event is the service: no user, the nil id; the audit
    /// row names the service key (`by`).
    pub async fn service_add_member(
        &self,
        conv: ConversationId,
        user: UserId,
        by: &Caller,
    ) -> Result<bool, StoreError> {
        if !self.conversation_exists(conv).await? {
            return Err(StoreError::NotFound);
        }
        self.put_member(conv, user, by).await
    }

    /// Remove `user` from `conv`; `NotFound` if they were not a member.
    pub async fn service_remove_member(
        &self,
        conv: ConversationId,
        user: UserId,
        by: &Caller,
    ) -> Result<(), StoreError> {
        self.drop_member(conv, user, by).await
    }

    async fn conversation_exists(&self, conv: ConversationId) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar("select exists (select 1 from conversations where id = $1)")
                .bind(conv.0)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// `postline.publish()`: the message id, or the gateway's refusal.
    pub async fn publish(
        &self,
        conv: ConversationId,
        sender: UserId,
        kind: &str,
        content: &serde_json::Value,
        client_message_id: &str,
    ) -> Result<Result<Uuid, PublishRefusal>, StoreError> {
        let result = sqlx::query_scalar("select postline.publish($1, $2, $3, $4, $5)")
            .bind(conv.0)
            .bind(sender.0)
            .bind(kind)
            .bind(content)
            .bind(client_message_id)
            .fetch_one(&self.pool)
            .await;
        match result {
            Ok(id) => Ok(Ok(id)),
            Err(sqlx::Error::Database(e)) => {
                let message = e.message().to_owned();
                let refusal = match e.code().as_deref() {
                    Some("22023") => PublishRefusal::Invalid(message),
                    Some("54000") => PublishRefusal::TooLarge(message),
                    Some("P0002") => PublishRefusal::NotFound(message),
                    Some("42501") => PublishRefusal::Forbidden(message),
                    _ => return Err(sqlx::Error::Database(e).into()),
                };
                Ok(Err(refusal))
            }
            Err(e) => Err(e.into()),
        }
    }
}

//! Key rotation (`postline keys rotate`): stored content moved to the active
//! key, a bounded batch per short transaction.
//!
//! The predicate `key_id is distinct from <active>` is the progress: a row
//! is rewritten exactly once, and a rotation stopped anywhere (killed, or the
//! database restarted) resumes by running again, with nothing to remember.
//! Each batch walks the primary key forward from where the last one stopped
//! (ids are UUIDv7, so the walk is an index range scan), and locks its rows
//! `for update skip locked`: a row an edit holds is passed over, for a later
//! pass, rather than waited for; an edit arriving meanwhile waits for the
//! batch's commit (milliseconds) and then applies to the re-sealed row.
//! Inserts never wait: they touch no row a batch locks.

use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;
use crate::crypto::{Keyring, RowBinding};
use crate::domain::{ConversationId, MessageId};
use crate::queue::audit::AuditEvent;

/// What one batch did.
#[derive(Debug, Default)]
pub struct RotationBatch {
    /// Rows looked at (locked), rewritten or not.
    pub scanned: usize,
    pub rotated: usize,
    /// Rows whose content could not be opened (key not configured, or
    /// altered), with why; left as they are.
    pub failed: Vec<(Uuid, String)>,
    /// The greatest id looked at: where the next batch starts.
    pub last_id: Option<Uuid>,
}

#[derive(sqlx::FromRow)]
struct RotationRow {
    id: Uuid,
    conversation_id: Uuid,
    content: Option<serde_json::Value>,
    key_id: Option<String>,
    ciphertext: Option<Vec<u8>>,
}

/// Messages (tombstones aside: they hold nothing) not yet under the active
/// key. A full scan: for progress reports, not for a hot path.
pub async fn rows_to_rotate(pool: &PgPool, keys: &Keyring) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "select count(*) from messages where deleted_at is null and key_id is distinct from $1",
    )
    .bind(keys.active_id())
    .fetch_one(pool)
    .await?)
}

/// Re-seal up to `limit` rows with ids above `after` that are not under the
/// active key, in one transaction. Rows already current, deleted, or locked
/// by someone else are passed over. `audit`, if given, is recorded in the
/// same transaction when it re-seals anything (`rotated > 0`): a run is
/// audited once it has changed something, and a run killed after that is
/// still on record.
pub async fn rotate_batch(
    pool: &PgPool,
    keys: &Keyring,
    after: Uuid,
    limit: i64,
    audit: Option<&AuditEvent>,
) -> Result<RotationBatch, StoreError> {
    let Some(active) = keys.active_id() else {
        return Err(StoreError::Invariant(
            "no active key to rotate to (POSTLINE_ENCRYPTION_KEYS)".into(),
        ));
    };
    let mut tx = pool.begin().await?;
    let rows: Vec<RotationRow> = sqlx::query_as(
        "select id, conversation_id, content, key_id, ciphertext from messages
         where id > $1 and deleted_at is null and key_id is distinct from $2
         order by id limit $3
         for update skip locked",
    )
    .bind(after)
    .bind(active)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut batch = RotationBatch {
        scanned: rows.len(),
        last_id: rows.last().map(|r| r.id),
        ..RotationBatch::default()
    };
    let mut ids = Vec::with_capacity(rows.len());
    let mut blobs = Vec::with_capacity(rows.len());
    for r in rows {
        let row = RowBinding {
            message_id: MessageId(r.id),
            conversation_id: ConversationId(r.conversation_id),
        };
        // The plaintext as stored: a plain row's compact JSON, or a sealed
        // row's opened bytes (re-sealed as they are).
        let plaintext: Result<Vec<u8>, String> = match (r.content, r.key_id, r.ciphertext) {
            (Some(plain), None, None) => {
                Ok(serde_json::to_vec(&plain).expect("a JSON value always encodes"))
            }
            (None, Some(key_id), Some(blob)) => {
                keys.open(&key_id, row, &blob).map_err(|e| e.to_string())
            }
            _ => Err("content, key_id and ciphertext disagree".into()),
        };
        match plaintext {
            Ok(bytes) => {
                let (_, blob) = keys.seal(row, &bytes).ok_or_else(|| {
                    StoreError::Invariant("the active key disappeared mid-batch".into())
                })?;
                ids.push(r.id);
                blobs.push(blob);
            }
            Err(reason) => batch.failed.push((r.id, reason)),
        }
    }
    if !ids.is_empty() {
        // The version is not bumped: clients see no change.
        batch.rotated = sqlx::query(
            "update messages m set content = null, key_id = $2, ciphertext = u.ciphertext
             from unnest($1::uuid[], $3::bytea[]) as u(id, ciphertext)
             where m.id = u.id",
        )
        .bind(&ids)
        .bind(active)
        .bind(&blobs)
        .execute(&mut *tx)
        .await?
        .rows_affected() as usize;
        if let (Some(event), true) = (audit, batch.rotated > 0) {
            crate::queue::audit::record(&mut *tx, event).await?;
        }
    }
    tx.commit().await?;
    Ok(batch)
}

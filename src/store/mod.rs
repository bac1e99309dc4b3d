//! Everything that reads or writes the chat tables: conversations, members,
//! messages, and the schema itself.
//!
//! Only this module, `queue` and `notify` touch sqlx. Changes that webhooks
//! report are queued (`queue::webhooks`), and those that are audited are
//! recorded (`queue::audit`), in the transaction that makes them. Queries are checked at
//! run time (no database is needed to build) and every value is bound.

mod audit;
mod conversations;
mod gateways;
mod messages;
mod room_presence;
mod rotation;
mod service;

pub use audit::{append_audit, prune_audit};
pub use conversations::{Access, ConversationSummary, NewConversation, MAX_INITIAL_MEMBERS};
pub use gateways::{gateways, GatewayRow, FORGET_SILENT_AFTER, MISSED_BEATS};
pub use messages::{
    advance_receipts, persist_batch, EditRefusal, HistoryPage, PersistOutcome, ReceiptState,
    ReceiptUpdate,
};
pub use rotation::{rotate_batch, rows_to_rotate, RotationBatch};
pub use service::{PublishRefusal, StoredResponse};

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conversation not found")]
    NotFound,
    #[error("not a member of this conversation")]
    Forbidden,
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("schema migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("installing pgmq failed: {0}")]
    Pgmq(String),
    /// Stored data contradicts what the code guarantees; not worth retrying
    /// as is (the worker splits the batch and, if it persists, dead-letters).
    #[error("consistency check failed: {0}")]
    Invariant(String),
    /// A sealed content that the configured keys cannot open: its key was
    /// removed from POSTLINE_ENCRYPTION_KEYS, or the row was altered. Logged
    /// where it is found; the read that met it fails as a whole.
    #[error("message {message_id} cannot be decrypted: {reason}")]
    Undecryptable {
        message_id: uuid::Uuid,
        reason: String,
    },
}

/// Handle to the chat tables. Cheap to clone (the pool is an `Arc`).
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Webhook endpoints the changes made here are reported to (none: no
    /// webhooks).
    webhook_endpoints: Arc<[String]>,
    /// Keys that seal content written here (edits) and open content read
    /// (history); none: plain.
    keyring: Arc<crate::crypto::Keyring>,
    /// Whether edits are queued for the moderation hook's review.
    reviews: bool,
}

impl From<crate::queue::QueueError> for StoreError {
    fn from(e: crate::queue::QueueError) -> Self {
        match e {
            crate::queue::QueueError::Db(e) => StoreError::Db(e),
            e @ crate::queue::QueueError::UnknownQueue(_) => StoreError::Invariant(e.to_string()),
        }
    }
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Store {
            pool,
            webhook_endpoints: Arc::from([]),
            keyring: Arc::new(crate::crypto::Keyring::plain()),
            reviews: false,
        }
    }

    /// Seal edited content with, and open stored content with, `keyring`.
    pub fn with_keyring(mut self, keyring: Arc<crate::crypto::Keyring>) -> Self {
        self.keyring = keyring;
        self
    }

    /// Queue a review of each edit for the moderation hook, in the
    /// transaction that makes it (the worker does the same for new messages).
    pub fn with_reviews(mut self) -> Self {
        self.reviews = true;
        self
    }

    /// Report edits, deletes, members and new conversations to these
    /// endpoints, in the transaction that makes each change.
    pub fn with_webhooks(mut self, endpoints: Arc<[String]>) -> Self {
        self.webhook_endpoints = endpoints;
        self
    }

    /// Queue `events` for every webhook endpoint in the caller's transaction.
    async fn emit(
        &self,
        conn: &mut sqlx::PgConnection,
        events: &[crate::protocol::webhook::Event<'_>],
    ) -> Result<(), StoreError> {
        if self.webhook_endpoints.is_empty() {
            return Ok(());
        }
        let events = events
            .iter()
            .map(crate::queue::webhooks::NewEvent::from_event)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Invariant(format!("encoding a webhook event: {e}")))?;
        crate::queue::webhooks::enqueue(conn, &self.webhook_endpoints, &events).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `select 1`, bounded in time: the readiness probe.
    pub async fn ping(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, sqlx::query("select 1").execute(&self.pool)).await,
            Ok(Ok(_))
        )
    }
}

/// A pooled connection idle this long is tested (one round trip) before it
/// is handed out; one used more recently is not.
///
/// sqlx tests every connection on acquire by default, and every connection
/// on release too (that one cannot be turned off), so a statement run on
/// the pool cost three round trips: in S1 (an enqueue ~250 times a second,
/// a worker batch ~50) the pings were about as many as the statements. The
/// release test already vouches for a busy connection; one idle through a
/// Postgres restart is still caught here, and one broken in the last second
/// fails its statement, which every caller treats as the transient error it
/// is.
pub const TEST_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Open a bounded pool.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let options: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= TEST_IDLE_AFTER {
                    // An error closes the connection and another is tried.
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        // pgmq's install and our idempotent migrations raise NOTICEs
        // ("already exists, skipping") on every start: not worth a log line.
        .connect_with(
            options
                .application_name("postline")
                .options([("client_min_messages", "warning")]),
        )
        .await?;
    Ok(pool)
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Install (or upgrade) pgmq from its embedded SQL, then apply our migrations.
/// Idempotent, and safe when several processes start at once: an advisory
/// lock serialises the pgmq install (sqlx's migrator takes its own).
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    // Any constant works; this one is "postline" in ASCII, to be recognisable in pg_locks.
    const LOCK_KEY: i64 = 0x706f_7374_6c69_6e65;
    let mut lock_conn = pool.acquire().await?;
    sqlx::query("select pg_advisory_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *lock_conn)
        .await?;
    let installed = pgmq::PGMQueueExt::new_with_pool(pool.clone())
        .await
        .install_sql_from_embedded()
        .await
        .map_err(|e| StoreError::Pgmq(e.to_string()));
    let migrated = match installed {
        Ok(()) => MIGRATOR.run(pool).await.map_err(StoreError::from),
        Err(e) => Err(e),
    };
    sqlx::query("select pg_advisory_unlock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *lock_conn)
        .await?;
    migrated
}

impl Store {
    /// The limits `postline.publish()` must apply as the gateways do
    /// (migrations/0008_publish.sql).
    pub async fn share_settings(&self, max_content_bytes: usize) -> Result<(), StoreError> {
        sqlx::query(
            "insert into postline.settings (key, value) values ('max_content_bytes', $1)
             on conflict (key) do update set value = excluded.value",
        )
        .bind(max_content_bytes.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

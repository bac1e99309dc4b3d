//! The review hook: every stored message (and every edit) is POSTed, signed,
//! to `POSTLINE_MODERATION_HOOK_URL` from the low-priority queue, after the
//! fact; an answer `retract` turns it into a tombstone and every member hears
//! `message_deleted` with the reason.
//!
//! - producers write one `review` background job per message in the
//!   transaction that stores it (the worker's persist batch) or edits it
//!   (`store`), so a review exists exactly when its message does;
//! - the worker hands review jobs to the [`Reviewer`], a bounded pool beside
//!   it (the webhooks' [`PoolHandle`]), so a slow or failing hook never holds
//!   a persist batch, and chat never waits for it;
//! - one attempt: read the message as it is now (a review of a version that
//!   was edited or deleted since is stale: dropped), POST it, read the
//!   answer; then, in one transaction, the tombstone (`store::retract_in`),
//!   its `message.deleted` webhook event, the `message_deleted` relay to
//!   every gateway (NOTIFY, sent at commit) and the job's deletion. A failed
//!   attempt (no answer, not 2xx, an answer that is neither `allow` nor
//!   `retract`) is retried with the worker's backoff and dead-lettered after
//!   `POSTLINE_MAX_ATTEMPTS`: the message then stays, unreviewed, and
//!   `postline dlq replay` asks again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ModerationHookConfig, RetryPolicy, WebhookUrl};
use crate::domain::StoredMessage;
use crate::notify::{self, Target};
use crate::protocol::moderation::{self as wire, Answer, Review};
use crate::protocol::server;
use crate::queue::audit::{self, Action, Actor, Origin};
use crate::queue::{self, dead_letters, BackgroundJob, QueueError, RawJob, BACKGROUND_QUEUE};
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;
use crate::webhooks::{post::post_for_answer, sign, PoolHandle};

/// The worker's handle on the review pool. Cheap to clone.
#[derive(Clone)]
pub struct Reviewer {
    pool: PoolHandle,
}

struct Shared {
    pool: PgPool,
    store: Store,
    url: WebhookUrl,
    secret: Vec<u8>,
    timeout: Duration,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
}

/// Why an attempt's outcome could not be recorded (the job then comes back
/// after its visibility timeout).
#[derive(Debug, thiserror::Error)]
enum RecordError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

impl Reviewer {
    /// Start the pool on `tasks`, until `stop`.
    pub fn spawn(
        pool: PgPool,
        cfg: &ModerationHookConfig,
        retry: RetryPolicy,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Reviewer {
        let shared = Arc::new(Shared {
            store: Store::new(pool.clone()),
            pool,
            url: cfg.url.clone(),
            secret: cfg.secret.as_bytes().to_vec(),
            timeout: cfg.timeout,
            retry,
            metrics,
        });
        let pool = PoolHandle::spawn(
            "moderation review",
            shared,
            cfg.concurrency,
            cfg.timeout,
            stop,
            tasks,
            |s, job| async move { review(&s, &job).await },
        );
        Reviewer { pool }
    }

    /// Where the worker hands review jobs over.
    pub fn pool(&self) -> &PoolHandle {
        &self.pool
    }
}

/// One attempt at the review a job names, and its outcome recorded.
async fn review(s: &Shared, job: &RawJob) -> Result<(), RecordError> {
    let Ok(BackgroundJob::Review {
        message_id,
        version,
        ..
    }) = BackgroundJob::decode(&job.message)
    else {
        // The worker hands over only review jobs.
        return Ok(());
    };
    let current = s
        .store
        .message(message_id)
        .await?
        .filter(|m| m.version == version && !m.deleted);
    let Some(message) = current else {
        // Gone, deleted, or edited since (the edit has its own review).
        let mut tx = s.pool.begin().await?;
        queue::delete(&mut *tx, BACKGROUND_QUEUE, &[job.msg_id]).await?;
        dead_letters::forget_failures(&mut *tx, BACKGROUND_QUEUE, &[job.msg_id]).await?;
        tx.commit().await?;
        return Ok(());
    };
    let outcome = ask(s, &message).await;
    let counters = &s.metrics.moderation;
    let mut tx = s.pool.begin().await?;
    match outcome {
        Ok(Answer::Allow) => {
            counters.allowed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Answer::Retract { reason }) => {
            let reason = wire::reason(reason.as_deref());
            let retracted = s
                .store
                .retract_in(&mut tx, message_id, version, reason)
                .await?;
            // None: deleted or edited while the hook thought; nothing to do.
            if let Some(tombstone) = retracted {
                let conv = tombstone.message.conversation_id;
                let frame =
                    server::message_deleted(conv, message_id, tombstone.version, Some(reason));
                notify::publish_in(&mut tx, Target::Room(conv), &frame).await?;
                let retraction = Origin::default()
                    .by(Actor::System("moderation hook".into()))
                    .did(Action::ModerationRetract)
                    .conversation(conv)
                    .message(message_id)
                    .user(tombstone.message.sender_id)
                    .detail(serde_json::json!({"reason": reason, "version": version}));
                audit::record(&mut *tx, &retraction).await?;
                counters.retracted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(message = %message_id, conversation = %conv, reason, "message retracted by the moderation hook");
            }
        }
        Err(error) => {
            counters.review_failed.fetch_add(1, Ordering::Relaxed);
            let attempts =
                dead_letters::failures(&mut *tx, BACKGROUND_QUEUE, job.msg_id).await? + 1;
            if attempts >= s.retry.max_attempts {
                tracing::error!(message = %message_id, attempts, %error, "moderation review dead-lettered; the message stays unreviewed");
                let counted = RawJob {
                    read_ct: attempts,
                    ..job.clone()
                };
                dead_letters::bury(&mut tx, BACKGROUND_QUEUE, &counted, &error).await?;
            } else {
                let delay = s.retry.backoff(attempts);
                tracing::warn!(message = %message_id, attempts, ?delay, %error, "moderation review failed; retrying later");
                dead_letters::record_failure(&mut *tx, BACKGROUND_QUEUE, job.msg_id, &error)
                    .await?;
                queue::set_vt(&mut *tx, BACKGROUND_QUEUE, &[job.msg_id], delay).await?;
            }
            tx.commit().await?;
            return Ok(());
        }
    }
    queue::delete(&mut *tx, BACKGROUND_QUEUE, &[job.msg_id]).await?;
    dead_letters::forget_failures(&mut *tx, BACKGROUND_QUEUE, &[job.msg_id]).await?;
    tx.commit().await?;
    Ok(())
}

/// POST the message, signed as webhooks are, and read the answer.
async fn ask(s: &Shared, m: &StoredMessage) -> Result<Answer, String> {
    let review = Review::new(m);
    let body =
        Bytes::from(serde_json::to_vec(&review).map_err(|e| format!("encoding the review: {e}"))?);
    let timestamp = chrono::Utc::now().timestamp();
    let headers = [
        (sign::TIMESTAMP_HEADER, timestamp.to_string()),
        (
            sign::SIGNATURE_HEADER,
            sign::signature(&s.secret, timestamp, &body),
        ),
        (sign::EVENT_ID_HEADER, review.id.to_string()),
    ];
    let answer = post_for_answer(&s.url, "postline-moderation", &headers, body, s.timeout)
        .await
        .map_err(|e| e.to_string())?;
    Answer::parse(&answer)
}

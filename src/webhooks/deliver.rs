//! The delivery pool: webhook jobs handed over by the worker, POSTed by at
//! most `POSTLINE_WEBHOOK_CONCURRENCY` tasks at once, each attempt bounded
//! by `POSTLINE_WEBHOOK_TIMEOUT_MS`.
//!
//! Why a pool beside the worker rather than HTTP inside its batch: the
//! worker applies one batch at a time, persist batches included, so one
//! hanging endpoint would hold chat messages for the whole timeout. The
//! worker only hands a job over (never waiting: a full pool leaves the job
//! in the queue for a later read) after hiding it for longer than an
//! attempt can take; the pool then finishes the job in its own transaction:
//! delete on a 2xx, otherwise backoff (the worker's [`RetryPolicy`], counted
//! from the delivery's own attempts) or, once attempts are used up, the
//! dead-letter table. A crash mid-attempt leaves the job to reappear when
//! its visibility timeout ends: delivery is at least once.
//!
//! Order: only the first pending delivery of each (endpoint, conversation)
//! has a job; the rest are parked when written ([`deliveries::enqueue`]),
//! and the transaction that finishes a delivery (2xx or dead letter) gives
//! the next its job ([`deliveries::wake_next`]). A job that still finds an
//! earlier delivery pending (a replayed dead letter) is parked by the
//! worker ([`deliveries::park_blocked`]). A failing endpoint so costs a row
//! per waiting event, not reads of waiting jobs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pool::PoolHandle;
use super::post::post;
use super::sign;
use crate::config::{RetryPolicy, WebhookConfig, WebhookUrl};
use crate::queue::webhooks::{self as deliveries, Delivery};
use crate::queue::{self, dead_letters, BackgroundJob, QueueError, RawJob, BACKGROUND_QUEUE};

/// The worker's handle on the pool. Cheap to clone.
#[derive(Clone)]
pub struct Deliverer {
    pool: PoolHandle,
    endpoints: Arc<[String]>,
}

struct Shared {
    pool: PgPool,
    urls: HashMap<String, WebhookUrl>,
    secret: Vec<u8>,
    timeout: Duration,
    retry: RetryPolicy,
}

impl Deliverer {
    /// Start the pool on `tasks`, until `stop` (attempts in flight are then
    /// dropped; their jobs come back after their visibility timeout).
    pub fn spawn(
        pool: PgPool,
        cfg: &WebhookConfig,
        retry: RetryPolicy,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Deliverer {
        let endpoints: Arc<[String]> = cfg.endpoints.iter().map(ToString::to_string).collect();
        let shared = Arc::new(Shared {
            pool,
            urls: cfg
                .endpoints
                .iter()
                .map(|u| (u.to_string(), u.clone()))
                .collect(),
            secret: cfg.secret.as_bytes().to_vec(),
            timeout: cfg.timeout,
            retry,
        });
        let pool = PoolHandle::spawn(
            "webhook delivery",
            shared,
            cfg.concurrency,
            cfg.timeout,
            stop,
            tasks,
            |s, job| async move { deliver(&s, &job).await },
        );
        Deliverer { pool, endpoints }
    }

    /// Every configured endpoint, as named in `webhook_deliveries`.
    pub fn endpoints(&self) -> &Arc<[String]> {
        &self.endpoints
    }

    /// Where the worker hands webhook jobs over.
    pub fn pool(&self) -> &PoolHandle {
        &self.pool
    }
}

/// One attempt at the delivery a job names, and its outcome recorded.
async fn deliver(s: &Shared, job: &RawJob) -> Result<(), QueueError> {
    let Ok(BackgroundJob::Webhook { delivery_id, .. }) = BackgroundJob::decode(&job.message) else {
        // The worker hands over only webhook jobs.
        return Ok(());
    };
    let Some(d) = deliveries::take(&s.pool, delivery_id).await? else {
        // Delivered already (a repeated job) or gone: nothing to send.
        queue::delete(&s.pool, BACKGROUND_QUEUE, &[job.msg_id]).await?;
        return Ok(());
    };
    let outcome = match s.urls.get(&d.endpoint) {
        Some(url) => send(s, url, &d).await.map_err(|e| e.to_string()),
        None => Err(format!(
            "{} is no longer in POSTLINE_WEBHOOK_URLS",
            d.endpoint
        )),
    };
    let mut tx = s.pool.begin().await?;
    deliveries::lock_lane(&mut tx, &d).await?;
    let finished = match outcome {
        Ok(()) => {
            deliveries::mark_delivered(&mut *tx, d.id).await?;
            queue::delete(&mut *tx, BACKGROUND_QUEUE, &[job.msg_id]).await?;
            dead_letters::forget_failures(&mut *tx, BACKGROUND_QUEUE, &[job.msg_id]).await?;
            true
        }
        Err(error) => {
            let attempts = d.attempts + 1;
            if attempts >= s.retry.max_attempts {
                tracing::error!(endpoint = %d.endpoint, delivery = d.id, attempts, %error, "webhook delivery dead-lettered");
                deliveries::mark_failed(&mut *tx, d.id, &error, None).await?;
                let counted = RawJob {
                    read_ct: attempts,
                    ..job.clone()
                };
                dead_letters::bury(&mut tx, BACKGROUND_QUEUE, &counted, &error).await?;
                true
            } else {
                let delay = s.retry.backoff(attempts);
                tracing::warn!(endpoint = %d.endpoint, delivery = d.id, attempts, ?delay, %error, "webhook delivery failed; retrying later");
                deliveries::mark_failed(&mut *tx, d.id, &error, Some(delay)).await?;
                dead_letters::record_failure(&mut *tx, BACKGROUND_QUEUE, job.msg_id, &error)
                    .await?;
                queue::set_vt(&mut *tx, BACKGROUND_QUEUE, &[job.msg_id], delay).await?;
                false
            }
        }
    };
    if finished {
        // The conversation's order moves on: its next delivery stops waiting.
        deliveries::wake_next(&mut tx, &d).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn send(s: &Shared, url: &WebhookUrl, d: &Delivery) -> Result<(), super::PostError> {
    let body = Bytes::from(d.body.to_string());
    let timestamp = chrono::Utc::now().timestamp();
    let headers = [
        (sign::TIMESTAMP_HEADER, timestamp.to_string()),
        (
            sign::SIGNATURE_HEADER,
            sign::signature(&s.secret, timestamp, &body),
        ),
        (sign::EVENT_ID_HEADER, d.event_id.to_string()),
    ];
    post(url, "postline-webhooks", &headers, body, s.timeout).await
}

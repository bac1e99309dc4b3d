//! The gateway's side of the persist queue: coalesces concurrent sends into
//! one `pgmq.send_batch`, and reports back once each job is committed.
//!
//! Callers never wait on Postgres: `submit` is a `try_send` into a bounded
//! buffer, and a full buffer is refused at once (the client hears
//! `unavailable`) rather than queued without bound or dropped after an ack.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{send_batch, PERSIST_QUEUE};

#[derive(Debug, Clone, Copy)]
pub struct EnqueueConfig {
    /// Jobs buffered in memory while a batch is in flight or Postgres is slow.
    pub capacity: usize,
    /// Most jobs in one `send_batch` (one statement, one commit).
    pub max_batch: usize,
    /// After shutdown is requested, how long to keep retrying the last jobs.
    pub flush_timeout: Duration,
}

impl Default for EnqueueConfig {
    fn default() -> Self {
        EnqueueConfig {
            capacity: 8192,
            max_batch: 512,
            flush_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnqueueError {
    #[error("the message could not be queued before shutdown: the database is unavailable")]
    Unavailable,
}

/// `submit` refused the job: the buffer is full or the enqueuer has stopped.
#[derive(Debug, thiserror::Error)]
#[error("persist buffer full or closed")]
pub struct Rejected;

/// Called once with the job's fate: Ok once it is committed to the queue.
pub type Done = Box<dyn FnOnce(Result<(), EnqueueError>) + Send>;

struct Submission {
    payload: serde_json::Value,
    done: Done,
}

/// Handle to the enqueue task. Cheap to clone.
#[derive(Clone)]
pub struct Enqueuer {
    tx: mpsc::Sender<Submission>,
}

impl Enqueuer {
    /// Start the enqueue task. `wake` is notified after each committed batch
    /// so a worker in the same process reads at once instead of at its next poll.
    pub fn spawn(
        pool: PgPool,
        cfg: EnqueueConfig,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Enqueuer {
        let (tx, rx) = mpsc::channel(cfg.capacity.max(1));
        tracker.spawn(run(rx, pool, cfg, wake, shutdown));
        Enqueuer { tx }
    }

    pub fn submit(&self, payload: serde_json::Value, done: Done) -> Result<(), Rejected> {
        self.tx
            .try_send(Submission { payload, done })
            .map_err(|_| Rejected)
    }
}

async fn run(
    mut rx: mpsc::Receiver<Submission>,
    pool: PgPool,
    cfg: EnqueueConfig,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<Submission> = Vec::with_capacity(cfg.max_batch);
    loop {
        let first = tokio::select! {
            biased;
            s = rx.recv() => s,
            _ = shutdown.cancelled() => {
                // Refuse new work, then flush what was already accepted.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        // Whatever piled up while the previous batch was in flight goes in this one.
        while batch.len() < cfg.max_batch {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        let payloads: Vec<serde_json::Value> = batch
            .iter_mut()
            .map(|s| std::mem::take(&mut s.payload))
            .collect();
        let result = commit_with_retry(&pool, &payloads, &cfg, &shutdown).await;
        if result.is_ok() {
            wake.notify_one();
        }
        for s in batch.drain(..) {
            (s.done)(result.clone());
        }
    }
}

/// Retry a failed batch with capped exponential backoff. Give up only once
/// shutdown was requested and the flush deadline passed: the callers were not
/// acked, so they hear `unavailable` and nothing acked is lost.
async fn commit_with_retry(
    pool: &PgPool,
    payloads: &[serde_json::Value],
    cfg: &EnqueueConfig,
    shutdown: &CancellationToken,
) -> Result<(), EnqueueError> {
    let mut backoff = Duration::from_millis(20);
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        match send_batch(pool, PERSIST_QUEUE, payloads).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, jobs = payloads.len(), "enqueue failed; retrying");
            }
        }
        if shutdown.is_cancelled() {
            let d =
                *deadline.get_or_insert_with(|| tokio::time::Instant::now() + cfg.flush_timeout);
            if tokio::time::Instant::now() >= d {
                tracing::error!(
                    jobs = payloads.len(),
                    "giving up on unqueued jobs at shutdown"
                );
                return Err(EnqueueError::Unavailable);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

//! The gateway's side of the persist queue: coalesces concurrent sends into
//! one `pgmq.send_batch`, and reports back once each job is committed.
//!
//! Callers never wait on Postgres: `submit` is a `try_send` into a bounded
//! buffer, and a full buffer is refused at once (the client hears
//! `unavailable`) rather than queued without bound or dropped after an ack.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{send_batch_encoded, Payload};
use crate::config::EnqueueConfig;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnqueueError {
    #[error("the message could not be queued before shutdown: the database is unavailable")]
    Unavailable,
    /// Postgres refused this job itself (not the connection): retrying it
    /// would fail forever, so it is refused alone and its batch goes on.
    #[error("the database refused the message: {0}")]
    Refused(String),
}

/// `submit` refused the job: the buffer is full or the enqueuer has stopped.
#[derive(Debug, thiserror::Error)]
#[error("persist buffer full or closed")]
pub struct Rejected;

/// Called once with the job's fate: Ok once it is committed to the queue.
pub type Done = Box<dyn FnOnce(Result<(), EnqueueError>) + Send>;

struct Submission {
    payload: Payload,
    done: Done,
}

/// Handle to the enqueue task. Cheap to clone.
#[derive(Clone)]
pub struct Enqueuer {
    tx: mpsc::Sender<Submission>,
    progress: Arc<Progress>,
}

/// A batch not committed after this long is stuck (Postgres down, a lock,
/// a pool that cannot connect) even before an attempt has failed: sqlx may
/// wait its whole acquire timeout before it reports anything.
const STALLED_AFTER: Duration = Duration::from_secs(1);

/// How the enqueue task is doing, shared with `buffer()` for /readyz.
#[derive(Default)]
struct Progress {
    /// The last attempt failed and is being retried.
    failing: AtomicBool,
    /// When the batch being sent now started; None between batches.
    sending_since: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Progress {
    fn sending(&self, since: Option<tokio::time::Instant>) {
        *self.sending_since.lock().unwrap_or_else(|p| p.into_inner()) = since;
    }

    fn stalled(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
            || self
                .sending_since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() >= STALLED_AFTER)
    }
}

/// The persist buffer's state, for /readyz.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistBuffer {
    pub buffered: usize,
    pub capacity: usize,
    /// The last attempt to enqueue failed and is being retried, or the batch
    /// in flight has not committed for a while.
    pub retrying: bool,
}

impl Enqueuer {
    /// Start the enqueue task. `wake` is notified after each committed batch
    /// so a worker in the same process reads at once instead of at its next poll.
    pub fn spawn(
        pool: PgPool,
        queue: &'static str,
        cfg: EnqueueConfig,
        wake: Arc<Notify>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Enqueuer {
        let (tx, rx) = mpsc::channel(cfg.capacity.max(1));
        let progress = Arc::new(Progress::default());
        tracker.spawn(run(rx, pool, queue, cfg, wake, shutdown, progress.clone()));
        Enqueuer { tx, progress }
    }

    pub fn buffer(&self) -> PersistBuffer {
        PersistBuffer {
            buffered: self.tx.max_capacity() - self.tx.capacity(),
            capacity: self.tx.max_capacity(),
            retrying: self.progress.stalled(),
        }
    }

    pub fn submit(&self, payload: Payload, done: Done) -> Result<(), Rejected> {
        self.tx
            .try_send(Submission { payload, done })
            .map_err(|_| Rejected)
    }
}

async fn run(
    mut rx: mpsc::Receiver<Submission>,
    pool: PgPool,
    queue: &'static str,
    cfg: EnqueueConfig,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    progress: Arc<Progress>,
) {
    let failing = &progress.failing;
    let mut batch: Vec<Submission> = Vec::with_capacity(cfg.max_batch);
    // One flush deadline for everything left at shutdown, not one per batch.
    let mut deadline: Option<tokio::time::Instant> = None;
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
        if !cfg.linger.is_zero() && batch.len() < cfg.max_batch {
            let linger_until = tokio::time::Instant::now() + cfg.linger;
            while batch.len() < cfg.max_batch {
                match tokio::time::timeout_at(linger_until, rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    _ => break,
                }
            }
        }
        let (payloads, dones): (Vec<Payload>, Vec<Done>) =
            batch.drain(..).map(|s| (s.payload, s.done)).unzip();
        progress.sending(Some(tokio::time::Instant::now()));
        let results = match commit_with_retry(
            &pool,
            queue,
            &payloads,
            &cfg,
            (&shutdown, &mut deadline),
            failing,
        )
        .await
        {
            Err(Attempt::Refused(_)) if payloads.len() > 1 => {
                // One bad job must not hold the others hostage: send them one by one.
                let mut results = Vec::with_capacity(payloads.len());
                for p in &payloads {
                    results.push(
                        commit_with_retry(
                            &pool,
                            queue,
                            std::slice::from_ref(p),
                            &cfg,
                            (&shutdown, &mut deadline),
                            failing,
                        )
                        .await
                        .map_err(EnqueueError::from),
                    );
                }
                results
            }
            other => vec![other.map_err(EnqueueError::from); payloads.len()],
        };
        progress.sending(None);
        if results.iter().any(Result::is_ok) {
            wake.notify_one();
        }
        for (done, result) in dones.into_iter().zip(results) {
            done(result);
        }
    }
}

enum Attempt {
    Unavailable,
    Refused(String),
}

impl From<Attempt> for EnqueueError {
    fn from(a: Attempt) -> Self {
        match a {
            Attempt::Unavailable => EnqueueError::Unavailable,
            Attempt::Refused(reason) => EnqueueError::Refused(reason),
        }
    }
}

/// Retry a batch that failed for a transient reason with capped exponential
/// backoff. Give up only once shutdown was requested and the flush deadline
/// passed: the callers were not acked, so they hear `unavailable` and nothing
/// acked is lost. A refusal caused by the data itself is returned at once.
async fn commit_with_retry(
    pool: &PgPool,
    queue: &str,
    payloads: &[Payload],
    cfg: &EnqueueConfig,
    (shutdown, deadline): (&CancellationToken, &mut Option<tokio::time::Instant>),
    failing: &AtomicBool,
) -> Result<(), Attempt> {
    let mut backoff = Duration::from_millis(20);
    loop {
        match send_batch_encoded(pool, queue, payloads).await {
            Ok(_) => {
                failing.store(false, Ordering::Relaxed);
                return Ok(());
            }
            Err(super::QueueError::Db(e)) if !super::is_transient(&e) => {
                tracing::warn!(error = %e, jobs = payloads.len(), "the database refused a persist batch");
                return Err(Attempt::Refused(e.to_string()));
            }
            Err(e) => {
                failing.store(true, Ordering::Relaxed);
                tracing::warn!(error = %e, jobs = payloads.len(), ?backoff, "enqueue failed; retrying");
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
                return Err(Attempt::Unavailable);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

//! The gateway's side of the persist queue: coalesces concurrent sends into
//! one `pgmq.send_batch`, and reports back once each job is committed.
//!
//! Callers never wait on Postgres: `submit` is a `try_send` into a bounded
//! buffer, and a full buffer is refused at once (the client hears
//! `unavailable`) rather than queued without bound or dropped after an ack.
//!
//! The buffer is shared fairly: each job has an owner (its sender), and no
//! owner may have more than its share waiting (buffered or in the batch in
//! flight). While Postgres is slow one flooding client fills its share and
//! is refused, and everyone else's sends are still taken.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{send_batch_encoded, Payload, QueueError};
use crate::config::EnqueueConfig;
use crate::domain::UserId;
use crate::store::TEST_IDLE_AFTER;

/// One owner's share of the buffer is capacity / this: sixteen owners at
/// their share fill it, so fewer than sixteen flooders cannot crowd out the
/// rest. One sender at the default send rate (20/s) needs far less than
/// 1/16 of the default 8,192 even through a long outage.
const SHARE_DIVISOR: usize = 16;

/// The smallest share, whatever the capacity: above the default send burst
/// (40), so a small buffer never refuses a legitimate burst for fairness.
const MIN_SHARE: usize = 64;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnqueueError {
    #[error("the message could not be queued before shutdown: the database is unavailable")]
    Unavailable,
    /// Postgres refused this job itself (not the connection): retrying it
    /// would fail forever, so it is refused alone and its batch goes on.
    #[error("the database refused the message: {0}")]
    Refused(String),
}

/// Why `submit` refused a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The buffer is full or the enqueuer has stopped.
    #[error("persist buffer full or closed")]
    Full,
    /// The owner already has its share of the buffer waiting.
    #[error("this sender's share of the persist buffer is full")]
    OverShare,
}

/// Called once with the job's fate: Ok once it is committed to the queue.
pub type Done = Box<dyn FnOnce(Result<(), EnqueueError>) + Send>;

struct Submission {
    owner: UserId,
    payload: Payload,
    done: Done,
}

/// Jobs waiting per owner (submitted, not yet settled). Holds only owners
/// with at least one job waiting, so at most capacity + one batch entries.
struct Shares {
    waiting: Mutex<HashMap<UserId, usize>>,
    max_per_owner: usize,
}

impl Shares {
    fn new(capacity: usize) -> Self {
        Shares {
            waiting: Mutex::default(),
            max_per_owner: (capacity / SHARE_DIVISOR).max(MIN_SHARE),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, usize>> {
        // Poisoning only means a panic elsewhere mid-update of a plain map.
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count one more job of `owner`, if it is within its share.
    fn take(&self, owner: UserId) -> Result<(), Rejected> {
        let mut waiting = self.lock();
        let n = waiting.entry(owner).or_insert(0);
        if *n >= self.max_per_owner {
            return Err(Rejected::OverShare);
        }
        *n += 1;
        Ok(())
    }

    /// One job of `owner` settled (committed, refused or never buffered).
    fn release(&self, owner: UserId) {
        let mut waiting = self.lock();
        if let Some(n) = waiting.get_mut(&owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                waiting.remove(&owner);
            }
        }
    }
}

/// Handle to the enqueue task. Cheap to clone.
#[derive(Clone)]
pub struct Enqueuer {
    tx: mpsc::Sender<Submission>,
    state: Arc<State>,
}

/// A batch not committed after this long is stuck (Postgres down, a lock,
/// a pool that cannot connect) even before an attempt has failed: sqlx may
/// wait its whole acquire timeout before it reports anything.
const STALLED_AFTER: Duration = Duration::from_secs(1);

/// The enqueue task's connection, kept from batch to batch while they come
/// often: taken from the pool for each batch, every batch also paid the
/// test sqlx runs on a connection's release (one round trip, not optional).
struct Link {
    pool: PgPool,
    held: Option<(PoolConnection<Postgres>, tokio::time::Instant)>,
}

impl Link {
    async fn send(&mut self, queue: &str, payloads: &[Payload]) -> Result<(), QueueError> {
        // Idle a while, it may have died meanwhile (a Postgres restart): it
        // goes back to the pool, which tests it, and a tested one is taken.
        let recent = self
            .held
            .take()
            .filter(|(_, used)| used.elapsed() < TEST_IDLE_AFTER);
        let mut conn = match recent {
            Some((conn, _)) => conn,
            None => self.pool.acquire().await?,
        };
        let sent = send_batch_encoded(&mut *conn, queue, payloads).await;
        let broken = matches!(&sent, Err(QueueError::Db(e)) if super::is_transient(e));
        // A connection that failed goes back to the pool, which closes it if
        // broken; and so does one the rest of the server needs (a pool at its
        // size with none idle, as a pool of one always is).
        let spare = self.pool.num_idle() > 0
            || self.pool.size() < self.pool.options().get_max_connections();
        if !broken && spare {
            self.held = Some((conn, tokio::time::Instant::now()));
        }
        sent.map(drop)
    }
}

/// What the handles and the task share.
struct State {
    /// The last attempt to enqueue failed and is being retried.
    failing: AtomicBool,
    /// When the batch being sent now started; None between batches.
    sending_since: std::sync::Mutex<Option<tokio::time::Instant>>,
    shares: Shares,
}

impl State {
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
        let state = Arc::new(State {
            failing: AtomicBool::new(false),
            sending_since: std::sync::Mutex::new(None),
            shares: Shares::new(cfg.capacity),
        });
        tracker.spawn(run(rx, pool, queue, cfg, wake, shutdown, state.clone()));
        Enqueuer { tx, state }
    }

    pub fn buffer(&self) -> PersistBuffer {
        PersistBuffer {
            buffered: self.tx.max_capacity() - self.tx.capacity(),
            capacity: self.tx.max_capacity(),
            retrying: self.state.stalled(),
        }
    }

    /// Buffer `owner`'s job; `done` is called once with its fate.
    pub fn submit(&self, owner: UserId, payload: Payload, done: Done) -> Result<(), Rejected> {
        self.state.shares.take(owner)?;
        let submission = Submission {
            owner,
            payload,
            done,
        };
        self.tx.try_send(submission).map_err(|_| {
            self.state.shares.release(owner);
            Rejected::Full
        })
    }
}

async fn run(
    mut rx: mpsc::Receiver<Submission>,
    pool: PgPool,
    queue: &'static str,
    cfg: EnqueueConfig,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    state: Arc<State>,
) {
    let failing = &state.failing;
    let mut link = Link { pool, held: None };
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
        let (payloads, settle): (Vec<Payload>, Vec<(UserId, Done)>) = batch
            .drain(..)
            .map(|s| (s.payload, (s.owner, s.done)))
            .unzip();
        state.sending(Some(tokio::time::Instant::now()));
        let results = match commit_with_retry(
            &mut link,
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
                            &mut link,
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
        state.sending(None);
        if results.iter().any(Result::is_ok) {
            wake.notify_one();
        }
        for ((owner, done), result) in settle.into_iter().zip(results) {
            // Released first, so a sender acked now may send again at once.
            state.shares.release(owner);
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
    link: &mut Link,
    queue: &str,
    payloads: &[Payload],
    cfg: &EnqueueConfig,
    (shutdown, deadline): (&CancellationToken, &mut Option<tokio::time::Instant>),
    failing: &AtomicBool,
) -> Result<(), Attempt> {
    let mut backoff = Duration::from_millis(20);
    loop {
        match link.send(queue, payloads).await {
            Ok(()) => {
                failing.store(false, Ordering::Relaxed);
                return Ok(());
            }
            Err(QueueError::Db(e)) if !super::is_transient(&e) => {
                tracing::warn!(error = %e, jobs = payloads.len(), "the database refused a persist batch");
                return Err(Attempt::Refused(e.to_string()));
            }
            Err(e @ QueueError::UnknownQueue(_)) => return Err(Attempt::Refused(e.to_string())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_past_its_share_is_refused_and_others_are_not() {
        let shares = Shares::new(256);
        assert_eq!(
            shares.max_per_owner, MIN_SHARE,
            "256 / 16 is below the floor"
        );
        let (flooder, polite) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
        for _ in 0..MIN_SHARE {
            shares.take(flooder).unwrap();
        }
        assert_eq!(shares.take(flooder), Err(Rejected::OverShare));
        assert_eq!(shares.take(polite), Ok(()));
        // Settled jobs give the share back, and idle owners leave the map.
        shares.release(flooder);
        assert_eq!(shares.take(flooder), Ok(()));
        shares.release(polite);
        assert!(!shares.lock().contains_key(&polite));
        assert_eq!(Shares::new(8192).max_per_owner, 512);
    }
}

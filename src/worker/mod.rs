//! The persistence worker: reads persist jobs from pgmq and, in ONE
//! transaction, stores their messages (assigning seqs), deletes the jobs and
//! NOTIFYs gateways.
//!
//! A crash at any point before commit leaves the jobs in the queue, visible
//! again after the visibility timeout; a commit stores each message once and
//! removes its job in the same breath. The worker never talks to a socket:
//! gateways hear from it only through Postgres, so it may run anywhere.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::domain::Message;
use crate::queue::{self, RawJob, PERSIST_QUEUE};
use crate::store::{self, StoreError};

#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Jobs read (and messages written) per transaction.
    pub batch_size: i32,
    /// How long a read job stays hidden before another reader may take it:
    /// the time a crashed worker's batch waits before it is retried.
    pub visibility_timeout: Duration,
    /// How often an idle worker polls when nothing wakes it.
    pub poll_interval: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            batch_size: 500,
            visibility_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

/// What one `run_once` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The queue had nothing visible.
    Idle,
    Processed {
        persisted: usize,
        duplicates: usize,
        /// Jobs that can never succeed (malformed payload, conversation gone):
        /// archived in pgmq, where `sql/` queries can inspect them.
        archived: usize,
    },
}

/// When the worker loop last made progress (unix millis), for /readyz.
#[derive(Debug, Default)]
pub struct Heartbeat(AtomicI64);

impl Heartbeat {
    fn beat(&self) {
        self.0
            .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Time since the last beat, or None if it never beat.
    pub fn age(&self) -> Option<Duration> {
        let last = self.0.load(Ordering::Relaxed);
        (last != 0).then(|| {
            Duration::from_millis((chrono::Utc::now().timestamp_millis() - last).max(0) as u64)
        })
    }
}

pub struct Worker {
    pool: PgPool,
    cfg: WorkerConfig,
    wake: Arc<Notify>,
    heartbeat: Arc<Heartbeat>,
}

impl Worker {
    pub fn new(pool: PgPool, cfg: WorkerConfig, wake: Arc<Notify>) -> Self {
        Worker {
            pool,
            cfg,
            wake,
            heartbeat: Arc::default(),
        }
    }

    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    /// Read one batch and persist it. Tests call this to drain the queue step
    /// by step without sleeping.
    pub async fn run_once(&self) -> Result<Outcome, WorkerError> {
        let vt = self
            .cfg
            .visibility_timeout
            .as_secs()
            .clamp(1, i32::MAX as u64) as i32;
        let jobs = queue::read(&self.pool, PERSIST_QUEUE, vt, self.cfg.batch_size).await?;
        if jobs.is_empty() {
            return Ok(Outcome::Idle);
        }
        self.persist_jobs(&jobs).await
    }

    async fn persist_jobs(&self, jobs: &[RawJob]) -> Result<Outcome, WorkerError> {
        let mut messages: Vec<Message> = Vec::with_capacity(jobs.len());
        let mut message_jobs: Vec<i64> = Vec::with_capacity(jobs.len());
        let mut dead: Vec<i64> = Vec::new();
        for job in jobs {
            match queue::PersistJob::decode(&job.message) {
                Ok(m) => {
                    messages.push(m);
                    message_jobs.push(job.msg_id);
                }
                Err(reason) => {
                    tracing::error!(msg_id = job.msg_id, %reason, "archiving a persist job that can never succeed");
                    dead.push(job.msg_id);
                }
            }
        }

        let mut tx = self.pool.begin().await?;
        let outcome = store::persist_batch(&mut tx, &messages).await?;
        for orphan in &outcome.orphans {
            if let Some(i) = messages.iter().position(|m| m.id == *orphan) {
                tracing::error!(message_id = %orphan, "archiving a persist job whose conversation no longer exists");
                dead.push(message_jobs[i]);
            }
        }
        let done: Vec<i64> = message_jobs
            .iter()
            .copied()
            .filter(|id| !dead.contains(id))
            .collect();
        queue::delete(&mut *tx, PERSIST_QUEUE, &done).await?;
        if !dead.is_empty() {
            queue::archive(&mut *tx, PERSIST_QUEUE, &dead).await?;
        }
        crate::notify::publish_persisted(&mut tx, &outcome.persisted).await?;
        tx.commit().await?;

        Ok(Outcome::Processed {
            persisted: outcome.persisted.len(),
            duplicates: outcome.duplicates,
            archived: dead.len(),
        })
    }

    /// Loop until shutdown: drain while there is work, then wait for a wake-up
    /// or the poll interval. A failed batch is retried with capped backoff
    /// (its jobs reappear after the visibility timeout in any case).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        self.heartbeat.beat();
        while !shutdown.is_cancelled() {
            match self.run_once().await {
                Ok(Outcome::Processed { .. }) => {
                    backoff = Duration::from_millis(50);
                    self.heartbeat.beat();
                }
                Ok(Outcome::Idle) => {
                    self.heartbeat.beat();
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "persist batch failed; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

//! The persistence worker: reads jobs from pgmq and, in ONE transaction per
//! batch, applies them (stores messages with their seqs, moves read markers),
//! deletes the jobs and NOTIFYs gateways.
//!
//! Two ways to take a batch of messages to store:
//! - claimed (the usual one): the jobs are locked by the very transaction
//!   that stores and deletes them, so a batch is one commit. Nothing is
//!   written to take them, so a failure leaves no trace on them: they are
//!   visible again at once, and their attempt is not counted;
//! - read (pgmq's `read`, its own commit first): the job is hidden for the
//!   visibility timeout and its `read_ct` counts the attempt, even if the
//!   process dies. A worker reads this way when it starts (a process that
//!   crashed on a batch counts that batch's attempts from its restart on),
//!   after any failure, until a batch succeeds again; and always for the
//!   background queue.
//!
//! Failures, by kind:
//! - a job that can never succeed (malformed payload, conversation gone) is
//!   dead-lettered at once, in the batch's own transaction;
//! - a transient failure (the database went away) fails the whole batch: the
//!   worker keeps the batch, re-extends its visibility timeout and retries it
//!   before reading anything else, so order is kept and nothing is charged to
//!   the jobs;
//! - any other failure splits the batch: jobs are retried one by one, so a
//!   poison job cannot stall the others; a job that fails on its own is
//!   retried with exponential backoff and jitter (pgmq set_vt, from read_ct)
//!   and dead-lettered after `max_attempts`.
//!
//! The worker never talks to a socket: gateways hear from it only through
//! Postgres, so it may run anywhere and any number may run at once.

mod retry;

pub use crate::config::{RetryPolicy, WorkerConfig};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::crypto::Keyring;
use crate::domain::{Message, MessageId, MessageKind, Seq};
use crate::moderation::Reviewer;
use crate::queue::{self, dead_letters, BackgroundJob, Queue, RawJob};
use crate::store::{self, ReceiptUpdate, StoreError};
use crate::telemetry::{Metrics, QueueCounters};
use crate::webhooks::{Deliverer, PoolHandle};

/// How soon a webhook or review job its full pool could not take is read
/// again: long enough not to spin, short next to any retry.
const POOL_FULL_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
}

impl WorkerError {
    fn sqlx(&self) -> Option<&sqlx::Error> {
        match self {
            WorkerError::Store(StoreError::Db(e))
            | WorkerError::Queue(queue::QueueError::Db(e))
            | WorkerError::Db(e) => Some(e),
            _ => None,
        }
    }

    /// A failure of the database or the connection, not of the jobs.
    pub fn is_transient(&self) -> bool {
        self.sqlx().is_some_and(queue::is_transient)
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchReport {
    pub jobs: usize,
    /// Messages newly stored (persist queue).
    pub persisted: usize,
    /// Messages already stored: retries, replays, duplicate jobs.
    pub duplicates: usize,
    /// Background jobs applied.
    pub applied: usize,
    /// Jobs that failed and were scheduled again with backoff.
    pub retried: usize,
    /// Jobs moved to the dead-letter table.
    pub dead: usize,
}

impl BatchReport {
    fn merge(&mut self, o: BatchReport) {
        self.persisted += o.persisted;
        self.duplicates += o.duplicates;
        self.applied += o.applied;
        self.retried += o.retried;
        self.dead += o.dead;
    }
}

/// What one `run_once` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No queue had anything visible.
    Idle,
    Processed(Queue, BatchReport),
}

/// When the worker loop last made progress (unix millis), for /readyz.
#[derive(Debug, Default)]
pub struct Heartbeat(AtomicI64);

impl Heartbeat {
    fn started() -> Self {
        let h = Heartbeat(AtomicI64::new(0));
        h.beat();
        h
    }

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

/// What a cleanup pass removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CleanupReport {
    pub archived_rows: u64,
    pub stale_failures: u64,
    /// Delivered webhook deliveries past the retention.
    pub webhook_deliveries: u64,
    /// Audit rows past the audit retention.
    pub audit_rows: u64,
    /// Webhook lanes whose first delivery was parked with nothing to wake
    /// it (none expected: see `queue::webhooks::wake_stranded`).
    pub webhook_lanes_woken: usize,
}

/// What [`Worker::claim_and_apply`] did.
enum Claim {
    Applied(Outcome),
    /// Claimed nothing: the persist queue has no visible job.
    Empty,
    /// Not claimed (see `claim_and_apply`): read instead.
    NotClaimed,
}

pub struct Worker {
    pool: PgPool,
    cfg: WorkerConfig,
    wake: Arc<Notify>,
    heartbeat: Arc<Heartbeat>,
    metrics: Arc<Metrics>,
    high_streak: AtomicU32,
    /// Read (not claim) the next persist batch: from the start and after a
    /// failure, until a batch succeeds (see the module's notes).
    careful: AtomicBool,
    /// A batch that failed transiently, retried before anything new is read.
    held: std::sync::Mutex<Option<(Queue, Vec<i64>)>>,
    /// Where webhook jobs go, and the endpoints `message.created` is written
    /// for; None when no webhook is configured.
    webhooks: Option<Deliverer>,
    /// Keys content is sealed under as it is stored; none: plain.
    keyring: Arc<Keyring>,
    /// Where review jobs go; a review is written for each message stored.
    /// None when no moderation hook is configured.
    reviews: Option<Reviewer>,
}

/// Background jobs finished by a pool beside the worker, not by the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pooled {
    Webhook,
    Review,
}

/// A failed batch and the jobs of it still unfinished.
struct Interrupted {
    error: WorkerError,
    remaining: Vec<i64>,
}

impl Worker {
    pub fn new(pool: PgPool, cfg: WorkerConfig, wake: Arc<Notify>) -> Self {
        Self::with_metrics(pool, cfg, wake, Arc::default())
    }

    pub fn with_metrics(
        pool: PgPool,
        cfg: WorkerConfig,
        wake: Arc<Notify>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Worker {
            pool,
            cfg,
            wake,
            // Counted from construction: /readyz asks whether the worker
            // looped within the last 30 s, and one that has not reached its
            // first loop yet (a busy start) is not stuck.
            heartbeat: Arc::new(Heartbeat::started()),
            metrics,
            high_streak: AtomicU32::new(0),
            careful: AtomicBool::new(true),
            held: std::sync::Mutex::new(None),
            webhooks: None,
            keyring: Arc::new(Keyring::plain()),
            reviews: None,
        }
    }

    /// Seal message content with the active key of `keyring` as it is
    /// stored (docs/OPERATIONS.md, "Encryption at rest").
    pub fn with_keyring(mut self, keyring: Arc<Keyring>) -> Self {
        self.keyring = keyring;
        self
    }

    /// Write `message.created` for every message stored, and hand webhook
    /// jobs to `deliverer` (see [`crate::webhooks`]).
    pub fn with_webhooks(mut self, deliverer: Deliverer) -> Self {
        self.webhooks = Some(deliverer);
        self
    }

    /// Write a review job for every message stored (but `system` ones), and
    /// hand review jobs to `reviewer` (see [`crate::moderation`]).
    pub fn with_reviews(mut self, reviewer: Reviewer) -> Self {
        self.reviews = Some(reviewer);
        self
    }

    /// The pool that finishes `kind` of job, if this process runs one.
    fn pool(&self, kind: Pooled) -> Option<&PoolHandle> {
        match kind {
            Pooled::Webhook => self.webhooks.as_ref().map(Deliverer::pool),
            Pooled::Review => self.reviews.as_ref().map(Reviewer::pool),
        }
    }

    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    fn counters(&self, q: Queue) -> &QueueCounters {
        match q {
            Queue::Persist => &self.metrics.persist,
            Queue::Background => &self.metrics.background,
        }
    }

    fn take_held(&self) -> Option<(Queue, Vec<i64>)> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn hold(&self, q: Queue, ids: Vec<i64>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) =
            (!ids.is_empty()).then_some((q, ids));
    }

    /// Take one batch (high priority first, see `starvation_limit`; claimed
    /// or read, see the module's notes) and apply it. Tests call this to
    /// drain the queues step by step without sleeping.
    pub async fn run_once(&self) -> Result<Outcome, WorkerError> {
        if let Some(jobs) = self.background_turn().await? {
            return self.run_batch(Queue::Background, jobs).await;
        }
        let persist_empty = match self.claim_and_apply().await? {
            Claim::Applied(outcome) => return Ok(outcome),
            Claim::Empty => true,
            Claim::NotClaimed => false,
        };
        let (q, jobs) = match self.take_held() {
            Some((q, ids)) => {
                // Keep the batch hidden from other workers while we retry it.
                match queue::set_vt(&self.pool, q.name(), &ids, self.cfg.visibility_timeout).await {
                    Ok(jobs) => (q, jobs),
                    Err(e) => {
                        self.hold(q, ids);
                        return Err(e.into());
                    }
                }
            }
            None => match self.read_by_priority(persist_empty).await? {
                Some(batch) => batch,
                None => return Ok(Outcome::Idle),
            },
        };
        if jobs.is_empty() {
            return Ok(Outcome::Idle);
        }
        self.run_batch(q, jobs).await
    }

    /// Apply a batch that was read (or held), retrying its jobs one by one
    /// if it fails as a whole.
    async fn run_batch(&self, q: Queue, jobs: Vec<RawJob>) -> Result<Outcome, WorkerError> {
        self.metrics.batch_size.observe(jobs.len() as f64);
        match self.process(q, &jobs).await {
            Ok(report) => {
                if q == Queue::Persist && report.retried == 0 {
                    self.careful.store(false, Ordering::Relaxed);
                }
                Ok(self.processed(q, report))
            }
            Err(Interrupted { error, remaining }) => {
                self.counters(q)
                    .failed
                    .fetch_add(remaining.len() as u64, Ordering::Relaxed);
                self.hold(q, remaining);
                Err(error)
            }
        }
    }

    fn processed(&self, q: Queue, report: BatchReport) -> Outcome {
        let c = self.counters(q);
        c.processed.fetch_add(
            (report.jobs - report.retried - report.dead) as u64,
            Ordering::Relaxed,
        );
        c.retried
            .fetch_add(report.retried as u64, Ordering::Relaxed);
        c.dead_lettered
            .fetch_add(report.dead as u64, Ordering::Relaxed);
        c.failed
            .fetch_add((report.retried + report.dead) as u64, Ordering::Relaxed);
        Outcome::Processed(q, report)
    }

    /// When the background queue's turn has come (see `starvation_limit`)
    /// and persist batches are being claimed: its batch, read as always.
    /// With nothing there the turn is over, and persist jobs are claimed
    /// again rather than read the careful way.
    async fn background_turn(&self) -> Result<Option<Vec<RawJob>>, WorkerError> {
        if !self.low_turn() || !self.claiming() {
            return Ok(None);
        }
        let jobs = self.read(Queue::Background).await?;
        self.high_streak.store(0, Ordering::Relaxed);
        Ok((!jobs.is_empty()).then_some(jobs))
    }

    /// A batch of `q` read the pgmq way: each job's attempt is written
    /// (read_ct) and it stays invisible for the visibility timeout.
    async fn read(&self, q: Queue) -> Result<Vec<RawJob>, WorkerError> {
        let jobs = queue::read(
            &self.pool,
            q.name(),
            self.cfg.vt_secs(),
            self.cfg.batch_size,
        )
        .await?;
        Ok(jobs)
    }

    /// Whether the background queue goes first now: persist batches have
    /// had `starvation_limit` turns in a row.
    fn low_turn(&self) -> bool {
        self.high_streak.load(Ordering::Relaxed) >= self.cfg.starvation_limit
    }

    /// Whether persist batches are claimed now: not while careful, nor
    /// while a held batch goes first.
    fn claiming(&self) -> bool {
        let held = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        !held && !self.careful.load(Ordering::Relaxed)
    }

    /// The usual way to store messages: claim a persist batch inside the
    /// transaction that applies it, one commit in all (the background
    /// queue's turn was taken just before, see `background_turn`). A batch
    /// that failed for a reason of its own is left to the read path, which
    /// takes the same jobs, counts the attempt and retries them one by one.
    async fn claim_and_apply(&self) -> Result<Claim, WorkerError> {
        if !self.claiming() {
            return Ok(Claim::NotClaimed);
        }
        let mut tx = self.pool.begin().await?;
        let jobs = queue::claim(&mut tx, Queue::Persist.name(), self.cfg.batch_size).await?;
        if jobs.is_empty() {
            // It only read: its rollback (on drop) writes nothing.
            return Ok(Claim::Empty);
        }
        self.metrics.batch_size.observe(jobs.len() as f64);
        match self.apply_in(tx, Queue::Persist, &jobs).await {
            Ok(report) => {
                self.high_streak.fetch_add(1, Ordering::Relaxed);
                Ok(Claim::Applied(self.processed(Queue::Persist, report)))
            }
            Err(e) => {
                self.careful.store(true, Ordering::Relaxed);
                tracing::warn!(jobs = jobs.len(), error = %e, "claimed batch failed; reading it again, counting the attempt");
                if e.is_transient() {
                    Err(e)
                } else {
                    Ok(Claim::NotClaimed)
                }
            }
        }
    }

    /// `persist_empty`: a claim just found nothing there, so skip it.
    async fn read_by_priority(
        &self,
        persist_empty: bool,
    ) -> Result<Option<(Queue, Vec<RawJob>)>, WorkerError> {
        let order = if self.low_turn() {
            [Queue::Background, Queue::Persist]
        } else {
            [Queue::Persist, Queue::Background]
        };
        for q in order {
            if q == Queue::Persist && persist_empty {
                continue;
            }
            let jobs = self.read(q).await?;
            if q == Queue::Background && jobs.is_empty() {
                // Nothing waiting below: no turn is owed.
                self.high_streak.store(0, Ordering::Relaxed);
            }
            if !jobs.is_empty() {
                match q {
                    Queue::Persist => self.high_streak.fetch_add(1, Ordering::Relaxed),
                    Queue::Background => self.high_streak.swap(0, Ordering::Relaxed),
                };
                return Ok(Some((q, jobs)));
            }
        }
        Ok(None)
    }

    async fn process(&self, q: Queue, jobs: &[RawJob]) -> Result<BatchReport, Interrupted> {
        let all = || jobs.iter().map(|j| j.msg_id).collect::<Vec<_>>();
        match self.apply(q, jobs).await {
            Ok(report) => return Ok(report),
            Err(e) if e.is_transient() => {
                return Err(Interrupted {
                    error: e,
                    remaining: all(),
                })
            }
            Err(e) if jobs.len() == 1 => {
                let job = &jobs[0];
                return self
                    .fail(q, job, &e.to_string())
                    .await
                    .map_err(|error| Interrupted {
                        error,
                        remaining: vec![job.msg_id],
                    });
            }
            Err(e) => {
                self.careful.store(true, Ordering::Relaxed);
                tracing::warn!(queue = q.name(), jobs = jobs.len(), error = %e, "batch failed; retrying its jobs one by one");
            }
        }
        let mut report = BatchReport {
            jobs: jobs.len(),
            ..BatchReport::default()
        };
        for (i, job) in jobs.iter().enumerate() {
            let one = std::slice::from_ref(job);
            let outcome = match self.apply(q, one).await {
                Ok(r) => Ok(r),
                Err(e) if e.is_transient() => Err(e),
                Err(e) => self.fail(q, job, &e.to_string()).await,
            };
            match outcome {
                Ok(r) => report.merge(r),
                Err(error) => {
                    return Err(Interrupted {
                        error,
                        remaining: jobs[i..].iter().map(|j| j.msg_id).collect(),
                    })
                }
            }
        }
        Ok(report)
    }

    /// A job failed on its own: schedule it again with backoff, or bury it
    /// once it has used its attempts.
    async fn fail(&self, q: Queue, job: &RawJob, error: &str) -> Result<BatchReport, WorkerError> {
        let mut tx = self.pool.begin().await?;
        let report = if job.read_ct >= self.cfg.retry.max_attempts {
            tracing::error!(queue = q.name(), msg_id = job.msg_id, attempts = job.read_ct, %error, "dead-lettering a job that keeps failing");
            dead_letters::bury(&mut tx, q.name(), job, error).await?;
            BatchReport {
                jobs: 1,
                dead: 1,
                ..BatchReport::default()
            }
        } else {
            let delay = self.cfg.retry.backoff(job.read_ct);
            tracing::warn!(queue = q.name(), msg_id = job.msg_id, attempt = job.read_ct, ?delay, %error, "job failed; retrying later");
            dead_letters::record_failure(&mut *tx, q.name(), job.msg_id, error).await?;
            queue::set_vt(&mut *tx, q.name(), &[job.msg_id], delay).await?;
            BatchReport {
                jobs: 1,
                retried: 1,
                ..BatchReport::default()
            }
        };
        tx.commit().await?;
        Ok(report)
    }

    /// Apply a batch in one transaction: its effects, the deletion of its
    /// jobs, the burial of jobs that can never succeed, and the NOTIFY.
    async fn apply(&self, q: Queue, jobs: &[RawJob]) -> Result<BatchReport, WorkerError> {
        let tx = self.pool.begin().await?;
        self.apply_in(tx, q, jobs).await
    }

    /// [`Self::apply`] in `tx`, which may already hold the jobs (claimed).
    /// A batch that fails is rolled back before the error is returned: a
    /// dropped transaction's rollback is only queued by sqlx, and until it
    /// runs the jobs it locked (claimed `for update`) are skipped by the very
    /// read that is to retry them, which then finds nothing.
    async fn apply_in(
        &self,
        mut tx: Transaction<'static, Postgres>,
        q: Queue,
        jobs: &[RawJob],
    ) -> Result<BatchReport, WorkerError> {
        let (report, handed) = match self.stage(&mut tx, q, jobs).await {
            Ok(staged) => staged,
            Err(e) => {
                if let Err(rollback) = tx.rollback().await {
                    tracing::debug!(error = %rollback, "rolling back a failed batch");
                }
                return Err(e);
            }
        };
        commit(tx).await?;
        for (permit, job) in handed {
            permit.send(job.clone());
        }
        Ok(report)
    }

    /// A batch's work in `tx`, short of the commit: its report, and the
    /// jobs to hand to their pools once it is committed.
    async fn stage<'s, 'j>(
        &'s self,
        tx: &mut Transaction<'static, Postgres>,
        q: Queue,
        jobs: &'j [RawJob],
    ) -> Result<(BatchReport, Vec<(mpsc::Permit<'s, RawJob>, &'j RawJob)>), WorkerError> {
        let mut report = BatchReport {
            jobs: jobs.len(),
            ..BatchReport::default()
        };
        let mut doomed: Vec<(&RawJob, String)> = Vec::new();
        // Each with the delivery it drives.
        let mut webhook_jobs: Vec<(&RawJob, i64)> = Vec::new();
        let mut pooled: Vec<(&RawJob, Pooled)> = Vec::new();
        match q {
            Queue::Persist => {
                let batch = Decoded::new(jobs, &mut doomed);
                let outcome = store::persist_batch(tx, &batch.messages, &self.keyring).await?;
                for orphan in &outcome.orphans {
                    if let Some((m, job)) = batch.get(*orphan) {
                        doomed.push((
                            job,
                            format!("conversation {} does not exist", m.conversation_id),
                        ));
                    }
                }
                crate::notify::publish_persisted(tx, &outcome.persisted).await?;
                if let Some(hooks) = &self.webhooks {
                    // In this transaction: an event exists exactly when its message does.
                    let events = created_events(&batch, &outcome.persisted)?;
                    queue::webhooks::enqueue(tx, hooks.endpoints(), &events).await?;
                }
                if self.reviews.is_some() {
                    // In this transaction too: a review exists exactly when
                    // its message does. System messages are the
                    // application's own, not reviewed.
                    let reviews: Vec<serde_json::Value> = outcome
                        .persisted
                        .iter()
                        .filter(|p| {
                            batch
                                .get(p.message_id)
                                .is_some_and(|(m, _)| m.kind != MessageKind::System)
                        })
                        .map(|p| BackgroundJob::review(p.message_id, 1))
                        .collect();
                    if !reviews.is_empty() {
                        queue::send_batch(&mut **tx, queue::BACKGROUND_QUEUE, &reviews).await?;
                    }
                }
                report.persisted = outcome.persisted.len();
                report.duplicates = outcome.duplicates;
                let now = chrono::Utc::now();
                for p in &outcome.persisted {
                    if let Some((_, job)) = batch.get(p.message_id) {
                        let waited = (now - job.enqueued_at).to_std().unwrap_or_default();
                        self.metrics.persist_latency.observe(waited.as_secs_f64());
                    }
                }
            }
            Queue::Background => {
                let mut receipts: Vec<ReceiptUpdate> = Vec::new();
                let mut audits = Vec::new();
                for job in jobs {
                    match BackgroundJob::decode(&job.message) {
                        Ok(BackgroundJob::ReadMarker {
                            conversation_id,
                            user_id,
                            seq,
                            ..
                        }) => receipts.push(ReceiptUpdate {
                            conversation_id,
                            user_id,
                            delivered_seq: Seq(0),
                            read_seq: seq,
                        }),
                        Ok(BackgroundJob::Receipt {
                            conversation_id,
                            user_id,
                            delivered_seq,
                            read_seq,
                            ..
                        }) => receipts.push(ReceiptUpdate {
                            conversation_id,
                            user_id,
                            delivered_seq,
                            read_seq,
                        }),
                        Ok(BackgroundJob::Webhook { delivery_id, .. }) => {
                            webhook_jobs.push((job, delivery_id));
                            pooled.push((job, Pooled::Webhook));
                        }
                        Ok(BackgroundJob::Review { .. }) => pooled.push((job, Pooled::Review)),
                        // Recorded without a time only by hand: the job's own
                        // enqueue time is the closest to the action.
                        Ok(BackgroundJob::Audit { event, .. }) => {
                            audits.push((event, job.enqueued_at))
                        }
                        Err(reason) => doomed.push((job, reason)),
                    }
                }
                report.applied = receipts.len() + pooled.len() + audits.len();
                store::advance_receipts(tx, &receipts).await?;
                // A job applied before (a crash after commit, a replay) adds nothing.
                store::append_audit(tx, &audits).await?;
            }
        }
        // Webhook and review jobs are not finished here: they go to their
        // pool, hidden meanwhile (or soon read again when it is full);
        // without that pool configured they can never be finished.
        let mut handed: Vec<(mpsc::Permit<'_, RawJob>, &RawJob)> = Vec::new();
        let mut busy: Vec<i64> = Vec::new();
        // Parked jobs stay in the queue, hidden until woken (see `crate::webhooks`).
        let parked = self.park_blocked_webhooks(tx, &webhook_jobs).await?;
        for (kind, setting) in [
            (Pooled::Webhook, "webhooks are not configured in this process (POSTLINE_WEBHOOK_URLS)"),
            (
                Pooled::Review,
                "the moderation hook is not configured in this process (POSTLINE_MODERATION_HOOK_URL)",
            ),
        ] {
            let jobs = pooled.iter().filter(|(_, k)| *k == kind).map(|(j, _)| *j);
            let Some(pool) = self.pool(kind) else {
                doomed.extend(jobs.map(|j| (j, setting.to_owned())));
                continue;
            };
            let mut ids = Vec::new();
            for job in jobs.filter(|j| !parked.contains(&j.msg_id)) {
                match pool.try_reserve() {
                    Some(permit) => {
                        handed.push((permit, job));
                        ids.push(job.msg_id);
                    }
                    None => busy.push(job.msg_id),
                }
            }
            if !ids.is_empty() {
                queue::set_vt(&mut **tx, q.name(), &ids, pool.hold()).await?;
            }
        }
        if !busy.is_empty() {
            queue::set_vt(&mut **tx, q.name(), &busy, POOL_FULL_RETRY).await?;
        }
        if !parked.is_empty() {
            queue::set_vt(&mut **tx, q.name(), &parked, queue::webhooks::PARK_MAX).await?;
        }
        for (job, reason) in &doomed {
            tracing::error!(queue = q.name(), msg_id = job.msg_id, %reason, "dead-lettering a job that can never succeed");
            dead_letters::bury(tx, q.name(), job, reason).await?;
        }
        report.dead = doomed.len();
        let done: Vec<i64> = jobs
            .iter()
            .map(|j| j.msg_id)
            .filter(|id| !doomed.iter().any(|(d, _)| d.msg_id == *id))
            .filter(|id| !pooled.iter().any(|(w, _)| w.msg_id == *id))
            .collect();
        queue::delete(&mut **tx, q.name(), &done).await?;
        if jobs.iter().any(|j| j.read_ct > 1) {
            dead_letters::forget_failures(&mut **tx, q.name(), &done).await?;
        }
        Ok((report, handed))
    }

    /// The webhook jobs of a batch whose deliveries must wait for an earlier
    /// one of their conversation: parked, so they are read again when that
    /// one finishes rather than every few moments until it does.
    async fn park_blocked_webhooks(
        &self,
        tx: &mut sqlx::PgConnection,
        jobs: &[(&RawJob, i64)],
    ) -> Result<Vec<i64>, WorkerError> {
        if self.webhooks.is_none() || jobs.is_empty() {
            return Ok(Vec::new());
        }
        let (job_ids, deliveries): (Vec<i64>, Vec<i64>) =
            jobs.iter().map(|(j, d)| (j.msg_id, *d)).unzip();
        let parked = queue::webhooks::park_blocked(tx, &deliveries, &job_ids).await?;
        Ok(deliveries
            .iter()
            .zip(&job_ids)
            .filter(|(d, _)| parked.contains(d))
            .map(|(_, j)| *j)
            .collect())
    }

    /// Remove archived jobs older than the retention, failure records of
    /// jobs that no longer exist, webhook deliveries delivered before the
    /// retention (pending and dead ones stay: they are still to act on), and
    /// audit rows older than the audit retention (unless it keeps them forever).
    pub async fn cleanup_once(&self) -> Result<CleanupReport, WorkerError> {
        let mut report = CleanupReport::default();
        for q in Queue::ALL {
            // Table names come from our own constants, never from input.
            let sql = format!(
                "delete from pgmq.a_{} where archived_at < now() - make_interval(secs => $1::float8)",
                q.name()
            );
            report.archived_rows += sqlx::query(&sql)
                .bind(self.cfg.retention.as_secs_f64())
                .execute(&self.pool)
                .await?
                .rows_affected();
            let sql = format!(
                "delete from job_failures f where f.queue = $1
                 and not exists (select 1 from pgmq.q_{} q where q.msg_id = f.msg_id)",
                q.name()
            );
            report.stale_failures += sqlx::query(&sql)
                .bind(q.name())
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        report.webhook_deliveries = sqlx::query(
            "delete from webhook_deliveries
             where state = 'delivered' and delivered_at < now() - make_interval(secs => $1::float8)",
        )
        .bind(self.cfg.retention.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if let Some(keep) = self.cfg.audit_retention {
            report.audit_rows = store::prune_audit(&self.pool, keep).await?;
        }
        if self.webhooks.is_some() {
            report.webhook_lanes_woken = queue::webhooks::wake_stranded(&self.pool, 100).await?;
            if report.webhook_lanes_woken > 0 {
                tracing::warn!(
                    lanes = report.webhook_lanes_woken,
                    "woke webhook deliveries that were parked with nothing to wake them"
                );
            }
        }
        Ok(report)
    }

    /// Loop until shutdown: drain while there is work, then wait for a wake-up
    /// or the poll interval; clean up on schedule. A failed batch is retried
    /// with capped backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(50);
        let mut next_cleanup = tokio::time::Instant::now() + self.cfg.cleanup_interval;
        self.heartbeat.beat();
        while !shutdown.is_cancelled() {
            if tokio::time::Instant::now() >= next_cleanup {
                match self.cleanup_once().await {
                    Ok(r) => tracing::info!(
                        archived_rows = r.archived_rows,
                        stale_failures = r.stale_failures,
                        webhook_deliveries = r.webhook_deliveries,
                        audit_rows = r.audit_rows,
                        "queue cleanup"
                    ),
                    Err(e) => tracing::warn!(error = %e, "queue cleanup failed"),
                }
                next_cleanup = tokio::time::Instant::now() + self.cfg.cleanup_interval;
            }
            match self.run_once().await {
                Ok(Outcome::Processed(_, report)) => {
                    backoff = Duration::from_millis(50);
                    self.heartbeat.beat();
                    if report.jobs < self.cfg.batch_size.max(1) as usize
                        && !self.cfg.linger.is_zero()
                    {
                        // The queue ran dry: let the next batch gather.
                        tokio::time::sleep(self.cfg.linger).await;
                    }
                }
                Ok(Outcome::Idle) => {
                    self.heartbeat.beat();
                    let woken = tokio::select! {
                        _ = self.wake.notified() => true,
                        _ = tokio::time::sleep(self.cfg.poll_interval) => false,
                        _ = shutdown.cancelled() => false,
                    };
                    if woken && !self.cfg.linger.is_zero() {
                        tokio::time::sleep(self.cfg.linger).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, ?backoff, "batch failed; will retry");
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

/// `message.created` for each message just stored, in seq order.
fn created_events(
    batch: &Decoded<'_>,
    persisted: &[crate::domain::Persisted],
) -> Result<Vec<queue::webhooks::NewEvent>, StoreError> {
    let mut out = Vec::with_capacity(persisted.len());
    for p in persisted {
        let Some((m, _)) = batch.get(p.message_id) else {
            continue;
        };
        let stored = crate::domain::StoredMessage {
            message: m.clone(),
            seq: p.seq,
            version: 1,
            edited_at: None,
            deleted: false,
        };
        let event = crate::protocol::webhook::Event::message_created(&stored);
        out.push(
            queue::webhooks::NewEvent::from_event(&event)
                .map_err(|e| StoreError::Invariant(format!("encoding a webhook event: {e}")))?,
        );
    }
    Ok(out)
}

/// A persist batch's jobs decoded, each message findable by id: the report
/// loops look up every stored message, and a scan per lookup was quadratic
/// in the batch (up to 500).
struct Decoded<'j> {
    messages: Vec<Message>,
    sources: Vec<&'j RawJob>,
    at: HashMap<MessageId, usize>,
}

impl<'j> Decoded<'j> {
    /// Jobs that do not decode go to `doomed` with the reason.
    fn new(jobs: &'j [RawJob], doomed: &mut Vec<(&'j RawJob, String)>) -> Self {
        let mut batch = Decoded {
            messages: Vec::with_capacity(jobs.len()),
            sources: Vec::with_capacity(jobs.len()),
            at: HashMap::with_capacity(jobs.len()),
        };
        for job in jobs {
            match queue::PersistJob::decode(&job.message) {
                Ok(m) => {
                    // The same job twice keeps its first place (persist_batch
                    // stores it once).
                    batch.at.entry(m.id).or_insert(batch.messages.len());
                    batch.messages.push(m);
                    batch.sources.push(job);
                }
                Err(reason) => doomed.push((job, reason)),
            }
        }
        batch
    }

    fn get(&self, id: MessageId) -> Option<(&Message, &'j RawJob)> {
        self.at
            .get(&id)
            .map(|&i| (&self.messages[i], self.sources[i]))
    }
}

async fn commit(tx: Transaction<'_, Postgres>) -> Result<(), WorkerError> {
    tx.commit().await?;
    Ok(())
}

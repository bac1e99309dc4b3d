//! The persistence worker's options (`serve` and `worker`) and the settings
//! they become. The backoff computed from [`RetryPolicy`] lives with the
//! worker (`worker::retry`); only the numbers live here.

use std::time::Duration;

use clap::Args;

use super::{defaults, hours, millis, positive, secs, ConfigError};

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Jobs the worker reads and stores per transaction.
    #[arg(long, env = "POSTLINE_WORKER_BATCH", default_value_t = 500)]
    pub worker_batch: i32,
    /// Seconds a read job stays invisible (how soon a crashed worker's jobs are retried).
    #[arg(long, env = "POSTLINE_WORKER_VISIBILITY_TIMEOUT", default_value_t = 30)]
    pub worker_visibility_timeout_secs: u64,
    /// Milliseconds between polls of an idle worker.
    #[arg(long, env = "POSTLINE_WORKER_POLL_MS", default_value_t = 250)]
    pub worker_poll_ms: u64,
    /// Milliseconds a worker waits after draining the queue, so batches gather
    /// (fewer commits and NOTIFYs; adds this much to message_persisted latency).
    #[arg(long, env = "POSTLINE_WORKER_LINGER_MS", default_value_t = 10)]
    pub worker_linger_ms: u64,
    /// Delay before the first retry of a failed job, in milliseconds (doubles per attempt).
    #[arg(long, env = "POSTLINE_RETRY_BASE_MS", default_value_t = 1000)]
    pub retry_base_ms: u64,
    /// Longest delay between retries, in seconds (not less than the base).
    #[arg(long, env = "POSTLINE_RETRY_CAP_SECS", default_value_t = 300)]
    pub retry_cap_secs: u64,
    /// Attempts after which a failing job is moved to the dead-letter table.
    #[arg(long, env = "POSTLINE_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: i32,
    /// High-priority batches in a row before a waiting background batch gets a turn.
    #[arg(long, env = "POSTLINE_STARVATION_LIMIT", default_value_t = 4)]
    pub starvation_limit: u32,
    /// Seconds between cleanups of pgmq's archive.
    #[arg(long, env = "POSTLINE_CLEANUP_INTERVAL_SECS", default_value_t = 600)]
    pub cleanup_interval_secs: u64,
    /// Hours archived (dead-lettered) jobs are kept in pgmq's archive tables.
    #[arg(long, env = "POSTLINE_ARCHIVE_RETENTION_HOURS", default_value_t = 168)]
    pub archive_retention_hours: u64,
    /// Hours audit rows are kept, counted from the action (90 days); 0 keeps
    /// them forever.
    #[arg(long, env = "POSTLINE_AUDIT_RETENTION_HOURS", default_value_t = 2160)]
    pub audit_retention_hours: u64,
}

impl Default for WorkerArgs {
    fn default() -> Self {
        defaults()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// Longest delay between attempts.
    pub cap: Duration,
    /// Attempts (reads) after which a failing job is dead-lettered.
    pub max_attempts: i32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        WorkerConfig::default().retry
    }
}

#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Jobs read (and written) per transaction.
    pub batch_size: i32,
    /// How long a read job stays hidden before another reader may take it:
    /// the time a crashed worker's batch waits before it is retried.
    pub visibility_timeout: Duration,
    /// How often an idle worker polls when nothing wakes it.
    pub poll_interval: Duration,
    /// After draining the queue, wait this long before reading again, so the
    /// next batch gathers several messages: fewer transactions and NOTIFYs for
    /// Postgres, at the cost of this much `message_persisted` latency.
    pub linger: Duration,
    pub retry: RetryPolicy,
    /// High-priority batches in a row after which a waiting low-priority
    /// batch gets one turn, so background jobs never starve.
    pub starvation_limit: u32,
    /// How often archived jobs past `retention` are removed.
    pub cleanup_interval: Duration,
    /// How long pgmq's archive keeps dead-lettered and archived jobs.
    pub retention: Duration,
    /// How long `audit_log` keeps a row after its action; None: forever.
    pub audit_retention: Option<Duration>,
}

impl WorkerConfig {
    /// `visibility_timeout` in whole seconds, as pgmq's read takes it.
    pub fn vt_secs(&self) -> i32 {
        self.visibility_timeout.as_secs().clamp(1, i32::MAX as u64) as i32
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig::try_from(&WorkerArgs::default())
            .expect("the worker's defaults are valid (tested)")
    }
}

impl TryFrom<&WorkerArgs> for WorkerConfig {
    type Error = ConfigError;

    fn try_from(a: &WorkerArgs) -> Result<Self, ConfigError> {
        // Zero would retry a poison job in a tight loop until it is buried.
        let base = millis(
            "POSTLINE_RETRY_BASE_MS",
            positive("POSTLINE_RETRY_BASE_MS", a.retry_base_ms)?,
        )?;
        let cap = secs("POSTLINE_RETRY_CAP_SECS", a.retry_cap_secs)?;
        if cap < base {
            return Err(ConfigError::RetryCapBelowBase { cap, base });
        }
        Ok(WorkerConfig {
            batch_size: positive("POSTLINE_WORKER_BATCH", a.worker_batch)?,
            // pgmq counts visibility in whole seconds; zero would let every
            // reader take the same jobs at once.
            visibility_timeout: secs(
                "POSTLINE_WORKER_VISIBILITY_TIMEOUT",
                positive(
                    "POSTLINE_WORKER_VISIBILITY_TIMEOUT",
                    a.worker_visibility_timeout_secs,
                )?,
            )?,
            // Zero would spin an idle worker against the database.
            poll_interval: millis(
                "POSTLINE_WORKER_POLL_MS",
                positive("POSTLINE_WORKER_POLL_MS", a.worker_poll_ms)?,
            )?,
            // Zero is meaningful: read again at once.
            linger: millis("POSTLINE_WORKER_LINGER_MS", a.worker_linger_ms)?,
            retry: RetryPolicy {
                base,
                cap,
                max_attempts: positive("POSTLINE_MAX_ATTEMPTS", a.max_attempts)?,
            },
            // Zero would serve background jobs before chat, always.
            starvation_limit: positive("POSTLINE_STARVATION_LIMIT", a.starvation_limit)?,
            // Zero would prune the archive on every loop.
            cleanup_interval: secs(
                "POSTLINE_CLEANUP_INTERVAL_SECS",
                positive("POSTLINE_CLEANUP_INTERVAL_SECS", a.cleanup_interval_secs)?,
            )?,
            // Zero is meaningful: keep nothing archived.
            retention: hours(
                "POSTLINE_ARCHIVE_RETENTION_HOURS",
                a.archive_retention_hours,
            )?,
            // Unlike the archive's, zero keeps everything: an audit log that
            // deletes at once is never what is meant.
            audit_retention: match a.audit_retention_hours {
                0 => None,
                h => Some(hours("POSTLINE_AUDIT_RETENTION_HOURS", h)?),
            },
        })
    }
}

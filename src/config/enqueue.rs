//! The persist buffer's options (`serve` only) and the settings they become.

use std::time::Duration;

use clap::Args;

use super::{defaults, micros, positive, ConfigError};

/// After shutdown is requested, how long the enqueuer keeps retrying the
/// last jobs before their senders hear `unavailable`. Not a flag: at most
/// half of POSTLINE_SHUTDOWN_GRACE (see [`EnqueueConfig::within_grace`]), so
/// those replies still reach the sockets before connections close.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Args)]
pub struct EnqueueArgs {
    /// Persist jobs buffered in memory before sends are refused with `unavailable`.
    #[arg(long, env = "POSTLINE_ENQUEUE_CAPACITY", default_value_t = 8192)]
    pub enqueue_capacity: usize,
    /// Most jobs per pgmq.send_batch.
    #[arg(long, env = "POSTLINE_ENQUEUE_MAX_BATCH", default_value_t = 512)]
    pub enqueue_max_batch: usize,
    /// Microseconds a persist batch may wait for more jobs (0: send at once;
    /// batches still form under load).
    #[arg(long, env = "POSTLINE_ENQUEUE_LINGER_US", default_value_t = 0)]
    pub enqueue_linger_us: u64,
}

impl Default for EnqueueArgs {
    fn default() -> Self {
        defaults()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct EnqueueConfig {
    /// Jobs buffered in memory while a batch is in flight or Postgres is slow.
    pub capacity: usize,
    /// Most jobs in one `send_batch` (one statement, one commit).
    pub max_batch: usize,
    /// How long a batch may wait for more jobs before it is sent. Zero sends
    /// at once; batches still form under load, from the jobs that arrive
    /// while the previous batch is in flight. (Tokio's timers are
    /// millisecond-grained, so small values round up to 1 ms.)
    pub linger: Duration,
    /// After shutdown is requested, how long to keep retrying the last jobs.
    pub flush_timeout: Duration,
}

impl Default for EnqueueConfig {
    fn default() -> Self {
        EnqueueConfig::try_from(&EnqueueArgs::default())
            .expect("the enqueuer's defaults are valid (tested)")
    }
}

impl EnqueueConfig {
    /// The flush must give up in the first half of the shutdown grace, or
    /// the deadline closes connections before the last senders hear
    /// `unavailable`.
    pub fn within_grace(mut self, grace: Duration) -> Self {
        self.flush_timeout = self.flush_timeout.min(grace / 2);
        self
    }
}

impl TryFrom<&EnqueueArgs> for EnqueueConfig {
    type Error = ConfigError;

    fn try_from(a: &EnqueueArgs) -> Result<Self, ConfigError> {
        Ok(EnqueueConfig {
            capacity: positive("POSTLINE_ENQUEUE_CAPACITY", a.enqueue_capacity)?,
            max_batch: positive("POSTLINE_ENQUEUE_MAX_BATCH", a.enqueue_max_batch)?,
            linger: micros("POSTLINE_ENQUEUE_LINGER_US", a.enqueue_linger_us)?,
            flush_timeout: FLUSH_TIMEOUT,
        })
    }
}

//! A bounded pool beside the worker that takes background jobs over and
//! finishes them with an HTTP call: what webhook deliveries and moderation
//! reviews both run on. The worker hands a job over only if there is room
//! (never waiting), after hiding it for [`PoolHandle::hold`]; the pool runs
//! at most `concurrency` jobs at once and records each outcome itself.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::queue::RawJob;

/// Added to the attempt timeout when hiding a handed-over job: the
/// transaction that finishes it must commit before anyone may read it again.
const HOLD_MARGIN: Duration = Duration::from_secs(30);

/// The worker's side of a pool. Cheap to clone.
#[derive(Clone)]
pub struct PoolHandle {
    tx: mpsc::Sender<RawJob>,
    hold: Duration,
}

impl PoolHandle {
    /// Run `work` on each job handed over, at most `concurrency` at once,
    /// on `tasks` until `stop` (jobs in flight are then dropped; they come
    /// back after their visibility timeout). `timeout` bounds one attempt.
    pub fn spawn<S, F, Fut, E>(
        what: &'static str,
        shared: Arc<S>,
        concurrency: usize,
        timeout: Duration,
        stop: CancellationToken,
        tasks: &TaskTracker,
        work: F,
    ) -> PoolHandle
    where
        S: Send + Sync + 'static,
        F: Fn(Arc<S>, RawJob) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        // As many jobs waiting as in flight: enough to keep the pool busy
        // between worker reads, few enough to hold little.
        let (tx, rx) = mpsc::channel(concurrency);
        tasks.spawn(run(
            what,
            shared,
            rx,
            concurrency,
            stop,
            tasks.clone(),
            work,
        ));
        PoolHandle {
            tx,
            hold: timeout + HOLD_MARGIN,
        }
    }

    /// How long a handed-over job must stay hidden in the queue.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Room for one more job, or None when the pool is full. Never waits.
    pub fn try_reserve(&self) -> Option<mpsc::Permit<'_, RawJob>> {
        self.tx.try_reserve().ok()
    }
}

async fn run<S, F, Fut, E>(
    what: &'static str,
    shared: Arc<S>,
    mut rx: mpsc::Receiver<RawJob>,
    concurrency: usize,
    stop: CancellationToken,
    tasks: TaskTracker,
    work: F,
) where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, RawJob) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        let job = tokio::select! {
            _ = stop.cancelled() => return,
            j = rx.recv() => match j { Some(j) => j, None => return },
        };
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => return },
        };
        let (msg_id, stop) = (job.msg_id, stop.clone());
        let attempt = work(shared.clone(), job);
        tasks.spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = stop.cancelled() => {}
                r = attempt => if let Err(e) = r {
                    // The job stays hidden until its visibility timeout, then is tried again.
                    tracing::warn!(msg_id, error = %e, "{what}: the outcome could not be recorded");
                }
            }
        });
    }
}

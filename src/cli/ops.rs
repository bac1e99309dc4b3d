//! The operator surface of a process, wired the same in `serve` and
//! `worker`: the counters' recorder, the alert evaluator and its webhook,
//! and the [`Ops`] handles the HTTP routes read.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alerts::{Alerts, Sources, Webhook};
use crate::config::OpsConfig;
use crate::http::{Ops, DASHBOARD_WINDOW};
use crate::store::Store;
use crate::telemetry::{Metrics, Recorder};

/// Snapshots kept at most: one a second covers a five-minute window; a
/// longer window is sampled more sparsely rather than kept bigger.
const MAX_SNAPSHOTS: u32 = 600;

/// Start the recorder, the evaluator and the webhook on `tasks` (until
/// `stop`), and return the handles for the HTTP routes.
pub(super) fn start(
    pool: &PgPool,
    metrics: Arc<Metrics>,
    cfg: &OpsConfig,
    gateway_id: Option<uuid::Uuid>,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> Arc<Ops> {
    let span = cfg.alerts.window.max(DASHBOARD_WINDOW);
    let every = (span / MAX_SNAPSHOTS).max(Duration::from_secs(1));
    let recorder = Arc::new(Recorder::new(every, span));
    let (r, m, s) = (recorder.clone(), metrics.clone(), stop.clone());
    tasks.spawn(async move { r.run(&m, s).await });
    let webhook = cfg
        .alerts
        .webhook
        .clone()
        .map(|url| Webhook::spawn(url, metrics.clone(), stop.clone(), tasks));
    let source = match gateway_id {
        Some(id) => format!("gateway {id}"),
        None => format!("worker {}", std::process::id()),
    };
    let alerts = Arc::new(Alerts::new(
        cfg.alerts.clone(),
        source,
        Sources {
            pool: pool.clone(),
            metrics: metrics.clone(),
            recorder: recorder.clone(),
        },
        webhook,
    ));
    tasks.spawn(alerts.clone().run(stop.clone()));
    Arc::new(Ops {
        store: Store::new(pool.clone()),
        metrics,
        recorder,
        alerts,
        operator: cfg.operator.clone(),
        gateway_id,
        started: std::time::Instant::now(),
    })
}

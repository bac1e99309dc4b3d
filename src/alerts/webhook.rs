//! Alert transitions POSTed to `POSTLINE_ALERT_WEBHOOK_URL`, never in the
//! evaluator's way: the evaluator drops a body into a bounded queue (or
//! counts it dropped when full) and one task delivers them in order, each
//! attempt bounded by a timeout, a few attempts each.
//!
//! Sent with the chat webhooks' POST ([`crate::webhooks::post`]): plain
//! HTTP/1.1, a connection per POST (transitions are rare), no TLS.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::WebhookUrl;
use crate::telemetry::Metrics;
use crate::webhooks::post::post;

/// Transitions waiting for delivery. A flapping rule under a dead endpoint
/// produces a few a minute; past this many, new ones are dropped (counted).
pub const QUEUE: usize = 64;
/// One attempt: connect, send, read the response head.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per transition, with [`BACKOFF`] doubling between them.
pub const ATTEMPTS: u32 = 3;
const BACKOFF: Duration = Duration::from_millis(500);

/// The evaluator's end of the queue.
pub struct Webhook {
    tx: mpsc::Sender<Bytes>,
    metrics: Arc<Metrics>,
}

impl Webhook {
    /// Start the delivery task (until `stop`; what is queued then is dropped).
    pub fn spawn(
        url: WebhookUrl,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Webhook {
        let (tx, rx) = mpsc::channel(QUEUE);
        tasks.spawn(deliver_all(url, rx, metrics.clone(), stop));
        Webhook { tx, metrics }
    }

    /// Queue `body`; never waits.
    pub fn send(&self, body: Bytes) {
        if self.tx.try_send(body).is_err() {
            self.metrics.webhook_dropped();
            tracing::warn!("alert webhook queue full: a transition was dropped");
        }
    }
}

async fn deliver_all(
    url: WebhookUrl,
    mut rx: mpsc::Receiver<Bytes>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    loop {
        let body = tokio::select! {
            _ = stop.cancelled() => return,
            b = rx.recv() => match b { Some(b) => b, None => return },
        };
        let mut wait = BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                r = post(&url, "postline-alerts", &[], body.clone(), ATTEMPT_TIMEOUT) => r,
            };
            match outcome {
                Ok(()) => {
                    metrics.webhook_sent();
                    break;
                }
                Err(e) if attempt == ATTEMPTS => {
                    metrics.webhook_failed();
                    tracing::warn!(error = %e, url = %url.authority, "alert webhook: giving up on a transition");
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "alert webhook: retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait *= 2;
                }
            }
        }
    }
}

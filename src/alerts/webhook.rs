//! Alert transitions POSTed to `POSTLINE_ALERT_WEBHOOK_URL`, never in the
//! evaluator's way: the evaluator drops a body into a bounded queue (or
//! counts it dropped when full) and one task delivers them in order, each
//! attempt bounded by a timeout, a few attempts each.
//!
//! Plain HTTP/1.1 over hyper's client connection, no pool: transitions are
//! rare, so a connection per POST costs nothing and keeps no state. No
//! TLS: a TLS stack would add minutes to a fresh build for a feature a relay
//! on the local network covers (config refuses https:// at start).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::WebhookUrl;
use crate::telemetry::Metrics;

/// Transitions waiting for delivery. A flapping rule under a dead endpoint
/// produces a few a minute; past this many, new ones are dropped (counted).
pub const QUEUE: usize = 64;
/// One attempt: connect, send, read the response head.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per transition, with [`BACKOFF`] doubling between them.
pub const ATTEMPTS: u32 = 3;
const BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("timed out after {ATTEMPT_TIMEOUT:?}")]
    TimedOut,
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("the endpoint answered {0}")]
    Status(hyper::StatusCode),
}

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
                r = tokio::time::timeout(ATTEMPT_TIMEOUT, post(&url, body.clone())) => {
                    r.unwrap_or(Err(DeliveryError::TimedOut))
                }
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

/// One POST over a fresh connection; Ok on a 2xx.
async fn post(url: &WebhookUrl, body: Bytes) -> Result<(), DeliveryError> {
    let stream = tokio::net::TcpStream::connect(&url.authority).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection future drives the socket; it ends with this function.
    let conn = tokio::spawn(conn);
    let req = hyper::Request::post(url.path.as_str())
        .header(hyper::header::HOST, url.authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "postline-alerts")
        .body(Full::new(body))?;
    let res = sender.send_request(req).await;
    let outcome = match res {
        Ok(res) if res.status().is_success() => {
            // Read (and discard) a small body so the endpoint sees a clean end.
            let _ = res.into_body().collect().await;
            Ok(())
        }
        Ok(res) => Err(DeliveryError::Status(res.status())),
        Err(e) => Err(e.into()),
    };
    conn.abort();
    outcome
}

//! What operators read: `/metrics`, `/alerts` and the dashboard
//! ([`super::dashboard`]), behind the operator token where they carry more
//! than counters. Served by `serve` among its routes and, through
//! [`serve_ops`], by a standalone `postline worker` on its own port.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{bearer_token, dashboard, json, ApiError, Body};
use crate::alerts::Alerts;
use crate::config::OperatorAuth;
use crate::protocol::http as wire;
use crate::store::Store;
use crate::telemetry::{render_cluster, Metrics, QueueGauge, Recorder};

/// The queue gauges of a scrape give up after this, so a slow database
/// delays a scrape by at most this much (the gauges are then left out).
const SCRAPE_DB_TIMEOUT: Duration = Duration::from_secs(1);

/// Connections the worker's ops port serves at once: scrapers and a few
/// operators, not the public.
const OPS_MAX_CONNECTIONS: usize = 32;
/// Head and whole-request bounds on the worker's ops port.
const OPS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const OPS_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The handles the operator routes need, in `serve` and in `worker` alike.
pub struct Ops {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub recorder: Arc<Recorder>,
    pub alerts: Arc<Alerts>,
    pub operator: OperatorAuth,
    /// This gateway (None in a standalone worker).
    pub gateway_id: Option<uuid::Uuid>,
    pub started: Instant,
}

/// `Ok` if the request may read operator data.
pub(super) fn authorize<B>(ops: &Ops, req: &Request<B>) -> Result<(), ApiError> {
    match &ops.operator {
        OperatorAuth::Open => Ok(()),
        OperatorAuth::NotConfigured => Err(ApiError::OperatorTokenNotConfigured),
        OperatorAuth::Token(token) => match bearer_token(req) {
            Some(given) if token.matches(given) => Ok(()),
            _ => Err(ApiError::NotOperator),
        },
    }
}

/// The routes every process with an ops surface answers; None: not one of them.
pub(super) async fn route<B>(ops: &Ops, req: &Request<B>, path: &[&str]) -> Option<Response<Body>> {
    let get = req.method() == Method::GET;
    let res = match path {
        ["metrics"] if get => Ok(metrics(ops).await),
        ["alerts"] if get => authorize(ops, req).map(|()| alerts(ops)),
        ["dashboard"] if get => Ok(dashboard::page()),
        ["dashboard", "stats"] if get => match authorize(ops, req) {
            Ok(()) => Ok(dashboard::stats(ops).await),
            Err(e) => Err(e),
        },
        ["metrics"] | ["alerts"] | ["dashboard"] | ["dashboard", "stats"] => {
            Err(ApiError::MethodNotAllowed)
        }
        _ => return None,
    };
    Some(res.unwrap_or_else(ApiError::into_response))
}

pub(super) async fn queue_gauges(store: &Store) -> Option<Vec<QueueGauge>> {
    let stats = tokio::time::timeout(SCRAPE_DB_TIMEOUT, crate::queue::stats(store.pool()))
        .await
        .ok()?
        .ok()?;
    Some(
        stats
            .into_iter()
            .map(|q| QueueGauge {
                queue: q.queue_name,
                depth: q.queue_length,
                visible: q.queue_visible_length,
                oldest_age_secs: q.oldest_msg_age_sec.unwrap_or(0).into(),
            })
            .collect(),
    )
}

async fn metrics(ops: &Ops) -> Response<Body> {
    let pool = ops.store.pool();
    let (queues, gateways, dead) = tokio::join!(
        queue_gauges(&ops.store),
        tokio::time::timeout(SCRAPE_DB_TIMEOUT, crate::store::gateways(pool)),
        tokio::time::timeout(
            SCRAPE_DB_TIMEOUT,
            crate::queue::dead_letters::counts(pool, ops.alerts.config().window)
        ),
    );
    let mut text = ops.metrics.render(&queues.unwrap_or_default());
    let gateways = gateways.ok().and_then(Result::ok).map(|gs| {
        let alive = gs.iter().filter(|g| g.alive).count();
        (alive, gs.len() - alive)
    });
    let dead = dead.ok().and_then(Result::ok).map(|(total, _)| total);
    render_cluster(&mut text, gateways, dead);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn alerts(ops: &Ops) -> Response<Body> {
    let a = &ops.alerts;
    json(
        StatusCode::OK,
        &wire::Alerts {
            source: a.source(),
            evaluated_at: a.evaluated_at(),
            firing: a.firing(),
            rules: a.rules().collect(),
            alerts: a.view(),
        },
    )
}

/// The ops port of a standalone worker: `/healthz`, `/metrics`, `/alerts`
/// and the dashboard, until `shutdown`; in-flight requests then finish.
pub async fn serve_ops(listener: TcpListener, ops: Arc<Ops>, shutdown: CancellationToken) {
    let conns = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(OPS_MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: pause rather than spin.
                tracing::debug!(error = %e, "ops port: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the cap: closed at once; scrapers retry on their interval.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (ops, shutdown) = (ops.clone(), shutdown.clone());
        conns.spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let ops = ops.clone();
                async move {
                    let res = tokio::time::timeout(OPS_REQUEST_TIMEOUT, ops_route(&ops, req))
                        .await
                        .unwrap_or_else(|_| {
                            ApiError::TimedOut(OPS_REQUEST_TIMEOUT).into_response()
                        });
                    Ok::<_, Infallible>(res)
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(OPS_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let _ = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            drop(permit);
        });
    }
    conns.close();
    conns.wait().await;
}

async fn ops_route<B>(ops: &Ops, req: Request<B>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let res = match segments.as_slice() {
        ["healthz"] if req.method() == Method::GET => {
            json(StatusCode::OK, &wire::Health { status: "ok" })
        }
        ["healthz"] => ApiError::MethodNotAllowed.into_response(),
        path => match route(ops, &req, path).await {
            Some(res) => res,
            None => ApiError::NotFound("no such route".into()).into_response(),
        },
    };
    if res.status().is_server_error() {
        ops.metrics.add_http_server_error();
    }
    res
}

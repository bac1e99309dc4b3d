//! The live dashboard: one embedded page (`web/dashboard.html`, no build
//! step, nothing loaded from the network) that polls `/dashboard/stats`
//! every second and plots the last minutes client-side. The page carries
//! no data, so it is served without the operator token; the stats are not.

use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http_body_util::Full;
use hyper::{Response, StatusCode};

use super::ops::{queue_gauges, Ops};
use super::{json, Body};
use crate::protocol::http as wire;
use crate::telemetry::{HistogramDelta, RateLimit};

const PAGE: &str = include_str!("../../web/dashboard.html");

/// Rates and percentiles on the dashboard are over this much recent time:
/// long enough that p99 means something at a few messages a second, short
/// enough that a plot reacts within seconds.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Each Postgres read of a poll gives up after this (its part is then null).
const DB_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) fn page() -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/html; charset=utf-8")
        // Everything is inline: forbid any other origin outright.
        .header(
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:",
        )
        .header("cache-control", "no-cache")
        .body(Full::new(Bytes::from_static(PAGE.as_bytes())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn percentiles_ms(h: &HistogramDelta) -> wire::Percentiles {
    let ms = |q: f64| h.quantile(q).map(|s| (s * 1e6).round() / 1e3);
    wire::Percentiles {
        p50: ms(0.5),
        p99: ms(0.99),
        count: h.count,
    }
}

pub(super) async fn stats(ops: &Ops) -> Response<Body> {
    let snap = ops.metrics.snapshot();
    let window = ops.recorder.window(&ops.metrics, WINDOW);
    let pool = ops.store.pool();
    let alert_window = ops.alerts.config().window;
    // Three small reads, concurrently, each bounded.
    let (queues, dead, gateways) = tokio::join!(
        queue_gauges(&ops.store),
        tokio::time::timeout(
            DB_TIMEOUT,
            crate::queue::dead_letters::counts(pool, alert_window)
        ),
        tokio::time::timeout(DB_TIMEOUT, crate::store::gateways(pool)),
    );
    let gateways = gateways.ok().and_then(Result::ok);
    let rate = |f: &dyn Fn(&crate::telemetry::Window) -> u64| {
        window.as_ref().map_or(0.0, |w| w.per_sec(f(w)))
    };
    let empty = |h: &HistogramDelta| HistogramDelta {
        bounds: h.bounds,
        buckets: vec![0; h.buckets.len()],
        count: 0,
    };
    let (send_broadcast, persist) = match &window {
        Some(w) => (
            percentiles_ms(&w.send_broadcast_latency),
            percentiles_ms(&w.persist_latency),
        ),
        None => (
            percentiles_ms(&empty(&snap.send_broadcast_latency)),
            percentiles_ms(&empty(&snap.persist_latency)),
        ),
    };
    let body = wire::DashboardStats {
        at: Utc::now(),
        gateway_id: ops.gateway_id,
        uptime_secs: ops.started.elapsed().as_secs(),
        window_secs: window.as_ref().map_or(0.0, |w| w.span.as_secs_f64()),
        connections: snap.connections_open,
        connections_total: snap.connections_total,
        messages_per_sec: rate(&|w| w.messages_sent),
        messages_sent_total: snap.messages_sent,
        persisted_per_sec: rate(&|w| w.persist.processed),
        send_broadcast_ms: send_broadcast,
        persist_ms: persist,
        queues: queues.map(|qs| {
            qs.into_iter()
                .map(|q| wire::QueueView {
                    queue: q.queue,
                    depth: q.depth,
                    visible: q.visible,
                    oldest_age_secs: q.oldest_age_secs,
                })
                .collect()
        }),
        retries_per_sec: rate(&|w| w.persist.retried + w.background.retried),
        retries_total: snap.persist.retried + snap.background.retried,
        dead_letters: dead
            .ok()
            .and_then(Result::ok)
            .map(|(total, recent)| wire::DeadLetterCounts { total, recent }),
        gateways_alive: gateways
            .as_ref()
            .map(|gs| gs.iter().filter(|g| g.alive).count()),
        gateways: gateways.map(|gs| {
            gs.into_iter()
                .map(|g| wire::GatewayView {
                    id: g.id,
                    started_at: g.started_at,
                    last_seen: g.last_seen,
                    alive: g.alive,
                })
                .collect()
        }),
        rate_limited_per_sec: rate(&|w| w.rate_limited.iter().sum()),
        rate_limited: RateLimit::ALL
            .iter()
            .map(|l| wire::RateLimitView {
                limiter: l.name(),
                total: snap.rate_limited[*l as usize],
                per_sec: rate(&|w| w.rate_limited[*l as usize]),
            })
            .collect(),
        alerts_firing: ops.alerts.firing(),
    };
    json(StatusCode::OK, &body)
}

//! Logging setup and the process's counters, rendered as Prometheus text on
//! /metrics. Counters are plain atomics: bumping one on a hot path costs a
//! relaxed add. [`window`] keeps a short history of them, so the dashboard
//! and the alerts can speak of "the last minute" (rates, p50/p99).

mod rate_limit;
mod window;

pub use rate_limit::RateLimit;
pub use window::{HistogramDelta, Recorder, Snapshot, Window};

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// How log lines are written (`POSTLINE_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event; colours only on a terminal.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`,
    /// `span`s), for log collectors that parse rather than grep.
    Json,
}

/// Install the tracing subscriber (RUST_LOG, default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        // Colour codes only where a person reads them, not into files,
        // pipes or a platform's log collector.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// A Prometheus histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in millionths of the unit, to keep it an integer atomic.
    sum_micro: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    /// The bucket counts (not cumulative), the count and the sum, as they are now.
    pub fn snapshot(&self) -> HistogramDelta {
        HistogramDelta {
            bounds: self.bounds,
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            count: self.count.load(Ordering::Relaxed),
        }
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.buckets) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}\n{name}_count{braces} {count}",
            self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
    }
}

/// Seconds, from 1 ms to 1 min: how long a message waits between enqueue and commit.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Seconds, from 10 µs to 1 s: a send is handed to the room's outboxes well
/// under a millisecond, so the latency buckets above would put it all in one.
const FAST_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// Worker counters for one queue.
#[derive(Debug, Default)]
pub struct QueueCounters {
    pub processed: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
}

/// Depth and age of one queue, read from pgmq at scrape time.
#[derive(Debug, Clone)]
pub struct QueueGauge {
    pub queue: String,
    pub depth: i64,
    pub visible: i64,
    pub oldest_age_secs: i64,
}

/// What moderation did (see `crate::moderation`); bumped with `fetch_add`
/// like [`QueueCounters`].
#[derive(Debug, Default)]
pub struct ModerationCounters {
    pub rejected: AtomicU64,
    pub masked: AtomicU64,
    pub reloaded: AtomicU64,
    pub reload_failed: AtomicU64,
    pub allowed: AtomicU64,
    pub retracted: AtomicU64,
    pub review_failed: AtomicU64,
}

#[derive(Debug)]
pub struct Metrics {
    connections_open: AtomicI64,
    connections_total: AtomicU64,
    messages_sent: AtomicU64,
    messages_duplicate: AtomicU64,
    persisted_notified: AtomicU64,
    /// Indexed by `RateLimit as usize`.
    rate_limited: [AtomicU64; RateLimit::ALL.len()],
    http_server_errors: AtomicU64,
    alerts_firing: AtomicI64,
    webhook_sent: AtomicU64,
    webhook_failed: AtomicU64,
    webhook_dropped: AtomicU64,
    pub moderation: ModerationCounters,
    pub persist: QueueCounters,
    pub background: QueueCounters,
    pub batch_size: Histogram,
    pub persist_latency: Histogram,
    /// From taking a `send_message` frame to handing its broadcast to the
    /// room's outboxes here.
    pub send_broadcast_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections_open: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            messages_duplicate: AtomicU64::new(0),
            persisted_notified: AtomicU64::new(0),
            rate_limited: Default::default(),
            http_server_errors: AtomicU64::new(0),
            alerts_firing: AtomicI64::new(0),
            webhook_sent: AtomicU64::new(0),
            webhook_failed: AtomicU64::new(0),
            webhook_dropped: AtomicU64::new(0),
            moderation: ModerationCounters::default(),
            persist: QueueCounters::default(),
            background: QueueCounters::default(),
            batch_size: Histogram::new(BATCH_BUCKETS),
            persist_latency: Histogram::new(LATENCY_BUCKETS),
            send_broadcast_latency: Histogram::new(FAST_BUCKETS),
        }
    }
}

impl Metrics {
    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn add_sent(&self) {
        self.messages_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_duplicate(&self) {
        self.messages_duplicate.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_persisted_notified(&self, n: u64) {
        self.persisted_notified.fetch_add(n, Ordering::Relaxed);
    }

    pub fn connections_open(&self) -> i64 {
        self.connections_open.load(Ordering::Relaxed)
    }

    /// A request refused by `limit`.
    pub fn add_rate_limited(&self, limit: RateLimit) {
        self.rate_limited[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// An HTTP response with a 5xx status.
    pub fn add_http_server_error(&self) {
        self.http_server_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_alerts_firing(&self, n: usize) {
        self.alerts_firing.store(n as i64, Ordering::Relaxed);
    }

    pub fn webhook_sent(&self) {
        self.webhook_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn webhook_failed(&self) {
        self.webhook_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn webhook_dropped(&self) {
        self.webhook_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter and histogram, as it is now.
    pub fn snapshot(&self) -> Snapshot {
        let jobs = |c: &QueueCounters| window::JobCounts {
            processed: c.processed.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
        };
        Snapshot {
            at: std::time::Instant::now(),
            connections_open: self.connections_open(),
            connections_total: self.connections_total.load(Ordering::Relaxed),
            messages_sent: self.messages_sent.load(Ordering::Relaxed),
            persisted_notified: self.persisted_notified.load(Ordering::Relaxed),
            http_server_errors: self.http_server_errors.load(Ordering::Relaxed),
            rate_limited: std::array::from_fn(|i| self.rate_limited[i].load(Ordering::Relaxed)),
            persist: jobs(&self.persist),
            background: jobs(&self.background),
            persist_latency: self.persist_latency.snapshot(),
            send_broadcast_latency: self.send_broadcast_latency.snapshot(),
        }
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, queues: &[QueueGauge]) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "postline_connections_open",
            "gauge",
            "WebSocket connections currently open on this process.",
            self.connections_open().to_string(),
        );
        metric(
            "postline_connections_total",
            "counter",
            "WebSocket connections accepted since start.",
            self.connections_total.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "postline_messages_sent_total",
            "counter",
            "Messages accepted and broadcast by this gateway.",
            self.messages_sent.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "postline_messages_duplicate_total",
            "counter",
            "Sends recognised as retries of an earlier client_message_id.",
            self.messages_duplicate.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "postline_messages_persisted_notified_total",
            "counter",
            "message_persisted notifications received from workers.",
            self.persisted_notified.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "postline_http_server_errors_total",
            "counter",
            "HTTP responses with a 5xx status.",
            self.http_server_errors.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "postline_alerts_firing",
            "gauge",
            "Alerts firing in this process's evaluator (GET /alerts).",
            self.alerts_firing.load(Ordering::Relaxed).to_string(),
        );
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in rows {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        let per_queue = |f: &dyn Fn(&QueueGauge) -> i64| -> Vec<(String, String)> {
            queues
                .iter()
                .map(|q| (format!("queue=\"{}\"", q.queue), f(q).to_string()))
                .collect()
        };
        family(
            "postline_queue_depth",
            "gauge",
            "Jobs in the queue, visible or in flight.",
            per_queue(&|q| q.depth),
        );
        family(
            "postline_queue_visible",
            "gauge",
            "Jobs ready to be read now.",
            per_queue(&|q| q.visible),
        );
        family(
            "postline_queue_oldest_age_seconds",
            "gauge",
            "Age of the oldest job in the queue (0 when empty).",
            per_queue(&|q| q.oldest_age_secs),
        );
        let counters = [
            ("postline_persist", &self.persist),
            ("postline_background", &self.background),
        ];
        for (suffix, help, pick) in [
            (
                "processed",
                "Jobs completed by this process's worker.",
                (|c: &QueueCounters| &c.processed) as fn(&QueueCounters) -> &AtomicU64,
            ),
            ("failed", "Job attempts that failed.", |c| &c.failed),
            (
                "retried",
                "Failed jobs scheduled for a retry with backoff.",
                |c| &c.retried,
            ),
            (
                "dead_lettered",
                "Jobs moved to the dead-letter table.",
                |c| &c.dead_lettered,
            ),
        ] {
            family(
                &format!("postline_jobs_{suffix}_total"),
                "counter",
                help,
                counters
                    .iter()
                    .map(|(q, c)| {
                        (
                            format!("queue=\"{q}\""),
                            pick(c).load(Ordering::Relaxed).to_string(),
                        )
                    })
                    .collect(),
            );
        }
        family(
            "postline_rate_limited_total",
            "counter",
            "Requests refused by a rate limit (HTTP 429 or a rate_limited reply), by limit.",
            RateLimit::ALL
                .iter()
                .map(|l| {
                    (
                        format!("limiter=\"{}\"", l.name()),
                        self.rate_limited[*l as usize]
                            .load(Ordering::Relaxed)
                            .to_string(),
                    )
                })
                .collect(),
        );
        family(
            "postline_alert_webhook_total",
            "counter",
            "Alert transitions by webhook outcome: sent (2xx), failed (every attempt), dropped (queue full).",
            [
                ("sent", &self.webhook_sent),
                ("failed", &self.webhook_failed),
                ("dropped", &self.webhook_dropped),
            ]
            .iter()
            .map(|(o, c)| (format!("outcome=\"{o}\""), c.load(Ordering::Relaxed).to_string()))
            .collect(),
        );
        let m = &self.moderation;
        for (name, help, outcomes) in [
            (
                "postline_moderation_checks_total",
                "Messages and edits that matched the word list, by what was done.",
                [("rejected", &m.rejected), ("masked", &m.masked)].as_slice(),
            ),
            (
                "postline_moderation_list_loads_total",
                "Reloads of the word list: ok (swapped in) or failed (the previous list kept).",
                &[("ok", &m.reloaded), ("failed", &m.reload_failed)],
            ),
            (
                "postline_moderation_reviews_total",
                "Review hook calls: allowed, retracted, or failed (every failed attempt).",
                &[
                    ("allowed", &m.allowed),
                    ("retracted", &m.retracted),
                    ("failed", &m.review_failed),
                ],
            ),
        ] {
            family(
                name,
                "counter",
                help,
                outcomes
                    .iter()
                    .map(|(o, c)| {
                        (
                            format!("outcome=\"{o}\""),
                            c.load(Ordering::Relaxed).to_string(),
                        )
                    })
                    .collect(),
            );
        }
        self.batch_size.render(
            &mut out,
            "postline_worker_batch_size",
            "",
            "Jobs per worker batch.",
        );
        self.persist_latency.render(
            &mut out,
            "postline_persist_latency_seconds",
            "",
            "Time from enqueue to the commit that stored the message.",
        );
        self.send_broadcast_latency.render(
            &mut out,
            "postline_send_broadcast_latency_seconds",
            "",
            "Time from taking a send_message frame to handing its broadcast to the room here.",
        );
        out
    }
}

/// What the database says about the whole cluster, read at scrape time:
/// gateways alive and missing (`gateways` table), rows in `dead_letters`.
/// Appended to [`Metrics::render`]'s text; a part that could not be read is
/// left out rather than reported as zero.
pub fn render_cluster(
    out: &mut String,
    gateways: Option<(usize, usize)>,
    dead_letters: Option<i64>,
) {
    if let Some((alive, missing)) = gateways {
        let _ = writeln!(
            out,
            "# HELP postline_gateways_alive Gateways heartbeating (any process reports all).\n\
             # TYPE postline_gateways_alive gauge\npostline_gateways_alive {alive}\n\
             # HELP postline_gateways_missing Gateways silent without a clean shutdown.\n\
             # TYPE postline_gateways_missing gauge\npostline_gateways_missing {missing}"
        );
    }
    if let Some(n) = dead_letters {
        let _ = writeln!(
            out,
            "# HELP postline_dead_letters Rows in the dead_letters table.\n\
             # TYPE postline_dead_letters gauge\npostline_dead_letters {n}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.connection_opened();
        m.add_sent();
        m.persist_latency.observe(0.003);
        m.persist_latency.observe(20.0);
        let text = m.render(&[QueueGauge {
            queue: "postline_persist".into(),
            depth: 3,
            visible: 1,
            oldest_age_secs: 7,
        }]);
        assert!(
            text.contains("# TYPE postline_connections_open gauge\npostline_connections_open 1\n")
        );
        assert!(text.contains("postline_messages_sent_total 1\n"));
        assert!(text.contains("postline_queue_depth{queue=\"postline_persist\"} 3\n"));
        assert!(text.contains("postline_queue_oldest_age_seconds{queue=\"postline_persist\"} 7\n"));
        assert!(
            text.contains("postline_persist_latency_seconds_bucket{le=\"0.0025\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("postline_persist_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("postline_persist_latency_seconds_bucket{le=\"30\"} 2\n"));
        assert!(text.contains("postline_persist_latency_seconds_count 2\n"));
        assert!(text.contains("postline_jobs_dead_lettered_total{queue=\"postline_persist\"} 0\n"));
    }

    #[test]
    fn rate_limit_refusals_are_counted_by_limiter() {
        let m = Metrics::default();
        m.add_rate_limited(RateLimit::UpgradePerIp);
        m.add_rate_limited(RateLimit::UpgradePerIp);
        m.send_broadcast_latency.observe(0.00003);
        let text = m.render(&[]);
        assert!(text.contains("postline_rate_limited_total{limiter=\"upgrade_per_ip\"} 2\n"));
        assert!(text.contains("postline_rate_limited_total{limiter=\"send_per_user\"} 0\n"));
        assert!(text.contains("postline_send_broadcast_latency_seconds_bucket{le=\"0.00005\"} 1\n"));
        assert_eq!(
            m.snapshot().rate_limited[RateLimit::UpgradePerIp as usize],
            2
        );
    }
}

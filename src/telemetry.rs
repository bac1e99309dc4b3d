//! Logging setup and the process's counters, rendered as Prometheus text on
//! /metrics. Counters are plain atomics: bumping one on a hot path costs a
//! relaxed add.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Install the tracing subscriber (RUST_LOG, default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

#[derive(Debug, Default)]
pub struct Metrics {
    connections_open: AtomicI64,
    connections_total: AtomicU64,
    messages_sent: AtomicU64,
    messages_duplicate: AtomicU64,
    persisted_notified: AtomicU64,
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

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, queue_depth: Option<i64>) -> String {
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
        if let Some(depth) = queue_depth {
            metric(
                "postline_persist_queue_depth",
                "gauge",
                "Jobs in the persist queue (visible or in flight).",
                depth.to_string(),
            );
        }
        out
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
        let text = m.render(Some(3));
        assert!(
            text.contains("# TYPE postline_connections_open gauge\npostline_connections_open 1\n")
        );
        assert!(text.contains("postline_messages_sent_total 1\n"));
        assert!(text.contains("postline_persist_queue_depth 3\n"));
    }
}

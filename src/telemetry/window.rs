//! The counters over a recent window: a [`Recorder`] keeps one [`Snapshot`]
//! a second for a few minutes, and [`Window`] is the difference between the
//! newest and an older one. Counters only grow, so a difference is what
//! happened in between: rates, and p50/p99 of just those observations
//! (a since-start quantile would barely move after an hour of uptime).
//! Memory only; a snapshot is a few hundred bytes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Metrics, RateLimit};

/// Worker counters of one queue at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounts {
    pub processed: u64,
    pub failed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
}

impl JobCounts {
    fn since(&self, old: &JobCounts) -> JobCounts {
        JobCounts {
            processed: self.processed.saturating_sub(old.processed),
            failed: self.failed.saturating_sub(old.failed),
            retried: self.retried.saturating_sub(old.retried),
            dead_lettered: self.dead_lettered.saturating_sub(old.dead_lettered),
        }
    }
}

/// A histogram's per-bucket counts (not cumulative) and total count.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramDelta {
    pub bounds: &'static [f64],
    pub buckets: Vec<u64>,
    /// Observations, those above the last bound included.
    pub count: u64,
}

impl HistogramDelta {
    fn since(&self, old: &HistogramDelta) -> HistogramDelta {
        HistogramDelta {
            bounds: self.bounds,
            buckets: self
                .buckets
                .iter()
                .zip(&old.buckets)
                .map(|(n, o)| n.saturating_sub(*o))
                .collect(),
            count: self.count.saturating_sub(old.count),
        }
    }

    /// The `q` quantile (0..=1) estimated as Prometheus' histogram_quantile
    /// does: find the bucket holding the rank, interpolate linearly inside
    /// it (from 0 for the first). None without observations; the last
    /// bound when the rank is above it (the +Inf bucket has no upper edge).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        for (i, (n, upper)) in self.buckets.iter().zip(self.bounds).enumerate() {
            let cumulative = below + n;
            if *n > 0 && cumulative as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { self.bounds[i - 1] };
                let inside = (rank - below as f64) / *n as f64;
                return Some(lower + (upper - lower) * inside);
            }
            below = cumulative;
        }
        self.bounds.last().copied()
    }
}

/// Every counter of [`Metrics`] at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at: Instant,
    pub connections_open: i64,
    pub connections_total: u64,
    pub messages_sent: u64,
    pub persisted_notified: u64,
    pub http_server_errors: u64,
    pub rate_limited: [u64; RateLimit::ALL.len()],
    pub persist: JobCounts,
    pub background: JobCounts,
    pub persist_latency: HistogramDelta,
    pub send_broadcast_latency: HistogramDelta,
}

/// What happened between two snapshots.
#[derive(Debug, Clone)]
pub struct Window {
    /// The actual span (the recorder may not reach as far back as asked).
    pub span: Duration,
    pub messages_sent: u64,
    pub persisted_notified: u64,
    pub http_server_errors: u64,
    pub rate_limited: [u64; RateLimit::ALL.len()],
    pub persist: JobCounts,
    pub background: JobCounts,
    pub persist_latency: HistogramDelta,
    pub send_broadcast_latency: HistogramDelta,
}

impl Window {
    pub fn between(old: &Snapshot, new: &Snapshot) -> Window {
        Window {
            span: new.at.saturating_duration_since(old.at),
            messages_sent: new.messages_sent.saturating_sub(old.messages_sent),
            persisted_notified: new
                .persisted_notified
                .saturating_sub(old.persisted_notified),
            http_server_errors: new
                .http_server_errors
                .saturating_sub(old.http_server_errors),
            rate_limited: std::array::from_fn(|i| {
                new.rate_limited[i].saturating_sub(old.rate_limited[i])
            }),
            persist: new.persist.since(&old.persist),
            background: new.background.since(&old.background),
            persist_latency: new.persist_latency.since(&old.persist_latency),
            send_broadcast_latency: new
                .send_broadcast_latency
                .since(&old.send_broadcast_latency),
        }
    }

    /// `n` per second over the window (0 over an empty one).
    pub fn per_sec(&self, n: u64) -> f64 {
        let secs = self.span.as_secs_f64();
        if secs > 0.0 {
            n as f64 / secs
        } else {
            0.0
        }
    }

    /// Failed job attempts and 5xx responses: what the error-rate alert counts.
    pub fn errors(&self) -> u64 {
        self.persist.failed + self.background.failed + self.http_server_errors
    }
}

/// Snapshots of one [`Metrics`], one per `every`, `keep` of them at most.
pub struct Recorder {
    every: Duration,
    keep: usize,
    ring: Mutex<VecDeque<Snapshot>>,
}

impl Recorder {
    /// Enough snapshots, one per `every`, to reach `span` back.
    pub fn new(every: Duration, span: Duration) -> Self {
        let every = every.max(Duration::from_millis(10));
        let keep = (span.as_millis() / every.as_millis()).max(1) as usize + 1;
        Recorder {
            every,
            keep,
            ring: Mutex::new(VecDeque::with_capacity(keep)),
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, VecDeque<Snapshot>> {
        // A poisoned ring only means a panic mid-push of plain data.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a snapshot now (tests call this instead of waiting for the task).
    pub fn record(&self, metrics: &Metrics) {
        let snap = metrics.snapshot();
        let mut ring = self.ring();
        if ring.len() == self.keep {
            ring.pop_front();
        }
        ring.push_back(snap);
    }

    /// From the oldest snapshot at most `span` old (or the oldest kept) to
    /// a fresh one taken now. None before the first snapshot.
    pub fn window(&self, metrics: &Metrics, span: Duration) -> Option<Window> {
        let now = metrics.snapshot();
        let ring = self.ring();
        // No cutoff (span reaches before the clock's epoch): the oldest kept.
        let old = match now.at.checked_sub(span) {
            Some(cutoff) => ring.iter().find(|s| s.at >= cutoff).or(ring.back())?,
            None => ring.front()?,
        };
        Some(Window::between(old, &now))
    }

    /// Record every `every` until `stop`.
    pub async fn run(&self, metrics: &Metrics, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.record(metrics),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(bounds: &'static [f64], buckets: &[u64]) -> HistogramDelta {
        HistogramDelta {
            bounds,
            buckets: buckets.to_vec(),
            count: buckets.iter().sum(),
        }
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket_like_prometheus() {
        const B: &[f64] = &[1.0, 2.0, 4.0];
        // 10 in (0,1], 10 in (1,2]: the median is the top of the first bucket.
        let h = hist(B, &[10, 10, 0]);
        assert_eq!(h.quantile(0.5), Some(1.0));
        // rank 19.8 of 20: 98 % of the way through the second bucket.
        let p99 = h.quantile(0.99).unwrap();
        assert!((p99 - 1.98).abs() < 1e-9, "{p99}");
        assert_eq!(hist(B, &[0, 0, 0]).quantile(0.5), None);
        // Above every bound (the +Inf bucket): the last bound.
        let over = HistogramDelta {
            bounds: B,
            buckets: vec![0, 0, 0],
            count: 3,
        };
        assert_eq!(over.quantile(0.99), Some(4.0));
    }

    #[test]
    fn a_window_counts_only_what_happened_inside_it() {
        let m = Metrics::default();
        m.add_sent();
        m.persist_latency.observe(30.0);
        let r = Recorder::new(Duration::from_secs(1), Duration::from_secs(60));
        r.record(&m);
        m.add_sent();
        m.add_sent();
        m.persist_latency.observe(0.002);
        let w = r.window(&m, Duration::from_secs(60)).unwrap();
        assert_eq!(w.messages_sent, 2);
        assert_eq!(w.persist_latency.count, 1);
        // The 30 s observation is outside the window: p99 is in (1, 2.5] ms.
        let p99 = w.persist_latency.quantile(0.99).unwrap();
        assert!(p99 > 0.001 && p99 <= 0.0025, "{p99}");
    }

    #[test]
    fn the_ring_keeps_only_its_span() {
        let m = Metrics::default();
        let r = Recorder::new(Duration::from_secs(1), Duration::from_secs(3));
        for _ in 0..10 {
            r.record(&m);
        }
        assert_eq!(r.ring().len(), 4);
    }
}

//! The latency run (the default mode): connect every connection, open the
//! measurement window once all are in, then report connect time, latency
//! percentiles (hdrhistogram) and rates as a table and as one JSON line.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::bail;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::connection::{run_connection, Plan, Start};
use crate::rss::{cpu_secs, rss_kib};
use crate::setup::{self, Setup};
use crate::Args;

pub(crate) const SHARDS: usize = 16;

/// Counters and histograms shared by all connection tasks.
pub(crate) struct Stats {
    start: Instant,
    /// Measurement window in ns since `start`; set once, before senders start.
    window_start: AtomicU64,
    window_end: AtomicU64,
    pub(crate) latency: Vec<Mutex<Histogram<u64>>>,
    /// Deliveries to a receiver on another gateway than the sender's.
    pub(crate) cross_latency: Mutex<Histogram<u64>>,
    pub(crate) connect: Mutex<Histogram<u64>>,
    pub(crate) sends: AtomicU64,
    pub(crate) deliveries: AtomicU64,
    pub(crate) persisted: AtomicU64,
    pub(crate) acks: AtomicU64,
    /// From a send to its ack (the message is durable in the queue).
    pub(crate) ack_latency: Mutex<Histogram<u64>>,
    /// From a send to its `message_persisted` at the conversation's observer
    /// (the message is stored with its seq), which the server may hold to
    /// share a write (POSTLINE_PERSISTED_HOLD_MS).
    pub(crate) persisted_latency: Mutex<Histogram<u64>>,
    errors: AtomicU64,
    error_sample: Mutex<Option<String>>,
}

impl Stats {
    pub(crate) fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub(crate) fn in_window(&self, t: u64) -> bool {
        t >= self.window_start.load(Ordering::Relaxed)
            && t < self.window_end.load(Ordering::Relaxed)
    }

    pub(crate) fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut s = self.error_sample.lock().unwrap();
        if s.is_none() {
            *s = Some(what);
        }
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Set up, run every connection, and report.
pub(crate) async fn latency_benchmark(args: Arc<Args>) -> anyhow::Result<()> {
    if args.conversations == 0 || args.connections < args.conversations {
        bail!("need at least one connection per conversation");
    }
    let gateways: Vec<SocketAddr> = std::iter::once(args.addr)
        .chain(args.also.iter().copied())
        .collect();
    let Setup {
        jwt,
        ttl,
        users,
        conversations,
    } = setup::prepare(&args).await?;

    let warmup_ns = (args.warmup * 1e9) as u64;
    let measure_ns = (args.duration * 1e9) as u64;
    let stats = Arc::new(Stats {
        start: Instant::now(),
        window_start: AtomicU64::new(u64::MAX),
        window_end: AtomicU64::new(0),
        latency: (0..SHARDS).map(|_| Mutex::new(hist())).collect(),
        cross_latency: Mutex::new(hist()),
        connect: Mutex::new(hist()),
        sends: AtomicU64::new(0),
        deliveries: AtomicU64::new(0),
        persisted: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        ack_latency: Mutex::new(hist()),
        persisted_latency: Mutex::new(hist()),
        errors: AtomicU64::new(0),
        error_sample: Mutex::new(None),
    });

    // Connect everyone first; the clock for warm-up starts once all are in.
    let permit = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let connect_start = Instant::now();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(args.connections);
    let go = Arc::new(tokio::sync::Notify::new());
    let stop_at = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(args.connections);
    for (i, user) in users.iter().enumerate() {
        let plan = Plan {
            token: jwt.issue(*user, ttl),
            conversation: conversations[i % args.conversations],
            sender: i / args.conversations < args.senders_per_conversation,
            observer: i < args.conversations,
            index: i,
            addr: gateways[(i / args.conversations) % gateways.len()],
            cross: !(i / args.conversations).is_multiple_of(gateways.len()),
            slow: i >= args.connections - args.slow_readers.min(args.connections),
        };
        let start = Start {
            ready: ready_tx.clone(),
            go: go.clone(),
            stop_at: stop_at.clone(),
        };
        tasks.push(tokio::spawn(run_connection(
            args.clone(),
            stats.clone(),
            plan,
            permit.clone(),
            i,
            start,
        )));
    }
    drop(ready_tx);
    // Every connection is in (or has failed) when the channel closes or all reported.
    let mut ready = 0;
    while ready < args.connections && ready_rx.recv().await.is_some() {
        ready += 1;
    }
    let connect_wall = connect_start.elapsed();
    let begin = stats.now_ns();
    stats
        .window_start
        .store(begin + warmup_ns, Ordering::Relaxed);
    stats
        .window_end
        .store(begin + warmup_ns + measure_ns, Ordering::Relaxed);
    stop_at.store(begin + warmup_ns + measure_ns, Ordering::Relaxed);
    go.notify_waiters();
    // The server's CPU time over the measurement window: cores busy.
    let cpu = args.server_pid.map(|pid| {
        let (warmup, measure) = (
            std::time::Duration::from_nanos(warmup_ns),
            std::time::Duration::from_nanos(measure_ns),
        );
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            let before = cpu_secs(pid)?;
            tokio::time::sleep(measure).await;
            Some((cpu_secs(pid)? - before) / measure.as_secs_f64())
        })
    });
    let mut failed = 0usize;
    let mut first_failure = None;
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failed += 1;
                first_failure.get_or_insert(e.to_string());
            }
            Err(e) => {
                failed += 1;
                first_failure.get_or_insert(e.to_string());
            }
        }
    }

    let mut lat = hist();
    for h in &stats.latency {
        lat.add(&*h.lock().unwrap()).ok();
    }
    let cross = stats.cross_latency.lock().unwrap().clone();
    // Same-gateway deliveries: all minus cross.
    let mut same = lat.clone();
    same.subtract(&cross).ok();
    let connect = stats.connect.lock().unwrap().clone();
    let acked = stats.ack_latency.lock().unwrap().clone();
    let stored = stats.persisted_latency.lock().unwrap().clone();
    let secs = args.duration;
    let rss = args.server_pid.and_then(rss_kib);
    let cpu_cores = match cpu {
        Some(task) => task.await.ok().flatten(),
        None => None,
    };
    let report = json!({
        "connections": args.connections,
        "conversations": args.conversations,
        "senders": args.conversations * args.senders_per_conversation.min(args.connections / args.conversations),
        "rate_per_sender": args.rate,
        "payload": args.payload,
        "duration_s": secs,
        "connect_us": {"p50": connect.value_at_quantile(0.5), "p99": connect.value_at_quantile(0.99), "max": connect.max()},
        "latency_us": {"p50": lat.value_at_quantile(0.5), "p90": lat.value_at_quantile(0.9), "p99": lat.value_at_quantile(0.99), "p99_9": lat.value_at_quantile(0.999), "max": lat.max(), "samples": lat.len()},
        "same_gateway_latency_us": {"p50": same.value_at_quantile(0.5), "p99": same.value_at_quantile(0.99), "samples": same.len()},
        "cross_gateway_latency_us": {"p50": cross.value_at_quantile(0.5), "p99": cross.value_at_quantile(0.99), "samples": cross.len()},
        "sends_per_s": stats.sends.load(Ordering::Relaxed) as f64 / secs,
        "deliveries_per_s": stats.deliveries.load(Ordering::Relaxed) as f64 / secs,
        "persisted_per_s": stats.persisted.load(Ordering::Relaxed) as f64 / secs,
        "acks": stats.acks.load(Ordering::Relaxed),
        "ack_latency_us": {"p50": acked.value_at_quantile(0.5), "p99": acked.value_at_quantile(0.99), "max": acked.max(), "samples": acked.len()},
        "persisted_latency_us": {"p50": stored.value_at_quantile(0.5), "p99": stored.value_at_quantile(0.99), "max": stored.max(), "samples": stored.len()},
        "errors": stats.errors.load(Ordering::Relaxed),
        "error_sample": *stats.error_sample.lock().unwrap(),
        "failed_connections": failed,
        "failure_sample": first_failure,
        "protocol": if args.socketio { "socketio" } else { "native" },
        "server_cpu_cores": cpu_cores,
        "server_rss_kib": rss,
        "server_rss_per_connection_kib": rss.map(|r| r as f64 / args.connections as f64),
        "connect_wall_s": connect_wall.as_secs_f64(),
    });
    if !args.json {
        println!("postline-bench: {} connections, {} conversations, rate {}/s per sender, {} B, {} s (+{} s warm-up)",
            args.connections, args.conversations, args.rate, args.payload, args.duration, args.warmup);
        println!(
            "  connect (us)   p50 {:>8}  p99 {:>8}  max {:>8}",
            connect.value_at_quantile(0.5),
            connect.value_at_quantile(0.99),
            connect.max()
        );
        println!(
            "  latency (us)   p50 {:>8}  p90 {:>8}  p99 {:>8}  p99.9 {:>8}  max {:>8}  (n={})",
            lat.value_at_quantile(0.5),
            lat.value_at_quantile(0.9),
            lat.value_at_quantile(0.99),
            lat.value_at_quantile(0.999),
            lat.max(),
            lat.len()
        );
        if !args.also.is_empty() {
            println!(
                "  same gateway (us)  p50 {:>8}  p99 {:>8}  (n={})   other gateway (us)  p50 {:>8}  p99 {:>8}  (n={})",
                same.value_at_quantile(0.5), same.value_at_quantile(0.99), same.len(),
                cross.value_at_quantile(0.5), cross.value_at_quantile(0.99), cross.len()
            );
        }
        println!(
            "  ack (us)       p50 {:>8}  p99 {:>8}  max {:>8}  (n={})",
            acked.value_at_quantile(0.5),
            acked.value_at_quantile(0.99),
            acked.max(),
            acked.len()
        );
        println!(
            "  persisted (us) p50 {:>8}  p99 {:>8}  max {:>8}  (n={})",
            stored.value_at_quantile(0.5),
            stored.value_at_quantile(0.99),
            stored.max(),
            stored.len()
        );
        println!("  sends/s {:>10.0}   deliveries/s {:>10.0}   persisted/s {:>10.0}   errors {}   failed connections {}",
            report["sends_per_s"].as_f64().unwrap_or(0.0), report["deliveries_per_s"].as_f64().unwrap_or(0.0), report["persisted_per_s"].as_f64().unwrap_or(0.0),
            report["errors"], failed);
        if let Some(c) = cpu_cores {
            println!("  server CPU {:.2} cores over the window", c);
        }
        if let Some(r) = rss {
            println!(
                "  server RSS {} KiB ({:.1} KiB per connection)",
                r,
                r as f64 / args.connections as f64
            );
        }
    }
    println!("{report}");
    Ok(())
}

//! `postline-bench`: a WebSocket load generator that speaks Postline's
//! protocol. It creates its own users, tokens and conversations (HTTP API +
//! the shared JWT secret), connects, joins, sends at a fixed rate, and reports
//! latency percentiles and rates as a table and as one JSON line.
//!
//! Latency is send -> receive of `new_message`, measured in this process: the
//! sender stamps a monotonic timestamp (nanoseconds since the run's start) at
//! the head of the content and receivers subtract it from their own clock.
//! Bounded in time; targets 127.0.0.1 by default.
//!
//! Modes: the latency run ([`latency`], the default), durable throughput
//! (`--persist-jobs`, [`persist`]) and cold start (`--cold-start`,
//! [`cold_start`]).

mod cold_start;
mod connection;
mod latency;
mod persist;
mod publish;
mod rss;
mod setup;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(name = "postline-bench", about = "Load generator for Postline")]
struct Args {
    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// More gateways sharing the database: receivers are spread over `addr`
    /// and these (senders stay on `addr`), and latency is reported separately
    /// for receivers on the sender's gateway and on another one.
    #[arg(long, value_delimiter = ',')]
    also: Vec<SocketAddr>,
    /// HS256 secret shared with the server (default: the --dev secret).
    #[arg(long, env = "POSTLINE_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// WebSocket connections (one user each).
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Conversations; connection i joins conversation i % conversations.
    #[arg(long, default_value_t = 2)]
    conversations: usize,
    /// Sending connections per conversation.
    #[arg(long, default_value_t = 1)]
    senders_per_conversation: usize,
    /// Messages per second per sender (0: connect and stay idle).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Content size in bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of sending before measurement starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// The server's pid, to report its RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
    /// Instead of the WebSocket run: enqueue this many persist jobs straight
    /// into pgmq and time workers draining them (durable throughput).
    #[arg(long)]
    persist_jobs: Option<usize>,
    /// Database for --persist-jobs; unset: a throwaway local cluster with fsync on.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// With --persist-jobs: drain with pgmq alone (read a batch, delete it,
    /// each its own commit as the worker does), no chat logic: the queue's
    /// own ceiling beside the worker's.
    #[arg(long)]
    pgmq_only: bool,
    /// Concurrent workers for --persist-jobs.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Instead of the WebSocket run: start `postline serve` this many times
    /// against a ready database and time process start -> first accepted
    /// WebSocket, then read its idle RSS.
    #[arg(long)]
    cold_start: Option<usize>,
    /// This many receiving connections stop reading once joined (slow
    /// consumers), to measure that they do not slow the others.
    #[arg(long, default_value_t = 0)]
    slow_readers: usize,
    /// Runtime threads of the generator (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Bind client sockets to this many loopback source addresses
    /// (127.0.0.1, 127.0.0.2, ...): one address has ~28k ephemeral ports.
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
    /// Instead of the WebSocket run: call postline.publish() this many times
    /// against DATABASE_URL (the server's database), one transaction each,
    /// and time commit -> new_message and commit -> message_persisted on a
    /// member's WebSocket connected to `addr`.
    #[arg(long)]
    sql_publish: Option<usize>,
    /// Speak Socket.IO v4 on /socket.io/ instead of the native protocol on
    /// /ws: the same events, Engine.IO/Socket.IO framing.
    #[arg(long)]
    socketio: bool,
    /// `--persist-jobs`: seal content as `postline worker` would with these
    /// keys (POSTLINE_ENCRYPTION_KEYS, `id:base64,...`); unset: plain. The
    /// latency runs pass the environment on to the server instead.
    #[command(flatten)]
    encryption: postline::config::EncryptionArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let mut rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if args.threads > 1 {
            b.worker_threads(args.threads);
        }
        b
    };
    rt.enable_all().build()?.block_on(run(args))
}

async fn run(args: Arc<Args>) -> anyhow::Result<()> {
    if let Some(runs) = args.cold_start {
        return cold_start::cold_start_benchmark(&args, runs.max(1)).await;
    }
    if let Some(n) = args.sql_publish {
        return publish::sql_publish_benchmark(&args, n.max(1)).await;
    }
    if let Some(jobs) = args.persist_jobs {
        return persist::persist_benchmark(&args, jobs).await;
    }
    latency::latency_benchmark(args).await
}

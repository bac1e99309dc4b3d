//! `postline-bench`: a WebSocket load generator that speaks Postline's
//! protocol. It creates its own users, tokens and conversations (HTTP API +
//! the shared JWT secret), connects, joins, sends at a fixed rate, and reports
//! latency percentiles and rates as a table and as one JSON line.
//!
//! Latency is send -> receive of `new_message`, measured in this process: the
//! sender stamps a monotonic timestamp (nanoseconds since the run's start) at
//! the head of the content and receivers subtract it from their own clock.
//! Bounded in time; targets 127.0.0.1 by default.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper::header::{CONNECTION, UPGRADE};
use hyper::Request;
use postline::auth::Jwt;
use postline::domain::UserId;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use uuid::Uuid;

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
}

const SHARDS: usize = 16;

/// Counters and histograms shared by all connection tasks.
struct Stats {
    start: Instant,
    /// Measurement window in ns since `start`; set once, before senders start.
    window_start: AtomicU64,
    window_end: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,
    /// Deliveries to a receiver on another gateway than the sender's.
    cross_latency: Mutex<Histogram<u64>>,
    connect: Mutex<Histogram<u64>>,
    sends: AtomicU64,
    deliveries: AtomicU64,
    persisted: AtomicU64,
    acks: AtomicU64,
    errors: AtomicU64,
    error_sample: Mutex<Option<String>>,
}

impl Stats {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn in_window(&self, t: u64) -> bool {
        t >= self.window_start.load(Ordering::Relaxed)
            && t < self.window_end.load(Ordering::Relaxed)
    }

    fn error(&self, what: String) {
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

struct Executor;
impl<Fut> hyper::rt::Executor<Fut> for Executor
where
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect(addr).await?;
    let body = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 2") {
        bail!("{method} {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(serde_json::from_str(body)?)
}

/// Read the sender's timestamp from `..."content":"t=<ns>;...`.
fn stamp(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"content\":\"t=";
    let at = frame.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = &frame[at..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

fn frame_type(frame: &[u8]) -> &[u8] {
    // Server frames start with {"type":"<name>"
    const PREFIX: &[u8] = b"{\"type\":\"";
    if !frame.starts_with(PREFIX) {
        return b"";
    }
    let rest = &frame[PREFIX.len()..];
    let end = rest.iter().position(|b| *b == b'"').unwrap_or(0);
    &rest[..end]
}

struct Plan {
    token: String,
    conversation: Uuid,
    sender: bool,
    index: usize,
    /// The gateway this connection uses.
    addr: SocketAddr,
    /// Never reads after joining.
    slow: bool,
    /// Whether it is not the gateway the conversation's senders use.
    cross: bool,
    /// One connection per conversation counts `message_persisted`, so
    /// persisted/s counts messages, not deliveries of the notice.
    observer: bool,
}

type WsRead = fastwebsockets::WebSocketRead<
    tokio::io::ReadHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
>;
type WsWrite = fastwebsockets::WebSocketWrite<
    tokio::io::WriteHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
>;

/// Open the WebSocket, read hello, join the conversation.
/// Returns the halves and the time from TCP connect to the join's ack (the
/// wait for a connect permit is not counted).
async fn connect(
    args: &Args,
    plan: &Plan,
    permit: &Semaphore,
) -> anyhow::Result<(WsRead, WsWrite, Duration)> {
    let guard = permit.acquire().await?;
    let t0 = Instant::now();
    let stream = if args.source_ips > 1 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        let ip =
            std::net::Ipv4Addr::new(127, 0, 0, 1 + (plan.index % args.source_ips as usize) as u8);
        socket.bind(SocketAddr::from((ip, 0)))?;
        socket.connect(plan.addr).await?
    } else {
        TcpStream::connect(plan.addr).await?
    };
    stream.set_nodelay(true)?;
    let ws = open_ws(stream, plan.addr, &plan.token).await?;
    let (mut rx, mut tx) = ws.split(tokio::io::split);
    let mut no_obligations = |_: Frame<'_>| async { Ok::<(), WebSocketError>(()) };
    let hello = rx.read_frame(&mut no_obligations).await?;
    if frame_type(&hello.payload) != b"hello" {
        bail!("expected hello");
    }
    let join =
        json!({"type": "join_conversation", "ref": "j", "conversation_id": plan.conversation})
            .to_string();
    tx.write_frame(Frame::text(Payload::Borrowed(join.as_bytes())))
        .await?;
    loop {
        let f = rx.read_frame(&mut no_obligations).await?;
        match frame_type(&f.payload) {
            b"ack" => break,
            b"error" => bail!("join refused: {}", String::from_utf8_lossy(&f.payload)),
            _ => {}
        }
    }
    drop(guard);
    Ok((rx, tx, t0.elapsed()))
}

/// Synchronises the start: every connection connects and joins, reports
/// ready, and waits for `go`; `stop_at` is known by then.
struct Start {
    ready: tokio::sync::mpsc::Sender<bool>,
    go: Arc<tokio::sync::Notify>,
    stop_at: Arc<AtomicU64>,
}

async fn run_connection(
    args: Arc<Args>,
    stats: Arc<Stats>,
    plan: Plan,
    permit: Arc<Semaphore>,
    idx: usize,
    start: Start,
) -> anyhow::Result<()> {
    let connected = connect(&args, &plan, &permit).await;
    let (mut rx, mut tx, took) = match connected {
        Ok(c) => c,
        Err(e) => {
            let _ = start.ready.send(false).await;
            return Err(e);
        }
    };
    stats
        .connect
        .lock()
        .unwrap()
        .record(took.as_micros() as u64)
        .ok();
    let go = start.go.notified();
    tokio::pin!(go);
    go.as_mut().enable();
    let _ = start.ready.send(true).await;
    go.await;
    let stop_at = start.stop_at.load(Ordering::Relaxed);
    let mut no_obligations = |_: Frame<'_>| async { Ok::<(), WebSocketError>(()) };

    if plan.slow {
        // Hold the socket, read nothing: the server must cope on its own.
        tokio::time::sleep(Duration::from_nanos(stop_at.saturating_sub(stats.now_ns()))).await;
        drop((rx, tx));
        return Ok(());
    }
    let reader_stats = stats.clone();
    let observer = plan.observer;
    let cross = plan.cross;
    let reader = tokio::spawn(async move {
        let shard = idx % SHARDS;
        loop {
            let f = match rx.read_frame(&mut no_obligations).await {
                Ok(f) => f,
                Err(_) => return,
            };
            if f.opcode == OpCode::Close {
                return;
            }
            let now = reader_stats.now_ns();
            match frame_type(&f.payload) {
                b"new_message" => {
                    if let Some(t) = stamp(&f.payload) {
                        if reader_stats.in_window(t) {
                            reader_stats.deliveries.fetch_add(1, Ordering::Relaxed);
                            let us = (now.saturating_sub(t) / 1000).max(1);
                            reader_stats.latency[shard].lock().unwrap().record(us).ok();
                            if cross {
                                reader_stats.cross_latency.lock().unwrap().record(us).ok();
                            }
                        }
                    }
                }
                b"message_persisted" if observer && reader_stats.in_window(now) => {
                    reader_stats.persisted.fetch_add(1, Ordering::Relaxed);
                }
                b"ack" => {
                    reader_stats.acks.fetch_add(1, Ordering::Relaxed);
                }
                b"error" => reader_stats.error(String::from_utf8_lossy(&f.payload).into_owned()),
                _ => {}
            }
        }
    });

    if plan.sender && args.rate > 0.0 {
        let period = Duration::from_secs_f64(1.0 / args.rate);
        // Spread senders' phases so they do not all fire on the same tick.
        let phase = period.mul_f64((idx % 97) as f64 / 97.0);
        tokio::time::sleep(phase).await;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let pad = "x".repeat(args.payload.saturating_sub(24));
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            let t = stats.now_ns();
            if t >= stop_at {
                break;
            }
            n += 1;
            let msg = format!(
                r#"{{"type":"send_message","ref":"{n}","conversation_id":"{}","client_message_id":"{idx}-{n}","content":"t={t};{pad}"}}"#,
                plan.conversation
            );
            tx.write_frame(Frame::text(Payload::Borrowed(msg.as_bytes())))
                .await?;
            if stats.in_window(t) {
                stats.sends.fetch_add(1, Ordering::Relaxed);
            }
        }
    } else {
        tokio::time::sleep(Duration::from_nanos(stop_at.saturating_sub(stats.now_ns()))).await;
    }
    // Let in-flight messages land, then close.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = tx.write_frame(Frame::close(1000, b"")).await;
    reader.abort();
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Durable throughput: jobs enqueued with send_batch, then drained by
/// `workers` workers at the default batch settings, synchronous_commit on.
async fn persist_benchmark(args: &Args, jobs: usize) -> anyhow::Result<()> {
    use postline::domain::{ClientMessageId, Content, Message, MessageId, MessageKind};
    use postline::queue::{self, PersistJob, PERSIST_QUEUE};
    use postline::worker::{Outcome, Worker, WorkerConfig};

    let mut cluster = None;
    let url = match &args.database_url {
        Some(u) => u.clone(),
        None => {
            let c = tokio::task::spawn_blocking(|| {
                postline::pglocal::Cluster::start(postline::pglocal::ClusterOptions {
                    fsync: true,
                    ..Default::default()
                })
            })
            .await??;
            let url = c.url("postgres");
            cluster = Some(c);
            url
        }
    };
    let pool = postline::store::connect(&url, (args.workers as u32 + 4).max(8)).await?;
    postline::store::migrate(&pool).await?;
    let store = postline::store::Store::new(pool.clone());
    let sender = UserId(Uuid::new_v4());
    let mut convs = Vec::new();
    for _ in 0..args.conversations {
        convs.push(store.create_conversation(sender, None, &[]).await?.id);
    }
    let pad = "x".repeat(args.payload.saturating_sub(8));
    let payloads: Vec<serde_json::Value> = (0..jobs)
        .map(|i| {
            let m = Message {
                id: MessageId::new_v7(),
                conversation_id: convs[i % convs.len()],
                sender_id: sender,
                client_message_id: ClientMessageId::parse(&format!("b{i}")).expect("valid id"),
                kind: MessageKind::Text,
                content: Content::from_stored(json!(format!("{i} {pad}"))),
                created_at: postline::domain::now_micros(),
            };
            serde_json::to_value(PersistJob::from_message(&m)).expect("job encodes")
        })
        .collect();
    let t = Instant::now();
    for chunk in payloads.chunks(1000) {
        queue::send_batch(&pool, PERSIST_QUEUE, chunk).await?;
    }
    let enqueue = t.elapsed();

    let t = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..args.workers {
        let w = Worker::new(
            pool.clone(),
            WorkerConfig::default(),
            Arc::new(tokio::sync::Notify::new()),
        );
        handles.push(tokio::spawn(async move {
            let mut n = 0usize;
            loop {
                match w.run_once().await {
                    Ok(Outcome::Processed(_, r)) => n += r.persisted,
                    Ok(Outcome::Idle) => return Ok::<usize, anyhow::Error>(n),
                    Err(e) => return Err(e.into()),
                }
            }
        }));
    }
    let mut persisted = 0;
    for h in handles {
        persisted += h.await??;
    }
    let drain = t.elapsed();
    let report = json!({
        "jobs": jobs,
        "workers": args.workers,
        "conversations": args.conversations,
        "payload": args.payload,
        "throwaway_cluster_fsync_on": cluster.is_some(),
        "enqueue_jobs_per_s": jobs as f64 / enqueue.as_secs_f64(),
        "persisted": persisted,
        "persisted_per_s": persisted as f64 / drain.as_secs_f64(),
        "drain_s": drain.as_secs_f64(),
    });
    if !args.json {
        println!(
            "postline-bench persist: {jobs} jobs, {} worker(s), {} conversations: enqueue {:.0} jobs/s (send_batch of 1000), persisted {:.0} msg/s ({persisted} in {:.2} s)",
            args.workers,
            args.conversations,
            report["enqueue_jobs_per_s"].as_f64().unwrap_or(0.0),
            report["persisted_per_s"].as_f64().unwrap_or(0.0),
            drain.as_secs_f64()
        );
    }
    println!("{report}");
    drop(cluster);
    Ok(())
}

/// Process start -> first accepted WebSocket (hello received), and RSS at
/// idle, over `runs` starts of the real binary against a ready database.
async fn cold_start_benchmark(args: &Args, runs: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?
        .parent()
        .context("bench binary has a directory")?
        .join("postline");
    let cluster =
        tokio::task::spawn_blocking(|| postline::pglocal::Cluster::start(Default::default()))
            .await??;
    let url = cluster.url("postgres");
    // The schema exists before the measured starts, as in any restart.
    let pool = postline::store::connect(&url, 2).await?;
    postline::store::migrate(&pool).await?;
    let jwt = Jwt::new(postline::config::DEV_JWT_SECRET.as_bytes());
    let token = jwt.issue(UserId(Uuid::new_v4()), Duration::from_secs(600));
    let mut startup_ms = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let t = Instant::now();
        let mut child = std::process::Command::new(&exe)
            .args(["serve", "--dev"])
            .env("DATABASE_URL", &url)
            .env("POSTLINE_LISTEN", addr.to_string())
            .env("RUST_LOG", "warn")
            .spawn()?;
        let plan = Plan {
            token: token.clone(),
            conversation: Uuid::nil(),
            sender: false,
            observer: false,
            index: 0,
            addr,
            cross: false,
            slow: false,
        };
        let elapsed = loop {
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!("server did not accept a WebSocket within 30 s");
            }
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    if hello_over(stream, &plan, addr).await.is_ok() {
                        break t.elapsed();
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_micros(500)).await,
            }
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(rss_kib(child.id()).unwrap_or(0));
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        startup_ms.push(elapsed.as_secs_f64() * 1000.0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut rss_f: Vec<f64> = rss.iter().map(|r| *r as f64).collect();
    let report = json!({
        "runs": runs,
        "start_to_first_ws_ms": {"median": median(&mut startup_ms.clone()), "all": startup_ms},
        "idle_rss_kib": {"median": median(&mut rss_f), "all": rss},
    });
    if !args.json {
        println!(
            "postline-bench cold start: {runs} runs, start -> first WebSocket median {:.1} ms, idle RSS median {:.0} KiB",
            report["start_to_first_ws_ms"]["median"].as_f64().unwrap_or(0.0),
            report["idle_rss_kib"]["median"].as_f64().unwrap_or(0.0)
        );
    }
    println!("{report}");
    Ok(())
}

type Ws = fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// The WebSocket handshake on `stream`, authenticated by `?token=`.
async fn open_ws(stream: TcpStream, addr: SocketAddr, token: &str) -> anyhow::Result<Ws> {
    let req = Request::builder()
        .method("GET")
        .uri(format!("http://{addr}/ws?token={token}"))
        .header("Host", addr.to_string())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())?;
    let (ws, _) = fastwebsockets::handshake::client(&Executor, req, stream).await?;
    Ok(ws)
}

/// Upgrade `stream` and read the hello frame.
async fn hello_over(stream: TcpStream, plan: &Plan, addr: SocketAddr) -> anyhow::Result<()> {
    let mut ws = open_ws(stream, addr, &plan.token).await?;
    let hello = ws.read_frame().await?;
    if frame_type(&hello.payload) != b"hello" {
        bail!("expected hello");
    }
    Ok(())
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
        return cold_start_benchmark(&args, runs.max(1)).await;
    }
    if let Some(jobs) = args.persist_jobs {
        return persist_benchmark(&args, jobs).await;
    }
    if args.conversations == 0 || args.connections < args.conversations {
        bail!("need at least one connection per conversation");
    }
    let secret = args
        .secret
        .clone()
        .unwrap_or_else(|| postline::config::DEV_JWT_SECRET.to_owned());
    let jwt = Jwt::new(secret.as_bytes());
    let ttl = Duration::from_secs(3600);

    let gateways: Vec<SocketAddr> = std::iter::once(args.addr)
        .chain(args.also.iter().copied())
        .collect();
    // Users and conversations.
    let users: Vec<UserId> = (0..args.connections)
        .map(|_| UserId(Uuid::new_v4()))
        .collect();
    let mut conversations = Vec::with_capacity(args.conversations);
    for c in 0..args.conversations {
        let members: Vec<UserId> = users
            .iter()
            .skip(c)
            .step_by(args.conversations)
            .copied()
            .collect();
        let owner = members[0];
        let first: Vec<UserId> = members[1..].iter().take(999).copied().collect();
        let v = http_json(
            args.addr,
            "POST",
            "/v1/conversations",
            &jwt.issue(owner, ttl),
            &json!({"title": format!("bench {c}"), "member_ids": first}),
        )
        .await?;
        let id: Uuid = v["id"].as_str().context("conversation id")?.parse()?;
        for m in members.iter().skip(1000) {
            http_json(
                args.addr,
                "POST",
                &format!("/v1/conversations/{id}/members"),
                &jwt.issue(owner, ttl),
                &json!({"user_id": m}),
            )
            .await?;
        }
        conversations.push(id);
    }

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
    let secs = args.duration;
    let rss = args.server_pid.and_then(rss_kib);
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
        "errors": stats.errors.load(Ordering::Relaxed),
        "error_sample": *stats.error_sample.lock().unwrap(),
        "failed_connections": failed,
        "failure_sample": first_failure,
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
        println!("  sends/s {:>10.0}   deliveries/s {:>10.0}   persisted/s {:>10.0}   errors {}   failed connections {}",
            report["sends_per_s"].as_f64().unwrap_or(0.0), report["deliveries_per_s"].as_f64().unwrap_or(0.0), report["persisted_per_s"].as_f64().unwrap_or(0.0),
            report["errors"], failed);
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

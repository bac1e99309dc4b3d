//! One connection of the latency run: its plan, connecting and joining,
//! then sending at the fixed rate and recording what it receives.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::latency::{Stats, SHARDS};
use crate::ws::{ack_ref, event, kind, message_id, open_socketio, open_ws, stamp, WsRead, WsWrite};
use crate::Args;

/// Sends remembered per connection for matching acks: far more than a
/// sender has in flight at any rate the server accepts.
const SENT_SLOTS: usize = 64;

/// Messages an observer remembers to time their `message_persisted`.
const RECENT_MESSAGES: usize = 256;

/// What one connection is and does: its user's token, the conversation it
/// joins, the gateway it uses, and its part in the run.
pub(crate) struct Plan {
    pub(crate) token: String,
    pub(crate) conversation: Uuid,
    pub(crate) sender: bool,
    pub(crate) index: usize,
    /// The gateway this connection uses.
    pub(crate) addr: SocketAddr,
    /// Never reads after joining.
    pub(crate) slow: bool,
    /// Whether it is not the gateway the conversation's senders use.
    pub(crate) cross: bool,
    /// One connection per conversation counts `message_persisted`, so
    /// persisted/s counts messages, not deliveries of the notice.
    pub(crate) observer: bool,
}

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
    let sio = args.socketio;
    let ws = if sio {
        open_socketio(stream, plan.addr, &plan.token).await?
    } else {
        open_ws(stream, plan.addr, &plan.token).await?
    };
    let (mut rx, mut tx) = ws.split(tokio::io::split);
    let mut no_obligations = |_: Frame<'_>| async { Ok::<(), WebSocketError>(()) };
    let hello = loop {
        let f = rx.read_frame(&mut no_obligations).await?;
        if !(sio && crate::ws::is_ping(&f.payload)) {
            break f;
        }
    };
    if kind(&hello.payload, sio) != b"hello" {
        bail!("expected hello");
    }
    let join = event(
        sio,
        "join_conversation",
        0,
        &format!(r#""conversation_id":"{}""#, plan.conversation),
    );
    tx.write_frame(Frame::text(Payload::Borrowed(join.as_bytes())))
        .await?;
    loop {
        let f = rx.read_frame(&mut no_obligations).await?;
        match kind(&f.payload, sio) {
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
pub(crate) struct Start {
    pub(crate) ready: tokio::sync::mpsc::Sender<bool>,
    pub(crate) go: Arc<tokio::sync::Notify>,
    pub(crate) stop_at: Arc<AtomicU64>,
}

pub(crate) async fn run_connection(
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
    // When each of the last SENT_SLOTS sends left, by ref: an ack is matched
    // to its own send even if it comes after the next one.
    let sent_at: Arc<[AtomicU64; SENT_SLOTS]> =
        Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
    let reader_sent_at = sent_at.clone();
    let reader_stats = stats.clone();
    let observer = plan.observer;
    let cross = plan.cross;
    let sio = args.socketio;
    let reader = tokio::spawn(async move {
        let shard = idx % SHARDS;
        // The observer's recent messages, (id, send stamp), to time their
        // confirmations: a few hundred ms of a busy room.
        let mut recent: VecDeque<(Vec<u8>, u64)> = VecDeque::new();
        loop {
            let f = match rx.read_frame(&mut no_obligations).await {
                Ok(f) => f,
                Err(_) => return,
            };
            if f.opcode == OpCode::Close {
                return;
            }
            let now = reader_stats.now_ns();
            match kind(&f.payload, sio) {
                b"new_message" => {
                    if let Some(t) = stamp(&f.payload) {
                        if observer {
                            if let Some(id) = message_id(&f.payload) {
                                if recent.len() == RECENT_MESSAGES {
                                    recent.pop_front();
                                }
                                recent.push_back((id.to_vec(), t));
                            }
                        }
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
                b"message_persisted" if observer => {
                    if reader_stats.in_window(now) {
                        reader_stats.persisted.fetch_add(1, Ordering::Relaxed);
                    }
                    let id = message_id(&f.payload).unwrap_or_default();
                    if let Some(i) = recent.iter().position(|(m, _)| m == id) {
                        let (_, t) = recent.remove(i).unwrap_or_default();
                        if reader_stats.in_window(t) {
                            let us = (now.saturating_sub(t) / 1000).max(1);
                            reader_stats
                                .persisted_latency
                                .lock()
                                .unwrap()
                                .record(us)
                                .ok();
                        }
                    }
                }
                b"ack" => {
                    reader_stats.acks.fetch_add(1, Ordering::Relaxed);
                    let sent = ack_ref(&f.payload, sio)
                        .map(|n| reader_sent_at[n as usize % SENT_SLOTS].load(Ordering::Relaxed));
                    if let Some(t) = sent.filter(|t| reader_stats.in_window(*t)) {
                        let us = (now.saturating_sub(t) / 1000).max(1);
                        reader_stats.ack_latency.lock().unwrap().record(us).ok();
                    }
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
            sent_at[n as usize % SENT_SLOTS].store(t, Ordering::Relaxed);
            let msg = event(
                args.socketio,
                "send_message",
                n,
                &format!(
                    r#""conversation_id":"{}","client_message_id":"{idx}-{n}","content":"t={t};{pad}""#,
                    plan.conversation
                ),
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

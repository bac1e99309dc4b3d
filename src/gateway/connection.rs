//! One WebSocket: a reader task that turns frames into whole client
//! messages, and a writer task that owns the sink and drains the bounded
//! outbox. Nothing else touches the socket.
//!
//! fastwebsockets' `read_frame` is not cancel-safe (bytes read before a
//! cancellation are lost), so it runs only in the reader task's own loop and
//! never in a `select!`; the session waits on a channel instead, which is.
//!
//! Liveness: the writer pings every `ping_interval`; the reader stamps
//! [`LastRead`] on every frame (pongs included), and the writer closes a
//! connection silent for `read_timeout` with 4000, which also ends `next`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketRead, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::cadence::Cadence;
use super::write_buffer::WriteBuffer;
use crate::protocol::{close, server, socketio, Framing};
use crate::rooms::{Outbox, OutboxReceiver, Urgency};

pub(super) type Io = TokioIo<Upgraded>;

/// Most bytes coalesced per connection before a write; a flush happens
/// sooner whenever the outbox runs empty. Held only during a burst (see
/// [`WriteBuffer`]).
const WRITE_BUFFER: usize = 16 * 1024;

/// Frames written back to back before a flush, so one busy connection cannot
/// hold its writer's thread for long.
const MAX_FRAMES_PER_FLUSH: usize = 64;

/// How long a closing connection's writer may take to flush before the
/// socket is dropped (a peer that stopped reading would block it forever).
const WRITER_GRACE: Duration = Duration::from_secs(2);

/// Whole messages read ahead of the session. Small: when the session is
/// busy the reader stops reading and TCP pushes back on the client. Each is
/// at most `max_frame_bytes`, so this bounds the bytes held too.
const INBOUND_MESSAGES: usize = 4;

/// Frames the reader owes the peer by protocol (pong, close echo) or decides
/// to send itself (close with a reason). Tiny: only the reader feeds it.
type Control = (OpCode, Vec<u8>);

/// What the reader hands the session.
#[derive(Debug)]
pub(super) enum Inbound {
    /// A complete text message (fragments reassembled, UTF-8 checked).
    Text(Vec<u8>),
    Binary,
    /// A Socket.IO packet the codec could not turn into a native frame; the
    /// session answers it (to its acknowledgement id when known). Boxed:
    /// rare, and every connection's channel holds a block of 32 slots of
    /// this enum's size.
    Refused(Box<socketio::Refused>),
}

/// Settings of one socket.
pub(super) struct SocketLimits {
    pub max_message_bytes: usize,
    /// On shutdown the client is told to reconnect after this pause.
    pub reconnect_after: Duration,
    /// The writer pings this often...
    pub ping_interval: Duration,
    /// ...and closes the connection (4000) when nothing was read for this long.
    pub read_timeout: Duration,
    /// A frame that may wait is held at most this long, and only when the
    /// connection's next urgent frame is expected by then (see [`Cadence`]).
    pub persisted_hold: Duration,
}

/// When the reader last read a frame, as milliseconds since `start`: one
/// atomic the reader stores and the writer loads, no lock, no channel.
struct LastRead {
    start: Instant,
    millis: AtomicU64,
}

/// Stored while the reader waits for the session to take a message: it is
/// not reading then, so the client's silence says nothing.
const NOT_READING: u64 = u64::MAX;

impl LastRead {
    fn new() -> Self {
        LastRead {
            start: Instant::now(),
            millis: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        // Saturates after 584 million years; the sentinel is never reached.
        (self.start.elapsed().as_millis() as u64).min(NOT_READING - 1)
    }

    fn touch(&self) {
        self.millis.store(self.now(), Ordering::Relaxed);
    }

    fn pause(&self) {
        self.millis.store(NOT_READING, Ordering::Relaxed);
    }

    /// How long the client has been silent; None while the reader is paused.
    fn silent_for(&self) -> Option<Duration> {
        match self.millis.load(Ordering::Relaxed) {
            NOT_READING => None,
            at => Some(Duration::from_millis(self.now().saturating_sub(at))),
        }
    }
}

/// The socket of one client, as the session sees it: messages in, frames
/// out through the outbox.
pub(super) struct Connection {
    codec: Framing,
    inbound: mpsc::Receiver<Inbound>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// Held so the writer keeps its control channel open until it is told
    /// to stop (by shutdown, slowness or `closed`).
    _control: mpsc::Sender<Control>,
    closed: CancellationToken,
    /// Cancelled when the writer ends (idle close, broken socket): nothing
    /// more can reach the client, so the session should end too.
    writer_done: CancellationToken,
}

impl Connection {
    /// Split the socket and start its reader and writer.
    pub(super) fn start(
        ws: fastwebsockets::WebSocket<Io>,
        codec: Framing,
        limits: SocketLimits,
        out: OutboxReceiver,
        outbox: &Outbox,
        shutdown: CancellationToken,
    ) -> Connection {
        // Frames are written into a buffer and flushed once the outbox is
        // empty, so a burst costs one syscall, not one each.
        let (mut read, write) = ws.split(|io| {
            let (r, w) = tokio::io::split(io);
            (r, WriteBuffer::new(w, WRITE_BUFFER))
        });
        // fastwebsockets refuses a frame whose length equals its limit; ours
        // is the largest size accepted.
        read.set_max_message_size(limits.max_message_bytes.saturating_add(1));
        read.set_auto_close(true);
        read.set_auto_pong(true);
        let (control, control_rx) = mpsc::channel::<Control>(8);
        let (inbound_tx, inbound) = mpsc::channel(INBOUND_MESSAGES);
        let closed = CancellationToken::new();
        let writer_done = CancellationToken::new();
        let last_read = Arc::new(LastRead::new());
        let reader = tokio::spawn(read_loop(
            read,
            codec,
            limits.max_message_bytes,
            inbound_tx,
            control.clone(),
            last_read.clone(),
        ));
        let writer = tokio::spawn(
            Writer {
                write,
                codec,
                head: Vec::new(),
                out,
                control: control_rx,
                slow: outbox.slow_signal().clone(),
                shutdown,
                closed: closed.clone(),
                reconnect_after: limits.reconnect_after,
                hold: limits.persisted_hold,
                liveness: Liveness {
                    last_read,
                    ping_interval: limits.ping_interval,
                    read_timeout: limits.read_timeout,
                },
            }
            .run(writer_done.clone()),
        );
        Connection {
            codec,
            inbound,
            reader,
            writer,
            _control: control,
            closed,
            writer_done,
        }
    }

    /// The next whole message; `None` once the peer closed or broke the
    /// protocol (the reader has already queued the close frame), or the
    /// writer ended (idle timeout, broken socket). Cancel-safe.
    pub(super) async fn next(&mut self) -> Option<Inbound> {
        tokio::select! {
            m = self.inbound.recv() => m,
            _ = self.writer_done.cancelled() => None,
        }
    }

    /// Close with `code`: the writer sends it ahead of anything still
    /// queued, then as [`Connection::close`].
    pub(super) async fn close_with(self, code: u16, reason: &[u8]) {
        // Socket.IO clients reconnect after a bare close; a DISCONNECT
        // first says the server meant it (an expired token, a flood).
        if self.codec == Framing::SocketIo && !close::should_reconnect(code) {
            let _ = self
                ._control
                .try_send((OpCode::Text, socketio::DISCONNECT.to_vec()));
        }
        let _ = self._control.try_send(close_frame(code, reason));
        self.close().await;
    }

    /// Stop reading, let the writer finish what it owes (bounded), drop the socket.
    pub(super) async fn close(self) {
        self.reader.abort();
        self.closed.cancel();
        let mut writer = self.writer;
        if tokio::time::timeout(WRITER_GRACE, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
    }
}

fn close_frame(code: u16, reason: &[u8]) -> Control {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    (OpCode::Close, p)
}

/// Whether the client masked this frame. fastwebsockets keeps the mask after
/// unmasking but exposes it only through the header it would write, whose
/// mask bit says so; formatting a header changes nothing in the frame.
fn was_masked(frame: &mut Frame<'_>) -> bool {
    let mut head = [0u8; 14];
    frame.fmt_head(&mut head);
    head[1] & 0x80 != 0
}

/// Read frames until the peer closes or breaks the protocol. Ends by
/// dropping `inbound`, which the session sees as the end of the connection.
async fn read_loop(
    mut read: WebSocketRead<ReadHalf<Io>>,
    codec: Framing,
    max: usize,
    inbound: mpsc::Sender<Inbound>,
    control: mpsc::Sender<Control>,
    last_read: Arc<LastRead>,
) {
    // Reassembly of a fragmented message, bounded by the same limit as a frame.
    let mut fragments: Option<Vec<u8>> = None;
    loop {
        // Waiting for room (rather than failing when full) means a ping flood
        // only slows this reader down to the writer's pace; it never drops
        // the connection.
        let mut obligated = |frame: Frame<'_>| {
            let owed = (frame.opcode, Vec::from(frame.payload));
            let control = control.clone();
            async move { control.send(owed).await.map_err(|_| "connection closing") }
        };
        let mut frame = match read.read_frame(&mut obligated).await {
            Ok(f) => {
                last_read.touch();
                f
            }
            Err(e) => {
                let close = match e {
                    WebSocketError::FrameTooLarge => {
                        close_frame(close::TOO_BIG, b"frame too large")
                    }
                    WebSocketError::InvalidUTF8 => {
                        close_frame(close::INVALID_PAYLOAD, b"invalid utf-8")
                    }
                    WebSocketError::UnexpectedEOF
                    | WebSocketError::ConnectionClosed
                    | WebSocketError::IoError(_) => return,
                    _ => close_frame(close::PROTOCOL_ERROR, b"protocol error"),
                };
                let _ = control.try_send(close);
                return;
            }
        };
        // RFC 6455 5.1: a server must close on an unmasked client frame.
        if !was_masked(&mut frame) {
            let _ = control.try_send(close_frame(
                close::PROTOCOL_ERROR,
                b"client frames must be masked",
            ));
            return;
        }
        let message = match frame.opcode {
            OpCode::Close => return,
            OpCode::Ping | OpCode::Pong => continue,
            OpCode::Binary => Inbound::Binary,
            OpCode::Text if fragments.is_some() => {
                let _ = control.try_send(close_frame(
                    close::PROTOCOL_ERROR,
                    b"new message inside a fragmented one",
                ));
                return;
            }
            OpCode::Text if frame.fin => Inbound::Text(Vec::from(frame.payload)),
            OpCode::Text => {
                fragments = Some(Vec::from(frame.payload));
                continue;
            }
            OpCode::Continuation => {
                let Some(buf) = fragments.as_mut() else {
                    let _ = control.try_send(close_frame(
                        close::PROTOCOL_ERROR,
                        b"unexpected continuation",
                    ));
                    return;
                };
                if buf.len() + frame.payload.len() > max {
                    let _ = control.try_send(close_frame(close::TOO_BIG, b"message too large"));
                    return;
                }
                buf.extend_from_slice(&frame.payload);
                if !frame.fin {
                    continue;
                }
                let whole = fragments.take().unwrap_or_default();
                if std::str::from_utf8(&whole).is_err() {
                    let _ = control.try_send(close_frame(close::INVALID_PAYLOAD, b"invalid utf-8"));
                    return;
                }
                Inbound::Text(whole)
            }
        };
        let message = match (codec, message) {
            (Framing::SocketIo, Inbound::Text(text)) => match socketio::decode(&text) {
                Ok(socketio::Packet::Event(native)) => Inbound::Text(native),
                Ok(socketio::Packet::Pong) => continue,
                Ok(socketio::Packet::Ping(data)) => {
                    let mut pong = socketio::PONG.to_vec();
                    pong.extend_from_slice(&data);
                    if control.send((OpCode::Text, pong)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Ok(socketio::Packet::Close) => return,
                Ok(socketio::Packet::Connect(_)) => Inbound::Refused(Box::new(socketio::Refused {
                    ack: None,
                    reason: "already connected to namespace \"/\"".into(),
                    fatal: false,
                })),
                Ok(socketio::Packet::ForeignNamespace(ns)) => {
                    if control
                        .send((OpCode::Text, socketio::invalid_namespace(&ns)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                Err(refused) if refused.fatal => {
                    let _ = control.try_send(close_frame(
                        close::PROTOCOL_ERROR,
                        b"invalid Socket.IO packet",
                    ));
                    return;
                }
                Err(refused) => Inbound::Refused(Box::new(refused)),
            },
            (_, message) => message,
        };
        // Waits while the session is busy: the socket is not read meanwhile,
        // and that wait is not the client's silence.
        match inbound.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(message)) => {
                last_read.pause();
                if inbound.send(message).await.is_err() {
                    return;
                }
                last_read.touch();
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// The writing half of a socket and everything that decides what it writes.
struct Writer {
    write: WebSocketWrite<WriteBuffer<WriteHalf<Io>>>,
    codec: Framing,
    /// Socket.IO: where a frame is wrapped (prefix, the shared bytes, a
    /// bracket) before it is written; reused, so no allocation per frame.
    head: Vec<u8>,
    out: OutboxReceiver,
    control: mpsc::Receiver<Control>,
    slow: CancellationToken,
    shutdown: CancellationToken,
    closed: CancellationToken,
    reconnect_after: Duration,
    /// How long frames that may wait sit in the write buffer unflushed.
    hold: Duration,
    liveness: Liveness,
}

/// What the writer needs to ping and to notice a silent client.
struct Liveness {
    last_read: Arc<LastRead>,
    ping_interval: Duration,
    read_timeout: Duration,
}

/// The writer's two deadlines, served by one timer (a `Sleep` is 112 bytes
/// of every idle connection's task), armed for the nearer.
struct Deadlines {
    /// When to look again at how long the client has been silent.
    idle: Instant,
    /// When frames that may wait, written to the buffer but not flushed,
    /// must be flushed; None when none are held. Every flush writes them.
    hold: Option<Instant>,
}

impl Deadlines {
    fn next(&self) -> Instant {
        self.hold.map_or(self.idle, |at| at.min(self.idle))
    }

    /// A flush wrote what was held: the timer goes back to the read
    /// deadline, so the end of the hold does not wake the writer for nothing.
    /// True if something was held.
    fn unhold(&mut self, timer: Pin<&mut Sleep>) -> bool {
        let held = self.hold.take().is_some();
        if held {
            timer.reset(self.next());
        }
        held
    }
}

impl Writer {
    async fn run(mut self, done: CancellationToken) {
        let _done = done.drop_guard();
        if let Err(e) = self.write_until_done().await {
            tracing::debug!(error = %e, "websocket write failed");
        }
    }

    async fn text(&mut self, frame: &[u8]) -> Result<(), WebSocketError> {
        let payload = match self.codec {
            Framing::Native => frame,
            // A room's broadcast, wrapped once for every Socket.IO member.
            Framing::SocketIo if socketio::is_wrapped(frame) => frame,
            // Its own replies and user pushes: wrapped here.
            Framing::SocketIo => {
                socketio::wrap(frame, &mut self.head);
                self.head.extend_from_slice(frame);
                self.head.extend_from_slice(socketio::TAIL);
                &self.head
            }
        };
        self.write
            .write_frame(Frame::text(Payload::Borrowed(payload)))
            .await
    }

    /// A keep-alive: a WebSocket ping, or Engine.IO's own ("2"), which
    /// Socket.IO clients expect and answer at their level.
    fn ping_frame(&self) -> Frame<'static> {
        match self.codec {
            Framing::Native => Frame::new(true, OpCode::Ping, None, Payload::Borrowed(&[])),
            Framing::SocketIo => Frame::text(Payload::Borrowed(socketio::PING)),
        }
    }

    async fn write_until_done(&mut self) -> Result<(), WebSocketError> {
        let every = self.liveness.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut due = Deadlines {
            idle: Instant::now() + self.liveness.read_timeout,
            hold: None,
        };
        let timer = tokio::time::sleep_until(due.next());
        tokio::pin!(timer);
        let mut cadence = Cadence::default();
        loop {
            tokio::select! {
                biased;
                c = self.control.recv() => {
                    let Some((opcode, payload)) = c else { return Ok(()) };
                    self.write.write_frame(Frame::new(true, opcode, None, Payload::Owned(payload))).await?;
                    self.write.flush().await?;
                    due.unhold(timer.as_mut());
                    if opcode == OpCode::Close {
                        return Ok(());
                    }
                }
                _ = self.slow.cancelled() => {
                    // The close replaces what is still queued: a client this
                    // far behind resyncs by seq anyway, and writing up to a
                    // whole budget first would delay the close past
                    // WRITER_GRACE for a client that reads slowly.
                    self.write.write_frame(Frame::close(close::SLOW_CONSUMER, b"slow consumer: reconnect and resync")).await?;
                    return self.write.flush().await;
                }
                // Before the outbox, so a busy room cannot starve them.
                _ = ping.tick() => {
                    let ping = self.ping_frame();
                    self.write.write_frame(ping).await?;
                    self.write.flush().await?;
                    due.unhold(timer.as_mut());
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if due.hold.is_some_and(|at| at <= now) {
                        self.write.flush().await?;
                        due.hold = None;
                        cadence.missed();
                    }
                    if due.idle <= now {
                        let timeout = self.liveness.read_timeout;
                        match self.liveness.last_read.silent_for() {
                            Some(silent) if silent >= timeout => {
                                self.write.write_frame(Frame::close(close::IDLE_TIMEOUT, b"idle timeout: reconnect")).await?;
                                return self.write.flush().await;
                            }
                            // Heard from within the timeout: look again when
                            // it would run out.
                            Some(silent) => due.idle = now + (timeout - silent),
                            None => due.idle = now + timeout,
                        }
                    }
                    timer.as_mut().reset(due.next());
                }
                _ = self.shutdown.cancelled() => {
                    // What is already queued (acks of the last sends) goes first.
                    while let Some(o) = self.out.try_recv() {
                        self.text(&o.frame).await?;
                    }
                    let notice = server::reconnect(self.reconnect_after.as_millis() as u64);
                    self.text(&notice).await?;
                    self.write.write_frame(Frame::close(close::GOING_AWAY, b"server shutting down")).await?;
                    return self.write.flush().await;
                }
                o = self.out.recv() => {
                    let Some(o) = o else { return self.write.flush().await };
                    let mut urgent = o.urgency == Urgency::Now;
                    self.text(&o.frame).await?;
                    // Whatever else is already queued goes out in the same write.
                    for _ in 1..MAX_FRAMES_PER_FLUSH {
                        // Flagged slow meanwhile: the close goes next (above).
                        if self.out.overflowed() {
                            break;
                        }
                        match self.out.try_recv() {
                            Some(o) => {
                                urgent |= o.urgency == Urgency::Now;
                                self.text(&o.frame).await?;
                            }
                            None => break,
                        }
                    }
                    let now = Instant::now();
                    if urgent {
                        cadence.urgent(now);
                        self.write.flush().await?;
                        if due.unhold(timer.as_mut()) {
                            cadence.paid();
                        }
                    } else if due.hold.is_some() {
                        // Held already: the first held frame's deadline stands.
                    } else if !self.hold.is_zero() && cadence.hold(now, self.hold) {
                        due.hold = Some(now + self.hold);
                        timer.as_mut().reset(due.next());
                    } else {
                        self.write.flush().await?;
                    }
                }
                // What was held goes out too: the session is done, the
                // socket is not.
                _ = self.closed.cancelled() => return self.write.flush().await,
            }
        }
    }
}

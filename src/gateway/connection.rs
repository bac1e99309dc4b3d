//! One WebSocket connection: a reader that decodes and dispatches events, and
//! a writer that owns the sink and drains the bounded outbox.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketRead, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{BufWriter, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::handlers::TypingStates;
use super::Gateway;
use crate::domain::{now_micros, ConversationId, UserId};
use crate::protocol::client::{decode, Request};
use crate::protocol::{close, server, ErrorCode};
use crate::rooms::{ConnectionId, Outbox};

type Io = TokioIo<Upgraded>;

/// Bytes coalesced per connection before a write; a flush happens sooner
/// whenever the outbox runs empty.
const WRITE_BUFFER: usize = 16 * 1024;

/// Frames written back to back before a flush, so one busy connection cannot
/// hold its writer's thread for long.
const MAX_FRAMES_PER_FLUSH: usize = 64;

/// How long a closing connection's writer may take to flush before the
/// socket is dropped (a peer that stopped reading would block it forever).
const WRITER_GRACE: Duration = Duration::from_secs(2);

/// Frames the reader owes the peer by protocol (pong, close echo) or decides
/// to send itself (close with a reason). Tiny: only the reader feeds it.
type Control = (OpCode, Vec<u8>);

pub(super) async fn run(
    gw: Arc<Gateway>,
    user: UserId,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
) {
    let ws = match upgrade.await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            return;
        }
    };
    // Frames are written into a buffer and flushed once the outbox is empty,
    // so a burst (a batch of message_persisted, say) costs one syscall, not one each.
    let (mut read, write) = ws.split(|io| {
        let (r, w) = tokio::io::split(io);
        (r, tokio::io::BufWriter::with_capacity(WRITE_BUFFER, w))
    });
    read.set_max_message_size(gw.cfg.max_frame_bytes);
    read.set_auto_close(true);
    read.set_auto_pong(true);

    let id = ConnectionId::next();
    let (outbox, out_rx) = Outbox::new(gw.cfg.outbox_capacity);
    let (ctl_tx, ctl_rx) = mpsc::channel::<Control>(8);
    let reader_done = CancellationToken::new();
    let writer = tokio::spawn(write_loop(
        write,
        out_rx,
        ctl_rx,
        outbox.slow_signal().clone(),
        gw.shutdown.clone(),
        reader_done.clone(),
        // Spread reconnects over the drain window (no thundering herd).
        gw.cfg.drain_window.mul_f64(crate::domain::random_unit()),
    ));

    gw.metrics.connection_opened();
    let mut conn = Connection {
        id,
        user,
        outbox: outbox.clone(),
        joined: HashMap::new(),
        typing: TypingStates::default(),
        gw: gw.clone(),
    };
    conn.push(server::hello(user, &id.0.to_string(), now_micros()));
    let transition = gw.users.connect(user, id, outbox);
    gw.on_presence(user, transition);

    conn.read_loop(&mut read, &ctl_tx).await;

    conn.stop_all_typing();
    for (conv, _) in conn.joined.drain() {
        gw.rooms.leave(conv, id);
    }
    let transition = gw.users.disconnect(user, id);
    gw.on_presence(user, transition);
    reader_done.cancel();
    let mut writer = writer;
    if tokio::time::timeout(WRITER_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    gw.metrics.connection_closed();
}

pub(super) struct Connection {
    pub(super) id: ConnectionId,
    pub(super) user: UserId,
    pub(super) outbox: Outbox,
    /// Conversations this connection joined (a superset of its rooms: the
    /// HTTP API may evict it), each with the room's broadcast mark at the
    /// join, so `sync` knows what reached this connection live.
    pub(super) joined: HashMap<ConversationId, u64>,
    pub(super) typing: TypingStates,
    pub(super) gw: Arc<Gateway>,
}

impl Connection {
    pub(super) fn push(&self, frame: Bytes) {
        // Overflow flags the connection slow and the writer closes it; there
        // is nothing more to do here.
        let _ = self.outbox.push(frame);
    }

    pub(super) fn reply_error(&self, r#ref: Option<&str>, code: ErrorCode, message: &str) {
        self.push(server::error(r#ref, code, message));
    }

    pub(super) fn reply_ack(&self, r#ref: Option<&str>, result: &serde_json::Value) {
        // Acks answer a `ref`; a frame without one asked for no reply.
        if r#ref.is_some() {
            self.push(server::ack(r#ref, result));
        }
    }

    async fn read_loop(
        &mut self,
        read: &mut WebSocketRead<ReadHalf<Io>>,
        ctl: &mpsc::Sender<Control>,
    ) {
        let slow = self.outbox.slow_signal().clone();
        let shutdown = self.gw.shutdown.clone();
        let max = self.gw.cfg.max_frame_bytes;
        // Reassembly of a fragmented message, bounded by the same limit as a frame.
        let mut fragments: Option<Vec<u8>> = None;
        loop {
            let mut obligated = |frame: Frame<'_>| {
                let sent = ctl.try_send((frame.opcode, Vec::from(frame.payload)));
                async move { sent.map_err(|_| "control queue full") }
            };
            // read_frame is not cancel-safe, but a cancelled read is only ever
            // followed by closing the connection, so no frame is half-consumed.
            let frame = tokio::select! {
                biased;
                _ = slow.cancelled() => return,
                _ = shutdown.cancelled() => return,
                f = read.read_frame(&mut obligated) => f,
            };
            let mut frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    let (code, reason): (u16, &[u8]) = match e {
                        WebSocketError::FrameTooLarge => (close::TOO_BIG, b"frame too large"),
                        WebSocketError::UnexpectedEOF | WebSocketError::ConnectionClosed => return,
                        WebSocketError::IoError(_) => return,
                        _ => (close::PROTOCOL_ERROR, b"protocol error"),
                    };
                    let _ = ctl.try_send((OpCode::Close, close_payload(code, reason)));
                    return;
                }
            };
            match frame.opcode {
                OpCode::Close => return,
                OpCode::Text if frame.fin && fragments.is_none() => {
                    self.handle(frame.payload.to_mut()).await;
                }
                OpCode::Text if fragments.is_none() => {
                    fragments = Some(Vec::from(frame.payload));
                }
                OpCode::Continuation => {
                    let Some(buf) = fragments.as_mut() else {
                        let _ = ctl.try_send((
                            OpCode::Close,
                            close_payload(close::PROTOCOL_ERROR, b"unexpected continuation"),
                        ));
                        return;
                    };
                    if buf.len() + frame.payload.len() > max {
                        let _ = ctl.try_send((
                            OpCode::Close,
                            close_payload(close::TOO_BIG, b"message too large"),
                        ));
                        return;
                    }
                    buf.extend_from_slice(&frame.payload);
                    if frame.fin {
                        let mut whole = fragments.take().unwrap_or_default();
                        if std::str::from_utf8(&whole).is_err() {
                            let _ = ctl
                                .try_send((OpCode::Close, close_payload(1007, b"invalid utf-8")));
                            return;
                        }
                        self.handle(&mut whole).await;
                    }
                }
                OpCode::Binary => self.reply_error(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text frames",
                ),
                OpCode::Text => {
                    let _ = ctl.try_send((
                        OpCode::Close,
                        close_payload(
                            close::PROTOCOL_ERROR,
                            b"new message inside a fragmented one",
                        ),
                    ));
                    return;
                }
                OpCode::Ping | OpCode::Pong => {}
            }
        }
    }

    /// The one place a client event enters the system.
    async fn handle(&mut self, buf: &mut [u8]) {
        match decode(buf, self.gw.cfg.decode_limits()) {
            Ok(Request { r#ref, event }) => self.dispatch(r#ref.as_deref(), event).await,
            Err(e) => self.reply_error(e.r#ref.as_deref(), e.code, &e.message),
        }
    }
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

async fn write_loop(
    mut write: WebSocketWrite<BufWriter<WriteHalf<Io>>>,
    mut out: mpsc::Receiver<Bytes>,
    mut ctl: mpsc::Receiver<Control>,
    slow: CancellationToken,
    shutdown: CancellationToken,
    reader_done: CancellationToken,
    reconnect_after: Duration,
) {
    let result: Result<(), WebSocketError> = async {
        loop {
            tokio::select! {
                biased;
                c = ctl.recv() => {
                    let Some((opcode, payload)) = c else { return Ok(()) };
                    write.write_frame(Frame::new(true, opcode, None, Payload::Owned(payload))).await?;
                    write.flush().await?;
                    if opcode == OpCode::Close {
                        return Ok(());
                    }
                }
                _ = slow.cancelled() => {
                    write.write_frame(Frame::close(close::SLOW_CONSUMER, b"slow consumer: reconnect and resync")).await?;
                    return write.flush().await;
                }
                _ = shutdown.cancelled() => {
                    // What is already queued (acks of the last sends) goes first.
                    while let Ok(frame) = out.try_recv() {
                        write.write_frame(Frame::text(Payload::Borrowed(&frame))).await?;
                    }
                    let notice = server::reconnect(reconnect_after.as_millis() as u64);
                    write.write_frame(Frame::text(Payload::Borrowed(&notice))).await?;
                    write.write_frame(Frame::close(close::GOING_AWAY, b"server shutting down")).await?;
                    return write.flush().await;
                }
                f = out.recv() => {
                    let Some(frame) = f else { return Ok(()) };
                    write.write_frame(Frame::text(Payload::Borrowed(&frame))).await?;
                    // Whatever else is already queued goes out in the same write.
                    for _ in 1..MAX_FRAMES_PER_FLUSH {
                        match out.try_recv() {
                            Ok(frame) => write.write_frame(Frame::text(Payload::Borrowed(&frame))).await?,
                            Err(_) => break,
                        }
                    }
                    write.flush().await?;
                }
                _ = reader_done.cancelled() => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "websocket write failed");
    }
}

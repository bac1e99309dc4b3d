//! One WebSocket connection: a reader that decodes and dispatches events, and
//! a writer that owns the sink and drains the bounded outbox.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketRead, WebSocketWrite};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{BufWriter, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Gateway;
use crate::domain::{now_micros, ConversationId, Message, MessageId, UserId};
use crate::protocol::client::{decode, ClientEvent, Request, SendMessage};
use crate::protocol::{close, server, ErrorCode};
use crate::queue::{EnqueueError, PersistJob};
use crate::rooms::{ConnectionId, Member, Outbox, Push};
use crate::store::Access;

type Io = TokioIo<Upgraded>;

/// Bytes coalesced per connection before a write; a flush happens sooner
/// whenever the outbox runs empty.
const WRITE_BUFFER: usize = 16 * 1024;

/// Frames written back to back before a flush, so one busy connection cannot
/// hold its writer's thread for long.
const MAX_FRAMES_PER_FLUSH: usize = 64;

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
    ));

    gw.metrics.connection_opened();
    let mut conn = Connection {
        id,
        user,
        outbox,
        joined: HashSet::new(),
        gw: gw.clone(),
    };
    conn.push(server::hello(user, &id.0.to_string(), now_micros()));
    conn.read_loop(&mut read, &ctl_tx).await;

    for conv in conn.joined.drain() {
        gw.rooms.leave(conv, id);
    }
    reader_done.cancel();
    let _ = writer.await;
    gw.metrics.connection_closed();
}

struct Connection {
    id: ConnectionId,
    user: UserId,
    outbox: Outbox,
    /// Conversations this connection joined (a superset of its rooms: the
    /// HTTP API may evict it), so it can leave them all on close.
    joined: HashSet<ConversationId>,
    gw: Arc<Gateway>,
}

impl Connection {
    fn push(&self, frame: Bytes) {
        // Overflow flags the connection slow and the writer closes it; there
        // is nothing more to do here.
        let _ = self.outbox.push(frame);
    }

    fn reply_error(&self, r#ref: Option<&str>, code: ErrorCode, message: &str) {
        self.push(server::error(r#ref, code, message));
    }

    fn reply_ack(&self, r#ref: Option<&str>, result: &serde_json::Value) {
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
        let Request { r#ref, event } = match decode(buf, self.gw.cfg.decode_limits()) {
            Ok(req) => req,
            Err(e) => {
                self.reply_error(e.r#ref.as_deref(), e.code, &e.message);
                return;
            }
        };
        let r = r#ref.as_deref();
        match event {
            ClientEvent::JoinConversation { conversation_id } => {
                self.join(r, conversation_id).await
            }
            ClientEvent::LeaveConversation { conversation_id } => {
                self.joined.remove(&conversation_id);
                if self.gw.rooms.leave(conversation_id, self.id) {
                    self.reply_ack(r, &json!({ "conversation_id": conversation_id }));
                } else {
                    self.reply_error(r, ErrorCode::NotJoined, "not joined to this conversation");
                }
            }
            ClientEvent::SendMessage(send) => self.send_message(r, send),
            ClientEvent::Typing {
                conversation_id,
                is_typing,
            } => {
                if !self.gw.rooms.is_joined(conversation_id, self.id) {
                    self.reply_error(r, ErrorCode::NotJoined, "join the conversation first");
                    return;
                }
                let frame = server::typing(conversation_id, self.user, is_typing);
                self.gw
                    .rooms
                    .broadcast(conversation_id, &frame, Some(self.id));
                self.reply_ack(r, &json!({}));
            }
            ClientEvent::Ping => self.reply_ack(r, &json!({ "server_time": now_micros() })),
        }
    }

    async fn join(&mut self, r: Option<&str>, conv: ConversationId) {
        match self.gw.store.access(conv, self.user).await {
            Ok(Access::Member { last_seq }) => {
                self.gw.rooms.join(
                    conv,
                    Member {
                        conn: self.id,
                        user: self.user,
                        outbox: self.outbox.clone(),
                    },
                );
                self.joined.insert(conv);
                self.reply_ack(r, &json!({ "conversation_id": conv, "last_seq": last_seq }));
            }
            Ok(Access::NotMember) => {
                self.reply_error(r, ErrorCode::Forbidden, "not a member of this conversation")
            }
            Ok(Access::NotFound) => {
                self.reply_error(r, ErrorCode::NotFound, "no such conversation")
            }
            Err(e) => {
                tracing::warn!(error = %e, "membership check failed");
                self.reply_error(
                    r,
                    ErrorCode::Unavailable,
                    "the database is unavailable; retry shortly",
                );
            }
        }
    }

    /// Broadcast at once; ack once the persist job is committed to the queue,
    /// so an acked message survives any crash.
    fn send_message(&self, r: Option<&str>, send: SendMessage) {
        let gw = &self.gw;
        let conv = send.conversation_id;
        if !gw.rooms.is_joined(conv, self.id) {
            self.reply_error(r, ErrorCode::NotJoined, "join the conversation first");
            return;
        }
        let id = MessageId::new_v7();
        if let Err(original) = gw.dedup.claim(self.user, conv, &send.client_message_id, id) {
            gw.metrics.add_duplicate();
            self.reply_ack(
                r,
                &json!({
                    "message_id": original,
                    "client_message_id": send.client_message_id,
                    "duplicate": true,
                }),
            );
            return;
        }
        let message = Message {
            id,
            conversation_id: conv,
            sender_id: self.user,
            client_message_id: send.client_message_id,
            kind: send.kind,
            content: send.content,
            created_at: now_micros(),
        };
        let job = match serde_json::to_value(PersistJob::from_message(&message)) {
            Ok(j) => j,
            Err(e) => {
                gw.dedup
                    .release(self.user, conv, &message.client_message_id);
                self.reply_error(
                    r,
                    ErrorCode::Internal,
                    &format!("could not encode the message: {e}"),
                );
                return;
            }
        };
        let ack = server::ack(
            r,
            &json!({
                "message_id": id,
                "client_message_id": message.client_message_id,
                "duplicate": false,
            }),
        );
        let outbox = self.outbox.clone();
        let reply_ref = r.map(str::to_owned);
        let (gw_done, user, cmid) = (gw.clone(), self.user, message.client_message_id.clone());
        let done = Box::new(move |res: Result<(), EnqueueError>| {
            if res.is_err() {
                // Not queued: a resend with the same client_message_id must be
                // treated as new, not acked as a duplicate of nothing.
                gw_done.dedup.release(user, conv, &cmid);
            }
            let _ = match res {
                Ok(()) if reply_ref.is_some() => outbox.push(ack),
                Ok(()) => Push::Queued,
                Err(EnqueueError::Unavailable) => outbox.push(server::error(
                    reply_ref.as_deref(),
                    ErrorCode::Unavailable,
                    "the message could not be made durable; send it again with the same client_message_id",
                )),
                Err(EnqueueError::Refused(reason)) => outbox.push(server::error(
                    reply_ref.as_deref(),
                    ErrorCode::Invalid,
                    &format!("the message cannot be stored: {reason}"),
                )),
            };
        });
        if gw.enqueuer.submit(job, done).is_err() {
            gw.dedup
                .release(self.user, conv, &message.client_message_id);
            self.reply_error(
                r,
                ErrorCode::Unavailable,
                "too many messages waiting to be stored; retry shortly",
            );
            return;
        }
        gw.metrics.add_sent();
        gw.rooms
            .broadcast(conv, &server::new_message(&message), None);
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

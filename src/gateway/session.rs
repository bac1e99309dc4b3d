//! One client's session: the connection's state (joined rooms, typing),
//! the loop that takes its messages in order, and `dispatch`, the one place
//! an event is routed to its handler. Replies go through the outbox only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, Inbound, SocketLimits};
use super::error::HandlerError;
use super::typing::TypingStates;
use super::Gateway;
use crate::domain::{now_micros, ConversationId, Seq, UserId};
use crate::limits::{Decision, Tolerance};
use crate::protocol::client::{decode, ClientEvent, Request};
use crate::protocol::server::{self, AckBody};
use crate::protocol::{close, ErrorCode};
use crate::rooms::{ConnectionId, Member, Outbox};
use crate::store::Access;

/// `sync`/`resume` requests one connection may have running at once; they
/// run beside the session so pings and sends are answered meanwhile.
const SYNCS_PER_CONNECTION: usize = 2;

/// A connection's handle for its handlers and the tasks they spawn. Cheap to clone.
#[derive(Clone)]
pub(super) struct Session {
    pub(super) id: ConnectionId,
    pub(super) user: UserId,
    pub(super) outbox: Outbox,
    /// Conversations this connection joined (a superset of its rooms: the
    /// HTTP API may evict it), each with the room's broadcast mark at the
    /// join, so `sync` knows what reached this connection live.
    joined: Arc<Mutex<HashMap<ConversationId, u64>>>,
    pub(super) typing: TypingStates,
    pub(super) syncs: Arc<Semaphore>,
    pub(super) gw: Arc<Gateway>,
    /// `rate_limited` refusals this connection may still collect.
    refusals: Arc<Tolerance>,
    /// Cancelled once it collected too many: it is closed with 1008.
    flooding: CancellationToken,
}

/// Run one upgraded WebSocket for `user` until it closes, the client proves
/// too slow, or the server shuts down.
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
    let (outbox, out_rx) = Outbox::new(gw.cfg.outbox_capacity);
    let limits = SocketLimits {
        max_message_bytes: gw.cfg.max_frame_bytes,
        // Spread reconnects over the drain window (no thundering herd).
        reconnect_after: gw.cfg.drain_window.mul_f64(crate::domain::random_unit()),
    };
    let mut conn = Connection::start(ws, limits, out_rx, &outbox, gw.shutdown.clone());
    gw.metrics.connection_opened();
    let session = Session {
        id: ConnectionId::next(),
        user,
        outbox: outbox.clone(),
        joined: Arc::default(),
        typing: TypingStates::default(),
        syncs: Arc::new(Semaphore::new(SYNCS_PER_CONNECTION)),
        gw: gw.clone(),
        refusals: Arc::new(gw.limits.tolerance()),
        flooding: CancellationToken::new(),
    };
    session.push(server::hello(user, &session.id.0.to_string(), now_micros()));
    gw.connected(user, session.id, outbox.clone());

    let slow = outbox.slow_signal().clone();
    loop {
        let message = tokio::select! {
            biased;
            _ = slow.cancelled() => break,
            _ = gw.shutdown.cancelled() => break,
            _ = session.flooding.cancelled() => {
                conn.close_with(close::POLICY_VIOLATION, b"rate limits ignored");
                break;
            }
            m = conn.next() => m,
        };
        match message {
            Some(Inbound::Text(mut buf)) => session.handle(&mut buf).await,
            Some(Inbound::Binary) => session.push(server::error(
                None,
                ErrorCode::BadRequest,
                "binary frames are not supported; send JSON text frames",
            )),
            None => break,
        }
    }

    session.stop_all_typing();
    for conv in session.joined_conversations() {
        gw.rooms.leave(conv, session.id);
    }
    gw.disconnected(user, session.id);
    conn.close().await;
    gw.metrics.connection_closed();
}

impl Session {
    pub(super) fn push(&self, frame: bytes::Bytes) {
        // Overflow flags the connection slow and the writer closes it; there
        // is nothing more to do here.
        let _ = self.outbox.push(frame);
    }

    /// The one reply to a request: its ack (only if it had a `ref`) or its error.
    pub(super) fn reply<T: AckBody>(&self, r#ref: Option<&str>, result: Result<T, HandlerError>) {
        match result {
            Ok(body) if r#ref.is_some() => self.push(server::ack(r#ref, &body)),
            Ok(_) => {}
            Err(e) => {
                if matches!(e, HandlerError::RateLimited { .. })
                    && self.refusals.exhausted_by_one_more()
                {
                    self.flooding.cancel();
                }
                self.push(e.frame(r#ref));
            }
        }
    }

    /// `Ok` if `decision` allows; else `rate_limited`, naming `what`.
    pub(super) fn allowed(
        &self,
        decision: Decision,
        what: &'static str,
    ) -> Result<(), HandlerError> {
        decision
            .into_result()
            .map_err(|wait| HandlerError::rate_limited(what, wait))
    }

    fn joined(&self) -> MutexGuard<'_, HashMap<ConversationId, u64>> {
        // Poisoning only means a panic elsewhere mid-update of a plain map.
        self.joined.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn joined_conversations(&self) -> Vec<ConversationId> {
        self.joined().drain().map(|(conv, _)| conv).collect()
    }

    /// The broadcast mark this connection joined `conv` at, if it is joined.
    pub(super) fn join_mark(&self, conv: ConversationId) -> Option<u64> {
        let mark = self.joined().get(&conv).copied()?;
        self.gw.rooms.is_joined(conv, self.id).then_some(mark)
    }

    pub(super) fn require_joined(&self, conv: ConversationId) -> Result<(), HandlerError> {
        if self.gw.rooms.is_joined(conv, self.id) {
            Ok(())
        } else {
            Err(HandlerError::NotJoined)
        }
    }

    /// The one place a client event enters the system.
    async fn handle(&self, buf: &mut [u8]) {
        match decode(buf, self.gw.cfg.decode_limits()) {
            Ok(Request { r#ref, event }) => self.dispatch(r#ref.as_deref(), event).await,
            Err(e) => self.push(server::error(e.r#ref.as_deref(), e.code, &e.message)),
        }
    }

    async fn dispatch(&self, r: Option<&str>, event: ClientEvent) {
        match event {
            ClientEvent::JoinConversation { conversation_id } => {
                let joined = match self.allowed(
                    self.gw.limits.join_per_user.check(&self.user),
                    "join_conversation: too many joins",
                ) {
                    Ok(()) => self.join(conversation_id).await,
                    Err(e) => Err(e),
                };
                self.reply(
                    r,
                    joined.map(|last_seq| server::Joined {
                        conversation_id,
                        last_seq,
                    }),
                );
            }
            ClientEvent::LeaveConversation { conversation_id } => {
                self.reply(r, self.leave(conversation_id));
            }
            ClientEvent::SendMessage(send) => self.send_message(r, send),
            ClientEvent::Typing {
                conversation_id,
                is_typing,
            } => self.reply(r, self.typing(conversation_id, is_typing)),
            ClientEvent::Delivered {
                conversation_id,
                seq,
            } => self.receipt(r, conversation_id, seq, None).await,
            ClientEvent::Read {
                conversation_id,
                seq,
            } => self.receipt(r, conversation_id, seq, Some(seq)).await,
            ClientEvent::Sync {
                conversation_id,
                after_seq,
                limit,
            } => self.sync(r, conversation_id, after_seq, limit),
            ClientEvent::Resume {
                conversations,
                limit,
            } => self.resume(r, conversations, limit),
            ClientEvent::EditMessage {
                message_id,
                content,
                version,
            } => {
                let changed = self.change(message_id, Some(content), version).await;
                self.reply(r, changed);
            }
            ClientEvent::DeleteMessage {
                message_id,
                version,
            } => {
                let changed = self.change(message_id, None, version).await;
                self.reply(r, changed);
            }
            ClientEvent::Ping => self.reply(
                r,
                Ok(server::Pong {
                    server_time: now_micros(),
                }),
            ),
        }
    }

    /// Check membership and enter the room; tell the user's other devices.
    /// Returns the last persisted seq.
    pub(super) async fn join(&self, conv: ConversationId) -> Result<Seq, HandlerError> {
        let gw = &self.gw;
        let last_seq = match gw.store.access(conv, self.user).await {
            Ok(Access::Member { last_seq }) => last_seq,
            Ok(Access::NotMember) => return Err(HandlerError::NotMember),
            Ok(Access::NotFound) => return Err(HandlerError::NoSuchConversation),
            Err(e) => return Err(HandlerError::database("membership check", e)),
        };
        let member = Member {
            conn: self.id,
            user: self.user,
            outbox: self.outbox.clone(),
        };
        let (new, mark) = gw.rooms.join(conv, member);
        if new {
            // A removal that committed (and evicted) between the check
            // above and the join would otherwise be missed: look again.
            if !matches!(
                gw.store.access(conv, self.user).await,
                Ok(Access::Member { .. })
            ) {
                gw.rooms.leave(conv, self.id);
                return Err(HandlerError::NotMember);
            }
        }
        let announce = {
            let mut joined = self.joined();
            // Re-joining a room it is in keeps the original mark: what reached
            // it live since then still counts as delivered.
            let fresh = new || !joined.contains_key(&conv);
            if fresh {
                joined.insert(conv, mark);
            }
            fresh
        };
        if announce {
            gw.publish_to_user(self.user, &server::joined(conv, last_seq), Some(self.id));
        }
        Ok(last_seq)
    }

    fn leave(&self, conv: ConversationId) -> Result<server::Left, HandlerError> {
        self.joined().remove(&conv);
        self.stop_typing(conv);
        if !self.gw.rooms.leave(conv, self.id) {
            return Err(HandlerError::NotInRoom);
        }
        self.gw
            .publish_to_user(self.user, &server::left(conv), Some(self.id));
        Ok(server::Left {
            conversation_id: conv,
        })
    }
}

//! One client's session: the connection's state (joined rooms, typing),
//! the loop that takes its messages in order, and `dispatch`, the one place
//! an event is routed to its handler. Replies go through the outbox only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use fastwebsockets::WebSocket;

use super::connection::{Connection, Inbound, Io, SocketLimits};
use super::error::HandlerError;
use super::room_presence::Departure;
use super::typing::TypingStates;
use super::Gateway;
use crate::auth::{Jwt, Verified};
use crate::domain::{now_micros, ConversationId, Seq, UserId};
use crate::limits::{Decision, Tolerance};
use crate::protocol::client::{decode, ClientEvent, Request};
use crate::protocol::server::{self, AckBody};
use crate::protocol::{close, ErrorCode, Framing};
use crate::queue::audit::Origin;
use crate::rooms::{ConnectionId, Member, Outbox};
use crate::store::Access;
use crate::telemetry::RateLimit;

/// `sync`/`resume` requests one connection may have running at once; they
/// run beside the session so pings and sends are answered meanwhile.
const SYNCS_PER_CONNECTION: usize = 2;

/// A connection's handle for its handlers and the tasks they spawn. Cheap to clone.
#[derive(Clone)]
pub(super) struct Session {
    pub(super) id: ConnectionId,
    pub(super) user: UserId,
    pub(super) outbox: Outbox,
    /// How its frames travel: rooms wrap a broadcast once per framing.
    framing: Framing,
    /// Conversations this connection joined (a superset of its rooms: the
    /// HTTP API may evict it), each with the room's broadcast mark at the
    /// join, so `sync` knows what reached this connection live.
    joined: Arc<Mutex<HashMap<ConversationId, u64>>>,
    pub(super) typing: TypingStates,
    pub(super) syncs: Arc<Semaphore>,
    pub(super) gw: Arc<Gateway>,
    /// Verifies the fresh tokens of `refresh_token`.
    jwt: Arc<Jwt>,
    /// `exp` of the latest token (Unix seconds): the connection is closed
    /// (4001) when it passes, unless a fresh token moved it.
    expires_at: Arc<AtomicU64>,
    /// `rate_limited` refusals this connection may still collect.
    refusals: Arc<Tolerance>,
    /// Cancelled once it collected too many: it is closed with 1008.
    flooding: CancellationToken,
    /// Where the connection came from (peer IP, this gateway): named by
    /// the audit rows of what it does.
    pub(super) from: Origin,
}

/// Finish a WebSocket upgrade, bounded by the handshake timeout.
pub(super) async fn upgraded(
    gw: &Gateway,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
) -> Option<WebSocket<Io>> {
    match tokio::time::timeout(gw.cfg.handshake_timeout, upgrade).await {
        Ok(Ok(ws)) => Some(ws),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            None
        }
        Err(_) => {
            tracing::debug!("websocket upgrade timed out");
            None
        }
    }
}

/// Run one WebSocket for the holder of `token` until it closes, the client
/// proves too slow, or the server shuts down. Both protocols end up here;
/// only `framing` differs.
pub(super) async fn run(
    gw: Arc<Gateway>,
    token: Verified,
    jwt: Arc<Jwt>,
    ws: WebSocket<Io>,
    framing: Framing,
    from: Origin,
) {
    let user = token.user;
    let (outbox, out_rx) = Outbox::new(gw.cfg.outbox_bytes);
    let limits = SocketLimits {
        max_message_bytes: gw.cfg.max_frame_bytes,
        // Spread reconnects over the drain window (no thundering herd).
        reconnect_after: gw.cfg.drain_window.mul_f64(crate::domain::random_unit()),
        ping_interval: gw.cfg.ping_interval,
        read_timeout: gw.cfg.ws_read_timeout,
        persisted_hold: gw.cfg.persisted_hold,
    };
    let mut conn = Connection::start(ws, framing, limits, out_rx, &outbox, gw.shutdown.clone());
    gw.metrics.connection_opened();
    let session = Session {
        id: ConnectionId::next(),
        user,
        outbox: outbox.clone(),
        framing,
        joined: Arc::default(),
        typing: TypingStates::default(),
        syncs: Arc::new(Semaphore::new(SYNCS_PER_CONNECTION)),
        gw: gw.clone(),
        jwt,
        expires_at: Arc::new(AtomicU64::new(token.expires_at)),
        refusals: Arc::new(gw.limits.tolerance()),
        flooding: CancellationToken::new(),
        from,
    };
    session.push(server::hello(user, &session.id.0.to_string(), now_micros()));
    gw.connected(user, session.id, outbox.clone());

    let slow = outbox.slow_signal().clone();
    // A socket must not outlive its token (nor a revoked user's last one).
    let mut expires_at = token.expires_at;
    let expiry = tokio::time::sleep(token.remaining());
    tokio::pin!(expiry);
    // Why the session ended, when the server closes it with a code of its own.
    let mut closing: Option<(u16, &[u8])> = None;
    loop {
        // The next request is taken only once this client's replies fit its
        // allowance: one that pipelines faster than it reads is slowed to its
        // own pace (its socket stops being read) and loses no reply.
        let next = async {
            outbox.reply_room().await;
            conn.next().await
        };
        let message = tokio::select! {
            biased;
            _ = slow.cancelled() => break,
            _ = gw.shutdown.cancelled() => break,
            _ = &mut expiry => {
                closing = Some((
                    close::TOKEN_EXPIRED,
                    b"token expired: reconnect with a fresh token",
                ));
                break;
            }
            _ = session.flooding.cancelled() => {
                closing = Some((close::POLICY_VIOLATION, b"rate limits ignored"));
                break;
            }
            m = next => m,
        };
        match message {
            // Boxed: the handlers' futures (join, history, sync) are
            // kilobytes, and inline they would make every connection's task
            // that large for its whole life, idle or not (S3).
            Some(Inbound::Text(mut buf)) => Box::pin(session.handle(&mut buf)).await,
            Some(Inbound::Binary) => session.push(server::error(
                None,
                ErrorCode::BadRequest,
                "binary frames are not supported; send JSON text frames",
            )),
            Some(Inbound::Refused(refused)) => session.push(server::error(
                refused.ack.map(|a| a.to_string()).as_deref(),
                ErrorCode::BadRequest,
                &refused.reason,
            )),
            None => break,
        }
        let latest = session.expires_at.load(Ordering::Acquire);
        if latest != expires_at {
            expires_at = latest;
            let fresh = Verified {
                user,
                expires_at: latest,
            };
            expiry.set(tokio::time::sleep(fresh.remaining()));
        }
    }

    session.stop_all_typing();
    for conv in session.joined_conversations() {
        gw.rooms.leave(conv, session.id);
        gw.left_room(conv, user, Departure::Disconnected);
    }
    gw.disconnected(user, session.id);
    match closing {
        Some((code, reason)) => conn.close_with(code, reason).await,
        None => conn.close().await,
    }
    gw.metrics.connection_closed();
}

impl Session {
    /// Queue a frame of this session's own (a reply, hello). Replies are
    /// never refused for room; the session loop waits for the writer instead.
    pub(super) fn push(&self, frame: bytes::Bytes) {
        // Closed: the connection is gone, there is no one to tell.
        let _ = self.outbox.reply(frame);
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

    /// `Ok` if `decision` allows; else `rate_limited`, naming `what`, and
    /// counted against `limit`.
    pub(super) fn allowed(
        &self,
        limit: RateLimit,
        decision: Decision,
        what: &'static str,
    ) -> Result<(), HandlerError> {
        decision.into_result().map_err(|wait| {
            self.gw.metrics.add_rate_limited(limit);
            HandlerError::rate_limited(what, wait)
        })
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
        // Where send→broadcast latency starts: decoding is part of it.
        let received = std::time::Instant::now();
        match decode(buf, self.gw.cfg.decode_limits()) {
            Ok(Request { r#ref, event }) => self.dispatch(r#ref.as_deref(), event, received).await,
            Err(e) => self.push(server::error(e.r#ref.as_deref(), e.code, &e.message)),
        }
    }

    async fn dispatch(&self, r: Option<&str>, event: ClientEvent, received: std::time::Instant) {
        match event {
            ClientEvent::JoinConversation { conversation_id } => {
                let joined = match self.allowed(
                    RateLimit::JoinPerUser,
                    self.gw.limits.join_per_user.check(&self.user),
                    "join_conversation: too many joins",
                ) {
                    Ok(()) => self.join(conversation_id).await,
                    Err(e) => Err(e),
                };
                self.reply(
                    r,
                    joined.map(|(last_seq, present)| server::Joined {
                        conversation_id,
                        last_seq,
                        present,
                    }),
                );
            }
            ClientEvent::LeaveConversation { conversation_id } => {
                self.reply(r, self.leave(conversation_id));
            }
            ClientEvent::SendMessage(send) => self.send_message(r, send, received),
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
            ClientEvent::RefreshToken { token } => self.reply(r, self.refresh_token(&token)),
        }
    }

    /// A fresh token for this connection's user moves its expiry; any other
    /// token is refused and the current one stays.
    fn refresh_token(&self, token: &str) -> Result<server::TokenRefreshed, HandlerError> {
        let fresh = self
            .jwt
            .verify_token(token)
            .map_err(|e| HandlerError::BadToken(e.to_string()))?;
        if fresh.user != self.user {
            return Err(HandlerError::TokenForAnotherUser);
        }
        self.expires_at.store(fresh.expires_at, Ordering::Release);
        let expires_at = i64::try_from(fresh.expires_at)
            .ok()
            .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC);
        Ok(server::TokenRefreshed { expires_at })
    }

    /// Check membership and enter the room; tell the user's other devices.
    /// Returns the last persisted seq.
    /// Join `conv`: its last seq, and who is in it now.
    pub(super) async fn join(
        &self,
        conv: ConversationId,
    ) -> Result<(Seq, Vec<UserId>), HandlerError> {
        let gw = &self.gw;
        // Bounds the rooms (and fan-out entries) one socket can hold. Checked
        // up front; events of a session are handled one at a time, so no
        // other join can slip in before the insert below.
        let limit = gw.cfg.max_joined_per_connection;
        let full = {
            let joined = self.joined();
            joined.len() >= limit && !joined.contains_key(&conv)
        };
        if full {
            return Err(HandlerError::TooManyJoined { limit });
        }
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
            framing: self.framing,
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
        let present = gw.entered_room(conv, self.user, self.id, announce).await;
        Ok((last_seq, present))
    }

    fn leave(&self, conv: ConversationId) -> Result<server::Left, HandlerError> {
        self.joined().remove(&conv);
        self.stop_typing(conv);
        if !self.gw.rooms.leave(conv, self.id) {
            return Err(HandlerError::NotInRoom);
        }
        self.gw.left_room(conv, self.user, Departure::Left);
        self.gw
            .publish_to_user(self.user, &server::left(conv), Some(self.id));
        Ok(server::Left {
            conversation_id: conv,
        })
    }
}

//! What each client event does. `Connection::dispatch` is the one place an
//! event is routed; each handler replies exactly once when the frame had a
//! `ref` (an ack or an error), or only on error when it had none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use super::connection::Connection;
use crate::domain::{now_micros, Content, ConversationId, Message, MessageId, Seq};
use crate::protocol::client::{ClientEvent, SendMessage};
use crate::protocol::{server, ErrorCode};
use crate::queue::{BackgroundJob, EnqueueError, PersistJob};
use crate::rooms::{Member, Outbox, Push};
use crate::store::{Access, EditRefusal, HistoryPage, StoredMessage};

/// How long `sync` waits for messages broadcast before the join to be
/// persisted, so none falls between history and live delivery.
const SYNC_SETTLE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy)]
struct Typing {
    last_on: Instant,
    /// Bumped by every change, so a pending expiry knows if it is stale.
    generation: u64,
    on: bool,
}

/// A connection's typing indicators, shared with their expiry timers.
#[derive(Clone, Default)]
pub(super) struct TypingStates(Arc<Mutex<HashMap<ConversationId, Typing>>>);

impl TypingStates {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConversationId, Typing>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A client_message_id being sent: retries wait for the original's fate
/// instead of being acked before it is durable.
pub(super) struct Claim {
    id: MessageId,
    state: Mutex<ClaimState>,
}

enum ClaimState {
    /// Queued, not yet committed: (outbox, ack to send, error to send) of retries.
    Pending(Vec<(Outbox, Option<Bytes>, Bytes)>),
    Committed,
    /// Never made durable; the claim is being removed.
    Failed,
}

impl Claim {
    fn new(id: MessageId) -> Self {
        Claim {
            id,
            state: Mutex::new(ClaimState::Pending(Vec::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClaimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A retry of this message: answered now if the original's fate is known,
    /// else when it is.
    fn retry(&self, outbox: &Outbox, ack: Option<Bytes>, error: Bytes) {
        let mut state = self.lock();
        match &mut *state {
            ClaimState::Pending(waiters) => waiters.push((outbox.clone(), ack, error)),
            ClaimState::Committed => {
                if let Some(ack) = ack {
                    let _ = outbox.push(ack);
                }
            }
            ClaimState::Failed => {
                let _ = outbox.push(error);
            }
        }
    }

    fn settle(&self, committed: bool) {
        let waiters = {
            let mut state = self.lock();
            let next = if committed {
                ClaimState::Committed
            } else {
                ClaimState::Failed
            };
            match std::mem::replace(&mut *state, next) {
                ClaimState::Pending(w) => w,
                _ => Vec::new(),
            }
        };
        for (outbox, ack, error) in waiters {
            let _ = match (committed, ack) {
                (true, Some(ack)) => outbox.push(ack),
                (true, None) => Push::Queued,
                (false, _) => outbox.push(error),
            };
        }
    }
}

/// One conversation's answer to `sync`/`resume`.
struct SyncPage {
    messages: Vec<StoredMessage>,
    has_more: bool,
    last_seq: i64,
}

impl Connection {
    pub(super) async fn dispatch(&mut self, r: Option<&str>, event: ClientEvent) {
        match event {
            ClientEvent::JoinConversation { conversation_id } => {
                if let Some(last_seq) = self.join(r, conversation_id).await {
                    self.reply_ack(
                        r,
                        &json!({ "conversation_id": conversation_id, "last_seq": last_seq }),
                    );
                }
            }
            ClientEvent::LeaveConversation { conversation_id } => self.leave(r, conversation_id),
            ClientEvent::SendMessage(send) => self.send_message(r, send),
            ClientEvent::Typing {
                conversation_id,
                is_typing,
            } => self.typing(r, conversation_id, is_typing),
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
            } => match self.sync(conversation_id, after_seq, limit).await {
                Ok(page) => self.reply_ack(
                    r,
                    &json!({
                        "conversation_id": conversation_id,
                        "messages": page.messages,
                        "has_more": page.has_more,
                        "last_seq": page.last_seq,
                    }),
                ),
                Err((code, message)) => self.reply_error(r, code, &message),
            },
            ClientEvent::Resume {
                conversations,
                limit,
            } => {
                let mut results = Vec::with_capacity(conversations.len());
                for (conv, after) in conversations {
                    results.push(match self.sync(conv, after, limit).await {
                        Ok(page) => json!({
                            "conversation_id": conv,
                            "messages": page.messages,
                            "has_more": page.has_more,
                            "last_seq": page.last_seq,
                        }),
                        Err((code, message)) => json!({
                            "conversation_id": conv,
                            "error": {"code": code, "message": message},
                        }),
                    });
                }
                self.reply_ack(r, &json!({ "conversations": results }));
            }
            ClientEvent::EditMessage {
                message_id,
                content,
                version,
            } => self.edit(r, message_id, Some(content), version).await,
            ClientEvent::DeleteMessage {
                message_id,
                version,
            } => self.edit(r, message_id, None, version).await,
            ClientEvent::Ping => self.reply_ack(r, &json!({ "server_time": now_micros() })),
        }
    }

    /// Check membership and enter the room; tell the user's other devices.
    /// Returns the last persisted seq, or replies with the error.
    async fn join(&mut self, r: Option<&str>, conv: ConversationId) -> Option<Seq> {
        match self.join_quietly(conv).await {
            Ok(last_seq) => Some(last_seq),
            Err((code, message)) => {
                self.reply_error(r, code, &message);
                None
            }
        }
    }

    async fn join_quietly(&mut self, conv: ConversationId) -> Result<Seq, (ErrorCode, String)> {
        let gw = self.gw.clone();
        match gw.store.access(conv, self.user).await {
            Ok(Access::Member { last_seq }) => {
                let (new, mark) = gw.rooms.join(
                    conv,
                    Member {
                        conn: self.id,
                        user: self.user,
                        outbox: self.outbox.clone(),
                    },
                );
                if new {
                    // A removal that committed (and evicted) between the check
                    // above and the join would otherwise be missed: look again.
                    if !matches!(
                        gw.store.access(conv, self.user).await,
                        Ok(Access::Member { .. })
                    ) {
                        gw.rooms.leave(conv, self.id);
                        return Err((
                            ErrorCode::Forbidden,
                            "not a member of this conversation".into(),
                        ));
                    }
                }
                if new || !self.joined.contains_key(&conv) {
                    self.joined.insert(conv, mark);
                    gw.push_user(self.user, &server::joined(conv, last_seq), Some(self.id));
                }
                Ok(last_seq)
            }
            Ok(Access::NotMember) => Err((
                ErrorCode::Forbidden,
                "not a member of this conversation".into(),
            )),
            Ok(Access::NotFound) => Err((ErrorCode::NotFound, "no such conversation".into())),
            Err(e) => {
                tracing::warn!(error = %e, "membership check failed");
                Err((
                    ErrorCode::Unavailable,
                    "the database is unavailable; retry shortly".into(),
                ))
            }
        }
    }

    fn leave(&mut self, r: Option<&str>, conv: ConversationId) {
        self.joined.remove(&conv);
        self.stop_typing(conv);
        if self.gw.rooms.leave(conv, self.id) {
            self.gw
                .push_user(self.user, &server::left(conv), Some(self.id));
            self.reply_ack(r, &json!({ "conversation_id": conv }));
        } else {
            self.reply_error(r, ErrorCode::NotJoined, "not joined to this conversation");
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
        let key = (self.user, conv, send.client_message_id.clone());
        let claim = Arc::new(Claim::new(id));
        if let Err(original) = gw.dedup.claim(key.clone(), claim.clone()) {
            gw.metrics.add_duplicate();
            let ack = r.map(|_| {
                server::ack(
                    r,
                    &json!({ "message_id": original.id, "client_message_id": send.client_message_id, "duplicate": true }),
                )
            });
            let error = server::error(
                r,
                ErrorCode::Unavailable,
                "the original of this message could not be made durable; send it again with the same client_message_id",
            );
            original.retry(&self.outbox, ack, error);
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
        let forget = |gw: &super::Gateway| {
            claim.settle(false);
            gw.dedup.remove_if(&key, |c| Arc::ptr_eq(c, &claim));
        };
        let job = match serde_json::to_value(PersistJob::from_message(&message)) {
            Ok(j) => j,
            Err(e) => {
                forget(gw);
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
            &json!({ "message_id": id, "client_message_id": message.client_message_id, "duplicate": false }),
        );
        let outbox = self.outbox.clone();
        let reply_ref = r.map(str::to_owned);
        let gw_done = gw.clone();
        let (done_key, done_claim) = (key.clone(), claim.clone());
        let done = Box::new(move |res: Result<(), EnqueueError>| {
            done_claim.settle(res.is_ok());
            if res.is_err() {
                // Not queued: a resend with the same client_message_id must be
                // treated as new, not acked as a duplicate of nothing.
                gw_done
                    .dedup
                    .remove_if(&done_key, |c| Arc::ptr_eq(c, &done_claim));
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
        if gw.queues.persist.submit(job, done).is_err() {
            forget(gw);
            self.reply_error(
                r,
                ErrorCode::Unavailable,
                "too many messages waiting to be stored; retry shortly",
            );
            return;
        }
        gw.metrics.add_sent();
        let frame = server::new_message(&message);
        gw.rooms.broadcast_message(conv, id, &frame);
        gw.relay
            .publish(crate::notify::Target::Message(conv, id), &frame);
    }

    fn typing(&self, r: Option<&str>, conv: ConversationId, on: bool) {
        let gw = &self.gw;
        if !gw.rooms.is_joined(conv, self.id) {
            self.reply_error(r, ErrorCode::NotJoined, "join the conversation first");
            return;
        }
        let now = Instant::now();
        let generation = {
            let mut states = self.typing.lock();
            let state = states.entry(conv).or_insert(Typing {
                last_on: now - gw.cfg.typing_interval,
                generation: 0,
                on: false,
            });
            if on && state.on {
                let since = now.duration_since(state.last_on);
                if since < gw.cfg.typing_interval {
                    let wait = (gw.cfg.typing_interval - since).as_millis() as u64;
                    drop(states);
                    self.push(server::error_with(
                        r,
                        ErrorCode::RateLimited,
                        "typing: at most one refresh per interval",
                        json!({ "retry_after_ms": wait }),
                    ));
                    return;
                }
            }
            if !on && !state.on {
                // Already off: nothing for the others to hear.
                drop(states);
                self.reply_ack(r, &json!({}));
                return;
            }
            state.generation += 1;
            state.on = on;
            if on {
                state.last_on = now;
            }
            state.generation
        };
        gw.fanout(conv, &server::typing(conv, self.user, on), Some(self.id));
        self.reply_ack(r, &json!({}));
        if on {
            // Not refreshed in time: the server turns it off for everyone.
            let (gw, states, conn, user, ttl) = (
                gw.clone(),
                self.typing.clone(),
                self.id,
                self.user,
                gw.cfg.typing_ttl,
            );
            tokio::spawn(async move {
                tokio::time::sleep(ttl).await;
                let expired = {
                    let mut states = states.lock();
                    match states.get_mut(&conv) {
                        Some(s) if s.on && s.generation == generation => {
                            s.on = false;
                            s.generation += 1;
                            true
                        }
                        _ => false,
                    }
                };
                if expired {
                    gw.fanout(conv, &server::typing(conv, user, false), Some(conn));
                }
            });
        }
    }

    fn stop_typing(&self, conv: ConversationId) {
        let was_on = {
            let mut states = self.typing.lock();
            states.remove(&conv).is_some_and(|s| s.on)
        };
        if was_on {
            self.gw
                .fanout(conv, &server::typing(conv, self.user, false), Some(self.id));
        }
    }

    /// On close: whoever was shown this connection typing sees it stop.
    pub(super) fn stop_all_typing(&self) {
        let convs: Vec<ConversationId> = self.typing.lock().keys().copied().collect();
        for conv in convs {
            self.stop_typing(conv);
        }
    }

    /// `delivered` (read = None) or `read`: move the member's positions
    /// forward, tell the room and the user's other devices at once, and store
    /// them through the low-priority queue.
    async fn receipt(&self, r: Option<&str>, conv: ConversationId, seq: Seq, read: Option<Seq>) {
        let gw = &self.gw;
        if !gw.rooms.is_joined(conv, self.id) {
            self.reply_error(r, ErrorCode::NotJoined, "join the conversation first");
            return;
        }
        let key = (conv, self.user);
        let known = match gw.receipts.get(&key) {
            Some(k) => k,
            None => match gw.store.receipt_state(conv, self.user).await {
                Ok(Some(k)) => k,
                Ok(None) => {
                    self.reply_error(r, ErrorCode::Forbidden, "not a member of this conversation");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "receipt state unavailable");
                    self.reply_error(
                        r,
                        ErrorCode::Unavailable,
                        "the database is unavailable; retry shortly",
                    );
                    return;
                }
            },
        };
        let read_seq = known.1.max(read.map_or(0, |s| s.0));
        // Reading a message implies having received it.
        let delivered_seq = known.0.max(seq.0).max(read_seq);
        let result = json!({ "conversation_id": conv, "delivered_seq": delivered_seq, "read_seq": read_seq });
        if (delivered_seq, read_seq) == known {
            gw.receipts.insert(key, known);
            self.reply_ack(r, &result);
            return;
        }
        let job = serde_json::to_value(BackgroundJob::Receipt {
            v: PersistJob::VERSION,
            conversation_id: conv.0,
            user_id: self.user.0,
            delivered_seq,
            read_seq,
        });
        let Ok(job) = job else {
            self.reply_error(r, ErrorCode::Internal, "could not encode the receipt");
            return;
        };
        // Remember the new positions only once they are queued, so a failed
        // receipt is not mistaken for a no-op when the client repeats it.
        let (outbox, reply_ref, gw_done) = (self.outbox.clone(), r.map(str::to_owned), gw.clone());
        let ack = server::ack(r, &result);
        let done = Box::new(move |res: Result<(), EnqueueError>| {
            let _ = match (res, reply_ref) {
                (Ok(()), rr) => {
                    gw_done.receipts.insert(key, (delivered_seq, read_seq));
                    if rr.is_some() {
                        outbox.push(ack)
                    } else {
                        Push::Queued
                    }
                }
                (Err(e), rr) => outbox.push(server::error(
                    rr.as_deref(),
                    ErrorCode::Unavailable,
                    &e.to_string(),
                )),
            };
        });
        if gw.queues.background.submit(job, done).is_err() {
            self.reply_error(
                r,
                ErrorCode::Unavailable,
                "too much background work queued; retry shortly",
            );
            return;
        }
        let frame = server::receipt(conv, self.user, delivered_seq, read_seq);
        gw.fanout(conv, &frame, Some(self.id));
        // The user's devices not in this room, here and on other gateways,
        // converge too (those in the room heard it above).
        for other in gw.users.connections(self.user, self.id) {
            if !gw.rooms.is_joined(conv, other) {
                gw.users.push_to(self.user, other, &frame);
            }
        }
        gw.relay
            .publish(crate::notify::Target::User(self.user), &frame);
    }

    /// Messages after `after`, with no gap against live delivery and no
    /// duplicate of what reached this connection live since it joined.
    async fn sync(
        &mut self,
        conv: ConversationId,
        after: Seq,
        limit: i64,
    ) -> Result<SyncPage, (ErrorCode, String)> {
        let gw = self.gw.clone();
        if !(self.joined.contains_key(&conv) && gw.rooms.is_joined(conv, self.id)) {
            self.join_quietly(conv).await?;
        }
        let mark = self.joined.get(&conv).copied().unwrap_or(0);
        // Messages broadcast before the join reached other connections live but
        // not this one: wait until they are in the table history is read from.
        let deadline = Instant::now() + SYNC_SETTLE;
        while gw.rooms.pending_up_to(conv, mark) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let page = HistoryPage {
            after_seq: Some(after.0),
            before_seq: None,
            limit,
        };
        let (rows, has_more) = gw.store.history(conv, page).await.map_err(|e| {
            tracing::warn!(error = %e, "sync failed");
            (
                ErrorCode::Unavailable,
                "the database is unavailable; retry shortly".to_owned(),
            )
        })?;
        let last_seq = rows.last().map_or(after.0, |m| m.seq);
        let live = gw.rooms.live_since(conv, mark);
        let messages = rows
            .into_iter()
            .filter(|m| !live.contains(&MessageId(m.id)))
            .collect();
        Ok(SyncPage {
            messages,
            has_more,
            last_seq,
        })
    }

    /// `edit_message` (content) or `delete_message` (None): applied with
    /// optimistic concurrency in one conditional UPDATE, then broadcast.
    async fn edit(&self, r: Option<&str>, id: MessageId, content: Option<Content>, version: i32) {
        let gw = &self.gw;
        let result = gw
            .store
            .change_message(
                id,
                self.user,
                version,
                content.as_ref().map(Content::as_json),
            )
            .await;
        match result {
            Ok(Ok(row)) => {
                let conv = ConversationId(row.conversation_id);
                let frame = if content.is_some() {
                    server::message_updated(&row)
                } else {
                    server::message_deleted(conv, id, row.version)
                };
                gw.fanout(conv, &frame, None);
                self.reply_ack(r, &json!({ "message_id": id, "version": row.version }));
            }
            Ok(Err(EditRefusal::NotFound)) => self.reply_error(
                r,
                ErrorCode::NotFound,
                "no such message (or not stored yet: wait for message_persisted)",
            ),
            Ok(Err(EditRefusal::NotSender)) => self.reply_error(
                r,
                ErrorCode::Forbidden,
                "only the sender may change a message",
            ),
            Ok(Err(EditRefusal::NotText)) => {
                self.reply_error(r, ErrorCode::Invalid, "only text messages can be edited")
            }
            Ok(Err(EditRefusal::Conflict {
                current_version,
                deleted,
            })) => self.push(server::error_with(
                r,
                ErrorCode::Conflict,
                if deleted {
                    "the message was deleted"
                } else {
                    "the message changed since that version"
                },
                json!({ "current_version": current_version, "deleted": deleted }),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "edit failed");
                self.reply_error(
                    r,
                    ErrorCode::Unavailable,
                    "the database is unavailable; retry shortly",
                );
            }
        }
    }
}

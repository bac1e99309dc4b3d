//! `send_message`: broadcast at once, ack once the persist job is committed
//! to the queue, so an acked message survives any crash; a retry of the same
//! client_message_id waits for the original's fate instead of being stored
//! or acked twice. Before any of it, the moderation check (shared with edits).

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::error::HandlerError;
use super::session::Session;
use crate::domain::{
    now_micros, ClientMessageId, Content, ConversationId, Message, MessageId, MessageKind, UserId,
};
use crate::moderation::Verdict;
use crate::notify::Target;
use crate::protocol::client::SendMessage;
use crate::protocol::server;
use crate::queue::audit::{self, Action, Actor};
use crate::queue::{EnqueueError, PersistJob, Rejected};
use crate::rooms::Outbox;
use crate::telemetry::RateLimit;

/// What a sender past its share of the persist buffer is told to wait. Its
/// share frees as Postgres catches up, which takes as long as the outage
/// does: a second is a guess that keeps a retrying client's load low.
const SHARE_RETRY_AFTER_MS: u64 = 1000;

/// The dedup key: one message per sender, conversation and client id.
pub(super) type DedupKey = (UserId, ConversationId, ClientMessageId);

/// A client_message_id being sent: retries wait for the original's fate
/// instead of being acked before it is durable.
pub(super) struct Claim {
    id: MessageId,
    state: Mutex<ClaimState>,
}

/// What a retry is owed once the original's fate is known.
struct Waiter {
    outbox: Outbox,
    /// Sent if the original was committed (None: the retry had no ref).
    ack: Option<Bytes>,
    /// Sent if it never was.
    error: Bytes,
}

enum ClaimState {
    /// Queued, not yet committed.
    Pending(Vec<Waiter>),
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

    fn lock(&self) -> MutexGuard<'_, ClaimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A retry of this message: answered now if the original's fate is known,
    /// else when it is.
    fn retry(&self, waiter: Waiter) {
        let mut state = self.lock();
        match &mut *state {
            ClaimState::Pending(waiters) => waiters.push(waiter),
            ClaimState::Committed => {
                if let Some(ack) = waiter.ack {
                    let _ = waiter.outbox.reply(ack);
                }
            }
            ClaimState::Failed => {
                let _ = waiter.outbox.reply(waiter.error);
            }
        }
    }

    fn settle(&self, committed: bool) {
        let next = if committed {
            ClaimState::Committed
        } else {
            ClaimState::Failed
        };
        let waiters = match std::mem::replace(&mut *self.lock(), next) {
            ClaimState::Pending(w) => w,
            _ => Vec::new(),
        };
        for w in waiters {
            let frame = if committed { w.ack } else { Some(w.error) };
            if let Some(frame) = frame {
                let _ = w.outbox.reply(frame);
            }
        }
    }
}

/// What a moderation action was taken on, for its audit row: a send has
/// no message id yet (none is assigned to a refused one), an edit has no
/// conversation at hand.
pub(super) enum Moderated {
    Send {
        conversation: ConversationId,
        client_message_id: ClientMessageId,
    },
    Edit {
        message: MessageId,
    },
}

impl Session {
    /// The moderation check of a user's text (a send or an edit): the
    /// content to send, masked if the action is `mask`, or `moderated`.
    /// Before broadcast and before storage, so what everyone sees and what
    /// history keeps are the same.
    pub(super) fn moderate(
        &self,
        kind: MessageKind,
        content: Content,
        of: Moderated,
    ) -> Result<Content, HandlerError> {
        let Some(filter) = &self.gw.moderation else {
            return Ok(content);
        };
        match filter.check(kind, &content) {
            Verdict::Clean => Ok(content),
            Verdict::Masked(masked) => {
                self.audit_moderation(Action::ModerationMask, of);
                Ok(masked)
            }
            Verdict::Rejected => {
                self.audit_moderation(Action::ModerationReject, of);
                Err(HandlerError::Moderated)
            }
        }
    }

    /// Audit a reject or a mask. Off the send path: a spawned insert of the
    /// audit job (its own one-statement transaction), so the check stays
    /// microseconds; a failed insert is logged, the only way its row can
    /// be missing. Sends are rate-limited before moderation, which bounds
    /// these inserts per user.
    fn audit_moderation(&self, action: Action, of: Moderated) {
        let mut event = self
            .from
            .by(Actor::User(self.user))
            .did(action)
            .user(self.user);
        event = match of {
            Moderated::Send {
                conversation,
                client_message_id,
            } => event
                .conversation(conversation)
                .detail(serde_json::json!({"on": "send", "client_message_id": client_message_id})),
            Moderated::Edit { message } => event
                .message(message)
                .detail(serde_json::json!({"on": "edit"})),
        };
        let pool = self.gw.store.pool().clone();
        tokio::spawn(async move {
            if let Err(e) = audit::record(&pool, &event).await {
                tracing::error!(error = %e, action = ?event.action, "could not audit a moderation action");
            }
        });
    }

    /// The sender's and the conversation's send limits.
    fn send_allowed(&self, conv: ConversationId) -> Result<(), HandlerError> {
        let limits = &self.gw.limits;
        self.allowed(
            RateLimit::SendPerUser,
            limits.send_per_user.check(&self.user),
            "send_message: too many messages from you",
        )?;
        self.allowed(
            RateLimit::SendPerConversation,
            limits.send_per_conversation.check(&conv),
            "send_message: too many messages in this conversation",
        )
    }

    /// `received`: when the session took the frame, where the
    /// send→broadcast latency starts.
    pub(super) fn send_message(
        &self,
        r: Option<&str>,
        send: SendMessage,
        received: std::time::Instant,
    ) {
        // Limited only once joined, so only real conversations become keys.
        // Moderated before the dedup claim: a refused message holds no id.
        let admitted = self
            .require_joined(send.conversation_id)
            .and_then(|()| self.send_allowed(send.conversation_id))
            .and_then(|()| {
                let of = Moderated::Send {
                    conversation: send.conversation_id,
                    client_message_id: send.client_message_id.clone(),
                };
                self.moderate(send.kind, send.content, of)
            });
        let content = match admitted {
            Ok(content) => content,
            Err(e) => return self.reply::<server::Done>(r, Err(e)),
        };
        let gw = &self.gw;
        let conv = send.conversation_id;
        let id = MessageId::new_v7();
        let key: DedupKey = (self.user, conv, send.client_message_id.clone());
        let claim = Arc::new(Claim::new(id));
        if let Err(original) = gw.dedup.claim(key.clone(), claim.clone()) {
            gw.metrics.add_duplicate();
            let ack = r.map(|_| {
                server::ack(
                    r,
                    &server::Sent {
                        message_id: original.id,
                        client_message_id: &send.client_message_id,
                        duplicate: true,
                    },
                )
            });
            original.retry(Waiter {
                outbox: self.outbox.clone(),
                ack,
                error: HandlerError::OriginalNotDurable.frame(r),
            });
            return;
        }
        let message = Message {
            id,
            conversation_id: conv,
            sender_id: self.user,
            client_message_id: send.client_message_id,
            kind: send.kind,
            content,
            created_at: now_micros(),
        };
        // Not queued: a resend with the same client_message_id must be
        // treated as new, not acked as a duplicate of nothing.
        let forget = {
            let (gw, key, claim) = (gw.clone(), key, claim.clone());
            move || {
                claim.settle(false);
                gw.dedup.remove_if(&key, |c| Arc::ptr_eq(c, &claim));
            }
        };
        // Serialized once for the queue, once for the clients; the content is
        // never copied between them.
        let job = match PersistJob::encode(&message) {
            Ok(job) => job,
            Err(e) => {
                forget();
                return self.reply::<server::Done>(
                    r,
                    Err(HandlerError::Unstorable(format!("cannot encode: {e}"))),
                );
            }
        };
        let frame = server::new_message(&message);
        let ack = server::ack(
            r,
            &server::Sent {
                message_id: id,
                client_message_id: &message.client_message_id,
                duplicate: false,
            },
        );
        let (outbox, reply_ref) = (self.outbox.clone(), r.map(str::to_owned));
        let forget_on_failure = forget.clone();
        let done = Box::new(move |res: Result<(), EnqueueError>| {
            let reply = match res {
                Ok(()) => {
                    claim.settle(true);
                    reply_ref.is_some().then_some(ack)
                }
                Err(e) => {
                    forget_on_failure();
                    let e = match e {
                        EnqueueError::Unavailable => HandlerError::NotDurable,
                        EnqueueError::Refused(reason) => HandlerError::Unstorable(reason),
                    };
                    Some(e.frame(reply_ref.as_deref()))
                }
            };
            if let Some(frame) = reply {
                let _ = outbox.reply(frame);
            }
        });
        if let Err(rejected) = gw.queues.persist.submit(self.user, job, done) {
            forget();
            let e = match rejected {
                Rejected::Full => HandlerError::PersistBufferFull,
                Rejected::OverShare => {
                    gw.metrics.add_rate_limited(RateLimit::PersistShare);
                    HandlerError::RateLimited {
                        what: "too many of your messages are waiting to be stored",
                        retry_after_ms: SHARE_RETRY_AFTER_MS,
                    }
                }
            };
            return self.reply::<server::Done>(r, Err(e));
        }
        gw.metrics.add_sent();
        gw.publish(Target::Message(conv, id), &frame, None);
        gw.metrics
            .send_broadcast_latency
            .observe(received.elapsed().as_secs_f64());
    }
}

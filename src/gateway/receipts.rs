//! `delivered` and `read`: a member's positions only move forward; the room
//! and the user's other devices hear at once, and the positions are stored
//! through the low-priority queue.

use super::error::HandlerError;
use super::session::Session;
use crate::domain::{ConversationId, Seq};
use crate::protocol::server;
use crate::queue::{BackgroundJob, EnqueueError, PersistJob};
use crate::store::ReceiptState;

impl Session {
    /// `delivered` (read = None) or `read`.
    pub(super) async fn receipt(
        &self,
        r: Option<&str>,
        conv: ConversationId,
        seq: Seq,
        read: Option<Seq>,
    ) {
        if let Err(e) = self.receipt_inner(r, conv, seq, read).await {
            self.reply::<server::Done>(r, Err(e));
        }
    }

    async fn receipt_inner(
        &self,
        r: Option<&str>,
        conv: ConversationId,
        seq: Seq,
        read: Option<Seq>,
    ) -> Result<(), HandlerError> {
        self.require_joined(conv)?;
        let gw = &self.gw;
        let key = (conv, self.user);
        let mut known = match gw.receipts.get(&key) {
            Some(k) => k,
            None => self.receipt_state(conv).await?,
        };
        let wanted = seq.max(read.unwrap_or(Seq(0)));
        if wanted > known.last_seq {
            // Messages may have been stored since the cached state was read.
            known = self.receipt_state(conv).await?;
        }
        // Nobody has received or read past the last stored message: what is
        // acked and broadcast is what the worker will store.
        let cap = |s: Seq| s.min(known.last_seq);
        let read_seq = known.read.max(read.map_or(Seq(0), cap));
        // Reading a message implies having received it.
        let delivered_seq = known.delivered.max(cap(seq)).max(read_seq);
        let result = server::Receipted {
            conversation_id: conv,
            delivered_seq,
            read_seq,
        };
        let moved = ReceiptState {
            delivered: delivered_seq,
            read: read_seq,
            last_seq: known.last_seq,
        };
        if moved == known {
            gw.receipts.insert(key, known);
            self.reply(r, Ok(result));
            return Ok(());
        }
        let job = BackgroundJob::Receipt {
            v: PersistJob::VERSION,
            conversation_id: conv,
            user_id: self.user,
            delivered_seq,
            read_seq,
        };
        let job = serde_json::value::to_raw_value(&job)
            .map_err(|e| HandlerError::Unstorable(format!("cannot encode the receipt: {e}")))?;
        // Remember the new positions only once they are queued, so a failed
        // receipt is not mistaken for a no-op when the client repeats it.
        let (outbox, reply_ref, gw_done) = (self.outbox.clone(), r.map(str::to_owned), gw.clone());
        let ack = server::ack(r, &result);
        let done = Box::new(move |res: Result<(), EnqueueError>| {
            let reply = match res {
                Ok(()) => {
                    gw_done.receipts.insert(key, moved);
                    reply_ref.is_some().then_some(ack)
                }
                Err(_) => Some(HandlerError::ReceiptNotStored.frame(reply_ref.as_deref())),
            };
            if let Some(frame) = reply {
                let _ = outbox.reply(frame);
            }
        });
        if gw.queues.background.submit(self.user, job, done).is_err() {
            return Err(HandlerError::BackgroundBufferFull);
        }
        let frame = server::receipt(conv, self.user, delivered_seq, read_seq);
        gw.publish_receipt(conv, self.user, &frame, self.id);
        Ok(())
    }

    async fn receipt_state(&self, conv: ConversationId) -> Result<ReceiptState, HandlerError> {
        self.gw
            .store
            .receipt_state(conv, self.user)
            .await
            .map_err(|e| HandlerError::database("reading receipt state", e))?
            .ok_or(HandlerError::NotMember)
    }
}

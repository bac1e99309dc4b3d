//! `sync` and `resume`: history after a seq, then live delivery, with no gap
//! and no duplicate between the two (the bookkeeping is the rooms' ledger).
//!
//! Both run beside the session, never on it: a connection keeps answering
//! pings and sends while Postgres is slow. Each connection has a few at a
//! time; `resume` pages conversations a few at a time and answers by a
//! deadline whatever happens.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::error::HandlerError;
use super::session::Session;
use crate::domain::{ConversationId, Seq, StoredMessage};
use crate::protocol::server::{self, ErrorBody, Resumed};
use crate::store::HistoryPage;
use crate::telemetry::RateLimit;

/// How long `sync` waits for messages broadcast before the join to be
/// persisted, so none falls between history and live delivery.
const SYNC_SETTLE: Duration = Duration::from_secs(3);

/// The most a `resume` takes before it answers; conversations not paged by
/// then are reported as failed, to be synced on their own.
const RESUME_DEADLINE: Duration = Duration::from_secs(10);

/// Conversations of one `resume` paged at once (each holds a pool connection).
const RESUME_CONCURRENCY: usize = 4;

/// What to wait before retrying a sync refused for too many in flight.
const SYNC_RETRY_AFTER_MS: u64 = 100;

/// One conversation's page, before it is shaped for the wire.
struct Page {
    conversation_id: ConversationId,
    /// Where the page was asked to start.
    after: Seq,
    messages: Vec<StoredMessage>,
    has_more: bool,
    last_seq: Seq,
}

impl Page {
    /// Cut the page so its messages take at most `allowance` bytes encoded
    /// (less what they took), keeping at least one if `at_least_one`, so a
    /// reply never pins more than a connection's budget however large its
    /// messages. A cut page says `has_more` and ends `last_seq` at the last
    /// message kept: the client pages on from there as usual.
    fn fit(&mut self, allowance: &mut usize, at_least_one: bool) {
        let mut keep = 0;
        for m in &self.messages {
            let size = server::encoded_len(&server::StoredView::from(m)) + 1;
            if size > *allowance && !(at_least_one && keep == 0) {
                break;
            }
            *allowance = allowance.saturating_sub(size);
            keep += 1;
        }
        if keep < self.messages.len() {
            self.messages.truncate(keep);
            self.has_more = true;
            if let Some(last) = self.messages.last() {
                self.last_seq = last.seq;
            } else {
                // Nothing fits: the next page starts where this one did.
                self.last_seq = self.after;
            }
        }
    }

    fn wire(&self) -> server::SyncPage<'_> {
        server::SyncPage {
            conversation_id: self.conversation_id,
            messages: self.messages.iter().map(Into::into).collect(),
            has_more: self.has_more,
            last_seq: self.last_seq,
        }
    }
}

impl Session {
    /// A slot for one more `sync`/`resume` of this connection, or why not:
    /// the user's history reads are limited (over all connections and
    /// HTTP), and so are the reads running at once on this connection.
    fn sync_slot(&self) -> Result<OwnedSemaphorePermit, HandlerError> {
        self.allowed(
            RateLimit::HistoryPerUser,
            self.gw.limits.history_per_user.check(&self.user),
            "too many history reads (sync, resume, GET messages)",
        )?;
        self.syncs.clone().try_acquire_owned().map_err(|_| {
            self.gw.metrics.add_rate_limited(RateLimit::SyncInFlight);
            HandlerError::RateLimited {
                what: "too many sync or resume requests in flight on this connection",
                retry_after_ms: SYNC_RETRY_AFTER_MS,
            }
        })
    }

    pub(super) fn sync(&self, r: Option<&str>, conv: ConversationId, after: Seq, limit: i64) {
        let permit = match self.sync_slot() {
            Ok(p) => p,
            Err(e) => return self.reply::<server::Done>(r, Err(e)),
        };
        let (session, r) = (self.clone(), r.map(str::to_owned));
        tokio::spawn(async move {
            let mut page = session.page(conv, after, limit).await;
            if let Ok(page) = &mut page {
                // At most the connection's reply allowance, not ~1 MB (200
                // messages of 4 KiB) per page for a client that stalled.
                let mut allowance = session.gw.cfg.outbox_bytes;
                page.fit(&mut allowance, true);
            }
            match &page {
                Ok(page) => session.reply(r.as_deref(), Ok(page.wire())),
                Err(e) => session.reply::<server::Done>(r.as_deref(), Err(e.clone())),
            }
            drop(permit);
        });
    }

    pub(super) fn resume(
        &self,
        r: Option<&str>,
        conversations: Vec<(ConversationId, Seq)>,
        limit: i64,
    ) {
        let permit = match self.sync_slot() {
            Ok(p) => p,
            Err(e) => return self.reply::<server::Done>(r, Err(e)),
        };
        let (session, r) = (self.clone(), r.map(str::to_owned));
        tokio::spawn(async move {
            let deadline = Instant::now() + RESUME_DEADLINE;
            let mut pages = session.pages(&conversations, limit, deadline).await;
            // One allowance for the whole reply, spent in the order named;
            // the first page with messages always carries one.
            let mut allowance = session.gw.cfg.outbox_bytes;
            for page in pages.iter_mut().flatten() {
                let first = allowance == session.gw.cfg.outbox_bytes;
                page.fit(&mut allowance, first);
            }
            let failures: Vec<Option<(crate::protocol::ErrorCode, String)>> = pages
                .iter()
                .map(|p| p.as_ref().err().map(|e| (e.code(), e.to_string())))
                .collect();
            let entries = conversations
                .iter()
                .zip(pages.iter().zip(&failures))
                .map(|((conv, _), (page, failure))| match (page, failure) {
                    (Ok(p), _) => Resumed::Page(p.wire()),
                    (Err(_), failure) => {
                        let (code, message) = failure
                            .as_ref()
                            .map_or((crate::protocol::ErrorCode::Internal, ""), |(c, m)| {
                                (*c, m.as_str())
                            });
                        Resumed::Failed {
                            conversation_id: *conv,
                            error: ErrorBody { code, message },
                        }
                    }
                })
                .collect();
            session.reply(
                r.as_deref(),
                Ok(server::Resume {
                    conversations: entries,
                }),
            );
            drop(permit);
        });
    }

    /// Pages for each conversation, a few at a time, in the order given.
    async fn pages(
        &self,
        conversations: &[(ConversationId, Seq)],
        limit: i64,
        deadline: Instant,
    ) -> Vec<Result<Page, HandlerError>> {
        let mut results: Vec<Result<Page, HandlerError>> = conversations
            .iter()
            .map(|_| Err(HandlerError::TimedOut))
            .collect();
        let gate = Arc::new(Semaphore::new(RESUME_CONCURRENCY));
        let mut tasks = JoinSet::new();
        for (i, &(conv, after)) in conversations.iter().enumerate() {
            let (session, gate) = (self.clone(), gate.clone());
            tasks.spawn(async move {
                let _slot = gate.acquire_owned().await;
                (i, session.page(conv, after, limit).await)
            });
        }
        loop {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(Ok((i, page)))) => results[i] = page,
                Ok(Some(Err(e))) => tracing::warn!(error = %e, "a resume page task failed"),
                Ok(None) => break,
                // What is left stays TimedOut; dropping the set aborts it.
                Err(_) => break,
            }
        }
        results
    }

    /// Messages after `after`, with no gap against live delivery and no
    /// duplicate of what reached this connection live since it joined.
    async fn page(
        &self,
        conv: ConversationId,
        after: Seq,
        limit: i64,
    ) -> Result<Page, HandlerError> {
        let mark = match self.join_mark(conv) {
            Some(mark) => mark,
            None => {
                self.join(conv).await?;
                self.join_mark(conv).unwrap_or(0)
            }
        };
        let gw = &self.gw;
        // Messages broadcast before the join reached other connections live
        // but not this one: wait until they are in the table history is read
        // from. Past the deadline the page is served anyway (a dead letter or
        // a missed hint must not stall sync); the client's next sync by seq
        // fills any hole.
        gw.rooms
            .settled(conv, mark, Instant::now() + SYNC_SETTLE)
            .await;
        let page = HistoryPage {
            after_seq: Some(after.0),
            before_seq: None,
            limit,
        };
        let (rows, has_more) = gw
            .store
            .history(conv, page)
            .await
            .map_err(|e| HandlerError::database("sync", e))?;
        let last_seq = rows.last().map_or(after, |m| m.seq);
        let live = gw.rooms.live_since(conv, mark);
        let messages = rows
            .into_iter()
            .filter(|m| !live.contains(&m.message.id))
            .collect();
        Ok(Page {
            conversation_id: conv,
            after,
            messages,
            has_more,
            last_seq,
        })
    }
}

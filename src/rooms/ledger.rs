//! Per-room delivery bookkeeping that lets `sync` promise "no gap, no
//! duplicate" against live delivery.
//!
//! Every new message broadcast in a room gets the room's next mark; a join
//! remembers the mark at that moment. A sync then (1) waits until every
//! message marked up to its join is persisted, so the history it reads holds
//! them (they went out live before this connection was there), and (2) leaves
//! out of the page what was broadcast after its join, which the connection
//! already received live. Waiting is woken by [`Ledger::persisted`], not polled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::domain::MessageId;

/// Message ids remembered per room, newest last, so a `sync` can leave out
/// what a connection already received live. Bounds the memory of a busy room.
const RECENT_LOG: usize = 1024;

/// A message not confirmed persisted after this long never will be (a
/// duplicate, a dead letter, a missed hint): stop waiting for it.
pub(super) const PENDING_TTL: Duration = Duration::from_secs(30);

#[derive(Default)]
pub(super) struct Ledger {
    /// Messages broadcast here so far; a join remembers the value at that moment.
    counter: u64,
    /// (mark, id) of recent broadcasts.
    recent: VecDeque<(u64, MessageId)>,
    /// Broadcast here but not yet confirmed persisted, with their mark and
    /// when they were broadcast.
    pending: HashMap<MessageId, (u64, Instant)>,
    /// Woken whenever a pending message is confirmed.
    settled: Arc<Notify>,
}

impl Ledger {
    pub(super) fn mark(&self) -> u64 {
        self.counter
    }

    /// A new message went out live: the next mark, and pending until persisted.
    pub(super) fn broadcast(&mut self, id: MessageId) {
        self.counter += 1;
        let mark = self.counter;
        self.recent.push_back((mark, id));
        if self.recent.len() > RECENT_LOG {
            self.recent.pop_front();
        }
        let now = Instant::now();
        self.pending
            .retain(|_, (_, at)| now.duration_since(*at) < PENDING_TTL);
        self.pending.insert(id, (mark, now));
    }

    pub(super) fn persisted(&mut self, id: MessageId) {
        if self.pending.remove(&id).is_some() {
            self.settled.notify_waiters();
        }
    }

    /// Messages marked up to `mark` and not yet persisted.
    pub(super) fn pending_up_to(&self, mark: u64) -> usize {
        self.pending
            .values()
            .filter(|(m, at)| *m <= mark && at.elapsed() < PENDING_TTL)
            .count()
    }

    /// Ids of messages broadcast after `mark` (within the recent log).
    pub(super) fn live_since(&self, mark: u64) -> HashSet<MessageId> {
        self.recent
            .iter()
            .filter(|(m, _)| *m > mark)
            .map(|(_, id)| *id)
            .collect()
    }

    /// Nothing is still expected; expired entries are forgotten.
    pub(super) fn idle(&mut self) -> bool {
        self.pending.retain(|_, (_, at)| at.elapsed() < PENDING_TTL);
        self.pending.is_empty()
    }

    pub(super) fn settled_signal(&self) -> Arc<Notify> {
        self.settled.clone()
    }
}

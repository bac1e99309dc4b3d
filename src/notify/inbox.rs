//! The hand-off between the LISTEN task and the hint consumer: bounded in
//! bytes, and it coalesces instead of blocking.
//!
//! sqlx's `PgListener` buffers without bound, so the LISTEN task must keep
//! draining it however slow the consumer is. It therefore never waits here:
//! a push always succeeds at once, and when the buffer is full the oldest
//! hints make way and a single "you missed some" marker stands for them all.
//! A lost hint costs a resync by seq, never a lost message: the tables are
//! the truth (see the module doc of `notify`).

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

/// Payloads waiting for the consumer, in bytes. A payload is under 8000
/// bytes, so this holds at least ~500 notifications, each up to a worker
/// batch of persisted entries or ~100 relayed events: seconds of a busy
/// cluster. A consumer that far behind is better served by one resync than
/// by replaying stale hints, and 4 MiB per process is small beside the
/// connections' outboxes.
pub(super) const MAX_BUFFERED_BYTES: usize = 4 * 1024 * 1024;

/// Counted per buffered payload on top of its length (the `String` header,
/// the deque slot, allocator rounding), so a flood of tiny payloads is
/// bounded too.
const ITEM_OVERHEAD: usize = 64;

/// Why clients must resync by seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resync {
    /// The LISTEN connection was lost and is back.
    Reconnected,
    /// Hints were dropped here (buffer overflow) or could not be fetched.
    Missed,
}

/// A notification as the LISTEN task forwards it: routed, not yet decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pending {
    /// Persisted payloads, raw; consecutive ones are merged into one entry.
    Persisted(Vec<String>),
    /// A relay batch from another gateway, inline and not yet parsed.
    Relay(String),
    /// A relay batch from another gateway sent by reference: the
    /// `relay_payloads` row the consumer fetches.
    RelayRef(i64),
    Resync(Resync),
}

impl Pending {
    /// What this entry counts against [`MAX_BUFFERED_BYTES`].
    fn cost(&self) -> usize {
        match self {
            Pending::Persisted(payloads) => payloads.iter().map(|p| p.len() + ITEM_OVERHEAD).sum(),
            Pending::Relay(payload) => payload.len() + ITEM_OVERHEAD,
            Pending::RelayRef(_) | Pending::Resync(_) => ITEM_OVERHEAD,
        }
    }
}

/// The buffer itself, without locking or waking: plain data, so its rules
/// are tested directly.
#[derive(Debug)]
pub(super) struct Buffer {
    items: VecDeque<Pending>,
    bytes: usize,
    max_bytes: usize,
    /// At most one pending resync, delivered before the items: whatever it
    /// stands for is older than them, and a resync by seq covers them too.
    resync: Option<Resync>,
}

impl Buffer {
    pub(super) fn new(max_bytes: usize) -> Buffer {
        Buffer {
            items: VecDeque::new(),
            bytes: 0,
            max_bytes,
            resync: None,
        }
    }

    /// Add an entry; never waits and never fails. Over the bound, the oldest
    /// entries are dropped and one `Resync::Missed` marker replaces them.
    pub(super) fn push(&mut self, p: Pending) {
        match p {
            // A reconnect says more than "missed some", and both mean resync.
            Pending::Resync(Resync::Reconnected) => self.resync = Some(Resync::Reconnected),
            Pending::Resync(Resync::Missed) => {
                self.resync.get_or_insert(Resync::Missed);
            }
            Pending::Persisted(mut more) => {
                self.bytes += more.iter().map(|p| p.len() + ITEM_OVERHEAD).sum::<usize>();
                match self.items.back_mut() {
                    Some(Pending::Persisted(last)) => last.append(&mut more),
                    _ => self.items.push_back(Pending::Persisted(more)),
                }
            }
            p => {
                self.bytes += p.cost();
                self.items.push_back(p);
            }
        }
        while self.bytes > self.max_bytes {
            let Some(old) = self.items.pop_front() else {
                break;
            };
            self.bytes -= old.cost();
            self.resync.get_or_insert(Resync::Missed);
        }
    }

    /// The next entry: a pending resync first, then the oldest item.
    pub(super) fn pop(&mut self) -> Option<Pending> {
        if let Some(r) = self.resync.take() {
            return Some(Pending::Resync(r));
        }
        let p = self.items.pop_front()?;
        self.bytes -= p.cost();
        Some(p)
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

#[derive(Debug)]
struct State {
    buffer: Buffer,
    /// The LISTEN task ended: nothing more will come.
    closed: bool,
    /// The consumer was dropped: the LISTEN task may stop.
    consumer_gone: bool,
}

/// [`Buffer`] shared by the LISTEN task (producer) and the consumer.
#[derive(Debug)]
pub(super) struct Inbox {
    state: Mutex<State>,
    ready: Notify,
}

impl Inbox {
    pub(super) fn new(max_bytes: usize) -> Inbox {
        Inbox {
            state: Mutex::new(State {
                buffer: Buffer::new(max_bytes),
                closed: false,
                consumer_gone: false,
            }),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing in here panics midway; a poisoned lock still holds a whole buffer.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand over an entry without waiting. False once the consumer is gone.
    pub(super) fn push(&self, p: Pending) -> bool {
        {
            let mut s = self.lock();
            if s.consumer_gone {
                return false;
            }
            s.buffer.push(p);
        }
        // Stores a permit if the consumer is not waiting yet, so no wake-up is lost.
        self.ready.notify_one();
        true
    }

    /// The producer is done; the consumer drains what is left, then ends.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    pub(super) fn consumer_gone(&self) {
        self.lock().consumer_gone = true;
    }

    /// The next entry, waiting for one; None once closed and drained.
    pub(super) async fn take(&self) -> Option<Pending> {
        loop {
            {
                let mut s = self.lock();
                if let Some(p) = s.buffer.pop() {
                    return Some(p);
                }
                if s.closed {
                    return None;
                }
            }
            self.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(n: usize) -> Pending {
        Pending::Relay("r".repeat(n))
    }

    fn drain(b: &mut Buffer) -> Vec<Pending> {
        std::iter::from_fn(|| b.pop()).collect()
    }

    #[test]
    fn overflow_drops_the_oldest_and_leaves_exactly_one_resync_marker() {
        // Room for three 100-byte payloads.
        let mut b = Buffer::new(3 * (100 + ITEM_OVERHEAD));
        for i in 0..10 {
            b.push(Pending::Relay(format!("{i}").repeat(100)));
        }
        assert!(b.bytes() <= 3 * (100 + ITEM_OVERHEAD));
        let out = drain(&mut b);
        assert_eq!(
            out,
            vec![
                Pending::Resync(Resync::Missed),
                Pending::Relay("7".repeat(100)),
                Pending::Relay("8".repeat(100)),
                Pending::Relay("9".repeat(100)),
            ],
            "one marker first, then the newest that fit"
        );
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn a_new_overflow_after_the_marker_was_taken_yields_a_new_marker() {
        let mut b = Buffer::new(100 + ITEM_OVERHEAD);
        b.push(relay(100));
        b.push(relay(100));
        assert_eq!(b.pop(), Some(Pending::Resync(Resync::Missed)));
        b.push(relay(100));
        assert_eq!(b.pop(), Some(Pending::Resync(Resync::Missed)));
        assert_eq!(b.pop(), Some(relay(100)));
        assert_eq!(b.pop(), None);
    }

    #[test]
    fn consecutive_persisted_payloads_merge_into_one_entry() {
        let mut b = Buffer::new(MAX_BUFFERED_BYTES);
        b.push(Pending::Persisted(vec!["a".into()]));
        b.push(Pending::Persisted(vec!["b".into()]));
        b.push(Pending::RelayRef(7));
        b.push(Pending::Persisted(vec!["c".into()]));
        assert_eq!(
            drain(&mut b),
            vec![
                Pending::Persisted(vec!["a".into(), "b".into()]),
                Pending::RelayRef(7),
                Pending::Persisted(vec!["c".into()]),
            ],
            "merged only while consecutive, so order across kinds holds"
        );
        assert_eq!(b.bytes(), 0, "merged entries are accounted exactly");
    }

    #[test]
    fn many_tiny_payloads_are_bounded_too() {
        let mut b = Buffer::new(10 * ITEM_OVERHEAD);
        for id in 0..1000 {
            b.push(Pending::RelayRef(id));
        }
        let out = drain(&mut b);
        assert_eq!(out.len(), 11, "the marker and ten references: {out:?}");
        assert_eq!(out[0], Pending::Resync(Resync::Missed));
        assert_eq!(out[1], Pending::RelayRef(990));
    }

    #[test]
    fn a_reconnect_outranks_a_missed_marker_and_is_never_dropped() {
        let mut b = Buffer::new(100 + ITEM_OVERHEAD);
        b.push(Pending::Resync(Resync::Reconnected));
        b.push(relay(100));
        b.push(relay(100));
        b.push(Pending::Resync(Resync::Reconnected));
        assert_eq!(
            drain(&mut b),
            vec![Pending::Resync(Resync::Reconnected), relay(100)]
        );
    }

    #[tokio::test]
    async fn the_producer_never_waits_and_the_consumer_drains_then_ends() {
        let inbox = Inbox::new(10 * (10 + ITEM_OVERHEAD));
        // Nobody is taking: pushes still return at once.
        for _ in 0..1000 {
            assert!(inbox.push(relay(10)));
        }
        inbox.close();
        let mut n = 0;
        while let Some(p) = inbox.take().await {
            if n == 0 {
                assert_eq!(p, Pending::Resync(Resync::Missed));
            }
            n += 1;
        }
        assert_eq!(n, 11);
        inbox.consumer_gone();
        assert!(
            !inbox.push(relay(1)),
            "the producer learns the consumer left"
        );
    }
}

//! A connection's write queue, bounded in bytes: the one place its budget
//! and its two allowances (others' pushes, its own replies) are kept.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Bytes charged per queued frame on top of its length: the queue slot and
/// `Bytes` handle (about 40 bytes) plus the WebSocket header written for it,
/// rounded up. So a flood of tiny frames (typing, receipts) is bounded too:
/// at most `budget / 64` frames, 4,096 at the default budget.
pub const FRAME_OVERHEAD: usize = 64;

/// The sending side of a connection's write queue, bounded in bytes (as
/// Centrifugo does), not frames: a sync page and a typing event differ by
/// three orders of magnitude, and memory is what a stalled client pins.
///
/// Two kinds of frame share the queue, in order, each with its own allowance
/// of `budget` bytes:
/// - pushes ([`Outbox::push`]: others' events, fanned out without waiting):
///   one that would take the queued pushes past the budget flags the
///   connection slow, and its writer closes it with a reconnect-and-resync
///   code rather than let it slow the room or grow memory;
/// - replies ([`Outbox::reply`]: answers to this client's own requests) are
///   never refused and never make a connection slow; instead the session
///   takes no new request while the replies queued exceed the budget
///   ([`Outbox::reply_room`]), so a client that pipelines requests is slowed
///   to the pace it reads, through TCP, and loses nothing.
///
/// An empty allowance always takes one frame, whatever its size, so no single
/// frame can make a connection slow on its own.
#[derive(Clone, Debug)]
pub struct Outbox {
    // Unbounded in frames only: every frame is charged to a byte allowance
    // before it is queued (see above), which bounds the count too.
    tx: mpsc::UnboundedSender<Queued>,
    budget: Arc<Budget>,
}

#[derive(Debug)]
struct Queued {
    frame: Bytes,
    reply: bool,
    urgency: Urgency,
}

/// Whether a frame must be written at once or may wait, up to the writer's
/// hold, to share the connection's next write.
///
/// On loopback and on the wire alike each write is a syscall and a packet,
/// and a confirmation nobody waits on (`message_persisted`) doubled the writes
/// of every message: in a busy room it rides with the next message instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Urgency {
    Now,
    MayWait,
}

/// A frame taken from the outbox, and how soon it must go out.
#[derive(Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub frame: Bytes,
    pub urgency: Urgency,
}

impl Queued {
    fn cost(&self) -> usize {
        self.frame.len() + FRAME_OVERHEAD
    }
}

#[derive(Debug)]
struct Budget {
    limit: usize,
    /// Bytes (with overhead) of pushes queued and not yet taken by the writer.
    pushes: AtomicUsize,
    /// The same for replies.
    replies: AtomicUsize,
    /// Woken when the replies queued fall back under the limit.
    drained: Notify,
    slow: CancellationToken,
    /// `slow` as a plain flag for the per-frame checks: the token's
    /// `is_cancelled` takes a lock, and it was ~3 % of the server's CPU in an
    /// S1 profile (once per recipient per broadcast).
    overflowed: AtomicBool,
}

/// What happened to a frame pushed into an outbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The push allowance was used up; the connection is now being closed as slow.
    Overflow,
    /// The connection is gone.
    Closed,
}

impl Outbox {
    /// An outbox allowing `budget` bytes of pushes and as many of replies.
    pub fn new(budget: usize) -> (Outbox, OutboxReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Budget {
            limit: budget,
            pushes: AtomicUsize::new(0),
            replies: AtomicUsize::new(0),
            drained: Notify::new(),
            slow: CancellationToken::new(),
            overflowed: AtomicBool::new(false),
        });
        (
            Outbox {
                tx,
                budget: budget.clone(),
            },
            OutboxReceiver { rx, budget },
        )
    }

    /// Queue an event from elsewhere, never waiting: past the push allowance
    /// the connection is flagged slow instead.
    pub fn push(&self, frame: Bytes) -> Push {
        self.push_with(frame, Urgency::Now)
    }

    /// [`Outbox::push`], for a frame that may wait for the connection's next
    /// write (see [`Urgency`]).
    pub fn push_with(&self, frame: Bytes, urgency: Urgency) -> Push {
        let b = &self.budget;
        if b.overflowed.load(Ordering::Acquire) {
            // Being closed: what is queued will not be written anyway.
            return Push::Overflow;
        }
        let q = Queued {
            frame,
            reply: false,
            urgency,
        };
        let cost = q.cost();
        let admitted = b
            .pushes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued == 0 || queued + cost <= b.limit).then_some(queued + cost)
            });
        if admitted.is_err() {
            b.overflowed.store(true, Ordering::Release);
            b.slow.cancel();
            return Push::Overflow;
        }
        self.send(q, &b.pushes)
    }

    /// Queue the answer to one of this client's requests. Never refused for
    /// room: the session stops taking requests while replies are over the
    /// budget instead (see [`Outbox::reply_room`]).
    pub fn reply(&self, frame: Bytes) -> Push {
        let q = Queued {
            frame,
            reply: true,
            urgency: Urgency::Now,
        };
        self.budget.replies.fetch_add(q.cost(), Ordering::AcqRel);
        self.send(q, &self.budget.replies)
    }

    fn send(&self, q: Queued, charged: &AtomicUsize) -> Push {
        let cost = q.cost();
        match self.tx.send(q) {
            Ok(()) => Push::Queued,
            Err(_) => {
                charged.fetch_sub(cost, Ordering::AcqRel);
                Push::Closed
            }
        }
    }

    /// Wait until the replies queued are within the budget and the pushes
    /// within half of it: the session calls this before taking each request,
    /// so a client that does not read its answers stops being read, and one
    /// that pipelines sends cannot overflow itself with its own echoes (the
    /// other half is left for everyone else's events). Cancel-safe.
    pub async fn reply_room(&self) {
        let b = &self.budget;
        let has_room = || {
            b.replies.load(Ordering::Acquire) <= b.limit
                && b.pushes.load(Ordering::Acquire) <= b.limit / 2
        };
        // The common case, checked before registering with `drained` (whose
        // waiter list takes a lock): a client that reads keeps room.
        if has_room() {
            return;
        }
        loop {
            let drained = b.drained.notified();
            tokio::pin!(drained);
            // Registered before the check, so a drain in between still wakes us.
            drained.as_mut().enable();
            if has_room() {
                return;
            }
            drained.await;
        }
    }

    /// Cancelled once the push allowance overflowed.
    pub fn slow_signal(&self) -> &CancellationToken {
        &self.budget.slow
    }

    /// Bytes queued (pushes, replies), overhead included.
    pub fn queued(&self) -> (usize, usize) {
        (
            self.budget.pushes.load(Ordering::Acquire),
            self.budget.replies.load(Ordering::Acquire),
        )
    }
}

/// The writer's end of an [`Outbox`]: frames in the order queued, each
/// released from its allowance as it is taken.
#[derive(Debug)]
pub struct OutboxReceiver {
    rx: mpsc::UnboundedReceiver<Queued>,
    budget: Arc<Budget>,
}

impl OutboxReceiver {
    /// The next frame; None once every [`Outbox`] is dropped. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        let q = self.rx.recv().await?;
        Some(self.release(q))
    }

    /// The connection overflowed and is being closed as slow (lock-free,
    /// unlike the slow signal's `is_cancelled`).
    pub fn overflowed(&self) -> bool {
        self.budget.overflowed.load(Ordering::Acquire)
    }

    /// The next frame if one is queued now.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        let q = self.rx.try_recv().ok()?;
        Some(self.release(q))
    }

    fn release(&self, q: Queued) -> Outgoing {
        let cost = q.cost();
        let b = &self.budget;
        let (queued, room) = if q.reply {
            (&b.replies, b.limit)
        } else {
            (&b.pushes, b.limit / 2)
        };
        let before = queued.fetch_sub(cost, Ordering::AcqRel);
        // Only a crossing can end a wait in `reply_room`.
        if before > room && before - cost <= room {
            b.drained.notify_waiters();
        }
        Outgoing {
            frame: q.frame,
            urgency: q.urgency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_are_bounded_in_bytes_overhead_included() {
        // Tiny frames are bounded by their overhead: 10 one-byte frames fit
        // in 10 * 65 bytes, the 11th does not.
        let (o, mut rx) = Outbox::new(10 * (1 + FRAME_OVERHEAD));
        for _ in 0..10 {
            assert_eq!(o.push(Bytes::from_static(b"x")), Push::Queued);
        }
        assert_eq!(o.queued().0, 10 * (1 + FRAME_OVERHEAD));
        assert_eq!(o.push(Bytes::from_static(b"x")), Push::Overflow);
        assert!(o.slow_signal().is_cancelled());
        // Taking frames gives their bytes back.
        while rx.try_recv().is_some() {}
        assert_eq!(o.queued(), (0, 0));
    }

    #[test]
    fn one_frame_larger_than_the_budget_fits_an_empty_outbox() {
        let (o, mut rx) = Outbox::new(100);
        let big = Bytes::from(vec![b'a'; 1000]);
        assert_eq!(o.push(big.clone()), Push::Queued);
        assert!(!o.slow_signal().is_cancelled());
        assert_eq!(rx.try_recv().map(|o| o.frame), Some(big));
        assert_eq!(o.push(Bytes::from_static(b"y")), Push::Queued);
    }

    #[test]
    fn replies_never_overflow_nor_use_the_push_allowance() {
        let (o, mut rx) = Outbox::new(100);
        for _ in 0..1000 {
            assert_eq!(o.reply(Bytes::from_static(b"ack")), Push::Queued);
        }
        assert!(!o.slow_signal().is_cancelled());
        assert_eq!(o.push(Bytes::from_static(b"event")), Push::Queued);
        // In the order queued, replies and pushes alike.
        assert_eq!(
            rx.try_recv().map(|o| o.frame),
            Some(Bytes::from_static(b"ack"))
        );
        drop(rx);
        assert_eq!(o.reply(Bytes::from_static(b"late")), Push::Closed);
    }

    #[test]
    fn a_frame_that_may_wait_keeps_its_urgency_its_place_and_the_push_allowance() {
        let (o, mut rx) = Outbox::new(2 * (1 + FRAME_OVERHEAD));
        assert_eq!(
            o.push_with(Bytes::from_static(b"p"), Urgency::MayWait),
            Push::Queued
        );
        assert_eq!(o.reply(Bytes::from_static(b"r")), Push::Queued);
        assert_eq!(o.push(Bytes::from_static(b"n")), Push::Queued);
        // Charged to the pushes like any other event: the next one overflows.
        assert_eq!(
            o.push_with(Bytes::from_static(b"x"), Urgency::MayWait),
            Push::Overflow
        );
        let got: Vec<(Bytes, Urgency)> = std::iter::from_fn(|| rx.try_recv())
            .map(|o| (o.frame, o.urgency))
            .collect();
        assert_eq!(
            got,
            [
                (Bytes::from_static(b"p"), Urgency::MayWait),
                (Bytes::from_static(b"r"), Urgency::Now),
                (Bytes::from_static(b"n"), Urgency::Now),
            ]
        );
    }

    #[tokio::test]
    async fn reply_room_waits_until_the_writer_drains_replies() {
        let (o, mut rx) = Outbox::new(200);
        o.reply_room().await;
        for _ in 0..4 {
            o.reply(Bytes::from_static(b"0123456789"));
        }
        // 4 * 74 bytes queued, over 200: the session must wait.
        let waiter = {
            let o = o.clone();
            tokio::spawn(async move { o.reply_room().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        rx.try_recv();
        assert!(rx.try_recv().is_some());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken once replies fit")
            .unwrap();

        // Pushes past half the budget hold the session too.
        for _ in 0..2 {
            o.push(Bytes::from_static(b"0123456789"));
        }
        let waiter = {
            let o = o.clone();
            tokio::spawn(async move { o.reply_room().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        while rx.try_recv().is_some() {}
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken once pushes fit")
            .unwrap();
    }
}

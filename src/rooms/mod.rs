//! The in-memory registry: conversation -> connections joined to it on this
//! process, and each connection's bounded outbox.
//!
//! Memory and channels only: no socket, no SQL. A broadcast receives a frame
//! already encoded and hands every recipient a clone of the same `Bytes`.
//! Shard locks are `std::sync::Mutex`, held only for non-blocking work
//! (`try_send`), never across an `.await`.

mod ledger;
mod users;

use ledger::Ledger;

pub use users::{Transition, Users};

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::domain::{ConversationId, MessageId, UserId};

/// A connection on this process; unique for the process lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConnectionId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

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
        let b = &self.budget;
        if b.overflowed.load(Ordering::Acquire) {
            // Being closed: what is queued will not be written anyway.
            return Push::Overflow;
        }
        let q = Queued {
            frame,
            reply: false,
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
        let q = Queued { frame, reply: true };
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
    pub async fn recv(&mut self) -> Option<Bytes> {
        let q = self.rx.recv().await?;
        Some(self.release(q))
    }

    /// The connection overflowed and is being closed as slow (lock-free,
    /// unlike the slow signal's `is_cancelled`).
    pub fn overflowed(&self) -> bool {
        self.budget.overflowed.load(Ordering::Acquire)
    }

    /// The next frame if one is queued now.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let q = self.rx.try_recv().ok()?;
        Some(self.release(q))
    }

    fn release(&self, q: Queued) -> Bytes {
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
        q.frame
    }
}

/// A connection's entry in a room.
#[derive(Clone, Debug)]
pub struct Member {
    pub conn: ConnectionId,
    pub user: UserId,
    pub outbox: Outbox,
}

/// A conversation's state on this process.
#[derive(Default)]
struct Room {
    members: Vec<Member>,
    ledger: Ledger,
}

impl Room {
    /// No members and nothing still expected: the room can be forgotten.
    fn idle(&mut self) -> bool {
        self.members.is_empty() && self.ledger.idle()
    }
}

type Shard = Mutex<HashMap<ConversationId, Room>>;

/// Sharded so that busy conversations on different shards do not contend.
pub struct Rooms {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Rooms {
    fn default() -> Self {
        Rooms::new(64)
    }
}

impl Rooms {
    pub fn new(shards: usize) -> Self {
        let shards = shards.max(1);
        Rooms {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(
        &self,
        conv: ConversationId,
    ) -> std::sync::MutexGuard<'_, HashMap<ConversationId, Room>> {
        let idx = (self.hasher.hash_one(conv) as usize) % self.shards.len();
        // A poisoned shard only means another thread panicked mid-update of a
        // plain map of handles; the data is still usable.
        self.shards[idx].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a connection to a room. Returns whether it was new, and the room's
    /// broadcast mark at this moment: messages broadcast after it reach the
    /// connection live.
    pub fn join(&self, conv: ConversationId, member: Member) -> (bool, u64) {
        let mut shard = self.shard(conv);
        let room = shard.entry(conv).or_default();
        if room.members.iter().any(|m| m.conn == member.conn) {
            return (false, room.ledger.mark());
        }
        room.members.push(member);
        (true, room.ledger.mark())
    }

    /// Remove a connection from a room; false if it was not there.
    pub fn leave(&self, conv: ConversationId, conn: ConnectionId) -> bool {
        let mut shard = self.shard(conv);
        let Some(room) = shard.get_mut(&conv) else {
            return false;
        };
        let before = room.members.len();
        room.members.retain(|m| m.conn != conn);
        let removed = room.members.len() != before;
        if room.idle() {
            shard.remove(&conv);
        }
        removed
    }

    pub fn is_joined(&self, conv: ConversationId, conn: ConnectionId) -> bool {
        self.shard(conv)
            .get(&conv)
            .is_some_and(|room| room.members.iter().any(|m| m.conn == conn))
    }

    /// Remove every connection of `user` from a room (their membership ended).
    /// Returns how many connections were removed.
    pub fn evict_user(&self, conv: ConversationId, user: UserId) -> usize {
        let mut shard = self.shard(conv);
        let Some(room) = shard.get_mut(&conv) else {
            return 0;
        };
        let before = room.members.len();
        room.members.retain(|m| m.user != user);
        let removed = before - room.members.len();
        if room.idle() {
            shard.remove(&conv);
        }
        removed
    }

    /// Queue `frame` on every connection in the room except `except`.
    /// Returns the number of connections it was queued on.
    pub fn broadcast(
        &self,
        conv: ConversationId,
        frame: &Bytes,
        except: Option<ConnectionId>,
    ) -> usize {
        let shard = self.shard(conv);
        let Some(room) = shard.get(&conv) else {
            return 0;
        };
        fan_out(&room.members, frame, except)
    }

    /// Broadcast a new message and remember it as pending until
    /// [`Rooms::persisted`] confirms it.
    pub fn broadcast_message(&self, conv: ConversationId, id: MessageId, frame: &Bytes) -> usize {
        let mut shard = self.shard(conv);
        let room = shard.entry(conv).or_default();
        room.ledger.broadcast(id);
        fan_out(&room.members, frame, None)
    }

    /// A message is durable: it no longer counts as pending.
    pub fn persisted(&self, conv: ConversationId, id: MessageId) {
        let mut shard = self.shard(conv);
        if let Some(room) = shard.get_mut(&conv) {
            room.ledger.persisted(id);
            if room.idle() {
                shard.remove(&conv);
            }
        }
    }

    /// Messages broadcast here up to `mark` and not yet persisted.
    pub fn pending_up_to(&self, conv: ConversationId, mark: u64) -> usize {
        self.shard(conv)
            .get(&conv)
            .map_or(0, |room| room.ledger.pending_up_to(mark))
    }

    /// Wait until every message broadcast here up to `mark` is persisted, or
    /// `deadline`; true if they all were. Woken by [`Rooms::persisted`].
    pub async fn settled(
        &self,
        conv: ConversationId,
        mark: u64,
        deadline: tokio::time::Instant,
    ) -> bool {
        loop {
            let Some(signal) = self
                .shard(conv)
                .get(&conv)
                .map(|room| room.ledger.settled_signal())
            else {
                return true;
            };
            let woken = signal.notified();
            tokio::pin!(woken);
            // Registered before the check, so a confirmation in between still wakes us.
            woken.as_mut().enable();
            if self.pending_up_to(conv, mark) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return self.pending_up_to(conv, mark) == 0;
            }
        }
    }

    /// Ids of messages broadcast after `mark` (within the recent log).
    pub fn live_since(&self, conv: ConversationId, mark: u64) -> HashSet<MessageId> {
        self.shard(conv)
            .get(&conv)
            .map_or_else(HashSet::new, |room| room.ledger.live_since(mark))
    }

    /// Number of connections joined to `conv` on this process.
    pub fn room_size(&self, conv: ConversationId) -> usize {
        self.shard(conv).get(&conv).map_or(0, |r| r.members.len())
    }
}

/// try_send never waits, so holding the shard lock here costs no more than
/// copying the handles out would, and saves an allocation per broadcast.
fn fan_out(members: &[Member], frame: &Bytes, except: Option<ConnectionId>) -> usize {
    members
        .iter()
        .filter(|m| Some(m.conn) != except)
        .filter(|m| m.outbox.push(frame.clone()) == Push::Queued)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: UserId, budget: usize) -> (Member, OutboxReceiver) {
        let (outbox, rx) = Outbox::new(budget);
        (
            Member {
                conn: ConnectionId::next(),
                user,
                outbox,
            },
            rx,
        )
    }

    fn uid() -> UserId {
        UserId(uuid::Uuid::new_v4())
    }

    #[test]
    fn broadcast_reaches_everyone_but_the_excluded_with_shared_bytes() {
        let rooms = Rooms::new(4);
        let conv = ConversationId::new_v7();
        let (a, mut ra) = member(uid(), 1024);
        let (b, mut rb) = member(uid(), 1024);
        let a_conn = a.conn;
        assert!(rooms.join(conv, a).0);
        assert!(rooms.join(conv, b).0);
        let frame = Bytes::from_static(b"{}");
        assert_eq!(rooms.broadcast(conv, &frame, None), 2);
        assert_eq!(rooms.broadcast(conv, &frame, Some(a_conn)), 1);
        let got = ra.try_recv().unwrap();
        assert_eq!(
            got.as_ptr(),
            frame.as_ptr(),
            "the frame is shared, not copied"
        );
        assert!(ra.try_recv().is_none());
        assert_eq!(rb.try_recv().unwrap(), frame);
        assert_eq!(rb.try_recv().unwrap(), frame);
    }

    #[test]
    fn join_is_idempotent_and_leave_cleans_up() {
        let rooms = Rooms::new(1);
        let conv = ConversationId::new_v7();
        let (a, _ra) = member(uid(), 100);
        let conn = a.conn;
        assert!(rooms.join(conv, a.clone()).0);
        assert!(!rooms.join(conv, a).0);
        assert!(rooms.is_joined(conv, conn));
        assert!(rooms.leave(conv, conn));
        assert!(!rooms.leave(conv, conn));
        assert!(!rooms.is_joined(conv, conn));
        assert_eq!(rooms.room_size(conv), 0);
    }

    #[test]
    fn overflow_flags_the_connection_slow_and_spares_the_others() {
        let rooms = Rooms::new(2);
        let conv = ConversationId::new_v7();
        let (slow, _never_read) = member(uid(), 100);
        let signal = slow.outbox.slow_signal().clone();
        let (fast, mut rf) = member(uid(), 4096);
        rooms.join(conv, slow);
        rooms.join(conv, fast);
        let f = Bytes::from_static(b"x");
        assert_eq!(rooms.broadcast(conv, &f, None), 2);
        assert!(!signal.is_cancelled());
        assert_eq!(rooms.broadcast(conv, &f, None), 1);
        assert!(signal.is_cancelled());
        assert_eq!(rf.try_recv().unwrap(), f);
        assert_eq!(rf.try_recv().unwrap(), f);
    }

    #[test]
    fn pending_and_live_marks_tell_sync_what_to_wait_for_and_leave_out() {
        let rooms = Rooms::new(2);
        let conv = ConversationId::new_v7();
        let (a, _ra) = member(uid(), 4096);
        rooms.join(conv, a);
        let (m1, m2) = (MessageId::new_v7(), MessageId::new_v7());
        rooms.broadcast_message(conv, m1, &Bytes::from_static(b"1"));
        let (b, _rb) = member(uid(), 4096);
        let (_, mark) = rooms.join(conv, b);
        rooms.broadcast_message(conv, m2, &Bytes::from_static(b"2"));
        assert_eq!(
            rooms.pending_up_to(conv, mark),
            1,
            "m1 was sent before b joined"
        );
        assert_eq!(rooms.live_since(conv, mark), HashSet::from([m2]));
        rooms.persisted(conv, m1);
        assert_eq!(rooms.pending_up_to(conv, mark), 0);
    }

    #[tokio::test]
    async fn settled_is_woken_by_the_confirmation_not_by_polling() {
        let rooms = std::sync::Arc::new(Rooms::new(2));
        let conv = ConversationId::new_v7();
        let m = MessageId::new_v7();
        rooms.broadcast_message(conv, m, &Bytes::from_static(b"1"));
        let far = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        let waiter = {
            let rooms = rooms.clone();
            tokio::spawn(async move { rooms.settled(conv, 1, far).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        rooms.persisted(conv, m);
        assert!(waiter.await.unwrap());
        // Nothing pending up to the mark: settled at once; a deadline in the
        // past with something pending: not settled.
        assert!(rooms.settled(conv, 1, far).await);
        rooms.broadcast_message(conv, MessageId::new_v7(), &Bytes::from_static(b"2"));
        assert!(!rooms.settled(conv, 2, tokio::time::Instant::now()).await);
    }

    #[test]
    fn a_room_with_pending_messages_outlives_its_members() {
        let rooms = Rooms::new(1);
        let conv = ConversationId::new_v7();
        let (a, _ra) = member(uid(), 1024);
        let conn = a.conn;
        rooms.join(conv, a);
        let m = MessageId::new_v7();
        rooms.broadcast_message(conv, m, &Bytes::from_static(b"x"));
        rooms.leave(conv, conn);
        assert_eq!(rooms.pending_up_to(conv, u64::MAX), 1);
        rooms.persisted(conv, m);
        assert_eq!(rooms.pending_up_to(conv, u64::MAX), 0);
    }

    #[test]
    fn evict_user_removes_all_their_connections() {
        let rooms = Rooms::new(2);
        let conv = ConversationId::new_v7();
        let u = uid();
        let (d1, _r1) = member(u, 100);
        let (d2, _r2) = member(u, 100);
        let (other, _r3) = member(uid(), 100);
        rooms.join(conv, d1);
        rooms.join(conv, d2);
        rooms.join(conv, other);
        assert_eq!(rooms.evict_user(conv, u), 2);
        assert_eq!(rooms.room_size(conv), 1);
    }

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
        assert_eq!(rx.try_recv(), Some(big));
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
        assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"ack")));
        drop(rx);
        assert_eq!(o.reply(Bytes::from_static(b"late")), Push::Closed);
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

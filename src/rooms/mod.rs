//! The in-memory registry: conversation -> connections joined to it on this
//! process, and each connection's bounded outbox.
//!
//! Memory and channels only: no socket, no SQL. A broadcast receives a frame
//! already encoded and hands every recipient a clone of the same `Bytes`
//! (Socket.IO connections a clone of the same wrapped `Bytes`, made once).
//! Shard locks are `std::sync::Mutex`, held only for non-blocking work
//! (`try_send`), never across an `.await`.

mod ledger;
mod outbox;
mod users;

use ledger::Ledger;

pub use outbox::{Outbox, OutboxReceiver, Outgoing, Push, Urgency, FRAME_OVERHEAD};
pub use users::{Transition, Users};

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

use crate::domain::{ConversationId, MessageId, UserId};
use crate::protocol::{socketio, Framing};

/// A connection on this process; unique for the process lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

impl ConnectionId {
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ConnectionId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A connection's entry in a room.
#[derive(Clone, Debug)]
pub struct Member {
    pub conn: ConnectionId,
    pub user: UserId,
    pub outbox: Outbox,
    pub framing: Framing,
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

    /// How many of `user`'s connections here are in the room.
    pub fn user_connections(&self, conv: ConversationId, user: UserId) -> usize {
        self.shard(conv).get(&conv).map_or(0, |room| {
            room.members.iter().filter(|m| m.user == user).count()
        })
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
        fan_out(&room.members, frame, except, Urgency::Now)
    }

    /// Broadcast a new message and remember it as pending until
    /// [`Rooms::persisted`] confirms it.
    pub fn broadcast_message(&self, conv: ConversationId, id: MessageId, frame: &Bytes) -> usize {
        let mut shard = self.shard(conv);
        let room = shard.entry(conv).or_default();
        room.ledger.broadcast(id);
        fan_out(&room.members, frame, None, Urgency::Now)
    }

    /// A message is durable: it no longer counts as pending here, and
    /// `frame` (its `message_persisted`) goes to the room, free to wait for
    /// each connection's next write. Returns the connections it was queued on.
    pub fn confirm_persisted(&self, conv: ConversationId, id: MessageId, frame: &Bytes) -> usize {
        let mut shard = self.shard(conv);
        let Some(room) = shard.get_mut(&conv) else {
            return 0;
        };
        room.ledger.persisted(id);
        let queued = fan_out(&room.members, frame, None, Urgency::MayWait);
        if room.idle() {
            shard.remove(&conv);
        }
        queued
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
/// One frame to every member but `except`: the same bytes for all native
/// connections, and for all Socket.IO ones the same wrapped bytes, wrapped
/// at most once per broadcast.
fn fan_out(
    members: &[Member],
    frame: &Bytes,
    except: Option<ConnectionId>,
    urgency: Urgency,
) -> usize {
    let mut wrapped: Option<Bytes> = None;
    let mut queued = 0;
    for m in members.iter().filter(|m| Some(m.conn) != except) {
        let f = match m.framing {
            Framing::Native => frame.clone(),
            Framing::SocketIo => wrapped
                .get_or_insert_with(|| socketio::wrapped(frame))
                .clone(),
        };
        if m.outbox.push_with(f, urgency) == Push::Queued {
            queued += 1;
        }
    }
    queued
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
                framing: Framing::Native,
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
        let got = ra.try_recv().unwrap().frame;
        assert_eq!(
            got.as_ptr(),
            frame.as_ptr(),
            "the frame is shared, not copied"
        );
        assert!(ra.try_recv().is_none());
        assert_eq!(rb.try_recv().unwrap().frame, frame);
        assert_eq!(rb.try_recv().unwrap().frame, frame);
    }

    #[test]
    fn a_mixed_room_wraps_a_broadcast_once_for_all_its_socket_io_members() {
        let rooms = Rooms::new(1);
        let conv = ConversationId::new_v7();
        let mut rx = Vec::new();
        for framing in [Framing::Native, Framing::SocketIo, Framing::SocketIo] {
            let (mut m, r) = member(uid(), 1024);
            m.framing = framing;
            rooms.join(conv, m);
            rx.push(r);
        }
        let frame = Bytes::from_static(br#"{"type":"typing","is_typing":true}"#);
        assert_eq!(rooms.broadcast(conv, &frame, None), 3);
        let got: Vec<Bytes> = rx.iter_mut().map(|r| r.try_recv().unwrap().frame).collect();
        assert_eq!(got[0].as_ptr(), frame.as_ptr(), "native: the frame itself");
        assert_eq!(
            &got[1][..],
            br#"42["typing",{"type":"typing","is_typing":true}]"#
        );
        assert_eq!(
            got[1].as_ptr(),
            got[2].as_ptr(),
            "Socket.IO members share one wrapped copy"
        );
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
        assert_eq!(rf.try_recv().unwrap().frame, f);
        assert_eq!(rf.try_recv().unwrap().frame, f);
    }

    #[test]
    fn pending_and_live_marks_tell_sync_what_to_wait_for_and_leave_out() {
        let rooms = Rooms::new(2);
        let conv = ConversationId::new_v7();
        let (a, mut ra) = member(uid(), 4096);
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
        assert_eq!(
            rooms.confirm_persisted(conv, m1, &Bytes::from_static(b"p1")),
            2
        );
        assert_eq!(rooms.pending_up_to(conv, mark), 0);
        // The confirmation reaches the room after the messages, and may wait.
        let got: Vec<Outgoing> = std::iter::from_fn(|| ra.try_recv()).collect();
        assert_eq!(
            got.last(),
            Some(&Outgoing {
                frame: Bytes::from_static(b"p1"),
                urgency: Urgency::MayWait
            })
        );
        assert!(got[..got.len() - 1]
            .iter()
            .all(|o| o.urgency == Urgency::Now));
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
        rooms.confirm_persisted(conv, m, &Bytes::new());
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
        assert_eq!(rooms.confirm_persisted(conv, m, &Bytes::new()), 0);
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
}

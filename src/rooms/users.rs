//! user -> connections on this process: for presence (online while any
//! device is connected) and for pushing to all of a user's devices.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

use bytes::Bytes;

use super::{ConnectionId, Outbox, Push};
use crate::domain::UserId;

#[derive(Default)]
struct Entry {
    conns: Vec<(ConnectionId, Outbox)>,
    /// Bumped whenever the user connects or goes to zero connections, so a
    /// delayed "offline" can tell whether it is still true.
    generation: u64,
}

pub struct Users {
    shards: Box<[Mutex<HashMap<UserId, Entry>>]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Users {
    fn default() -> Self {
        Users {
            shards: (0..64).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
        }
    }
}

/// What a connect or disconnect means for the user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// First connection, and the user was not within an offline grace period.
    CameOnline,
    /// Last connection closed: offline unless they return within the grace
    /// period; pass the generation to [`Users::expire`].
    MaybeOffline(u64),
    /// Nothing others need to hear.
    Unchanged,
}

impl Users {
    fn shard(&self, user: UserId) -> std::sync::MutexGuard<'_, HashMap<UserId, Entry>> {
        let i = (self.hasher.hash_one(user) as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn connect(&self, user: UserId, conn: ConnectionId, outbox: Outbox) -> Transition {
        let mut shard = self.shard(user);
        let existed = shard.contains_key(&user);
        let entry = shard.entry(user).or_default();
        entry.generation += 1;
        let first = entry.conns.is_empty();
        entry.conns.push((conn, outbox));
        if first && !existed {
            Transition::CameOnline
        } else {
            // Either another device is on, or they came back within the grace
            // period: no flapping offline/online.
            Transition::Unchanged
        }
    }

    pub fn disconnect(&self, user: UserId, conn: ConnectionId) -> Transition {
        let mut shard = self.shard(user);
        let Some(entry) = shard.get_mut(&user) else {
            return Transition::Unchanged;
        };
        entry.conns.retain(|(c, _)| *c != conn);
        if entry.conns.is_empty() {
            entry.generation += 1;
            Transition::MaybeOffline(entry.generation)
        } else {
            Transition::Unchanged
        }
    }

    /// The grace period ended: true if the user is really offline now (and
    /// forgets them).
    pub fn expire(&self, user: UserId, generation: u64) -> bool {
        let mut shard = self.shard(user);
        match shard.get(&user) {
            Some(e) if e.conns.is_empty() && e.generation == generation => {
                shard.remove(&user);
                true
            }
            _ => false,
        }
    }

    /// Online: connected, or disconnected less than the grace period ago.
    pub fn is_online(&self, user: UserId) -> bool {
        self.shard(user).contains_key(&user)
    }

    /// Queue `frame` on each of the user's connections except `except`.
    pub fn push(&self, user: UserId, frame: &Bytes, except: Option<ConnectionId>) -> usize {
        let shard = self.shard(user);
        shard.get(&user).map_or(0, |e| {
            e.conns
                .iter()
                .filter(|(c, _)| Some(*c) != except)
                .filter(|(_, o)| o.push(frame.clone()) == Push::Queued)
                .count()
        })
    }

    /// Queue `frame` on one connection of the user.
    pub fn push_to(&self, user: UserId, conn: ConnectionId, frame: &Bytes) {
        if let Some(e) = self.shard(user).get(&user) {
            if let Some((_, o)) = e.conns.iter().find(|(c, _)| *c == conn) {
                let _ = o.push(frame.clone());
            }
        }
    }

    /// Every user known here, with their connection count (0 while in the
    /// offline grace period).
    pub fn snapshot(&self) -> Vec<(UserId, usize)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(shard.iter().map(|(u, e)| (*u, e.conns.len())));
        }
        out
    }

    /// How many connections the user has here.
    pub fn count(&self, user: UserId) -> usize {
        self.shard(user).get(&user).map_or(0, |e| e.conns.len())
    }

    /// Queue `frame` on every connection of every user here.
    pub fn push_all(&self, frame: &Bytes) {
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for e in shard.values() {
                for (_, o) in &e.conns {
                    let _ = o.push(frame.clone());
                }
            }
        }
    }

    /// The user's connections other than `except`.
    pub fn connections(&self, user: UserId, except: ConnectionId) -> Vec<ConnectionId> {
        self.shard(user).get(&user).map_or_else(Vec::new, |e| {
            e.conns
                .iter()
                .map(|(c, _)| *c)
                .filter(|c| *c != except)
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox() -> Outbox {
        Outbox::new(4).0
    }

    #[test]
    fn devices_count_once_and_flapping_is_absorbed() {
        let users = Users::default();
        let u = UserId(uuid::Uuid::new_v4());
        let (c1, c2) = (ConnectionId::next(), ConnectionId::next());
        assert_eq!(users.connect(u, c1, outbox()), Transition::CameOnline);
        assert_eq!(users.connect(u, c2, outbox()), Transition::Unchanged);
        assert_eq!(users.disconnect(u, c1), Transition::Unchanged);
        let Transition::MaybeOffline(g) = users.disconnect(u, c2) else {
            panic!()
        };
        assert!(users.is_online(u), "still online during the grace period");
        // Back within the grace period: no online event, and the old expiry is void.
        let c3 = ConnectionId::next();
        assert_eq!(users.connect(u, c3, outbox()), Transition::Unchanged);
        assert!(!users.expire(u, g));
        let Transition::MaybeOffline(g2) = users.disconnect(u, c3) else {
            panic!()
        };
        assert!(users.expire(u, g2));
        assert!(!users.is_online(u));
        assert_eq!(users.connect(u, c1, outbox()), Transition::CameOnline);
    }
}

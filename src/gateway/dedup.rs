//! Recently accepted client message ids, so a client's retry is acked with
//! the original message id instead of being broadcast again.
//!
//! Bounded: each shard keeps two generations and drops the older one when the
//! newer fills up, so memory stays under `capacity` entries while recent ids
//! (the ones retries carry) are kept. The database's unique constraint is the
//! backstop for ids that aged out.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;

use crate::domain::{ClientMessageId, ConversationId, MessageId, UserId};

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key(UserId, ConversationId, ClientMessageId);

#[derive(Default)]
struct Shard {
    young: HashMap<Key, MessageId>,
    old: HashMap<Key, MessageId>,
}

pub struct DedupCache {
    shards: Box<[Mutex<Shard>]>,
    per_generation: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl DedupCache {
    pub fn new(capacity: usize) -> Self {
        const SHARDS: usize = 16;
        DedupCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_generation: (capacity / SHARDS / 2).max(1),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &Key) -> std::sync::MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record `id` for the key, or return the id recorded earlier.
    pub fn claim(
        &self,
        user: UserId,
        conv: ConversationId,
        cmid: &ClientMessageId,
        id: MessageId,
    ) -> Result<(), MessageId> {
        let key = Key(user, conv, cmid.clone());
        let mut shard = self.shard(&key);
        if let Some(existing) = shard.young.get(&key).or_else(|| shard.old.get(&key)) {
            return Err(*existing);
        }
        if shard.young.len() >= self.per_generation {
            shard.old = std::mem::take(&mut shard.young);
        }
        shard.young.insert(key, id);
        Ok(())
    }

    /// Forget a claim whose message was refused after all (not queued).
    pub fn release(&self, user: UserId, conv: ConversationId, cmid: &ClientMessageId) {
        let key = Key(user, conv, cmid.clone());
        let mut shard = self.shard(&key);
        shard.young.remove(&key);
        shard.old.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_returns_the_first_id() {
        let c = DedupCache::new(100);
        let (u, conv) = (UserId(uuid::Uuid::new_v4()), ConversationId::new_v7());
        let cm = ClientMessageId::parse("x").unwrap();
        let first = MessageId::new_v7();
        assert!(c.claim(u, conv, &cm, first).is_ok());
        assert_eq!(c.claim(u, conv, &cm, MessageId::new_v7()), Err(first));
        // Another user, or another conversation, is not a duplicate.
        assert!(c
            .claim(UserId(uuid::Uuid::new_v4()), conv, &cm, MessageId::new_v7())
            .is_ok());
        assert!(c
            .claim(u, ConversationId::new_v7(), &cm, MessageId::new_v7())
            .is_ok());
        c.release(u, conv, &cm);
        assert!(c.claim(u, conv, &cm, MessageId::new_v7()).is_ok());
    }

    #[test]
    fn memory_stays_bounded() {
        let c = DedupCache::new(64);
        let (u, conv) = (UserId(uuid::Uuid::new_v4()), ConversationId::new_v7());
        for i in 0..10_000 {
            let cm = ClientMessageId::parse(&i.to_string()).unwrap();
            let _ = c.claim(u, conv, &cm, MessageId::new_v7());
        }
        let total: usize = c
            .shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap();
                s.young.len() + s.old.len()
            })
            .sum();
        assert!(total <= 64, "{total} entries kept");
    }
}

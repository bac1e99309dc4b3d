//! A bounded map for recent facts (client message ids, receipt positions).
//!
//! Each shard keeps two generations and drops the older one when the newer
//! fills up, so memory stays under `capacity` entries while recent keys (the
//! ones retries and receipts touch) are kept. Whatever ages out is found
//! again in the database.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;

struct Shard<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
}

impl<K, V> Default for Shard<K, V> {
    fn default() -> Self {
        Shard {
            young: HashMap::new(),
            old: HashMap::new(),
        }
    }
}

pub struct BoundedMap<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    per_generation: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl<K: Hash + Eq, V: Clone> BoundedMap<K, V> {
    pub fn new(capacity: usize) -> Self {
        const SHARDS: usize = 16;
        BoundedMap {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_generation: (capacity / SHARDS / 2).max(1),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, Shard<K, V>> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, shard: &mut Shard<K, V>, key: K, value: V) {
        if shard.young.len() >= self.per_generation {
            shard.old = std::mem::take(&mut shard.young);
        }
        shard.young.insert(key, value);
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let shard = self.shard(key);
        shard.young.get(key).or_else(|| shard.old.get(key)).cloned()
    }

    pub fn insert(&self, key: K, value: V) {
        let mut shard = self.shard(&key);
        shard.old.remove(&key);
        self.put(&mut shard, key, value);
    }

    /// Record `value` unless the key is present; then return what is there.
    pub fn claim(&self, key: K, value: V) -> Result<(), V> {
        let mut shard = self.shard(&key);
        if let Some(existing) = shard.young.get(&key).or_else(|| shard.old.get(&key)) {
            return Err(existing.clone());
        }
        self.put(&mut shard, key, value);
        Ok(())
    }

    /// Remove the entry only if `pred` holds for its value (so a stale
    /// remover cannot delete a newer entry under the same key).
    pub fn remove_if(&self, key: &K, pred: impl Fn(&V) -> bool) {
        let mut shard = self.shard(key);
        if shard.young.get(key).is_some_and(&pred) {
            shard.young.remove(key);
        }
        if shard.old.get(key).is_some_and(&pred) {
            shard.old.remove(key);
        }
    }

    pub fn remove(&self, key: &K) {
        let mut shard = self.shard(key);
        shard.young.remove(key);
        shard.old.remove(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap();
                s.young.len() + s.old.len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_returns_the_first_value() {
        let c: BoundedMap<(u32, &str), u64> = BoundedMap::new(100);
        assert!(c.claim((1, "x"), 10).is_ok());
        assert_eq!(c.claim((1, "x"), 11), Err(10));
        assert!(c.claim((2, "x"), 12).is_ok());
        c.remove(&(1, "x"));
        assert!(c.claim((1, "x"), 13).is_ok());
        c.insert((1, "x"), 14);
        assert_eq!(c.get(&(1, "x")), Some(14));
    }

    #[test]
    fn memory_stays_bounded() {
        let c: BoundedMap<u64, u64> = BoundedMap::new(64);
        for i in 0..10_000 {
            let _ = c.claim(i, i);
        }
        assert!(c.len() <= 64, "{} entries kept", c.len());
        assert_eq!(c.get(&9_999), Some(9_999), "the newest are kept");
    }
}

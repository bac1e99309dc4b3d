//! The per-user cap on open WebSockets: a slot is taken before the upgrade
//! (so a refusal is a plain HTTP 429) and given back when the session ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::domain::UserId;

/// All of this user's WebSocket slots on this gateway are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many open connections for this user (at most {limit}); close one first")]
pub struct TooManyConnections {
    pub limit: usize,
}

/// Open WebSockets per user. One map under one lock: it is touched once per
/// connect and once per disconnect, never per frame. Users at zero are
/// removed, so it holds at most one entry per open connection.
pub(super) struct UserSlots {
    limit: usize,
    counts: Arc<Mutex<HashMap<UserId, usize>>>,
}

impl UserSlots {
    pub(super) fn new(limit: usize) -> Self {
        UserSlots {
            limit,
            counts: Arc::default(),
        }
    }

    pub(super) fn take(&self, user: UserId) -> Result<UserSlot, TooManyConnections> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(user).or_default();
        if *n >= self.limit {
            return Err(TooManyConnections { limit: self.limit });
        }
        *n += 1;
        Ok(UserSlot {
            user,
            counts: self.counts.clone(),
        })
    }
}

/// One taken slot; dropping it gives the slot back.
pub struct UserSlot {
    user: UserId,
    counts: Arc<Mutex<HashMap<UserId, usize>>>,
}

impl UserSlot {
    pub fn user(&self) -> UserId {
        self.user
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_gets_at_most_the_limit_and_a_dropped_slot_is_given_back() {
        let slots = UserSlots::new(2);
        let (a, b) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).err(), Some(TooManyConnections { limit: 2 }));
        let _b1 = slots.take(b).unwrap();
        drop(a1);
        let _a3 = slots.take(a).unwrap();
        drop((_a2, _a3, _b1));
        assert!(
            slots.counts.lock().unwrap().is_empty(),
            "no entry outlives its slots"
        );
    }
}

//! Whether any other gateway may be listening to this one's relay.
//!
//! A gateway alone on its Postgres relays to nobody: every event it
//! broadcast was encoded, NOTIFYed in a transaction of its own (a
//! cluster-wide lock at commit) and read back by its own LISTEN connection
//! only to be dropped. In S1 that was ~360 commits a second. So the relay
//! is skipped while no other gateway is known, and resumes the moment one
//! is, by two signals:
//!
//! - **The `gateways` table**, read on every liveness heartbeat: another
//!   row alive (heard from within its missed-beat window) means a peer.
//! - **Anything heard from another gateway on the relay channel**, its
//!   announcement at start above all: a new gateway NOTIFYs before it
//!   accepts a connection, so the others relay to it from then on, without
//!   waiting up to a heartbeat for its row.
//!
//! Doubt counts as a peer: before the first look at the table, after a look
//! failed, and after the LISTEN connection came back (an announcement may
//! have been missed), the relay runs until a look says otherwise.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What this gateway knows of the others.
#[derive(Debug)]
pub struct Peers {
    /// The last look at the table found another live gateway, or could not
    /// tell (doubt).
    in_table: AtomicBool,
    /// When another gateway was last heard on the relay channel, in
    /// milliseconds since `epoch` plus one (0: never).
    heard: AtomicU64,
    epoch: Instant,
    /// How long a gateway heard counts as present without a row: the
    /// missed-beat window, after which its row would read dead anyway.
    remember: Duration,
}

impl Peers {
    /// `remember`: how long a gateway heard on the channel counts as
    /// present; the table's own verdict takes over within that time.
    pub fn new(remember: Duration) -> Peers {
        Peers {
            in_table: AtomicBool::new(true),
            heard: AtomicU64::new(0),
            epoch: Instant::now(),
            remember,
        }
    }

    /// Relay or not. One atomic load on the send path in the common cases.
    pub fn present(&self) -> bool {
        self.present_at(Instant::now())
    }

    /// Another gateway spoke on the relay channel.
    pub fn heard(&self) {
        self.heard_at(Instant::now());
    }

    fn present_at(&self, now: Instant) -> bool {
        if self.in_table.load(Ordering::Relaxed) {
            return true;
        }
        match self.heard.load(Ordering::Relaxed) {
            0 => false,
            at => self.millis(now).saturating_sub(at - 1) < self.remember.as_millis() as u64,
        }
    }

    fn heard_at(&self, now: Instant) {
        self.heard.store(self.millis(now) + 1, Ordering::Relaxed);
    }

    /// The table's answer: `Some(others_alive)`, or `None` when the look
    /// failed (then relay, as when in doubt). Returns whether the verdict
    /// changed, so the caller can log it once.
    pub fn looked(&self, others_alive: Option<bool>) -> bool {
        let now = others_alive.unwrap_or(true);
        self.in_table.swap(now, Ordering::Relaxed) != now
    }

    /// Notifications may have been missed (the LISTEN connection dropped):
    /// relay until the next look at the table.
    pub fn doubt(&self) {
        self.in_table.store(true, Ordering::Relaxed);
    }

    fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_doubt_until_the_table_says_alone() {
        let p = Peers::new(Duration::from_secs(15));
        assert!(p.present(), "before the first look: relay");
        assert!(p.looked(Some(false)));
        assert!(!p.present());
        assert!(!p.looked(Some(false)), "no change, nothing to log");
        assert!(p.looked(None), "a failed look is doubt");
        assert!(p.present());
        p.looked(Some(false));
        p.doubt();
        assert!(p.present(), "after the LISTEN connection came back");
    }

    #[test]
    fn a_gateway_heard_counts_until_the_table_would_know_it() {
        let p = Peers::new(Duration::from_secs(15));
        let at = |secs| p.epoch + Duration::from_secs(secs);
        p.looked(Some(false));
        p.heard_at(at(1));
        assert!(
            p.present_at(at(1)),
            "an announcement turns the relay on at once"
        );
        assert!(p.present_at(at(15)));
        assert!(!p.present_at(at(17)), "silent and not in the table: gone");
        p.heard_at(at(20));
        assert!(p.present_at(at(20)));
        p.looked(Some(true));
        assert!(p.present_at(at(100)), "alive in the table, heard or not");
    }
}

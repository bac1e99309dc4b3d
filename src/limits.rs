//! Rate limits: governor's GCRA limiters, keyed (per user, conversation,
//! connection or IP) and bounded in memory, answering [`Decision::Allow`] or
//! [`Decision::RetryAfter`]. Callers never see governor's types.
//!
//! Memory: a key is kept only while its state differs from a fresh one (it
//! used part of its burst recently); [`Limits::sweep`] drops the rest and
//! runs every [`SWEEP_INTERVAL`]. Each limiter also holds at most
//! [`MAX_KEYS`] keys: a new key arriving when that many are recent is
//! refused for a moment rather than let grow the map (the keys are mostly
//! authenticated ids, but IPs are the client's to pick, and IPv6 has many).
//!
//! Imports only `config` and `domain`.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::StateStore;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use crate::config::{LimitsConfig, Rate};
use crate::domain::{ConversationId, UserId};

/// Keys one limiter holds at most. About 100 bytes each (key, state, map
/// overhead), so 10 MB a limiter at worst; keys leave once idle for their
/// burst's refill time (a few seconds), so reaching this takes tens of
/// thousands of new keys a second.
pub const MAX_KEYS: usize = 100_000;

/// How often idle keys are dropped. Short next to the minutes a map would
/// take to grow large, long enough that the O(keys) pass is rare.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// A full limiter sweeps on its own at most this often, so a flood of new
/// keys cannot make every check pay for an O(keys) pass. Also what a new key
/// refused for want of room is told to wait.
const FULL_SWEEP_SPACING: Duration = Duration::from_secs(1);

/// A limiter's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Over the limit: the earliest the same request could be allowed.
    RetryAfter(Duration),
}

impl Decision {
    /// `Err(wait)` when refused, for `?`-style callers.
    pub fn into_result(self) -> Result<(), Duration> {
        match self {
            Decision::Allow => Ok(()),
            Decision::RetryAfter(d) => Err(d),
        }
    }
}

/// The quota of `rate`: `per_second` sustained, `burst` at once.
fn quota(rate: Rate) -> Quota {
    Quota::per_second(rate.per_second).allow_burst(rate.burst)
}

/// One allowed per `period`, no burst. A zero period (never configured:
/// the typing interval is a constant) would mean no limit; governor cannot
/// express that, so the fastest quota it can stands in.
fn one_per(period: Duration) -> Quota {
    Quota::with_period(period).unwrap_or(Quota::per_second(NonZeroU32::MAX))
}

/// The keyed state, shared between the governor limiter (which owns a
/// store) and us (who need `contains_key` to enforce [`MAX_KEYS`]).
struct SharedStore<K: Hash + Eq + Clone>(Arc<DashMapStateStore<K>>);

impl<K: Hash + Eq + Clone> StateStore for SharedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for SharedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below)
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A rate limit per key, holding at most `max_keys` keys.
pub struct Limiter<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    limiter: RateLimiter<K, SharedStore<K>, C, NoOpMiddleware<C::Instant>>,
    keys: Arc<DashMapStateStore<K>>,
    max_keys: usize,
    /// Keys held, counted without locking every shard: set exactly by each
    /// sweep, raised by each new key between sweeps.
    approx_keys: AtomicUsize,
    /// When a full limiter last swept on its own.
    last_full_sweep: Mutex<Option<C::Instant>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn new(quota: Quota, max_keys: usize) -> Self {
        Self::with_clock(quota, max_keys, DefaultClock::default())
    }
}

impl<K: Hash + Eq + Clone, C: Clock> Limiter<K, C> {
    pub fn with_clock(quota: Quota, max_keys: usize, clock: C) -> Self {
        let keys: Arc<DashMapStateStore<K>> = Arc::default();
        Limiter {
            limiter: RateLimiter::new(quota, SharedStore(keys.clone()), clock),
            keys,
            max_keys,
            approx_keys: AtomicUsize::new(0),
            last_full_sweep: Mutex::new(None),
        }
    }

    /// Count one request for `key`.
    pub fn check(&self, key: &K) -> Decision {
        if !self.keys.contains_key(key) {
            if let Some(wait) = self.room_for_new_key() {
                return Decision::RetryAfter(wait);
            }
            self.approx_keys.fetch_add(1, Ordering::Relaxed);
        }
        match self.limiter.check_key(key) {
            Ok(()) => Decision::Allow,
            Err(not_until) => {
                Decision::RetryAfter(not_until.wait_time_from(self.limiter.clock().now()))
            }
        }
    }

    /// None if a new key fits (after a sweep, if that is what it takes),
    /// else how long to wait.
    fn room_for_new_key(&self) -> Option<Duration> {
        if self.approx_keys.load(Ordering::Relaxed) < self.max_keys {
            return None;
        }
        let now = self.limiter.clock().now();
        // One sweeper at a time; the others are refused at once.
        if let Ok(mut last) = self.last_full_sweep.try_lock() {
            let due =
                last.is_none_or(|t| Duration::from(now.duration_since(t)) >= FULL_SWEEP_SPACING);
            if due {
                *last = Some(now);
                self.sweep();
            }
        }
        (self.approx_keys.load(Ordering::Relaxed) >= self.max_keys).then_some(FULL_SWEEP_SPACING)
    }

    /// Drop the keys whose state is the same as a fresh key's.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.approx_keys.store(self.keys.len(), Ordering::Relaxed);
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Refusals one connection has collected: past its tolerance the client is
/// ignoring `retry_after_ms`, and the connection is closed (1008).
pub struct Tolerance(DefaultDirectRateLimiter);

impl Tolerance {
    /// `max` refusals within `window`, regained evenly over it.
    pub fn new(max: NonZeroU32, window: Duration) -> Self {
        let q = Quota::with_period(window / max.get())
            .unwrap_or(Quota::per_second(max))
            .allow_burst(max);
        Tolerance(RateLimiter::direct(q))
    }

    /// Count one refusal; true once the connection has used up its tolerance.
    pub fn exhausted_by_one_more(&self) -> bool {
        self.0.check().is_err()
    }
}

/// The typing limiter's key: a connection (its id) and a conversation.
pub type TypingKey = (u64, ConversationId);

/// Every limit of a server process, shared by the gateway and the HTTP layer
/// (a user's history reads count the same over WebSocket and HTTP).
pub struct Limits {
    pub send_per_user: Limiter<UserId>,
    pub send_per_conversation: Limiter<ConversationId>,
    pub join_per_user: Limiter<UserId>,
    /// `sync`, `resume` and HTTP history.
    pub history_per_user: Limiter<UserId>,
    /// One `typing: true` refresh per interval per connection and conversation.
    pub typing: Limiter<TypingKey>,
    pub http_per_user: Limiter<UserId>,
    pub http_per_ip: Limiter<IpAddr>,
    pub upgrade_per_ip: Limiter<IpAddr>,
    max_refusals: NonZeroU32,
}

impl Limits {
    pub fn new(cfg: &LimitsConfig, typing_interval: Duration) -> Self {
        fn keyed<K: Hash + Eq + Clone>(rate: Rate) -> Limiter<K> {
            Limiter::new(quota(rate), MAX_KEYS)
        }
        Limits {
            send_per_user: keyed(cfg.send_per_user),
            send_per_conversation: keyed(cfg.send_per_conversation),
            join_per_user: keyed(cfg.join_per_user),
            history_per_user: keyed(cfg.history_per_user),
            typing: Limiter::new(one_per(typing_interval), MAX_KEYS),
            http_per_user: keyed(cfg.http_per_user),
            http_per_ip: keyed(cfg.http_per_ip),
            upgrade_per_ip: keyed(cfg.upgrade_per_ip),
            max_refusals: cfg.max_refusals,
        }
    }

    /// A fresh refusal count for a new connection.
    pub fn tolerance(&self) -> Tolerance {
        Tolerance::new(self.max_refusals, LimitsConfig::REFUSAL_WINDOW)
    }

    /// Drop idle keys from every limiter.
    pub fn sweep(&self) {
        self.send_per_user.sweep();
        self.send_per_conversation.sweep();
        self.join_per_user.sweep();
        self.history_per_user.sweep();
        self.typing.sweep();
        self.http_per_user.sweep();
        self.http_per_ip.sweep();
        self.upgrade_per_ip.sweep();
    }

    /// Sweep every [`SWEEP_INTERVAL`] until `shutdown`.
    pub async fn sweep_until(self: Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(SWEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => self.sweep(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn limiter(
        per_second: u32,
        burst: u32,
        max_keys: usize,
    ) -> (Limiter<u32, FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let rate = Rate {
            per_second: nz(per_second),
            burst: nz(burst),
        };
        (
            Limiter::with_clock(quota(rate), max_keys, clock.clone()),
            clock,
        )
    }

    #[test]
    fn a_burst_is_allowed_then_refused_with_the_time_to_wait() {
        let (l, clock) = limiter(10, 3, 100);
        for _ in 0..3 {
            assert_eq!(l.check(&1), Decision::Allow);
        }
        assert_eq!(
            l.check(&1),
            Decision::RetryAfter(Duration::from_millis(100))
        );
        clock.advance(Duration::from_millis(40));
        assert_eq!(l.check(&1), Decision::RetryAfter(Duration::from_millis(60)));
        clock.advance(Duration::from_millis(60));
        assert_eq!(l.check(&1), Decision::Allow);
        // Other keys have their own budget.
        assert_eq!(l.check(&2), Decision::Allow);
    }

    #[test]
    fn idle_keys_are_swept_and_recent_ones_kept() {
        let (l, clock) = limiter(10, 2, 100);
        l.check(&1);
        l.check(&2);
        l.check(&2);
        assert_eq!(l.len(), 2);
        // Key 1 used one cell (refilled at 100 ms), key 2 two (at 200 ms);
        // governor keeps a key one emission interval (100 ms) past that.
        clock.advance(Duration::from_millis(250));
        l.sweep();
        assert_eq!(l.len(), 1);
        clock.advance(Duration::from_millis(100));
        l.sweep();
        assert!(l.is_empty());
    }

    #[test]
    fn a_full_limiter_refuses_new_keys_but_serves_known_ones() {
        let (l, clock) = limiter(1, 5, 3);
        for k in 0..3 {
            assert_eq!(l.check(&k), Decision::Allow);
        }
        // All three are recent: no room, and the sweep that tried found none.
        assert_eq!(l.check(&9), Decision::RetryAfter(FULL_SWEEP_SPACING));
        assert_eq!(l.check(&0), Decision::Allow);
        assert_eq!(l.len(), 3);
        // Once they are idle, the next new key triggers a sweep and fits.
        clock.advance(Duration::from_secs(2));
        assert_eq!(l.check(&9), Decision::Allow);
        assert!(l.len() <= 3, "{}", l.len());
    }

    #[test]
    fn tolerance_is_used_up_by_a_flood_not_by_a_few_refusals() {
        let t = Tolerance::new(nz(5), Duration::from_secs(10));
        for _ in 0..5 {
            assert!(!t.exhausted_by_one_more());
        }
        assert!(t.exhausted_by_one_more());
    }

    #[test]
    fn every_default_limit_builds() {
        let l = Limits::new(&LimitsConfig::default(), Duration::from_secs(1));
        let u = UserId(uuid::Uuid::new_v4());
        for _ in 0..40 {
            assert_eq!(l.send_per_user.check(&u), Decision::Allow);
        }
        assert!(
            matches!(l.send_per_user.check(&u), Decision::RetryAfter(d) if d <= Duration::from_millis(50))
        );
        let key = (1, ConversationId(uuid::Uuid::new_v4()));
        assert_eq!(l.typing.check(&key), Decision::Allow);
        assert!(
            matches!(l.typing.check(&key), Decision::RetryAfter(d) if d > Duration::from_millis(900))
        );
        l.sweep();
    }
}

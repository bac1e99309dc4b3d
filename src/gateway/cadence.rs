//! When a connection's next urgent write is due, so the writer holds a frame
//! that may wait ([`crate::rooms::Urgency::MayWait`]) only where it is likely
//! to share that write.
//!
//! Holding pays only if something urgent follows within the hold: in a room
//! of ten messages a second the confirmation rides with the next message,
//! but in a quieter one it waits the whole hold, then costs a timer, a wake
//! and the write it was meant to save (S2, a message every 333 ms per
//! connection: +18 % server CPU with a blind 100 ms hold).
//!
//! A client that waits for each confirmation before its next step (a
//! publisher in lock-step) makes its own rhythm look busy, and a hold would
//! slow it to one step per hold: `scripts/bench.sh SQL` went from 13 ms to
//! 113 ms a publish. So a hold that runs out with nothing to ride with
//! counts as a miss, and each miss in a row doubles how many confirmations
//! are written at once before holding is tried again.

use std::time::Duration;

use tokio::time::Instant;

/// Confirmations written at once after a run of missed holds, at most: a
/// lock-step client pays one hold in this many steps.
const MAX_BACKOFF: u8 = 64;

/// The rhythm of one connection's urgent writes.
#[derive(Debug, Default)]
pub(super) struct Cadence {
    last: Option<Instant>,
    /// The usual time between urgent writes, smoothed (each new gap counts
    /// half), so one stray gap neither starts nor stops holding alone.
    gap: Option<Duration>,
    /// After a miss: confirmations still to write at once...
    skip: u8,
    /// ...and how many the last miss earned (0 after a hold that paid).
    backoff: u8,
}

impl Cadence {
    /// An urgent frame was written at `now`.
    pub(super) fn urgent(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let g = now.saturating_duration_since(last);
            self.gap = Some(self.gap.map_or(g, |gap| (gap + g) / 2));
        }
        self.last = Some(now);
    }

    /// Whether to hold a frame that may wait, taken at `now`, for up to
    /// `hold`: the next urgent write is expected by then, and no recent miss
    /// says the rhythm is the client waiting for us.
    pub(super) fn hold(&mut self, now: Instant, hold: Duration) -> bool {
        if !self.due_within(now, hold) {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// A hold ended with an urgent write: it paid.
    pub(super) fn paid(&mut self) {
        self.backoff = 0;
    }

    /// A hold ran out with nothing urgent written.
    pub(super) fn missed(&mut self) {
        self.backoff = (self.backoff.saturating_mul(2)).clamp(1, MAX_BACKOFF);
        self.skip = self.backoff;
    }

    /// Whether the next urgent write is expected within `hold` of `now`.
    /// No rhythm yet, or one already broken (the next write is overdue): no.
    fn due_within(&self, now: Instant, hold: Duration) -> bool {
        let (Some(last), Some(gap)) = (self.last, self.gap) else {
            return false;
        };
        let elapsed = now.saturating_duration_since(last);
        elapsed <= gap && gap - elapsed <= hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_millis(100);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A connection that got urgent frames at these offsets (ms).
    fn after(t0: Instant, writes: &[u64]) -> Cadence {
        let mut c = Cadence::default();
        for w in writes {
            c.urgent(t0 + ms(*w));
        }
        c
    }

    #[test]
    fn a_room_of_ten_messages_a_second_holds_a_confirmation_for_the_next() {
        let t0 = Instant::now();
        let c = after(t0, &[0, 100, 200, 300]);
        // A confirmation 15 ms after the last message: the next is 85 ms away.
        assert!(c.due_within(t0 + ms(315), HOLD));
    }

    #[test]
    fn a_quieter_room_writes_it_at_once() {
        let t0 = Instant::now();
        let c = after(t0, &[0, 333, 666, 1000]);
        // 313 ms until the next message: longer than the hold.
        assert!(!c.due_within(t0 + ms(1020), HOLD));
    }

    #[test]
    fn no_rhythm_or_a_broken_one_is_no_reason_to_hold() {
        let t0 = Instant::now();
        assert!(!Cadence::default().due_within(t0, HOLD));
        assert!(!after(t0, &[0]).due_within(t0 + ms(1), HOLD));
        // A burst, then silence: the next write is overdue, not near.
        let burst = after(t0, &[0, 1, 2, 3]);
        assert!(!burst.due_within(t0 + ms(500), HOLD));
    }

    #[test]
    fn misses_in_a_row_write_more_and_more_confirmations_at_once() {
        let t0 = Instant::now();
        // A lock-step client: a step every 14 ms, its confirmation at 13.
        let mut c = after(t0, &[0, 14, 28]);
        let mut held = Vec::new();
        for step in 0..200u64 {
            let t = 28 + step * 14;
            let h = c.hold(t0 + ms(t + 13), HOLD);
            if h {
                // Nothing urgent comes: the client waits for this very frame.
                c.missed();
            }
            held.push(h);
            c.urgent(t0 + ms(t + 14));
        }
        let holds: Vec<usize> = (0..held.len()).filter(|i| held[*i]).collect();
        // Held, then 1, 2, 4, ... 64 written at once between holds: 9 of
        // 200 steps pay a hold, and from then on one in 65.
        assert_eq!(holds, [0, 2, 5, 10, 19, 36, 69, 134, 199]);
    }

    #[test]
    fn a_hold_that_pays_forgets_the_misses() {
        let t0 = Instant::now();
        let mut c = after(t0, &[0, 100, 200]);
        c.missed();
        c.missed();
        // Two confirmations written at once, then holding again...
        assert!(!c.hold(t0 + ms(215), HOLD));
        assert!(!c.hold(t0 + ms(216), HOLD));
        assert!(c.hold(t0 + ms(217), HOLD));
        // ...and one that pays resets the backoff: a miss now skips one.
        c.paid();
        c.missed();
        assert!(!c.hold(t0 + ms(218), HOLD));
        assert!(c.hold(t0 + ms(219), HOLD));
    }

    #[test]
    fn one_stray_gap_moves_the_rhythm_halfway() {
        let t0 = Instant::now();
        let mut c = after(t0, &[0, 100, 200]);
        c.urgent(t0 + ms(1200));
        // The usual gap is now (100 + 1000) / 2 = 550 ms.
        assert!(!c.due_within(t0 + ms(1215), HOLD));
        assert!(c.due_within(t0 + ms(1700), HOLD));
        c.urgent(t0 + ms(1300));
        c.urgent(t0 + ms(1400));
        // (550 + 100) / 2 = 325, then (325 + 100) / 2 = 212 ms.
        assert!(!c.due_within(t0 + ms(1410), HOLD));
        assert!(c.due_within(t0 + ms(1520), HOLD));
    }
}

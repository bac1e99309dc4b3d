//! When a connection's next urgent write is due, so the writer holds a frame
//! that may wait ([`crate::rooms::Urgency::MayWait`]) only where it is likely
//! to share that write.
//!
//! Holding pays only if something urgent follows within the hold: in a room
//! of ten messages a second the confirmation rides with the next message,
//! but in a quieter one it waits the whole hold, then costs a timer, a wake
//! and the write it was meant to save (S2, a message every 333 ms per
//! connection: +18 % server CPU with a blind 100 ms hold).

use std::time::Duration;

use tokio::time::Instant;

/// The rhythm of one connection's urgent writes.
#[derive(Debug, Default)]
pub(super) struct Cadence {
    last: Option<Instant>,
    /// The usual time between urgent writes, smoothed (each new gap counts
    /// half), so one stray gap neither starts nor stops holding alone.
    gap: Option<Duration>,
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

    /// Whether the next urgent write is expected within `hold` of `now`.
    /// No rhythm yet, or one already broken (the next write is overdue): no.
    pub(super) fn due_within(&self, now: Instant, hold: Duration) -> bool {
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

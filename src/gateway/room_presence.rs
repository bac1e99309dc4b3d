//! Room presence: who is in a conversation right now — joined on some
//! device, on any gateway — announced to the room as `user_joined` /
//! `user_left` and listed in the join ack. Distinct from membership (who
//! may join: `member_joined`/`member_left`) and from user presence (who is
//! connected at all: `presence`).
//!
//! A user enters when their first connection anywhere joins, and leaves
//! when their last one leaves: at once on `leave_conversation`, after the
//! presence grace period on a disconnect, so a quick reconnect (a network
//! blip, a gateway drain) announces nothing. The rows in `room_presence`
//! make it cluster-wide; the presence heartbeat reaps rows of gateways that
//! died.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Gateway;
use crate::domain::{ConversationId, UserId};
use crate::protocol::server;
use crate::rooms::ConnectionId;

/// Users whose last connection here left a room by disconnecting, each with
/// the generation of that departure: a join before the grace period ends
/// removes the entry, and the departure is dropped.
#[derive(Default)]
pub(super) struct Departures {
    pending: Mutex<HashMap<(ConversationId, UserId), u64>>,
    next: AtomicU64,
}

impl Departures {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(ConversationId, UserId), u64>> {
        // Poisoning only means a panic elsewhere mid-update of a plain map.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(&self, key: (ConversationId, UserId)) -> u64 {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        self.map().insert(key, generation);
        generation
    }

    /// Whether a departure was pending (and is now called off).
    fn cancel(&self, key: (ConversationId, UserId)) -> bool {
        self.map().remove(&key).is_some()
    }

    /// Whether `generation` is still the pending departure (and now done).
    fn finish(&self, key: (ConversationId, UserId), generation: u64) -> bool {
        let mut map = self.map();
        if map.get(&key) == Some(&generation) {
            map.remove(&key);
            true
        } else {
            false
        }
    }
}

/// How a connection left a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Departure {
    /// `leave_conversation`: meant, announced at once.
    Left,
    /// The connection closed: announced only if the user is not back within
    /// the grace period.
    Disconnected,
}

impl Gateway {
    /// Connection `conn` of `user` joined `conv` (already in the room here;
    /// `fresh` unless it was in it before). Announces the user if this is
    /// their first connection in it anywhere; returns who is in it now.
    pub(super) async fn entered_room(
        &self,
        conv: ConversationId,
        user: UserId,
        conn: ConnectionId,
        fresh: bool,
    ) -> Vec<UserId> {
        let returning = self.departures.cancel((conv, user));
        let here_before = self.rooms.user_connections(conv, user) > 1;
        match self.store.enter_room(conv, user, self.id).await {
            Ok((elsewhere, present)) => {
                if fresh && !returning && !here_before && !elsewhere {
                    self.publish_to_room(conv, &server::user_joined(conv, user), Some(conn));
                }
                present
            }
            Err(e) => {
                // The join itself stands; the list is this gateway's view.
                tracing::warn!(error = %e, "room presence: could not record an entry");
                vec![user]
            }
        }
    }

    /// A connection of `user` left `conv` here (already out of the room).
    pub(super) fn left_room(self: &Arc<Self>, conv: ConversationId, user: UserId, how: Departure) {
        if self.rooms.user_connections(conv, user) > 0 {
            return; // another device of theirs is still in it here
        }
        // While draining, rows are left for the other gateways to reap, after
        // the clients had time to come back elsewhere (as presence does).
        if how == Departure::Disconnected && self.shutdown.is_cancelled() {
            return;
        }
        let gw = self.clone();
        tokio::spawn(async move {
            if how == Departure::Disconnected {
                let generation = gw.departures.start((conv, user));
                tokio::time::sleep(gw.cfg.presence_grace).await;
                if gw.shutdown.is_cancelled()
                    || !gw.departures.finish((conv, user), generation)
                    || gw.rooms.user_connections(conv, user) > 0
                {
                    return;
                }
            } else {
                gw.departures.cancel((conv, user));
            }
            match gw.store.exit_room(conv, user, gw.id).await {
                Ok(true) => gw.publish_to_room(conv, &server::user_left(conv, user), None),
                Ok(false) => {} // still in it elsewhere, or announced already
                Err(e) => tracing::warn!(error = %e, "room presence: could not record a leave"),
            }
        });
    }

    /// `user` is no longer a member of `conv`: out of its room on every gateway.
    pub(super) async fn removed_from_room(&self, conv: ConversationId, user: UserId) {
        self.departures.cancel((conv, user));
        match self.store.clear_room_user(conv, user).await {
            Ok(true) => self.publish_to_room(conv, &server::user_left(conv, user), None),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "room presence: could not clear a removed member"),
        }
    }

    /// Rows whose gateway died: announce who thereby left. Run by the
    /// presence heartbeat.
    pub(super) async fn reap_room_presence(&self) {
        let min_age = self.cfg.presence_heartbeat * 3;
        match self.store.reap_room_presence(min_age).await {
            Ok(gone) => {
                for (conv, user) in gone {
                    self.publish_to_room(conv, &server::user_left(conv, user), None);
                }
            }
            Err(e) => tracing::warn!(error = %e, "room presence: reaping failed"),
        }
    }
}

//! WebSocket connections: the upgrade's aftermath, one reader and one writer
//! task per socket, event dispatch, and fan-out of what Postgres tells us.
//!
//! Events enter in exactly one place ([`Connection::handle`]), fan out in one
//! place ([`Rooms::broadcast`]), and head for storage in one place (the
//! [`Enqueuer`]). The reader never writes to the socket: everything goes
//! through the connection's bounded outbox, owned by the writer task.

mod connection;
mod dedup;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use dedup::DedupCache;

use crate::domain::{ConversationId, Persisted, UserId};
use crate::protocol::client::DecodeLimits;
use crate::protocol::server;
use crate::queue::Enqueuer;
use crate::rooms::Rooms;
use crate::store::Store;
use crate::telemetry::Metrics;

#[derive(Debug, Clone, Copy)]
pub struct GatewayConfig {
    /// Largest WebSocket message accepted (after reassembling fragments).
    /// Larger ones close the connection with 1009: the client is abusive or broken.
    pub max_frame_bytes: usize,
    /// Largest message content; larger ones are refused with `too_large`.
    pub max_content_bytes: usize,
    /// Frames queued per connection before it counts as a slow consumer.
    pub outbox_capacity: usize,
    /// Recent client_message_ids remembered for dedup, across all users.
    pub dedup_capacity: usize,
    /// How long shutdown waits for connections to finish closing.
    pub close_grace: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_frame_bytes: 64 * 1024,
            max_content_bytes: 4096,
            outbox_capacity: 1024,
            dedup_capacity: 200_000,
            close_grace: Duration::from_secs(5),
        }
    }
}

impl GatewayConfig {
    fn decode_limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_content_bytes: self.max_content_bytes,
        }
    }
}

/// The handles a connection needs, shared by all connections of a process.
pub struct Gateway {
    rooms: Arc<Rooms>,
    store: Store,
    enqueuer: Enqueuer,
    dedup: DedupCache,
    metrics: Arc<Metrics>,
    cfg: GatewayConfig,
    shutdown: CancellationToken,
    connections: TaskTracker,
}

impl Gateway {
    pub fn new(
        rooms: Arc<Rooms>,
        store: Store,
        enqueuer: Enqueuer,
        metrics: Arc<Metrics>,
        cfg: GatewayConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Gateway {
            rooms,
            store,
            enqueuer,
            dedup: DedupCache::new(cfg.dedup_capacity),
            metrics,
            cfg,
            shutdown,
            connections: TaskTracker::new(),
        })
    }

    /// Take over an upgraded WebSocket for `user` (already authenticated).
    /// Hyper does not track upgraded connections, so we do.
    pub fn accept(self: &Arc<Self>, user: UserId, upgrade: fastwebsockets::upgrade::UpgradeFut) {
        let gw = self.clone();
        self.connections
            .spawn(async move { connection::run(gw, user, upgrade).await });
    }

    /// Wait (bounded) for every connection to finish closing after shutdown.
    pub async fn drain(&self) {
        self.connections.close();
        if tokio::time::timeout(self.cfg.close_grace, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.connections.len(),
                "connections still open after the close grace period"
            );
        }
    }

    /// Tell each room that these messages are durable.
    pub fn on_persisted(&self, entries: &[Persisted]) {
        for p in entries {
            let frame = server::message_persisted(p.conversation_id, p.message_id, p.seq);
            self.rooms.broadcast(p.conversation_id, &frame, None);
        }
        self.metrics.add_persisted_notified(entries.len() as u64);
    }

    /// Membership changed through the HTTP API: tell the room, and take a
    /// removed user's connections out of it.
    pub fn on_membership(&self, conv: ConversationId, user: UserId, joined: bool) {
        let frame: Bytes = if joined {
            server::member_joined(conv, user)
        } else {
            server::member_left(conv, user)
        };
        self.rooms.broadcast(conv, &frame, None);
        if !joined {
            self.rooms.evict_user(conv, user);
        }
    }
}

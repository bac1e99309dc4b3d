//! WebSocket connections: the upgrade's aftermath, one reader and one writer
//! task per socket, event dispatch, presence, and fan-out of what Postgres
//! tells us.
//!
//! Events enter in exactly one place (`Connection::handle`), fan out in one
//! place ([`Rooms`]), and head for storage in one place (the [`Enqueuer`]s).
//! The reader never writes to the socket: everything goes through the
//! connection's bounded outbox, owned by the writer task.

mod cache;
mod connection;
mod handlers;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cache::BoundedMap;

use crate::domain::{ClientMessageId, ConversationId, MessageId, Persisted, UserId};
use crate::protocol::client::DecodeLimits;
use crate::protocol::server;
use crate::queue::Enqueuer;
use crate::rooms::{Rooms, Transition, Users};
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
    /// A user whose last connection closed stays online this long, so a
    /// reconnect (page reload, network switch) does not flap offline/online.
    pub presence_grace: Duration,
    /// A typing indicator not refreshed for this long is turned off by the server.
    pub typing_ttl: Duration,
    /// At most one `typing: true` per conversation and connection this often.
    pub typing_interval: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_frame_bytes: 64 * 1024,
            max_content_bytes: 4096,
            outbox_capacity: 1024,
            dedup_capacity: 200_000,
            close_grace: Duration::from_secs(5),
            presence_grace: Duration::from_secs(5),
            typing_ttl: Duration::from_secs(6),
            typing_interval: Duration::from_millis(1000),
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

/// The queues a gateway writes to.
#[derive(Clone)]
pub struct Enqueuers {
    /// Chat messages (high priority).
    pub persist: Enqueuer,
    /// Receipts and other background work (low priority).
    pub background: Enqueuer,
}

/// The handles a connection needs, shared by all connections of a process.
pub struct Gateway {
    rooms: Arc<Rooms>,
    users: Users,
    store: Store,
    queues: Enqueuers,
    dedup: BoundedMap<(UserId, ConversationId, ClientMessageId), MessageId>,
    /// Latest (delivered, read) per member, so a receipt that moves nothing
    /// is not broadcast and a known position needs no query.
    receipts: BoundedMap<(ConversationId, UserId), (i64, i64)>,
    metrics: Arc<Metrics>,
    cfg: GatewayConfig,
    shutdown: CancellationToken,
    connections: TaskTracker,
}

impl Gateway {
    pub fn new(
        rooms: Arc<Rooms>,
        store: Store,
        queues: Enqueuers,
        metrics: Arc<Metrics>,
        cfg: GatewayConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Gateway {
            rooms,
            users: Users::default(),
            store,
            queues,
            dedup: BoundedMap::new(cfg.dedup_capacity),
            receipts: BoundedMap::new(cfg.dedup_capacity),
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
            self.rooms.persisted(p.conversation_id, p.message_id);
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

    /// Online per this process: connected, or within the grace period.
    pub fn is_online(&self, user: UserId) -> bool {
        self.users.is_online(user)
    }

    /// A presence transition of `user`: tell everyone who shares a
    /// conversation with them (after the grace period, for offline).
    fn on_presence(self: &Arc<Self>, user: UserId, transition: Transition) {
        let gw = self.clone();
        match transition {
            Transition::Unchanged => {}
            Transition::CameOnline => {
                tokio::spawn(async move { gw.announce(user, true).await });
            }
            Transition::MaybeOffline(generation) => {
                tokio::spawn(async move {
                    tokio::time::sleep(gw.cfg.presence_grace).await;
                    if gw.users.expire(user, generation) {
                        gw.announce(user, false).await;
                    }
                });
            }
        }
    }

    async fn announce(&self, user: UserId, online: bool) {
        let contacts = match self.store.contacts(user).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "presence: could not read contacts");
                return;
            }
        };
        let frame = server::presence(user, online);
        for contact in contacts {
            self.users.push(contact, &frame, None);
        }
    }
}

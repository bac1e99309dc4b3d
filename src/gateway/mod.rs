//! WebSocket clients: the session of each connection, event handlers by
//! concern, presence, and the one place frames are published.
//!
//! - [`connection`]: the socket; a reader task and a writer task. Nothing
//!   else touches it.
//! - [`session`]: a connection's state and `dispatch`, the one place a
//!   client event enters. Handlers by concern: [`messages`] (send and
//!   dedup), [`typing`], [`receipts`], [`sync`] (sync and resume), [`edits`].
//! - [`publish`]: the one place a frame leaves, here and to other gateways,
//!   and where what other gateways and workers said is delivered.
//! - [`presence`]: online/offline across gateways.
//! - [`error`]: why a request was refused, mapped to the contract once.
//!
//! The session never writes to the socket: every frame goes through the
//! connection's bounded outbox, owned by the writer task. Messages head for
//! storage in one place, the [`Enqueuer`]s.

mod cache;
mod connection;
mod edits;
mod error;
mod messages;
mod presence;
mod publish;
mod receipts;
mod session;
mod sync;
mod typing;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cache::BoundedMap;

use crate::domain::{ConversationId, UserId};
use crate::notify::Relay;
use crate::protocol::client::DecodeLimits;
use crate::queue::Enqueuer;
use crate::rooms::{Rooms, Users};

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
    /// On shutdown, clients are told to reconnect after a random pause within
    /// this window, so they do not all arrive at the other gateways at once.
    pub drain_window: Duration,
    /// How often this gateway refreshes its presence sessions; a gateway
    /// silent for three of these is taken for dead and its users go offline.
    pub presence_heartbeat: Duration,
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
            drain_window: Duration::from_secs(5),
            presence_heartbeat: Duration::from_secs(5),
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
    /// This gateway's identity among those sharing the database.
    id: uuid::Uuid,
    relay: Relay,
    rooms: Arc<Rooms>,
    users: Users,
    store: Store,
    queues: Enqueuers,
    dedup: BoundedMap<messages::DedupKey, Arc<messages::Claim>>,
    /// Latest (delivered, read) per member, so a receipt that moves nothing
    /// is not broadcast and a known position needs no query.
    receipts: BoundedMap<(ConversationId, UserId), crate::store::ReceiptState>,
    metrics: Arc<Metrics>,
    cfg: GatewayConfig,
    /// Cancelled when connections must close (after the persist buffer is flushed).
    shutdown: CancellationToken,
    connections: TaskTracker,
}

impl Gateway {
    pub fn new(
        relay: Relay,
        store: Store,
        queues: Enqueuers,
        metrics: Arc<Metrics>,
        cfg: GatewayConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Gateway {
            id: relay.gateway(),
            relay,
            rooms: Arc::new(Rooms::default()),
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
            .spawn(async move { session::run(gw, user, upgrade).await });
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

    pub fn id(&self) -> uuid::Uuid {
        self.id
    }
}

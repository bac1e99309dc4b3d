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

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::GatewayConfig;
pub use cache::BoundedMap;

use crate::domain::{ConversationId, UserId};
use crate::limits::Limits;
use crate::notify::Relay;
use crate::protocol::client::DecodeLimits;
use crate::queue::Enqueuer;
use crate::rooms::{Rooms, Users};

use crate::store::Store;
use crate::telemetry::Metrics;

// Built here, not in config: config sits below protocol and may not import it.
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
    /// Shared with the HTTP layer: history reads count the same over both.
    limits: Arc<Limits>,
}

impl Gateway {
    pub fn new(
        relay: Relay,
        store: Store,
        queues: Enqueuers,
        metrics: Arc<Metrics>,
        cfg: GatewayConfig,
        shutdown: CancellationToken,
        limits: Arc<Limits>,
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
            limits,
        })
    }

    /// Take over an upgraded WebSocket for `user` (already authenticated).
    /// Hyper does not track upgraded connections, so we do.
    pub fn accept(self: &Arc<Self>, user: UserId, upgrade: fastwebsockets::upgrade::UpgradeFut) {
        let gw = self.clone();
        self.connections
            .spawn(async move { session::run(gw, user, upgrade).await });
    }

    /// Wait for every connection to finish closing after shutdown, until
    /// `deadline` at most (the one shutdown deadline, shared by every stage).
    pub async fn drain(&self, deadline: tokio::time::Instant) {
        self.connections.close();
        if tokio::time::timeout_at(deadline, self.connections.wait())
            .await
            .is_err()
        {
            tracing::error!(
                stage = "close connections",
                remaining = self.connections.len(),
                "shutdown stage cut short by the deadline: connections still open"
            );
        }
    }

    pub fn id(&self) -> uuid::Uuid {
        self.id
    }
}

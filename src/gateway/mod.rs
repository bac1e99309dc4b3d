//! WebSocket clients: the session of each connection, event handlers by
//! concern, presence, and the one place frames are published.
//!
//! - [`connection`]: the socket; a reader task and a writer task. Nothing
//!   else touches it. [`cadence`]: when the writer holds a frame that may
//!   wait for the next write.
//! - [`session`]: a connection's state and `dispatch`, the one place a
//!   client event enters. Handlers by concern: [`messages`] (send and
//!   dedup, and the moderation check sends and edits share), [`typing`],
//!   [`receipts`], [`sync`] (sync and resume), [`edits`].
//! - [`publish`]: the one place a frame leaves, here and to other gateways,
//!   and where what other gateways and workers said is delivered.
//! - [`presence`]: online/offline across gateways; [`liveness`]: this
//!   gateway's heartbeat row, for "gateways alive".
//! - [`room_presence`]: who is in a conversation right now, across gateways.
//! - [`error`]: why a request was refused, mapped to the contract once.
//! - [`slots`]: the per-user cap on open WebSockets.
//! - [`socketio`]: the Socket.IO handshake (auth after the upgrade); then
//!   the same session, with the Socket.IO codec on the socket.
//!
//! The session never writes to the socket: every frame goes through the
//! connection's bounded outbox, owned by the writer task. Messages head for
//! storage in one place, the [`Enqueuer`]s.

mod cache;
mod cadence;
mod connection;
mod edits;
mod error;
mod liveness;
mod messages;
mod presence;
mod publish;
mod receipts;
mod room_presence;
mod session;
mod slots;
mod socketio;
mod sync;
mod typing;
mod write_buffer;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::GatewayConfig;
pub use cache::BoundedMap;
pub use slots::{TooManyConnections, UserSlot};

use crate::auth::{Jwt, Verified};
use crate::domain::{ConversationId, UserId};
use crate::limits::Limits;
use crate::moderation::Filter;
use crate::notify::Relay;
use crate::protocol::client::DecodeLimits;
use crate::queue::audit::Origin;
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

/// What clients' requests are held to, shared with the HTTP layer where it
/// applies there too.
pub struct Policies {
    /// Rate limits; history reads count the same over WebSocket and HTTP.
    pub limits: Arc<Limits>,
    /// The moderation word list, checked on every send and edit; None: off.
    pub moderation: Option<Arc<Filter>>,
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
    user_slots: slots::UserSlots,
    /// Shared with the HTTP layer: history reads count the same over both.
    limits: Arc<Limits>,
    moderation: Option<Arc<Filter>>,
    /// Room departures waiting out the grace period: at most one per
    /// (conversation, user) with a connection here that just closed.
    departures: room_presence::Departures,
}

impl Gateway {
    pub fn new(
        relay: Relay,
        store: Store,
        queues: Enqueuers,
        metrics: Arc<Metrics>,
        cfg: GatewayConfig,
        shutdown: CancellationToken,
        policies: Policies,
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
            departures: room_presence::Departures::default(),
            metrics,
            cfg,
            shutdown,
            connections: TaskTracker::new(),
            user_slots: slots::UserSlots::new(cfg.max_connections_per_user),
            limits: policies.limits,
            moderation: policies.moderation,
        })
    }

    /// One of `user`'s WebSocket slots, taken before the upgrade so a user
    /// over the cap is refused with a plain HTTP error.
    pub fn reserve(&self, user: UserId) -> Result<UserSlot, TooManyConnections> {
        self.user_slots.take(user)
    }

    /// Take over an upgraded WebSocket for the holder of `token` (already
    /// verified) in one of its user's slots, given back when the session
    /// ends; `jwt` verifies the fresh tokens it may send later; `from` is
    /// where it came from (its audited actions name it). Hyper does not
    /// track upgraded connections, so we do.
    pub fn accept(
        self: &Arc<Self>,
        slot: UserSlot,
        token: Verified,
        jwt: &Arc<Jwt>,
        upgrade: fastwebsockets::upgrade::UpgradeFut,
        from: Origin,
    ) {
        let (gw, jwt) = (self.clone(), jwt.clone());
        self.connections.spawn(async move {
            if let Some(ws) = session::upgraded(&gw, upgrade).await {
                session::run(gw, token, jwt, ws, crate::protocol::Framing::Native, from).await;
            }
            drop(slot);
        });
    }

    /// Take over an upgraded Socket.IO connection, not yet authenticated:
    /// its token comes in its CONNECT packet (or `header_token`, from the
    /// upgrade request). `authenticated` runs once it verified.
    pub fn accept_socketio(
        self: &Arc<Self>,
        jwt: &Arc<Jwt>,
        header_token: Option<String>,
        upgrade: fastwebsockets::upgrade::UpgradeFut,
        from: Origin,
        authenticated: impl FnOnce() + Send + 'static,
    ) {
        let (gw, jwt) = (self.clone(), jwt.clone());
        self.connections.spawn(socketio::run(
            gw,
            jwt,
            header_token,
            upgrade,
            from,
            authenticated,
        ));
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

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

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::GatewayConfig;
pub use cache::BoundedMap;

use crate::domain::{ClientMessageId, ConversationId, Persisted, UserId};
use crate::notify::{Hint, Relay, Target};
use crate::protocol::client::DecodeLimits;
use crate::protocol::server;
use crate::queue::Enqueuer;
use crate::rooms::{Rooms, Transition, Users};

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
    dedup: BoundedMap<(UserId, ConversationId, ClientMessageId), Arc<handlers::Claim>>,
    /// Latest (delivered, read) per member, so a receipt that moves nothing
    /// is not broadcast and a known position needs no query.
    receipts: BoundedMap<(ConversationId, UserId), (i64, i64)>,
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
            .spawn(async move { connection::run(gw, user, upgrade).await });
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

    /// A frame for a conversation: to the connections here (but `except`),
    /// and to the other gateways.
    fn fanout(
        &self,
        conv: ConversationId,
        frame: &Bytes,
        except: Option<crate::rooms::ConnectionId>,
    ) {
        self.rooms.broadcast(conv, frame, except);
        self.relay.publish(Target::Room(conv), frame);
    }

    /// A frame for all of a user's connections, here (but `except`) and elsewhere.
    fn push_user(&self, user: UserId, frame: &Bytes, except: Option<crate::rooms::ConnectionId>) {
        self.users.push(user, frame, except);
        self.relay.publish(Target::User(user), frame);
    }

    /// What the LISTEN connection heard.
    pub fn on_hint(&self, hint: Hint) {
        match hint {
            Hint::Persisted(entries) => self.on_persisted(&entries),
            Hint::Relay(batch) if batch.gateway == self.id => {}
            Hint::Relay(batch) => {
                for e in batch.events {
                    match e.target {
                        Target::Room(conv) => {
                            self.rooms.broadcast(conv, &e.frame, None);
                        }
                        Target::Message(conv, id) => {
                            self.rooms.broadcast_message(conv, id, &e.frame);
                        }
                        Target::User(user) => {
                            self.users.push(user, &e.frame, None);
                        }
                        Target::Evict(conv, user) => {
                            self.rooms.evict_user(conv, user);
                        }
                    }
                }
            }
            Hint::Reconnected => self.users.push_all(&server::resync()),
        }
    }

    /// Tell each room that these messages are durable.
    fn on_persisted(&self, entries: &[Persisted]) {
        for p in entries {
            self.rooms.persisted(p.conversation_id, p.message_id);
            let frame = server::message_persisted(p.conversation_id, p.message_id, p.seq);
            self.rooms.broadcast(p.conversation_id, &frame, None);
        }
        self.metrics.add_persisted_notified(entries.len() as u64);
    }

    /// Membership changed through the HTTP API: tell the room, and take a
    /// removed user's connections out of it, on every gateway.
    pub fn on_membership(&self, conv: ConversationId, user: UserId, joined: bool) {
        let frame: Bytes = if joined {
            server::member_joined(conv, user)
        } else {
            server::member_left(conv, user)
        };
        self.fanout(conv, &frame, None);
        if !joined {
            self.rooms.evict_user(conv, user);
            self.relay.publish(Target::Evict(conv, user), &Bytes::new());
        }
    }

    /// Online: connected to some gateway, or within the grace period here.
    pub async fn online(&self, users: &[UserId]) -> Result<Vec<bool>, crate::store::StoreError> {
        let elsewhere = self.store.online_users(users).await?;
        Ok(users
            .iter()
            .map(|u| self.users.is_online(*u) || elsewhere.contains(u))
            .collect())
    }

    /// A presence transition of `user` here: record it, and tell everyone who
    /// shares a conversation with them if the user's state changed across
    /// all gateways (offline only after the grace period).
    fn on_presence(self: &Arc<Self>, user: UserId, transition: Transition) {
        let gw = self.clone();
        tokio::spawn(async move {
            match transition {
                Transition::Unchanged => {
                    // Another device: keep the session's count right.
                    let n = gw.users.count(user);
                    if n > 0 {
                        let _ = gw.store.set_presence(user, gw.id, n).await;
                    }
                }
                Transition::CameOnline => match gw
                    .store
                    .set_presence(user, gw.id, gw.users.count(user).max(1))
                    .await
                {
                    Ok(1) => gw.announce(user, true).await,
                    Ok(_) => {} // already online through another gateway
                    Err(e) => tracing::warn!(error = %e, "presence: could not record a session"),
                },
                Transition::MaybeOffline(generation) => {
                    tokio::time::sleep(gw.cfg.presence_grace).await;
                    if gw.users.expire(user, generation) {
                        match gw.store.set_presence(user, gw.id, 0).await {
                            Ok(0) => gw.announce(user, false).await,
                            Ok(_) => {} // still connected elsewhere
                            Err(e) => {
                                tracing::warn!(error = %e, "presence: could not end a session")
                            }
                        }
                    }
                }
            }
        });
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
            self.push_user(contact, &frame, None);
        }
    }

    /// Until `shutdown`: refresh this gateway's presence sessions and take
    /// dead gateways' users offline (each exactly once, cluster-wide).
    pub async fn presence_keeper(self: Arc<Self>, stop: CancellationToken) {
        // Sessions left by an earlier run under the same id are stale.
        if let Ok(gone) = self.store.clear_presence(self.id).await {
            for user in gone {
                self.announce(user, false).await;
            }
        }
        let expiry = self.cfg.presence_heartbeat * 3;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.cfg.presence_heartbeat) => {}
            }
            let local = self.users.snapshot();
            match self.store.presence_heartbeat(self.id, expiry, &local).await {
                Ok(gone) => {
                    for user in gone {
                        tracing::info!(%user, "a gateway went silent; its user is offline");
                        self.announce(user, false).await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "presence heartbeat failed"),
            }
        }
        // Leaving cleanly: this gateway's users are offline unless connected elsewhere.
        if let Ok(gone) = self.store.clear_presence(self.id).await {
            for user in gone {
                self.announce(user, false).await;
            }
        }
    }
}

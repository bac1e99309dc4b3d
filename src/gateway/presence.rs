//! Presence: a user is online while connected to any gateway (or within the
//! grace period after their last connection here closed). Sessions are
//! recorded in Postgres so every gateway agrees; transitions are announced
//! to everyone who shares a conversation with the user, exactly once.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Gateway;
use crate::domain::UserId;
use crate::protocol::server;
use crate::rooms::{ConnectionId, Outbox, Transition};

impl Gateway {
    /// A connection of `user` opened here.
    pub(super) fn connected(self: &Arc<Self>, user: UserId, conn: ConnectionId, outbox: Outbox) {
        let transition = self.users.connect(user, conn, outbox);
        self.on_presence(user, transition);
    }

    /// A connection of `user` closed here.
    pub(super) fn disconnected(self: &Arc<Self>, user: UserId, conn: ConnectionId) {
        let transition = self.users.disconnect(user, conn);
        self.on_presence(user, transition);
    }

    /// Online: connected to some gateway, or within the grace period here.
    pub async fn online(&self, users: &[UserId]) -> Result<Vec<bool>, crate::store::StoreError> {
        let elsewhere = self.store.online_users(users).await?;
        Ok(users
            .iter()
            .map(|u| self.users.is_online(*u) || elsewhere.contains(u))
            .collect())
    }

    /// Record a transition of `user` here, and announce it if the user's
    /// state changed across all gateways (offline only after the grace period).
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
                // While draining, sessions are left for the other gateways:
                // their heartbeat reaps them three beats after ours stops,
                // after the relay here is gone, and announces only the users
                // who did not reconnect elsewhere (exactly once, cluster-wide).
                Transition::MaybeOffline(_) if gw.shutdown.is_cancelled() => {}
                Transition::MaybeOffline(generation) => {
                    tokio::time::sleep(gw.cfg.presence_grace).await;
                    if gw.shutdown.is_cancelled() {
                        return;
                    }
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
        self.publish_to_users(&contacts, &server::presence(user, online));
    }

    /// Until `stop`: refresh this gateway's presence sessions and take dead
    /// gateways' users offline (each exactly once, cluster-wide).
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
            self.reap_room_presence().await;
        }
        // Leaving: the sessions stay until they expire. Clearing them here
        // would announce offline too early (the drained clients are
        // reconnecting elsewhere) through a relay that is stopping, and
        // leave nothing for another gateway to reap.
    }
}

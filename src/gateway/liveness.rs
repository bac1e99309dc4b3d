//! This gateway's row in `gateways`: written at start, refreshed every
//! presence heartbeat, deleted on a clean shutdown. Any process reads the
//! table to say which gateways are alive and which died silently. Each
//! heartbeat also reads whether any other gateway is alive, which turns the
//! relay on or off (see [`crate::notify::Peers`]).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Gateway;

impl Gateway {
    /// Until `stop`: keep this gateway's heartbeat row fresh; then remove it.
    pub async fn liveness_keeper(self: Arc<Self>, stop: CancellationToken) {
        let every = self.cfg.presence_heartbeat;
        loop {
            let others = match self.store.gateway_heartbeat(self.id, every).await {
                Ok(others) => Some(others),
                Err(e) => {
                    tracing::warn!(error = %e, "gateway heartbeat failed");
                    None
                }
            };
            if self.relay.peers().looked(others) {
                match others {
                    Some(false) => {
                        tracing::info!("no other gateway alive: live events are not relayed")
                    }
                    _ => tracing::info!("relaying live events to other gateways"),
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        // Gone on purpose: not "missing". Best effort; if this fails the row
        // reads as missing until it is forgotten (store::FORGET_SILENT_AFTER).
        if let Err(e) = self.store.remove_gateway(self.id).await {
            tracing::warn!(error = %e, "could not remove this gateway's heartbeat row");
        }
    }
}

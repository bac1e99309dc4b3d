//! This gateway's row in `gateways`: written at start, refreshed every
//! presence heartbeat, deleted on a clean shutdown. Any process reads the
//! table to say which gateways are alive and which died silently.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Gateway;

impl Gateway {
    /// Until `stop`: keep this gateway's heartbeat row fresh; then remove it.
    pub async fn liveness_keeper(self: Arc<Self>, stop: CancellationToken) {
        let every = self.cfg.presence_heartbeat;
        loop {
            if let Err(e) = self.store.gateway_heartbeat(self.id, every).await {
                tracing::warn!(error = %e, "gateway heartbeat failed");
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

//! The one LISTEN connection of a process, split in two so the listener
//! never falls behind: the LISTEN task only drains sqlx's `PgListener` and
//! routes each notification into the [`Inbox`]; the consumer ([`Hints`])
//! decodes, fetches batches sent by reference, and hands out [`Hint`]s.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::inbox::{Inbox, Pending, Resync, MAX_BUFFERED_BYTES};
use super::relay::{peek, RelayBatch};
use super::{decode_persisted, Hint, EVENTS_CHANNEL, PERSISTED_CHANNEL};

/// How long the consumer waits for a batch sent by reference. A live event
/// later than this is worth less than a resync, and a saturated pool must
/// not stall every other hint behind it.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the LISTEN task sends one notification, decided from its channel
/// and, for relay payloads, the sender prefix alone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Persisted,
    /// An inline batch from another gateway.
    Relay,
    /// A batch from another gateway sent by reference: fetch this row.
    RelayRef(i64),
    /// This gateway's own relay: it already delivered those events locally.
    Own,
    /// Not ours to read; the reason is logged.
    Ignore(&'static str),
}

/// Route a notification without parsing more than the relay sender, so the
/// LISTEN task stays a drain: no events decoded, no query made.
pub(crate) fn route(channel: &str, payload: &str, own: Uuid) -> Route {
    match channel {
        PERSISTED_CHANNEL => Route::Persisted,
        EVENTS_CHANNEL => match peek(payload) {
            Some(p) if p.sender == own => Route::Own,
            Some(p) => match p.reference {
                Some(id) => Route::RelayRef(id),
                None => Route::Relay,
            },
            None => Route::Ignore("a relay payload without a sender"),
        },
        _ => Route::Ignore("a notification on an unknown channel"),
    }
}

/// The consumer side of the LISTEN connection.
pub struct Hints {
    inbox: Arc<Inbox>,
    /// For batches sent by reference.
    pool: PgPool,
}

impl Hints {
    /// The next hint, or None once the LISTEN task has ended (shutdown) and
    /// everything it forwarded was handed out. Fetches a batch sent by
    /// reference here, on the consumer's time; a failed fetch is logged and
    /// becomes [`Hint::Missed`], so clients resync instead of losing events
    /// silently.
    pub async fn recv(&mut self) -> Option<Hint> {
        loop {
            match self.inbox.take().await? {
                Pending::Resync(Resync::Reconnected) => return Some(Hint::Reconnected),
                Pending::Resync(Resync::Missed) => return Some(Hint::Missed),
                Pending::Persisted(payloads) => {
                    let mut entries = Vec::new();
                    for p in &payloads {
                        match decode_persisted(p) {
                            Ok(more) => entries.extend(more),
                            Err(e) => {
                                tracing::warn!(error = %e, "ignoring malformed persisted hint")
                            }
                        }
                    }
                    if !entries.is_empty() {
                        return Some(Hint::Persisted(entries));
                    }
                }
                Pending::Relay(payload) => match RelayBatch::parse(&payload) {
                    Ok(batch) => return Some(Hint::Relay(batch)),
                    Err(e) => tracing::warn!(error = %e, "ignoring a relay notification"),
                },
                Pending::RelayRef(id) => {
                    let fetched =
                        tokio::time::timeout(FETCH_TIMEOUT, RelayBatch::fetch(&self.pool, id))
                            .await
                            .unwrap_or_else(|_| Err(format!("timed out after {FETCH_TIMEOUT:?}")));
                    return Some(match fetched {
                        Ok(batch) => Hint::Relay(batch),
                        Err(e) => {
                            tracing::warn!(error = %e, id, "could not fetch a relay batch; clients will resync");
                            Hint::Missed
                        }
                    });
                }
            }
        }
    }
}

impl Drop for Hints {
    fn drop(&mut self) {
        self.inbox.consumer_gone();
    }
}

/// Listen on a dedicated connection. The task it spawns only drains and
/// routes: it awaits nothing but the next notification (or a reconnect, or
/// shutdown), drops `gateway`'s own relay notifications unread, and hands
/// the rest to [`Hints`] through a buffer bounded in bytes that coalesces
/// rather than waits.
pub async fn listen(
    pool: &PgPool,
    gateway: Uuid,
    shutdown: CancellationToken,
) -> Result<(Hints, tokio::task::JoinHandle<()>), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([PERSISTED_CHANNEL, EVENTS_CHANNEL])
        .await?;
    let inbox = Arc::new(Inbox::new(MAX_BUFFERED_BYTES));
    let hints = Hints {
        inbox: inbox.clone(),
        pool: pool.clone(),
    };
    let pool = pool.clone();
    let handle = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = listener.try_recv() => n,
            };
            let pending = match next {
                Ok(Some(n)) => match route(n.channel(), n.payload(), gateway) {
                    Route::Persisted => Pending::Persisted(vec![n.payload().to_owned()]),
                    Route::Relay => Pending::Relay(n.payload().to_owned()),
                    Route::RelayRef(id) => Pending::RelayRef(id),
                    Route::Own => continue,
                    Route::Ignore(why) => {
                        tracing::warn!(channel = n.channel(), "ignoring {why}");
                        continue;
                    }
                },
                Ok(None) | Err(_) => {
                    // Reconnect now rather than on the next notification, so
                    // clients hear at once that they may have missed some.
                    tracing::warn!("LISTEN connection lost; reconnecting");
                    match reconnect(&pool, &shutdown).await {
                        Some(fresh) => listener = fresh,
                        None => break,
                    }
                    Pending::Resync(Resync::Reconnected)
                }
            };
            if !inbox.push(pending) {
                break;
            }
        }
        inbox.close();
    });
    Ok((hints, handle))
}

/// The longest wait between LISTEN reconnect attempts. Short: once Postgres
/// is back the worker stores again within its own poll, and every message
/// stored before this gateway listens is announced by `resync`, not by its
/// `message_persisted` (with a 5 s cap, one outage-test run in four met it).
/// One attempt a second against a down database costs nothing.
const RECONNECT_BACKOFF_CAP: Duration = Duration::from_secs(1);

/// A new LISTEN connection, retried with backoff until it works or shutdown.
async fn reconnect(pool: &PgPool, shutdown: &CancellationToken) -> Option<PgListener> {
    let mut backoff = Duration::from_millis(50);
    loop {
        let attempt = async {
            let mut l = PgListener::connect_with(pool).await?;
            l.listen_all([PERSISTED_CHANNEL, EVENTS_CHANNEL]).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match attempt.await {
            Ok(l) => return Some(l),
            Err(e) => tracing::warn!(error = %e, ?backoff, "LISTEN reconnect failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_CAP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_relay_notifications_are_dropped_unread_inline_or_by_reference() {
        let own = Uuid::new_v4();
        let inline = format!(r#"{{"g":"{own}","e":[this is never parsed"#);
        assert_eq!(route(EVENTS_CHANNEL, &inline, own), Route::Own);
        let by_ref = format!(r#"{{"g":"{own}","r":12}}"#);
        assert_eq!(
            route(EVENTS_CHANNEL, &by_ref, own),
            Route::Own,
            "no fetch for our own big batch"
        );
    }

    #[test]
    fn other_gateways_relays_are_forwarded_and_references_marked_for_fetch() {
        let (own, other) = (Uuid::new_v4(), Uuid::new_v4());
        let inline = format!(r#"{{"g":"{other}","e":[]}}"#);
        assert_eq!(route(EVENTS_CHANNEL, &inline, own), Route::Relay);
        let by_ref = format!(r#"{{"g":"{other}","r":12}}"#);
        assert_eq!(route(EVENTS_CHANNEL, &by_ref, own), Route::RelayRef(12));
    }

    #[test]
    fn persisted_payloads_are_forwarded_undecoded_and_strays_ignored() {
        let own = Uuid::new_v4();
        assert_eq!(
            route(PERSISTED_CHANNEL, "[not decoded here", own),
            Route::Persisted
        );
        assert!(matches!(
            route(EVENTS_CHANNEL, "garbage", own),
            Route::Ignore(_)
        ));
        assert!(matches!(route("elsewhere", "{}", own), Route::Ignore(_)));
    }
}

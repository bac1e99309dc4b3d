//! LISTEN/NOTIFY between workers and gateways: a hint, not a transport.
//!
//! A worker NOTIFYs once per committed batch (never once per message: a
//! NOTIFY takes a cluster-wide lock at commit), packing many `Persisted`
//! entries per payload. Notifications are at-most-once; the messages table
//! is the truth and a client that missed one recovers by seq.

mod relay;

pub use relay::{Relay, RelayBatch, RelayEvent, Target};

use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::{ConversationId, MessageId, Persisted, Seq};

/// Channel on which workers announce persisted messages.
pub const PERSISTED_CHANNEL: &str = "postline_persisted";
/// Channel on which gateways relay live events to each other.
pub const EVENTS_CHANNEL: &str = "postline_events";

/// What the listener hears.
#[derive(Debug)]
pub enum Hint {
    Persisted(Vec<Persisted>),
    Relay(RelayBatch),
    /// The LISTEN connection was lost and is back: notifications sent
    /// meanwhile are gone, so clients should resync by seq.
    Reconnected,
}

/// NOTIFY payloads must be under 8000 bytes; leave room for the envelope.
const MAX_PAYLOAD: usize = 7900;

/// Encode entries as compact `[["conv","msg",seq],...]` payloads, each under
/// the NOTIFY size limit.
pub fn encode_persisted(entries: &[Persisted]) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut cur = String::from("[");
    for p in entries {
        let item = format!(
            "[\"{}\",\"{}\",{}]",
            p.conversation_id, p.message_id, p.seq.0
        );
        if cur.len() + item.len() + 2 > MAX_PAYLOAD && cur.len() > 1 {
            cur.push(']');
            payloads.push(std::mem::replace(&mut cur, String::from("[")));
        }
        if cur.len() > 1 {
            cur.push(',');
        }
        cur.push_str(&item);
    }
    if cur.len() > 1 {
        cur.push(']');
        payloads.push(cur);
    }
    payloads
}

pub fn decode_persisted(payload: &str) -> Result<Vec<Persisted>, serde_json::Error> {
    let raw: Vec<(ConversationId, MessageId, i64)> = serde_json::from_str(payload)?;
    Ok(raw
        .into_iter()
        .map(|(conversation_id, message_id, seq)| Persisted {
            conversation_id,
            message_id,
            seq: Seq(seq),
        })
        .collect())
}

/// NOTIFY the persisted entries inside the caller's transaction, so listeners
/// hear of them exactly when (and only if) they commit.
pub async fn publish_persisted(
    conn: &mut PgConnection,
    entries: &[Persisted],
) -> Result<(), sqlx::Error> {
    for payload in encode_persisted(entries) {
        sqlx::query("select pg_notify($1, $2)")
            .bind(PERSISTED_CHANNEL)
            .bind(payload)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Listen on a dedicated connection and forward decoded hints into a
/// bounded channel. The task only drains and forwards (fetching a relay
/// payload sent by reference is the one query it makes), so the listener
/// connection never falls behind on the server side.
pub async fn listen(
    pool: &PgPool,
    shutdown: CancellationToken,
) -> Result<(mpsc::Receiver<Hint>, tokio::task::JoinHandle<()>), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([PERSISTED_CHANNEL, EVENTS_CHANNEL])
        .await?;
    let (tx, rx) = mpsc::channel(1024);
    let pool = pool.clone();
    let handle = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = listener.try_recv() => n,
            };
            let hint = match next {
                Ok(Some(n)) => match n.channel() {
                    PERSISTED_CHANNEL => match decode_persisted(n.payload()) {
                        Ok(entries) => Hint::Persisted(entries),
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring malformed persisted hint");
                            continue;
                        }
                    },
                    _ => match RelayBatch::decode(n.payload(), &pool).await {
                        Ok(batch) => Hint::Relay(batch),
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring a relay notification");
                            continue;
                        }
                    },
                },
                Ok(None) | Err(_) => {
                    // Reconnect now rather than on the next notification, so
                    // clients hear at once that they may have missed some.
                    tracing::warn!("LISTEN connection lost; reconnecting");
                    match reconnect(&pool, &shutdown).await {
                        Some(fresh) => listener = fresh,
                        None => break,
                    }
                    Hint::Reconnected
                }
            };
            if tx.send(hint).await.is_err() {
                break;
            }
        }
    });
    Ok((rx, handle))
}

/// A new LISTEN connection, retried with backoff until it works or shutdown.
async fn reconnect(pool: &PgPool, shutdown: &CancellationToken) -> Option<PgListener> {
    let mut backoff = std::time::Duration::from_millis(50);
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
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: i64) -> Persisted {
        Persisted {
            conversation_id: ConversationId::new_v7(),
            message_id: MessageId::new_v7(),
            seq: Seq(seq),
        }
    }

    #[test]
    fn payloads_round_trip_and_stay_under_the_limit() {
        let entries: Vec<Persisted> = (1..=500).map(entry).collect();
        let payloads = encode_persisted(&entries);
        assert!(payloads.len() > 1, "500 entries need several payloads");
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() < 8000, "payload of {} bytes", p.len());
            back.extend(decode_persisted(p).unwrap());
        }
        assert_eq!(back, entries);
        assert!(encode_persisted(&[]).is_empty());
    }
}

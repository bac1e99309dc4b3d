//! LISTEN/NOTIFY between workers and gateways: a hint, not a transport.
//!
//! A worker NOTIFYs once per committed batch (never once per message: a
//! NOTIFY takes a cluster-wide lock at commit), packing many `Persisted`
//! entries per payload. Notifications are at-most-once; the messages table
//! is the truth and a client that missed one recovers by seq.
//!
//! - `relay`: gateway-to-gateway live events, their wire format, publishing.
//! - `listen`: the LISTEN task (drains and routes, never waits on anyone)
//!   and [`Hints`], the consumer side that decodes and fetches.
//! - `inbox`: the byte-bounded, coalescing buffer between the two.
//! - `peers`: whether any other gateway listens, so a lone one relays nothing.

mod inbox;
mod listen;
mod peers;
mod relay;

pub use listen::{listen, Hints};
pub use peers::Peers;
pub use relay::{publish_in, Relay, RelayBatch, RelayEvent, Target, NO_GATEWAY};

use sqlx::PgConnection;

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
    /// Hints were lost on this side: the consumer fell so far behind that
    /// the oldest were dropped, or a batch sent by reference could not be
    /// fetched. Clients should resync by seq, as after `Reconnected`.
    Missed,
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

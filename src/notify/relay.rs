//! Live fan-out between gateways: each gateway NOTIFYs the events it
//! broadcast locally, every other gateway broadcasts them to its own rooms.
//!
//! Events are coalesced: one NOTIFY carries as many as fit under the payload
//! limit (a NOTIFY's commit takes a cluster-wide lock, so never one per
//! message). A single event too big for a payload travels by reference: its
//! batch is written to `relay_payloads` and only the row id is notified.
//! Delivery is at most once, like NOTIFY itself; the messages table is the
//! truth and clients resync by seq.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::EVENTS_CHANNEL;
use crate::domain::{ConversationId, MessageId, UserId};

/// NOTIFY payloads must be under 8000 bytes; leave room for the envelope.
const MAX_PAYLOAD: usize = 7800;
/// Relay rows older than this are removed (receivers fetch within ms).
const RELAY_ROW_TTL_SECS: f64 = 60.0;

/// Where a relayed frame goes on the receiving gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every connection joined to the conversation.
    Room(ConversationId),
    /// A new message for the conversation: receivers track it as pending
    /// until persisted, so `sync` on their side meets it without gap or duplicate.
    Message(ConversationId, MessageId),
    /// Every connection of the user.
    User(UserId),
    /// Take the user's connections out of the room (membership ended).
    Evict(ConversationId, UserId),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RelayEvent {
    pub target: Target,
    /// The encoded server frame (empty for `Evict`).
    pub frame: Bytes,
}

/// Events from one other gateway.
#[derive(Debug)]
pub struct RelayBatch {
    pub gateway: Uuid,
    pub events: Vec<RelayEvent>,
}

#[derive(Deserialize)]
struct WireEvent<'a> {
    t: &'a str,
    #[serde(default)]
    c: Option<Uuid>,
    #[serde(default)]
    u: Option<Uuid>,
    #[serde(default)]
    m: Option<Uuid>,
    #[serde(default, borrow)]
    f: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    g: Uuid,
    #[serde(default, borrow)]
    e: Vec<WireEvent<'a>>,
    /// A batch sent by reference: the id of its `relay_payloads` row.
    #[serde(default)]
    r: Option<i64>,
}

/// What the LISTEN task needs from a relay notification to route it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peek {
    /// The gateway that sent it.
    pub sender: Uuid,
    /// Set when the batch came by reference: its `relay_payloads` row.
    pub reference: Option<i64>,
}

/// Read the sender (and the row id of a batch sent by reference) from the
/// fixed prefix every envelope starts with, `{"g":"<uuid>",` (see
/// `envelope` and `publish`), without parsing the events: the LISTEN
/// task must not spend time on batches it is about to drop, its own above all.
pub(crate) fn peek(payload: &str) -> Option<Peek> {
    let rest = payload.strip_prefix(r#"{"g":""#)?;
    let sender = Uuid::try_parse(rest.get(..36)?).ok()?;
    let rest = rest.get(36..)?.strip_prefix('"')?;
    let reference = match rest.strip_prefix(r#","r":"#) {
        Some(id) => Some(id.strip_suffix('}')?.parse().ok()?),
        None => None,
    };
    Some(Peek { sender, reference })
}

impl RelayBatch {
    /// Parse a batch that came inline in its notification.
    pub fn parse(payload: &str) -> Result<RelayBatch, String> {
        let wire: Wire<'_> = serde_json::from_str(payload).map_err(|e| e.to_string())?;
        if let Some(id) = wire.r {
            return Err(format!("relay batch {id} came by reference: fetch it"));
        }
        Self::from_wire(wire)
    }

    /// Fetch and parse a batch sent by reference (`relay_payloads` row `id`).
    /// Called by the hint consumer, never by the LISTEN task.
    pub async fn fetch(pool: &PgPool, id: i64) -> Result<RelayBatch, String> {
        let full: Option<String> =
            sqlx::query_scalar("select payload from relay_payloads where id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
                .map_err(|e| e.to_string())?;
        let full = full.ok_or_else(|| format!("relay payload {id} is gone"))?;
        Self::parse(&full)
    }

    fn from_wire(wire: Wire<'_>) -> Result<RelayBatch, String> {
        let mut events = Vec::with_capacity(wire.e.len());
        for e in wire.e {
            let frame =
                e.f.map(|f| Bytes::copy_from_slice(f.get().as_bytes()))
                    .unwrap_or_default();
            let target = match (e.t, e.c, e.u, e.m) {
                ("room", Some(c), _, _) => Target::Room(ConversationId(c)),
                ("msg", Some(c), _, Some(m)) => Target::Message(ConversationId(c), MessageId(m)),
                ("user", _, Some(u), _) => Target::User(UserId(u)),
                ("evict", Some(c), Some(u), _) => Target::Evict(ConversationId(c), UserId(u)),
                (t, ..) => return Err(format!("unknown relay event {t:?}")),
            };
            events.push(RelayEvent { target, frame });
        }
        Ok(RelayBatch {
            gateway: wire.g,
            events,
        })
    }
}

/// One event as it appears inside a payload.
fn encode_event(e: &RelayEvent) -> String {
    let frame = std::str::from_utf8(&e.frame).unwrap_or("null");
    let frame = if frame.is_empty() { "null" } else { frame };
    match e.target {
        Target::Room(c) => format!(r#"{{"t":"room","c":"{c}","f":{frame}}}"#),
        Target::Message(c, m) => format!(r#"{{"t":"msg","c":"{c}","m":"{m}","f":{frame}}}"#),
        Target::User(u) => format!(r#"{{"t":"user","u":"{u}","f":{frame}}}"#),
        Target::Evict(c, u) => format!(r#"{{"t":"evict","c":"{c}","u":"{u}"}}"#),
    }
}

fn envelope(gateway: Uuid, events: &[String]) -> String {
    format!(r#"{{"g":"{gateway}","e":[{}]}}"#, events.join(","))
}

/// Handle to the relay publisher. Cheap to clone.
#[derive(Clone)]
pub struct Relay {
    tx: mpsc::Sender<RelayEvent>,
    gateway: Uuid,
}

impl Relay {
    pub fn spawn(
        pool: PgPool,
        gateway: Uuid,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Relay {
        // Bounded: if Postgres cannot keep up, live relay degrades (dropped
        // hints, recovered by sync) instead of growing memory.
        let (tx, rx) = mpsc::channel(16_384);
        tracker.spawn(run(rx, pool, gateway, shutdown));
        Relay { tx, gateway }
    }

    pub fn gateway(&self) -> Uuid {
        self.gateway
    }

    pub fn publish(&self, target: Target, frame: &Bytes) {
        if self
            .tx
            .try_send(RelayEvent {
                target,
                frame: frame.clone(),
            })
            .is_err()
        {
            tracing::warn!("relay queue full; a live event was not relayed to other gateways");
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<RelayEvent>,
    pool: PgPool,
    gateway: Uuid,
    shutdown: CancellationToken,
) {
    let mut last_cleanup = tokio::time::Instant::now();
    loop {
        let first = tokio::select! {
            e = rx.recv() => e,
            _ = shutdown.cancelled() => break,
        };
        let Some(first) = first else { break };
        let mut pieces = vec![encode_event(&first)];
        let mut size = pieces[0].len() + 64;
        // Everything that queued while the previous NOTIFY was in flight.
        while size < MAX_PAYLOAD {
            match rx.try_recv() {
                Ok(e) => {
                    let piece = encode_event(&e);
                    if size + piece.len() + 1 > MAX_PAYLOAD {
                        // Does not fit: send what we have, start the next with it.
                        publish(&pool, gateway, &pieces).await;
                        pieces.clear();
                        size = 64;
                    }
                    size += piece.len() + 1;
                    pieces.push(piece);
                }
                Err(_) => break,
            }
        }
        publish(&pool, gateway, &pieces).await;
        if last_cleanup.elapsed() > Duration::from_secs(30) {
            last_cleanup = tokio::time::Instant::now();
            let _ = sqlx::query(
                "delete from relay_payloads where created_at < now() - make_interval(secs => $1)",
            )
            .bind(RELAY_ROW_TTL_SECS)
            .execute(&pool)
            .await;
        }
    }
}

async fn publish(pool: &PgPool, gateway: Uuid, pieces: &[String]) {
    if pieces.is_empty() {
        return;
    }
    let payload = envelope(gateway, pieces);
    let result = if payload.len() < MAX_PAYLOAD {
        sqlx::query("select pg_notify($1, $2)")
            .bind(EVENTS_CHANNEL)
            .bind(&payload)
            .execute(pool)
            .await
            .map(|_| ())
    } else {
        // Too big for NOTIFY: by reference, insert and notify in one transaction.
        async {
            let mut tx = pool.begin().await?;
            let id: i64 =
                sqlx::query_scalar("insert into relay_payloads (payload) values ($1) returning id")
                    .bind(&payload)
                    .fetch_one(&mut *tx)
                    .await?;
            sqlx::query("select pg_notify($1, $2)")
                .bind(EVENTS_CHANNEL)
                .bind(format!(r#"{{"g":"{gateway}","r":{id}}}"#))
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        .await
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, events = pieces.len(), "relay NOTIFY failed; other gateways miss these live events");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_the_wire_format() {
        let g = Uuid::new_v4();
        let conv = ConversationId::new_v7();
        let user = UserId(Uuid::new_v4());
        let events = [
            RelayEvent {
                target: Target::Room(conv),
                frame: Bytes::from_static(br#"{"type":"typing","is_typing":true}"#),
            },
            RelayEvent {
                target: Target::User(user),
                frame: Bytes::from_static(br#"{"type":"presence","status":"online"}"#),
            },
            RelayEvent {
                target: Target::Evict(conv, user),
                frame: Bytes::new(),
            },
            RelayEvent {
                target: Target::Message(conv, MessageId::new_v7()),
                frame: Bytes::from_static(
                    br#"{"type":"new_message","message":{"content":"a \"quoted\" text"}}"#,
                ),
            },
        ];
        let pieces: Vec<String> = events.iter().map(encode_event).collect();
        let batch = RelayBatch::parse(&envelope(g, &pieces)).unwrap();
        assert_eq!(batch.gateway, g);
        assert_eq!(batch.events[0], events[0]);
        assert_eq!(batch.events[1], events[1]);
        assert_eq!(batch.events[2].target, events[2].target);
        assert_eq!(batch.events[3], events[3]);
    }

    #[test]
    fn peek_reads_the_sender_and_the_reference_without_the_events() {
        let g = Uuid::new_v4();
        let inline = envelope(g, &["not even json".to_owned()]);
        assert_eq!(
            peek(&inline),
            Some(Peek {
                sender: g,
                reference: None
            })
        );
        let by_ref = format!(r#"{{"g":"{g}","r":42}}"#);
        assert_eq!(
            peek(&by_ref),
            Some(Peek {
                sender: g,
                reference: Some(42)
            })
        );
        assert_eq!(peek(""), None);
        assert_eq!(peek(r#"{"g":"not-a-uuid"}"#), None);
        assert_eq!(peek(&format!(r#"{{"g":"{g}","r":x}}"#)), None);
        assert_eq!(peek(&format!(r#"{{"e":[],"g":"{g}"}}"#)), None);
        // A multi-byte character where the uuid should be is refused, not a panic.
        assert_eq!(peek(r#"{"g":"ééééééééééééééééééééééééééééééééééé"}"#), None);
    }

    #[test]
    fn a_reference_is_not_parsed_as_an_empty_batch() {
        let p = format!(r#"{{"g":"{}","r":7}}"#, Uuid::new_v4());
        assert!(RelayBatch::parse(&p).is_err());
    }

    #[test]
    fn unknown_events_are_refused() {
        let p = format!(r#"{{"g":"{}","e":[{{"t":"dance"}}]}}"#, Uuid::new_v4());
        assert!(RelayBatch::parse(&p).is_err());
    }
}

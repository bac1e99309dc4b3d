//! Live fan-out between gateways: each gateway NOTIFYs the events it
//! broadcast locally, every other gateway broadcasts them to its own rooms.
//!
//! Events are coalesced: one NOTIFY carries as many as fit under the payload
//! limit (a NOTIFY's commit takes a cluster-wide lock, so never one per
//! message). A single event too big for a payload travels by reference: its
//! batch is written to `relay_payloads` and only the row id is notified.
//! Delivery is at most once, like NOTIFY itself; the messages table is the
//! truth and clients resync by seq.
//!
//! A frame for many users (a presence change for every contact) is one
//! `users` event carrying the frame once and the list of ids, split so each
//! part fits a payload: 5,000 contacts cost ~26 NOTIFYs, not 5,000.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::peers::Peers;
use super::EVENTS_CHANNEL;
use crate::domain::{ConversationId, MessageId, UserId};

/// NOTIFY payloads must be under 8000 bytes; leave room for the envelope.
const MAX_PAYLOAD: usize = 7800;
/// Relay rows older than this are removed (receivers fetch within ms).
const RELAY_ROW_TTL_SECS: f64 = 60.0;

/// Where a relayed frame goes on the receiving gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connection joined to the conversation.
    Room(ConversationId),
    /// A new message for the conversation: receivers track it as pending
    /// until persisted, so `sync` on their side meets it without gap or duplicate.
    Message(ConversationId, MessageId),
    /// Every connection of the user.
    User(UserId),
    /// Every connection of each of these users: one frame, many recipients.
    /// Built by [`Relay::publish_users`], which keeps each list short enough
    /// for its event to fit a payload.
    Users(Vec<UserId>),
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
    /// The recipients of a `users` event.
    #[serde(default)]
    us: Option<Vec<Uuid>>,
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
            let target = match (e.t, e.c, e.u, e.m, e.us) {
                ("room", Some(c), ..) => Target::Room(ConversationId(c)),
                ("msg", Some(c), _, Some(m), _) => Target::Message(ConversationId(c), MessageId(m)),
                ("user", _, Some(u), ..) => Target::User(UserId(u)),
                ("users", .., Some(us)) => Target::Users(us.into_iter().map(UserId).collect()),
                ("evict", Some(c), Some(u), ..) => Target::Evict(ConversationId(c), UserId(u)),
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
    match &e.target {
        Target::Room(c) => format!(r#"{{"t":"room","c":"{c}","f":{frame}}}"#),
        Target::Message(c, m) => format!(r#"{{"t":"msg","c":"{c}","m":"{m}","f":{frame}}}"#),
        Target::User(u) => format!(r#"{{"t":"user","u":"{u}","f":{frame}}}"#),
        Target::Users(us) => {
            let mut s = String::with_capacity(32 + us.len() * USER_ID_BYTES + frame.len());
            s.push_str(r#"{"t":"users","us":["#);
            for (i, u) in us.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push('"');
                s.push_str(&u.0.to_string());
                s.push('"');
            }
            s.push_str(r#"],"f":"#);
            s.push_str(frame);
            s.push('}');
            s
        }
        Target::Evict(c, u) => format!(r#"{{"t":"evict","c":"{c}","u":"{u}"}}"#),
    }
}

/// Bytes one id adds to a `users` event: 36 for the uuid, 2 quotes, a comma.
const USER_ID_BYTES: usize = 39;
/// The envelope (`{"g":"<uuid>","e":[...]}`, 51 bytes) plus a `users`
/// event's own keys (30 bytes), rounded up.
const USERS_EVENT_OVERHEAD: usize = 96;
/// With a frame so big that fewer ids than this fit beside it, the event
/// goes by reference instead: a few dozen NOTIFYs of a handful of ids each
/// would cost more commits than one row.
const MIN_INLINE_USERS: usize = 16;
/// Ids per event once it goes by reference anyway: one `relay_payloads`
/// row of ~160 KB plus the frame, which bounds the row and the receivers' fetch.
const USERS_PER_REFERENCED_EVENT: usize = 4096;

/// How many recipients one `users` event carries beside a frame of
/// `frame_len` bytes: as many as keep it under the NOTIFY limit.
fn users_per_event(frame_len: usize) -> usize {
    let room = MAX_PAYLOAD.saturating_sub(USERS_EVENT_OVERHEAD + frame_len.max(4)) / USER_ID_BYTES;
    if room >= MIN_INLINE_USERS {
        room
    } else {
        USERS_PER_REFERENCED_EVENT
    }
}

/// The sender of events no gateway sent (SQL's `postline.publish()`, the
/// moderation hook's retractions): every gateway delivers them.
pub const NO_GATEWAY: Uuid = Uuid::nil();

/// Relay `frame` to `target` on every gateway, from [`NO_GATEWAY`], in the
/// caller's transaction: Postgres sends the NOTIFY at commit, so gateways
/// hear of a change exactly when (and only if) it commits. For producers
/// outside a gateway, such as the worker's pools; a gateway uses [`Relay`].
pub async fn publish_in(
    conn: &mut PgConnection,
    target: Target,
    frame: &Bytes,
) -> Result<(), sqlx::Error> {
    let event = encode_event(&RelayEvent {
        target,
        frame: frame.clone(),
    });
    let payload = envelope(NO_GATEWAY, &[event]);
    let notice = if payload.len() < MAX_PAYLOAD {
        payload
    } else {
        let id: i64 =
            sqlx::query_scalar("insert into relay_payloads (payload) values ($1) returning id")
                .bind(&payload)
                .fetch_one(&mut *conn)
                .await?;
        format!(r#"{{"g":"{NO_GATEWAY}","r":{id}}}"#)
    };
    notify(&mut *conn, &notice).await
}

/// NOTIFY the relay channel; sent when `e`'s transaction commits.
async fn notify<'e>(e: impl sqlx::PgExecutor<'e>, payload: &str) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(EVENTS_CHANNEL)
        .bind(payload)
        .execute(e)
        .await
        .map(|_| ())
}

fn envelope(gateway: Uuid, events: &[String]) -> String {
    format!(r#"{{"g":"{gateway}","e":[{}]}}"#, events.join(","))
}

/// Handle to the relay publisher. Cheap to clone.
#[derive(Clone)]
pub struct Relay {
    tx: mpsc::Sender<RelayEvent>,
    gateway: Uuid,
    /// Whether anyone else listens; while nobody does, nothing is relayed.
    peers: Arc<Peers>,
    pool: PgPool,
}

impl Relay {
    /// `remember`: how long another gateway heard on the channel counts as
    /// present without a live row in `gateways` (see [`Peers`]).
    pub fn spawn(
        pool: PgPool,
        gateway: Uuid,
        remember: Duration,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Relay {
        // Bounded: if Postgres cannot keep up, live relay degrades (dropped
        // hints, recovered by sync) instead of growing memory.
        let (tx, rx) = mpsc::channel(16_384);
        tracker.spawn(run(rx, pool.clone(), gateway, shutdown));
        Relay {
            tx,
            gateway,
            peers: Arc::new(Peers::new(remember)),
            pool,
        }
    }

    pub fn gateway(&self) -> Uuid {
        self.gateway
    }

    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Tell the other gateways this one is here, before it accepts a
    /// connection, so they relay to it at once rather than from their next
    /// look at `gateways`: an empty batch, which every receiver takes as a
    /// sign of life.
    pub async fn announce(&self) -> Result<(), sqlx::Error> {
        notify(&self.pool, &envelope(self.gateway, &[])).await
    }

    /// The same frame for every connection of each of `users`: the frame is
    /// relayed once per part of the list, not once per user.
    pub fn publish_users(&self, users: &[UserId], frame: &Bytes) {
        for event in users_events(users, frame) {
            self.send(event);
        }
    }

    pub fn publish(&self, target: Target, frame: &Bytes) {
        self.send(RelayEvent {
            target,
            frame: frame.clone(),
        });
    }

    fn send(&self, event: RelayEvent) {
        if !self.peers.present() {
            return;
        }
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("relay queue full; a live event was not relayed to other gateways")
            }
            // Shutdown stopped the publisher before the last announcements;
            // not a capacity problem, so not a warning.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!("relay stopped; a live event was not relayed")
            }
        }
    }
}

/// One `users` event per part of `users`, each sharing `frame`.
fn users_events<'a>(
    users: &'a [UserId],
    frame: &'a Bytes,
) -> impl Iterator<Item = RelayEvent> + 'a {
    users
        .chunks(users_per_event(frame.len()))
        .map(|part| RelayEvent {
            target: Target::Users(part.to_vec()),
            frame: frame.clone(),
        })
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
        notify(pool, &payload).await
    } else {
        // Too big for NOTIFY: by reference, insert and notify in one transaction.
        async {
            let mut tx = pool.begin().await?;
            let id: i64 =
                sqlx::query_scalar("insert into relay_payloads (payload) values ($1) returning id")
                    .bind(&payload)
                    .fetch_one(&mut *tx)
                    .await?;
            notify(&mut *tx, &format!(r#"{{"g":"{gateway}","r":{id}}}"#)).await?;
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

    fn presence_frame() -> Bytes {
        Bytes::from_static(br#"{"type":"presence","user_id":"x","status":"online"}"#)
    }

    #[test]
    fn a_users_event_round_trips_with_the_frame_once() {
        let g = Uuid::new_v4();
        let users: Vec<UserId> = (0..3).map(|_| UserId(Uuid::new_v4())).collect();
        let frame = presence_frame();
        let events: Vec<RelayEvent> = users_events(&users, &frame).collect();
        assert_eq!(events.len(), 1, "three ids fit one event");
        let piece = encode_event(&events[0]);
        assert_eq!(
            piece.matches("presence").count(),
            1,
            "the frame once: {piece}"
        );
        let batch = RelayBatch::parse(&envelope(g, &[piece])).unwrap();
        assert_eq!(batch.events[0].target, Target::Users(users));
        assert_eq!(batch.events[0].frame, frame);
    }

    #[test]
    fn a_long_users_list_is_split_into_events_that_each_fit_a_notify() {
        let g = Uuid::new_v4();
        let users: Vec<UserId> = (0..5000).map(|_| UserId(Uuid::new_v4())).collect();
        let frame = presence_frame();
        let events: Vec<RelayEvent> = users_events(&users, &frame).collect();
        assert!(
            (20..40).contains(&events.len()),
            "5000 ids in a few dozen events, not thousands: {}",
            events.len()
        );
        let mut back = Vec::new();
        for e in &events {
            assert!(
                e.frame.as_ptr() == frame.as_ptr(),
                "the frame is shared, not copied"
            );
            // Alone in its envelope, as `run` sends an event that fills a payload.
            let payload = envelope(g, &[encode_event(e)]);
            assert!(
                payload.len() < MAX_PAYLOAD,
                "payload of {} bytes",
                payload.len()
            );
            let batch = RelayBatch::parse(&payload).unwrap();
            match &batch.events[0].target {
                Target::Users(us) => back.extend_from_slice(us),
                other => panic!("not a users event: {other:?}"),
            }
            assert_eq!(batch.events[0].frame, frame);
        }
        assert_eq!(back, users, "every id once, in order");
        assert_eq!(users_events(&[], &frame).count(), 0);
    }

    #[test]
    fn a_users_event_with_a_huge_frame_goes_by_reference_in_few_parts() {
        let frame = Bytes::from(format!(r#""{}""#, "x".repeat(7700)));
        let users: Vec<UserId> = (0..5000).map(|_| UserId(Uuid::new_v4())).collect();
        let events: Vec<RelayEvent> = users_events(&users, &frame).collect();
        assert_eq!(
            events.len(),
            2,
            "no room beside the frame: big parts, by reference"
        );
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

//! The gateway's options (`serve` only) and the settings they become.

use std::time::Duration;

use clap::Args;

use super::{defaults, millis, positive, ConfigError};

/// Recent client_message_ids remembered for dedup, across all users. Not a
/// flag: it bounds memory (about 100 bytes an entry) and only needs to outlast
/// a client's retry window, which this does by orders of magnitude.
const DEDUP_CAPACITY: usize = 200_000;

/// At most one `typing: true` per conversation and connection this often.
/// Not a flag: it is part of the protocol's contract (docs/PROTOCOL.md).
const TYPING_INTERVAL: Duration = Duration::from_millis(1000);

/// A presence heartbeat shorter than this would turn the presence table into
/// a hot spot (one write per gateway per heartbeat) for no gain.
const MIN_PRESENCE_HEARTBEAT_MS: u64 = 10;

/// From the upgrade response to a WebSocket the session can use. Not a flag:
/// the handshake ends as soon as hyper has written the 101 (a few hundred
/// bytes, which fit any socket buffer), so this only bounds a wedged one.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Largest message content in bytes.
    #[arg(long, env = "POSTLINE_MAX_CONTENT_BYTES", default_value_t = 4096)]
    pub max_content_bytes: usize,
    /// Largest WebSocket message in bytes; larger closes the connection (1009).
    #[arg(long, env = "POSTLINE_MAX_FRAME_BYTES", default_value_t = 65536)]
    pub max_frame_bytes: usize,
    /// Deprecated and ignored: outboxes are bounded in bytes now
    /// (POSTLINE_OUTBOX_BYTES). Still accepted so an old deployment starts,
    /// with a warning.
    #[arg(long, env = "POSTLINE_OUTBOX_CAPACITY", hide = true)]
    pub outbox_capacity: Option<usize>,
    /// Milliseconds a user stays online after their last connection closes
    /// (a reconnect within it shows no offline/online flap).
    #[arg(long, env = "POSTLINE_PRESENCE_GRACE_MS", default_value_t = 5000)]
    pub presence_grace_ms: u64,
    /// Milliseconds after which an unrefreshed typing indicator is turned off.
    #[arg(long, env = "POSTLINE_TYPING_TTL_MS", default_value_t = 6000)]
    pub typing_ttl_ms: u64,
    /// This gateway's id among those sharing the database (default: random
    /// per start).
    #[arg(long, env = "POSTLINE_GATEWAY_ID")]
    pub gateway_id: Option<uuid::Uuid>,
    /// Milliseconds over which clients are told to reconnect on shutdown.
    #[arg(long, env = "POSTLINE_DRAIN_WINDOW_MS", default_value_t = 5000)]
    pub drain_window_ms: u64,
    /// Milliseconds between presence heartbeats (at least 10); a gateway
    /// silent for three is taken for dead and its users go offline.
    #[arg(long, env = "POSTLINE_PRESENCE_HEARTBEAT_MS", default_value_t = 5000)]
    pub presence_heartbeat_ms: u64,
    /// Milliseconds between the server's WebSocket pings on each connection.
    #[arg(long, env = "POSTLINE_PING_INTERVAL_MS", default_value_t = 25_000)]
    pub ping_interval_ms: u64,
    /// Milliseconds a WebSocket may go without sending anything (a pong
    /// counts) before it is closed with 4000; more than the ping interval.
    #[arg(long, env = "POSTLINE_WS_READ_TIMEOUT_MS", default_value_t = 60_000)]
    pub ws_read_timeout_ms: u64,
    /// Open WebSockets per user on this gateway; more are refused with 429.
    #[arg(long, env = "POSTLINE_MAX_CONNECTIONS_PER_USER", default_value_t = 16)]
    pub max_connections_per_user: usize,
    /// Conversations one connection may have joined at once; more are
    /// refused with `invalid`.
    #[arg(
        long,
        env = "POSTLINE_MAX_JOINED_PER_CONNECTION",
        default_value_t = 500
    )]
    pub max_joined_per_connection: usize,
    /// Bytes of events queued for one connection before it is closed as a
    /// slow consumer (4008); its replies have an allowance of the same size.
    /// 256 KiB: seconds of a busy room for a client that keeps up, and a
    /// quarter of a megabyte, not more, pinned by each one that stalled.
    #[arg(long, env = "POSTLINE_OUTBOX_BYTES", default_value_t = 256 * 1024)]
    pub outbox_bytes: usize,
    /// Milliseconds a `message_persisted` may wait on a connection to share
    /// a write with its next frame, when that frame is expected by then (a
    /// busy room); 0 writes each at once.
    #[arg(long, env = "POSTLINE_PERSISTED_HOLD_MS", default_value_t = 100)]
    pub persisted_hold_ms: u64,
}

impl Default for GatewayArgs {
    fn default() -> Self {
        defaults()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct GatewayConfig {
    /// Largest WebSocket message accepted (after reassembling fragments).
    /// Larger ones close the connection with 1009: the client is abusive or broken.
    pub max_frame_bytes: usize,
    /// Largest message content; larger ones are refused with `too_large`.
    pub max_content_bytes: usize,
    /// Recent client_message_ids remembered for dedup, across all users.
    pub dedup_capacity: usize,
    /// A user whose last connection closed stays online this long, so a
    /// reconnect (page reload, network switch) does not flap offline/online.
    pub presence_grace: Duration,
    /// A typing indicator not refreshed for this long is turned off by the server.
    pub typing_ttl: Duration,
    /// At most one `typing: true` per conversation and connection this often.
    pub typing_interval: Duration,
    /// On shutdown, clients are told to reconnect after a random pause within
    /// this window, so they do not all arrive at the other gateways at once.
    pub drain_window: Duration,
    /// How often this gateway refreshes its presence sessions; a gateway
    /// silent for three of these is taken for dead and its users go offline.
    pub presence_heartbeat: Duration,
    /// The upgrade must have completed within this.
    pub handshake_timeout: Duration,
    /// The server pings each WebSocket this often...
    pub ping_interval: Duration,
    /// ...and closes one it has read nothing from for this long (4000).
    pub ws_read_timeout: Duration,
    pub max_connections_per_user: usize,
    pub max_joined_per_connection: usize,
    /// Bytes (each frame plus a fixed overhead) of events queued per
    /// connection before it counts as a slow consumer; replies to its own
    /// requests have an allowance of the same size, and a sync page is cut
    /// to fit it.
    pub outbox_bytes: usize,
    /// A `message_persisted` waits at most this long for the connection's
    /// next write, and only when that is expected by then (see
    /// `gateway::cadence`).
    pub persisted_hold: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig::try_from(&GatewayArgs::default())
            .expect("the gateway's defaults are valid (tested)")
    }
}

impl TryFrom<&GatewayArgs> for GatewayConfig {
    type Error = ConfigError;

    fn try_from(a: &GatewayArgs) -> Result<Self, ConfigError> {
        if a.presence_heartbeat_ms < MIN_PRESENCE_HEARTBEAT_MS {
            return Err(ConfigError::TooSmall {
                var: "POSTLINE_PRESENCE_HEARTBEAT_MS",
                min: MIN_PRESENCE_HEARTBEAT_MS,
                got: a.presence_heartbeat_ms,
            });
        }
        // A deadline at or below the interval would close clients that
        // answer every ping.
        if a.ws_read_timeout_ms <= a.ping_interval_ms {
            return Err(ConfigError::TooSmall {
                var: "POSTLINE_WS_READ_TIMEOUT_MS",
                min: a.ping_interval_ms.saturating_add(1),
                got: a.ws_read_timeout_ms,
            });
        }
        Ok(GatewayConfig {
            max_frame_bytes: positive("POSTLINE_MAX_FRAME_BYTES", a.max_frame_bytes)?,
            max_content_bytes: positive("POSTLINE_MAX_CONTENT_BYTES", a.max_content_bytes)?,
            dedup_capacity: DEDUP_CAPACITY,
            // Zero is meaningful: offline at once, no grace.
            presence_grace: millis("POSTLINE_PRESENCE_GRACE_MS", a.presence_grace_ms)?,
            // Zero would turn every indicator off as soon as it is set.
            typing_ttl: millis(
                "POSTLINE_TYPING_TTL_MS",
                positive("POSTLINE_TYPING_TTL_MS", a.typing_ttl_ms)?,
            )?,
            typing_interval: TYPING_INTERVAL,
            // Zero is meaningful: reconnect at once.
            drain_window: millis("POSTLINE_DRAIN_WINDOW_MS", a.drain_window_ms)?,
            presence_heartbeat: millis("POSTLINE_PRESENCE_HEARTBEAT_MS", a.presence_heartbeat_ms)?,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            // Zero would be a busy loop of pings.
            ping_interval: millis(
                "POSTLINE_PING_INTERVAL_MS",
                positive("POSTLINE_PING_INTERVAL_MS", a.ping_interval_ms)?,
            )?,
            ws_read_timeout: millis("POSTLINE_WS_READ_TIMEOUT_MS", a.ws_read_timeout_ms)?,
            max_connections_per_user: positive(
                "POSTLINE_MAX_CONNECTIONS_PER_USER",
                a.max_connections_per_user,
            )?,
            max_joined_per_connection: positive(
                "POSTLINE_MAX_JOINED_PER_CONNECTION",
                a.max_joined_per_connection,
            )?,
            outbox_bytes: positive("POSTLINE_OUTBOX_BYTES", a.outbox_bytes)?,
            // Zero is meaningful: every confirmation written at once.
            persisted_hold: millis("POSTLINE_PERSISTED_HOLD_MS", a.persisted_hold_ms)?,
        })
    }
}

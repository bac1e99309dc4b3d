//! Rate limits (`serve` only): how often each client may do each costly
//! thing, and how many refusals a connection may ignore before it is closed.
//! Each limit is a sustained rate per second and a burst (requests allowed at
//! once after a quiet spell); `limits` turns them into governor quotas.
//!
//! The defaults are sized for people chatting, with room for the bursts real
//! clients make (a reconnect that joins and syncs every open conversation, a
//! paste of many lines), and far below what one client can push: measured
//! before these limits, a single socket had ~3,500 sends/s accepted.

use std::num::NonZeroU32;

use clap::Args;

use super::{defaults, ConfigError};

#[derive(Debug, Clone, Args)]
pub struct LimitsArgs {
    /// Messages a user may send per second, over all their connections.
    #[arg(long, env = "POSTLINE_SEND_RATE", default_value_t = 20)]
    pub send_rate: u32,
    /// Messages a user may send at once after a quiet spell.
    #[arg(long, env = "POSTLINE_SEND_BURST", default_value_t = 40)]
    pub send_burst: u32,
    /// Messages one conversation may receive per second, from all its members.
    #[arg(long, env = "POSTLINE_CONVERSATION_SEND_RATE", default_value_t = 100)]
    pub conversation_send_rate: u32,
    /// Messages one conversation may receive at once after a quiet spell.
    #[arg(long, env = "POSTLINE_CONVERSATION_SEND_BURST", default_value_t = 200)]
    pub conversation_send_burst: u32,
    /// `join_conversation` requests a user may make per second.
    #[arg(long, env = "POSTLINE_JOIN_RATE", default_value_t = 20)]
    pub join_rate: u32,
    /// `join_conversation` requests a user may make at once.
    #[arg(long, env = "POSTLINE_JOIN_BURST", default_value_t = 50)]
    pub join_burst: u32,
    /// History reads (`sync`, `resume`, GET .../messages) a user may make per second.
    #[arg(long, env = "POSTLINE_HISTORY_RATE", default_value_t = 10)]
    pub history_rate: u32,
    /// History reads a user may make at once.
    #[arg(long, env = "POSTLINE_HISTORY_BURST", default_value_t = 20)]
    pub history_burst: u32,
    /// `/v1` requests a user may make per second.
    #[arg(long, env = "POSTLINE_HTTP_USER_RATE", default_value_t = 50)]
    pub http_user_rate: u32,
    /// `/v1` requests a user may make at once.
    #[arg(long, env = "POSTLINE_HTTP_USER_BURST", default_value_t = 100)]
    pub http_user_burst: u32,
    /// `/v1` requests one IP address may make per second (all its users).
    #[arg(long, env = "POSTLINE_HTTP_IP_RATE", default_value_t = 200)]
    pub http_ip_rate: u32,
    /// `/v1` requests one IP address may make at once.
    #[arg(long, env = "POSTLINE_HTTP_IP_BURST", default_value_t = 400)]
    pub http_ip_burst: u32,
    /// WebSocket upgrades (`GET /ws`) one IP address may make per second.
    #[arg(long, env = "POSTLINE_UPGRADE_IP_RATE", default_value_t = 20)]
    pub upgrade_ip_rate: u32,
    /// WebSocket upgrades one IP address may make at once.
    #[arg(long, env = "POSTLINE_UPGRADE_IP_BURST", default_value_t = 50)]
    pub upgrade_ip_burst: u32,
    /// `rate_limited` refusals a connection may collect within 10 seconds;
    /// one more closes it with 1008 (policy violation).
    #[arg(long, env = "POSTLINE_MAX_REFUSALS", default_value_t = 100)]
    pub max_refusals: u32,
}

impl Default for LimitsArgs {
    fn default() -> Self {
        defaults()
    }
}

/// A sustained rate and a burst; both at least one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Rate {
    fn new(
        (rate_var, per_second): (&'static str, u32),
        (burst_var, burst): (&'static str, u32),
    ) -> Result<Rate, ConfigError> {
        Ok(Rate {
            per_second: NonZeroU32::new(per_second).ok_or(ConfigError::NotPositive(rate_var))?,
            burst: NonZeroU32::new(burst).ok_or(ConfigError::NotPositive(burst_var))?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LimitsConfig {
    /// `send_message` per user. 20/s, burst 40: a fast typist sends a few
    /// a second; a paste of many lines or an offline queue flushed on
    /// reconnect is a burst, and a client honouring `retry_after_ms` drains
    /// any longer one without harm.
    pub send_per_user: Rate,
    /// `send_message` per conversation, whoever sends. 100/s, burst 200: the
    /// liveliest group chat stays under it, and each message costs one frame
    /// per member (100/s into a room of 1,000 is 100,000 frames/s, about
    /// what one gateway can write).
    pub send_per_conversation: Rate,
    /// `join_conversation` per user. 20/s, burst 50: an app opening joins
    /// the conversations on screen at once; `resume` covers the rest.
    pub join_per_user: Rate,
    /// `sync`, `resume` and HTTP history reads per user: each is a query of
    /// up to 200 rows. 10/s, burst 20: scrolling back reads a page or two a
    /// second; a reconnect syncs a screenful of conversations at once.
    /// (Measured: 32 connections flooding `sync limit=200` raised another
    /// user's ack p99 from 4.8 ms to 169 ms.)
    pub history_per_user: Rate,
    /// `/v1` requests per user. 50/s, burst 100: the app's REST calls are
    /// occasional; this only stops a client stuck in a loop.
    pub http_per_user: Rate,
    /// `/v1` requests per IP, checked before authentication so a flood of
    /// bad tokens is bounded too. 200/s, burst 400: offices and carrier NAT
    /// put many users behind one address.
    pub http_per_ip: Rate,
    /// `GET /ws` upgrades per IP. 20/s, burst 50: after a gateway restart
    /// clients reconnect spread over the drain window; 50 users behind one
    /// NAT may still arrive together.
    pub upgrade_per_ip: Rate,
    /// `rate_limited` refusals a connection may collect within
    /// [`REFUSAL_WINDOW`](Self::REFUSAL_WINDOW) before it is closed with
    /// 1008. 100: a client honouring `retry_after_ms` collects about one per
    /// burst it overruns; one that ignores them collects hundreds a second.
    pub max_refusals: NonZeroU32,
}

impl LimitsConfig {
    /// The window `max_refusals` is counted over. Not a flag: only the
    /// ratio matters, and `max_refusals` already sets it.
    pub const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig::try_from(&LimitsArgs::default())
            .expect("the limits' defaults are valid (tested)")
    }
}

impl TryFrom<&LimitsArgs> for LimitsConfig {
    type Error = ConfigError;

    fn try_from(a: &LimitsArgs) -> Result<Self, ConfigError> {
        // Zero would refuse everything: to lift a limit, set it high.
        Ok(LimitsConfig {
            send_per_user: Rate::new(
                ("POSTLINE_SEND_RATE", a.send_rate),
                ("POSTLINE_SEND_BURST", a.send_burst),
            )?,
            send_per_conversation: Rate::new(
                ("POSTLINE_CONVERSATION_SEND_RATE", a.conversation_send_rate),
                (
                    "POSTLINE_CONVERSATION_SEND_BURST",
                    a.conversation_send_burst,
                ),
            )?,
            join_per_user: Rate::new(
                ("POSTLINE_JOIN_RATE", a.join_rate),
                ("POSTLINE_JOIN_BURST", a.join_burst),
            )?,
            history_per_user: Rate::new(
                ("POSTLINE_HISTORY_RATE", a.history_rate),
                ("POSTLINE_HISTORY_BURST", a.history_burst),
            )?,
            http_per_user: Rate::new(
                ("POSTLINE_HTTP_USER_RATE", a.http_user_rate),
                ("POSTLINE_HTTP_USER_BURST", a.http_user_burst),
            )?,
            http_per_ip: Rate::new(
                ("POSTLINE_HTTP_IP_RATE", a.http_ip_rate),
                ("POSTLINE_HTTP_IP_BURST", a.http_ip_burst),
            )?,
            upgrade_per_ip: Rate::new(
                ("POSTLINE_UPGRADE_IP_RATE", a.upgrade_ip_rate),
                ("POSTLINE_UPGRADE_IP_BURST", a.upgrade_ip_burst),
            )?,
            max_refusals: NonZeroU32::new(a.max_refusals)
                .ok_or(ConfigError::NotPositive("POSTLINE_MAX_REFUSALS"))?,
        })
    }
}

//! The wire format of `/ws`: client events in, server events out; and
//! `socketio`, the codec that carries the same frames on `/socket.io/`.
//!
//! `client::decode` turns one text frame into a validated [`client::Request`]
//! or a [`client::DecodeError`] carrying the contract's error code; `server`
//! encodes each server event once into `Bytes` that fan-out shares. Nothing
//! here touches a socket.

pub mod client;
pub mod depth;
#[cfg(test)]
pub(crate) mod fuzz;
pub mod http;
pub mod moderation;
pub mod server;
pub mod socketio;
pub mod webhook;

use serde::Serialize;

/// How frames travel on a connection: native frames as they are (`/ws`), or
/// Socket.IO packets around them (`/socket.io/`). Sessions, handlers and
/// rooms speak native frames; a broadcast is wrapped once per framing, not
/// once per connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    Native,
    SocketIo,
}

/// Error codes of the contract (docs/PROTOCOL.md lists when each is sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Invalid,
    TooLarge,
    NotFound,
    Forbidden,
    NotJoined,
    RateLimited,
    Unavailable,
    Unauthorized,
    Conflict,
    /// The message (or edit) matched the moderation word list: not sent.
    Moderated,
    Internal,
    /// HTTP only: the route exists, the method does not.
    MethodNotAllowed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Invalid => "invalid",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Moderated => "moderated",
            ErrorCode::Internal => "internal",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
        }
    }
}

/// WebSocket close codes the server uses, and whether a client should reconnect.
pub mod close {
    /// The server is shutting down or restarting: reconnect (after a pause).
    pub const GOING_AWAY: u16 = 1001;
    /// A frame was larger than the limit: do not resend it.
    pub const TOO_BIG: u16 = 1009;
    /// Protocol violation (bad framing, unmasked client frame): fix the client.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that is not valid UTF-8: fix the client.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The client kept going after many `rate_limited` replies: reconnect
    /// only after a pause, and honour `retry_after_ms`.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// The connection could not keep up with its outbound traffic: reconnect
    /// and resync by seq.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Nothing (not even a pong to the server's pings) arrived from the
    /// client within the read timeout: the network path is probably gone.
    /// Reconnect and resync by seq.
    pub const IDLE_TIMEOUT: u16 = 4000;
    /// The connection's token expired and no fresh one came (`refresh_token`):
    /// reconnect with a fresh token.
    pub const TOKEN_EXPIRED: u16 = 4001;

    /// Whether a client may reconnect as it is, at once or after a pause:
    /// the server went away or the path broke. Otherwise something about
    /// the client must change first (its token, its pace, its frames).
    pub fn should_reconnect(code: u16) -> bool {
        matches!(code, GOING_AWAY | SLOW_CONSUMER | IDLE_TIMEOUT)
    }
}

//! The Socket.IO handshake on `/socket.io/`: what happens between the
//! WebSocket upgrade and the session. A Socket.IO client authenticates only
//! after the upgrade (its JWT is in the CONNECT packet's `auth`), so this is
//! where its token is checked and its user's connection slot taken; from
//! then on it is a session like any other (`session::run`, codec
//! `SocketIo`).

use std::sync::Arc;

use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use tokio::time::Instant;

use super::connection::Io;
use super::{session, Gateway, UserSlot};
use crate::auth::{Jwt, Verified};
use crate::protocol::Framing;
use crate::protocol::{close, socketio};
use crate::queue::audit::Origin;

/// Why a CONNECT was refused, as socket.io-client shows it (`err.message`).
enum Refusal {
    Token(String),
    TooManyConnections,
}

impl Refusal {
    fn message(&self) -> String {
        match self {
            Refusal::Token(why) => format!("unauthorized: {why}"),
            Refusal::TooManyConnections => {
                "rate_limited: too many connections open for this user".into()
            }
        }
    }
}

/// Run a Socket.IO connection: Engine.IO open, wait for the CONNECT of
/// namespace `/` (bounded by the handshake timeout), authenticate, then the
/// session. `header_token` is a token the upgrade request carried
/// (Authorization or `?token=`), used when `auth` has none.
/// `authenticated` runs once the token verified (the HTTP layer stops
/// counting the connection as an anonymous one). `from`: where the
/// connection came from, for the audit log.
pub(super) async fn run(
    gw: Arc<Gateway>,
    jwt: Arc<Jwt>,
    header_token: Option<String>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    from: Origin,
    authenticated: impl FnOnce() + Send,
) {
    let Some(mut ws) = session::upgraded(&gw, upgrade).await else {
        return;
    };
    let deadline = Instant::now() + gw.cfg.handshake_timeout;
    let sid = uuid::Uuid::new_v4().simple().to_string();
    let open = socketio::open(&socketio::Open {
        sid: &sid,
        upgrades: [],
        ping_interval: gw.cfg.ping_interval.as_millis() as u64,
        // The client gives the server up when no ping came within
        // pingInterval + pingTimeout; the server closes a client silent for
        // the read timeout. One bound for both sides.
        ping_timeout: gw
            .cfg
            .ws_read_timeout
            .saturating_sub(gw.cfg.ping_interval)
            .as_millis() as u64,
        max_payload: gw.cfg.max_frame_bytes,
    });
    if send(&mut ws, &open).await.is_err() {
        return;
    }
    let auth = match tokio::time::timeout_at(deadline, wait_for_connect(&mut ws)).await {
        Ok(Ok(auth)) => auth,
        Ok(Err(why)) => {
            let _ = refuse(&mut ws, &why, close::PROTOCOL_ERROR).await;
            return;
        }
        Err(_) => {
            let _ = refuse(
                &mut ws,
                "no CONNECT within the handshake timeout",
                close::POLICY_VIOLATION,
            )
            .await;
            return;
        }
    };
    let token = socketio::auth_token(auth.as_ref())
        .map(str::to_owned)
        .or(header_token)
        .unwrap_or_default();
    let (verified, slot) = match admit(&gw, &jwt, &token) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            let packet = socketio::connect_error(&refusal.message(), None);
            if send(&mut ws, &packet).await.is_ok() {
                let _ = ws
                    .write_frame(Frame::close(close::POLICY_VIOLATION, b"connect refused"))
                    .await;
            }
            return;
        }
    };
    authenticated();
    // The CONNECT reply names this connection as the session's hello does.
    if send(&mut ws, &socketio::connected(&sid)).await.is_err() {
        return;
    }
    session::run(gw, verified, jwt, ws, Framing::SocketIo, from).await;
    drop(slot);
}

fn admit(gw: &Gateway, jwt: &Jwt, token: &str) -> Result<(Verified, UserSlot), Refusal> {
    let verified = jwt
        .verify_token(token)
        .map_err(|e| Refusal::Token(e.to_string()))?;
    let slot = gw.reserve(verified.user).map_err(|_| {
        gw.metrics
            .add_rate_limited(crate::telemetry::RateLimit::ConnectionsPerUser);
        Refusal::TooManyConnections
    })?;
    Ok((verified, slot))
}

/// Read until the client's CONNECT; answer its pings meanwhile. Anything
/// else before it is a protocol error.
async fn wait_for_connect(ws: &mut WebSocket<Io>) -> Result<Option<serde_json::Value>, String> {
    loop {
        let frame = ws.read_frame().await.map_err(|e| e.to_string())?;
        match frame.opcode {
            OpCode::Text if frame.fin => {}
            OpCode::Text | OpCode::Continuation => {
                return Err("fragmented messages before CONNECT".into())
            }
            OpCode::Close => return Err("closed before CONNECT".into()),
            OpCode::Binary => return Err("binary frames are not supported".into()),
            OpCode::Ping | OpCode::Pong => continue,
        }
        match socketio::decode(&frame.payload) {
            Ok(socketio::Packet::Connect(auth)) => return Ok(auth),
            Ok(socketio::Packet::Pong) => continue,
            Ok(socketio::Packet::Ping(data)) => {
                let mut pong = socketio::PONG.to_vec();
                pong.extend_from_slice(&data);
                send(ws, &pong).await.map_err(|e| e.to_string())?;
            }
            Ok(socketio::Packet::Close) => return Err("closed before CONNECT".into()),
            Ok(socketio::Packet::ForeignNamespace(ns)) => {
                send(ws, &socketio::invalid_namespace(&ns))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(socketio::Packet::Event(_)) => {
                return Err("an event before CONNECT: connect to namespace \"/\" first".into())
            }
            Err(refused) => return Err(refused.reason),
        }
    }
}

async fn send(ws: &mut WebSocket<Io>, text: &[u8]) -> Result<(), fastwebsockets::WebSocketError> {
    ws.write_frame(Frame::text(Payload::Borrowed(text))).await
}

/// CONNECT_ERROR with `why`, then close with `code`.
async fn refuse(
    ws: &mut WebSocket<Io>,
    why: &str,
    code: u16,
) -> Result<(), fastwebsockets::WebSocketError> {
    send(ws, &socketio::connect_error(why, None)).await?;
    // The reason is in the CONNECT_ERROR; a close reason is capped at 123 bytes.
    ws.write_frame(Frame::close(code, b"connect refused")).await
}

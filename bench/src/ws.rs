//! The WebSocket client side of Postline's protocol: the handshake, and
//! reading a server frame's type and the sender's timestamp without parsing
//! JSON.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{CONNECTION, UPGRADE};
use hyper::Request;
use tokio::net::TcpStream;

struct Executor;
impl<Fut> hyper::rt::Executor<Fut> for Executor
where
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

type Ws = fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;
pub(crate) type WsRead = fastwebsockets::WebSocketRead<
    tokio::io::ReadHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
>;
pub(crate) type WsWrite = fastwebsockets::WebSocketWrite<
    tokio::io::WriteHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
>;

/// The WebSocket handshake on `stream`, authenticated by `?token=`.
pub(crate) async fn open_ws(
    stream: TcpStream,
    addr: SocketAddr,
    token: &str,
) -> anyhow::Result<Ws> {
    handshake(stream, addr, &format!("/ws?token={token}")).await
}

/// A Socket.IO connection on `stream`: the WebSocket handshake on
/// /socket.io/, Engine.IO's open packet, then CONNECT with `auth.token`.
/// The next frame is the `hello` event.
pub(crate) async fn open_socketio(
    stream: TcpStream,
    addr: SocketAddr,
    token: &str,
) -> anyhow::Result<Ws> {
    use fastwebsockets::{Frame, Payload};
    let mut ws = handshake(stream, addr, "/socket.io/?EIO=4&transport=websocket").await?;
    let open = ws.read_frame().await?;
    anyhow::ensure!(open.payload.starts_with(b"0{"), "expected Engine.IO open");
    let connect = format!(r#"40{{"token":"{token}"}}"#);
    ws.write_frame(Frame::text(Payload::Borrowed(connect.as_bytes())))
        .await?;
    // An Engine.IO ping ("2") may come first: a server may ping at any time,
    // socketioxide at once. Receivers never answer pings (the servers wait).
    let reply = loop {
        let f = ws.read_frame().await?;
        if !is_ping(&f.payload) {
            break f;
        }
    };
    anyhow::ensure!(
        reply.payload.starts_with(b"40{"),
        "CONNECT refused: {}",
        String::from_utf8_lossy(&reply.payload)
    );
    Ok(ws)
}

async fn handshake(stream: TcpStream, addr: SocketAddr, path: &str) -> anyhow::Result<Ws> {
    let req = Request::builder()
        .method("GET")
        .uri(format!("http://{addr}{path}"))
        .header("Host", addr.to_string())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())?;
    let (ws, _) = fastwebsockets::handshake::client(&Executor, req, stream).await?;
    Ok(ws)
}

/// An Engine.IO ping packet.
pub(crate) fn is_ping(frame: &[u8]) -> bool {
    frame == b"2"
}

/// Read the sender's timestamp from `..."content":"t=<ns>;...`.
pub(crate) fn stamp(frame: &[u8]) -> Option<u64> {
    leading_number(after(frame, b"\"content\":\"t=")?)
}

/// The message id a `new_message` carries (`"message":{"id":"..."`) or a
/// `message_persisted` confirms (`"message_id":"..."`), in either framing.
pub(crate) fn message_id(frame: &[u8]) -> Option<&[u8]> {
    // `"id":"` does not match inside `"conversation_id":"` (an underscore
    // precedes `id` there, not a quote).
    let value = after(frame, b"\"message_id\":\"").or_else(|| after(frame, b"\"id\":\""))?;
    value
        .iter()
        .position(|b| *b == b'"')
        .map(|end| &value[..end])
}

/// The ref an ack answers: native `{"type":"ack","ref":"N",...}`, or the
/// Socket.IO acknowledgement id of `43N[...]`.
pub(crate) fn ack_ref(frame: &[u8], socketio: bool) -> Option<u64> {
    leading_number(if socketio {
        frame.strip_prefix(b"43")?
    } else {
        after(frame, b"\"ref\":\"")?
    })
}

/// What follows the first `key` in `frame`.
fn after<'f>(frame: &'f [u8], key: &[u8]) -> Option<&'f [u8]> {
    let at = frame.windows(key.len()).position(|w| w == key)?;
    Some(&frame[at + key.len()..])
}

/// The number `bytes` start with, ended by anything not a digit.
fn leading_number(bytes: &[u8]) -> Option<u64> {
    let end = bytes.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&bytes[..end]).ok()?.parse().ok()
}

/// [`frame_type`] of a native frame, or of one in Socket.IO framing: an
/// event `42["<name>",{...}]`, or an ack `43N[{"type":"ack"...}]`.
pub(crate) fn kind(frame: &[u8], socketio: bool) -> &[u8] {
    if !socketio {
        return frame_type(frame);
    }
    if let Some(rest) = frame.strip_prefix(b"42[\"") {
        let end = rest.iter().position(|b| *b == b'"').unwrap_or(0);
        return &rest[..end];
    }
    if let Some(rest) = frame.strip_prefix(b"43") {
        let open = rest.iter().position(|b| *b == b'[').unwrap_or(rest.len());
        return frame_type(rest.get(open + 1..).unwrap_or_default());
    }
    b""
}

/// A client event as sent: native `{"type":...,"ref":"N",...}` or Socket.IO
/// `42N["type",{...}]` (the ref as the acknowledgement id). `fields` is the
/// rest of the object, without braces.
pub(crate) fn event(socketio: bool, ty: &str, ack: u64, fields: &str) -> String {
    if socketio {
        format!(r#"42{ack}["{ty}",{{{fields}}}]"#)
    } else {
        format!(r#"{{"type":"{ty}","ref":"{ack}",{fields}}}"#)
    }
}

pub(crate) fn frame_type(frame: &[u8]) -> &[u8] {
    // Server frames start with {"type":"<name>"
    const PREFIX: &[u8] = b"{\"type\":\"";
    if !frame.starts_with(PREFIX) {
        return b"";
    }
    let rest = &frame[PREFIX.len()..];
    let end = rest.iter().position(|b| *b == b'"').unwrap_or(0);
    &rest[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_s_ref_is_read_in_either_framing_and_other_frames_have_none() {
        let native = br#"{"type":"ack","ref":"42","message_id":"m","created_at":1}"#;
        assert_eq!(ack_ref(native, false), Some(42));
        assert_eq!(
            ack_ref(br#"43917[{"type":"ack","message_id":"m"}]"#, true),
            Some(917)
        );
        assert_eq!(ack_ref(br#"{"type":"ack","message_id":"m"}"#, false), None);
        assert_eq!(ack_ref(br#"42["new_message",{}]"#, true), None);
        assert_eq!(ack_ref(br#"{"type":"ack","ref":"x"}"#, false), None);
    }

    #[test]
    fn a_send_s_stamp_is_read_from_the_head_of_its_content() {
        let f = br#"{"type":"new_message","message":{"id":"m","content":"t=12345;xxx"}}"#;
        assert_eq!(stamp(f), Some(12345));
        assert_eq!(stamp(br#"{"content":"hello"}"#), None);
        assert_eq!(stamp(br#"{"content":"t=12"#), None, "no end to the number");
    }

    #[test]
    fn a_message_s_id_is_read_from_new_message_and_message_persisted_alike() {
        let new = br#"{"type":"new_message","message":{"id":"m1","conversation_id":"c","sender_id":"s","content":"t=5;x"}}"#;
        assert_eq!(message_id(new), Some(&b"m1"[..]));
        let sio = br#"42["new_message",{"type":"new_message","message":{"id":"m2","conversation_id":"c"}}]"#;
        assert_eq!(message_id(sio), Some(&b"m2"[..]));
        let done =
            br#"{"type":"message_persisted","conversation_id":"c","message_id":"m3","seq":1}"#;
        assert_eq!(message_id(done), Some(&b"m3"[..]));
        assert_eq!(
            message_id(br#"{"type":"typing","conversation_id":"c"}"#),
            None
        );
    }
}

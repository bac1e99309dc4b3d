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
    let req = Request::builder()
        .method("GET")
        .uri(format!("http://{addr}/ws?token={token}"))
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

/// Read the sender's timestamp from `..."content":"t=<ns>;...`.
pub(crate) fn stamp(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"content\":\"t=";
    let at = frame.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = &frame[at..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
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

//! `/socket.io/` from Rust: the admission and origin rules it shares with
//! `/ws`, and one room holding both kinds of client. The socket.io-client
//! suite (tests/node/) covers the protocol itself.

use futures_util::{SinkExt, StreamExt};
use postline::config::Origins;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use crate::harness::*;

pub type Sio = WebSocketStream<TcpStream>;

/// A request that is served (401) when the address has room, 503 when not.
const TOKENLESS_API: &str =
    "GET /v1/conversations HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// A Socket.IO WebSocket over `stream`, past the Engine.IO open packet.
pub async fn engine_io(stream: TcpStream, addr: std::net::SocketAddr) -> Sio {
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("upgrade");
    let open = next_text(&mut ws).await;
    assert!(open.starts_with("0{"), "{open}");
    ws
}

pub async fn next_text(ws: &mut Sio) -> String {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message within the wait")
            .expect("open")
            .expect("a frame");
        if let WsMessage::Text(t) = msg {
            // Engine.IO pings are not what the tests wait for.
            if t.as_str() != "2" {
                return t.as_str().to_owned();
            }
        }
    }
}

/// CONNECT with `token`; the reply (`40{...}` or `44{...}`).
pub async fn connect(ws: &mut Sio, token: &str) -> String {
    ws.send(WsMessage::text(format!("40{}", json!({ "token": token }))))
        .await
        .unwrap();
    next_text(ws).await
}

/// The next Socket.IO event named `name`: its one argument.
pub async fn event(ws: &mut Sio, name: &str) -> Value {
    loop {
        let t = next_text(ws).await;
        if let Some(args) = t.strip_prefix("42") {
            let v: Value = serde_json::from_str(args).unwrap();
            if v[0] == name {
                return v[1].clone();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_socket_io_connections_count_as_pending_until_connect() {
    let mut o = Options::default();
    o.config.admission.max_pending_per_ip = 2;
    let app = TestApp::spawn_with(o).await;
    let from = [127, 0, 0, 3];
    let mut a = engine_io(connect_from(from, app.addr).await.unwrap(), app.addr).await;
    let _b = engine_io(connect_from(from, app.addr).await.unwrap(), app.addr).await;
    // Two upgraded sockets that never said who they are hold the address's cap.
    let addr = app.addr;
    eventually("127.0.0.3 is at its cap", || async move {
        let mut s = connect_from(from, addr).await.ok()?;
        // Not a health probe: those are answered even at the cap.
        let res = exchange(&mut s, TOKENLESS_API).await;
        res.starts_with("HTTP/1.1 503").then_some(())
    })
    .await;
    // One authenticates: its place is released, another may come in.
    let reply = connect(&mut a, &app.token(uid())).await;
    assert!(reply.starts_with("40{\"sid\""), "{reply}");
    eventually("127.0.0.3 has room again", || async move {
        let mut s = connect_from(from, addr).await.ok()?;
        let res = exchange(&mut s, TOKENLESS_API).await;
        res.starts_with("HTTP/1.1 401").then_some(())
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_from_another_origin_cannot_open_socket_io() {
    let mut opts = Options::default();
    opts.config.allowed_origins = Origins::List(vec!["https://chat.example".into()]);
    let app = TestApp::spawn_with(opts).await;
    for (origin, allowed) in [
        ("https://evil.example", false),
        ("https://chat.example", true),
    ] {
        let mut req = format!("ws://{}/socket.io/?EIO=4&transport=websocket", app.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok(_) => assert!(allowed, "{origin} was let in"),
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
                assert!(!allowed, "{origin}: {}", res.status());
                assert_eq!(res.status(), 403);
            }
            Err(e) => panic!("{origin}: {e}"),
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_room_serves_native_and_socket_io_clients_the_same_message() {
    let app = TestApp::spawn().await;
    let (alice, bob) = (uid(), uid());
    let conv = app.conversation(alice, &[bob]).await;
    let mut native = app.ws(alice).await;
    native.join(conv).await;
    let mut sio = engine_io(TcpStream::connect(app.addr).await.unwrap(), app.addr).await;
    assert!(connect(&mut sio, &app.token(bob)).await.starts_with("40"));
    assert_eq!(event(&mut sio, "hello").await["user_id"], bob.0.to_string());
    sio.send(WsMessage::text(format!(
        "421{}",
        json!(["join_conversation", {"conversation_id": conv}])
    )))
    .await
    .unwrap();
    // Events (42...) may come first: Socket.IO interleaves them with acks.
    let ack = loop {
        let t = next_text(&mut sio).await;
        if !t.starts_with("42") {
            break t;
        }
    };
    assert!(
        ack.starts_with("431[{\"type\":\"ack\",\"ref\":\"1\""),
        "{ack}"
    );

    native.send_text(conv, "n1", "to both").await;
    let live = native.recv_type("new_message").await;
    let pushed = event(&mut sio, "new_message").await;
    // The same frame, byte for byte, in both framings.
    assert_eq!(pushed, live);
    // And the Socket.IO side sends into the same room.
    sio.send(WsMessage::text(format!(
        "422{}",
        json!(["send_message", {"conversation_id": conv, "client_message_id": "s1", "content": "back"}])
    )))
    .await
    .unwrap();
    let heard = native.recv_type("new_message").await;
    assert_eq!(heard["message"]["content"], "back");
    assert_eq!(heard["message"]["sender_id"], bob.0.to_string());
    app.stop().await;
}

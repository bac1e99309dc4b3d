//! `postline chat`: a command-line client of a running server, so the tour
//! in the README (and a quick check against a deployment) needs no other
//! tool. It speaks the public contract only — HTTP `/v1` and `/ws` as
//! documented in docs/PROTOCOL.md — exactly as any client would.

use std::io::BufRead;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use clap::{Args, Subcommand};
use fastwebsockets::{FragmentCollector, Frame, OpCode};
use http_body_util::{BodyExt, Full};
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::auth::Jwt;
use crate::config::DEV_JWT_SECRET;
use crate::domain::UserId;

/// How long any one step (connect, a reply) may take before the command
/// gives up: a tour that hangs is worse than one that says why it stopped.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Lifetime of the token signed for `--user`: long enough for a session at
/// the terminal, well under the server's default maximum (24 h).
const SIGNED_TOKEN_TTL: Duration = Duration::from_secs(3600);

#[derive(Args)]
pub struct ChatArgs {
    /// The server's base URL.
    #[arg(
        long,
        global = true,
        env = "POSTLINE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// Act as this user (UUID): a token is signed with POSTLINE_JWT_SECRET,
    /// or without it with the public dev secret (what `serve --dev` accepts).
    #[arg(long, global = true, conflicts_with = "token")]
    user: Option<Uuid>,
    /// A token to use as it is (instead of --user).
    #[arg(long, global = true, env = "POSTLINE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, env = "POSTLINE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    #[command(subcommand)]
    action: ChatAction,
}

#[derive(Subcommand)]
enum ChatAction {
    /// Create a conversation and print its id (alone, so `$(...)` takes it).
    New {
        #[arg(long)]
        title: Option<String>,
        /// Members besides yourself (UUIDs); repeat or separate by commas.
        #[arg(long = "with", value_delimiter = ',')]
        members: Vec<Uuid>,
    },
    /// Join a conversation and print every event as one JSON line, until
    /// Ctrl-C or the server closes the connection.
    Listen { conversation: Uuid },
    /// Send TEXT, or each line of standard input; print the ack and, once
    /// the worker stored it, the `message_persisted` event of each.
    Send {
        conversation: Uuid,
        text: Option<String>,
    },
}

/// The server's address, split out of `--url`: only plain `http://host:port`
/// is spoken here (put a TLS-terminating proxy's inner address, or use
/// another client for `https`).
struct Server {
    authority: String,
}

impl Server {
    fn parse(url: &str) -> anyhow::Result<Server> {
        let uri: hyper::Uri = url.parse().with_context(|| format!("bad --url {url:?}"))?;
        match uri.scheme_str() {
            Some("http") | Some("ws") => {}
            _ => bail!("--url must be http://host:port (got {url:?}); https is not spoken here"),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("--url {url:?} names no host"))?;
        let authority = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{}:80", authority.host()),
        };
        Ok(Server { authority })
    }

    async fn connect(&self) -> anyhow::Result<TcpStream> {
        tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| anyhow!("connecting to {} timed out", self.authority))?
            .with_context(|| format!("connecting to {} (is the server running?)", self.authority))
    }
}

pub async fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let server = Server::parse(&args.url)?;
    let token = match (args.token, args.user) {
        (Some(t), _) => t,
        (None, Some(user)) => {
            let secret = args.jwt_secret.as_deref().unwrap_or(DEV_JWT_SECRET);
            Jwt::new(secret.as_bytes()).issue(UserId(user), SIGNED_TOKEN_TTL)
        }
        (None, None) => bail!("say who you are: --user <uuid> or --token <jwt>"),
    };
    match args.action {
        ChatAction::New { title, members } => {
            let body = json!({ "title": title, "member_ids": members });
            let created = post_json(&server, &token, "/v1/conversations", &body).await?;
            let id = created["id"]
                .as_str()
                .ok_or_else(|| anyhow!("unexpected reply: {created}"))?;
            println!("{id}");
            Ok(())
        }
        ChatAction::Listen { conversation } => {
            let mut ws = Socket::open(&server, &token).await?;
            let joined = ws.join(conversation).await?;
            // On stderr, so stdout stays events only, one JSON object a line.
            eprintln!(
                "listening to {conversation} (last seq {})",
                joined["last_seq"]
            );
            loop {
                let event = ws.next_event(None).await?;
                println!("{event}");
            }
        }
        ChatAction::Send { conversation, text } => {
            let mut ws = Socket::open(&server, &token).await?;
            ws.join(conversation).await?;
            match text {
                Some(text) => ws.send_and_wait(conversation, &text).await?,
                None => {
                    for line in std::io::stdin().lock().lines() {
                        let line = line.context("reading standard input")?;
                        if !line.trim().is_empty() {
                            ws.send_and_wait(conversation, &line).await?;
                        }
                    }
                }
            }
            ws.close().await;
            Ok(())
        }
    }
}

async fn post_json(
    server: &Server,
    token: &str,
    path: &str,
    body: &Value,
) -> anyhow::Result<Value> {
    let stream = server.connect().await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::post(path)
        .header(hyper::header::HOST, &server.authority)
        .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let res = tokio::time::timeout(STEP_TIMEOUT, async {
        let res = sender.send_request(req).await?;
        let status = res.status();
        let bytes = res.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, bytes))
    })
    .await
    .map_err(|_| anyhow!("POST {path} timed out"))??;
    let (status, bytes) = res;
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("POST {path}: {status}: {}", String::from_utf8_lossy(&bytes));
    }
    Ok(value)
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// One WebSocket connection, speaking events. Requests carry a `ref` from a
/// counter so their one reply can be told from the pushes around it.
struct Socket {
    ws: FragmentCollector<TokioIo<Upgraded>>,
    next_ref: u64,
    /// `message_persisted` events read while waiting for a reply:
    /// the worker can store a message and its confirmation reach us before
    /// the gateway has written the send's ack (both follow the same commit).
    persisted_early: Vec<Value>,
}

impl Socket {
    async fn open(server: &Server, token: &str) -> anyhow::Result<Socket> {
        let stream = server.connect().await?;
        let req = Request::get("/ws")
            .header(hyper::header::HOST, &server.authority)
            .header(hyper::header::UPGRADE, "websocket")
            .header(hyper::header::CONNECTION, "upgrade")
            .header(
                "sec-websocket-key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("sec-websocket-version", "13")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(http_body_util::Empty::<Bytes>::new())?;
        let (ws, _) = tokio::time::timeout(
            STEP_TIMEOUT,
            fastwebsockets::handshake::client(&SpawnExecutor, req, stream),
        )
        .await
        .map_err(|_| anyhow!("the WebSocket upgrade timed out"))?
        .map_err(|e| anyhow!("opening /ws: {e} (a 401 means the token was refused)"))?;
        let mut socket = Socket {
            ws: FragmentCollector::new(ws),
            next_ref: 0,
            persisted_early: Vec::new(),
        };
        let hello = socket.next_event(Some(STEP_TIMEOUT)).await?;
        if hello["type"] != "hello" {
            bail!("expected hello first, got {hello}");
        }
        Ok(socket)
    }

    /// The next server event; `None` waits as long as the connection lives.
    async fn next_event(&mut self, within: Option<Duration>) -> anyhow::Result<Value> {
        loop {
            let read = self.ws.read_frame();
            let frame = match within {
                Some(d) => tokio::time::timeout(d, read)
                    .await
                    .map_err(|_| anyhow!("no reply from the server within {d:?}"))?,
                None => read.await,
            }?;
            match frame.opcode {
                OpCode::Text => return Ok(serde_json::from_slice(&frame.payload)?),
                OpCode::Close => {
                    let code = frame
                        .payload
                        .get(..2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]));
                    let reason = String::from_utf8_lossy(frame.payload.get(2..).unwrap_or(&[]));
                    bail!("the server closed the connection ({code:?}) {reason}");
                }
                _ => {}
            }
        }
    }

    /// Send `event` with a fresh `ref`, print pushes that arrive meanwhile,
    /// and return the reply's body; an error reply is an error here.
    async fn request(&mut self, mut event: Value) -> anyhow::Result<Value> {
        self.next_ref += 1;
        let r = self.next_ref.to_string();
        event["ref"] = Value::String(r.clone());
        self.ws
            .write_frame(Frame::text(event.to_string().into_bytes().into()))
            .await?;
        loop {
            let reply = self.next_event(Some(STEP_TIMEOUT)).await?;
            if reply["ref"] != r.as_str() {
                // Bounded in count, and emptied at each send.
                if reply["type"] == "message_persisted" && self.persisted_early.len() < 1024 {
                    self.persisted_early.push(reply);
                }
                continue;
            }
            if reply["type"] == "error" {
                bail!("{} refused: {reply}", event["type"]);
            }
            return Ok(reply);
        }
    }

    async fn join(&mut self, conversation: Uuid) -> anyhow::Result<Value> {
        self.request(json!({"type": "join_conversation", "conversation_id": conversation}))
            .await
    }

    /// Send one text message and wait until it is durable (the ack) and
    /// stored with its seq (`message_persisted`).
    async fn send_and_wait(&mut self, conversation: Uuid, text: &str) -> anyhow::Result<()> {
        let ack = self
            .request(json!({
                "type": "send_message",
                "conversation_id": conversation,
                "client_message_id": Uuid::new_v4().to_string(),
                "content": text,
            }))
            .await?;
        println!("{ack}");
        let id = ack["message_id"].clone();
        let early = std::mem::take(&mut self.persisted_early);
        if let Some(event) = early.iter().find(|e| e["message_id"] == id) {
            println!("{event}");
            return Ok(());
        }
        loop {
            let event = self.next_event(Some(STEP_TIMEOUT)).await?;
            if event["type"] == "message_persisted" && event["message_id"] == id {
                println!("{event}");
                return Ok(());
            }
        }
    }

    async fn close(mut self) {
        let _ = self.ws.write_frame(Frame::close(1000, b"bye")).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_takes_http_host_and_port_and_refuses_the_rest() {
        assert_eq!(
            Server::parse("http://127.0.0.1:8080").unwrap().authority,
            "127.0.0.1:8080"
        );
        assert_eq!(
            Server::parse("http://localhost").unwrap().authority,
            "localhost:80"
        );
        assert!(Server::parse("https://chat.example.com").is_err());
        assert!(Server::parse("localhost:8080").is_err());
        assert!(Server::parse("not a url").is_err());
    }
}

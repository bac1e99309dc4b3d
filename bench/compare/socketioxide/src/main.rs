//! The `socketioxide` row of `scripts/bench.sh compare`: a plain Rust
//! Socket.IO v4 server (socketioxide on hyper), nothing stored. It mirrors
//! ../server.mjs without --persist (its memoryStore path), the same routes,
//! events, shapes and errors, so the same `postline-bench --socketio` drives
//! it; nothing more.
//!
//!   compare-socketioxide --port P
//!
//! Tokens are HS256 JWTs signed with POSTLINE_JWT_SECRET (default: Postline's
//! public --dev secret, which postline-bench signs with by default).
//! COMPARE_WS_READ_TIMEOUT_MS is how long a socket may go without a pong.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, Extension, SocketRef, State, TryData};
use socketioxide::handler::{ConnectHandler, FromMessageParts};
use socketioxide::socket::Socket;
use socketioxide::{SocketIo, TransportType};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use uuid::Uuid;

const DEV_JWT_SECRET: &str = "postline-dev-secret-do-not-use-in-production";
const MAX_CONTENT_BYTES: usize = 4096;

/// Conversation id -> its members' ids (server.mjs's memoryStore).
type Store = Arc<Mutex<HashMap<String, HashSet<String>>>>;

/// The connected socket's user id, set by [`authenticate`].
#[derive(Clone)]
struct User(String);

// ---------------------------------------------------------------- helpers

static JWT: LazyLock<(DecodingKey, Validation)> = LazyLock::new(|| {
    let secret = std::env::var("POSTLINE_JWT_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEV_JWT_SECRET.to_owned());
    // As server.mjs: HS256, `exp` required and past it is expired (no leeway),
    // no other claim checked.
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = 0;
    v.validate_aud = false;
    (DecodingKey::from_secret(secret.as_bytes()), v)
});

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

/// The user id of a valid token, or None.
fn verify(token: &str) -> Option<String> {
    let claims = jsonwebtoken::decode::<Claims>(token, &JWT.0, &JWT.1)
        .ok()?
        .claims;
    uuid(&claims.sub)
}

/// `s` if it is a UUID as server.mjs's UUID_RE takes it (hyphenated, either
/// case), lower-cased.
fn uuid(s: &str) -> Option<String> {
    if s.len() != 36 {
        return None;
    }
    Uuid::parse_str(s).ok().map(|u| u.to_string())
}

fn err(code: &str, message: &str) -> Value {
    json!({"type": "error", "code": code, "message": message})
}

/// Now as `new Date().toISOString()`.
fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

// ------------------------------------------------------------------- HTTP

fn send(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::from(body.to_string()))
        .unwrap()
}

/// `/v1/conversations` -> Some(None), `/v1/conversations/{id}/members` ->
/// Some(Some(id)), anything else None.
fn route(path: &str) -> Option<Option<&str>> {
    let rest = path.strip_prefix("/v1/conversations")?;
    if rest.is_empty() {
        return Some(None);
    }
    let id = rest.strip_prefix('/')?.strip_suffix("/members")?;
    (!id.is_empty() && !id.contains('/')).then_some(Some(id))
}

/// Everything but /socket.io/. The path is read from `uri().path()`, which is
/// right for postline-bench's absolute-form targets (`GET http://host/...`)
/// as for origin-form ones; socketioxide matches /socket.io/ the same way.
async fn http(req: Request<Incoming>, store: Store) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if req.method() == Method::GET && (path == "/healthz" || path == "/readyz") {
        return Response::builder()
            .header(CONTENT_TYPE, "text/plain")
            .body(Full::from("ok"))
            .unwrap();
    }
    let Some(target) = route(path) else {
        return send(404, err("not_found", "no such route"));
    };
    let target = target.map(str::to_owned);
    if req.method() != Method::POST {
        return send(405, err("method_not_allowed", "POST only"));
    }
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(user) = token
        .and_then(|t| t.strip_prefix("Bearer "))
        .and_then(verify)
    else {
        return send(401, err("unauthorized", "bad or missing token"));
    };
    let Ok(body) = req.into_body().collect().await else {
        return send(503, err("unavailable", "try again"));
    };
    let body: Value = match serde_json::from_slice(&body.to_bytes()) {
        Ok(v @ (Value::Object(_) | Value::Array(_))) => v,
        _ => return send(400, err("bad_request", "not JSON")),
    };

    let Some(id) = target else {
        // POST /v1/conversations
        let ids = body.get("member_ids").and_then(Value::as_array);
        let ids: Option<Vec<String>> = ids
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(|u| u.as_str().and_then(uuid))
            .collect();
        let Some(ids) = ids else {
            return send(422, err("invalid", "member_ids must be UUIDs"));
        };
        let id = Uuid::now_v7().to_string();
        let title = body.get("title").and_then(Value::as_str);
        let title: Option<String> = title.map(|t| t.chars().take(200).collect());
        let mut members = vec![user.clone()];
        members.extend(ids.into_iter().filter(|u| *u != user));
        store
            .lock()
            .unwrap()
            .insert(id.clone(), members.iter().cloned().collect());
        return send(
            201,
            json!({"id": id, "title": title, "created_by": user, "created_at": now(), "member_ids": members}),
        );
    };

    // POST /v1/conversations/{id}/members
    let added = body.get("user_id").and_then(Value::as_str).and_then(uuid);
    let (Some(conversation), Some(added)) = (uuid(&id), added) else {
        return send(400, err("bad_request", "bad ids"));
    };
    let refused = match store.lock().unwrap().get_mut(&conversation) {
        None => Some("not_found"),
        Some(m) if !m.contains(&user) => Some("forbidden"),
        Some(m) => {
            m.insert(added);
            None
        }
    };
    match refused {
        Some(code) => send(if code == "not_found" { 404 } else { 403 }, err(code, code)),
        None => send(
            201,
            json!({"conversation_id": id, "user_id": body["user_id"]}),
        ),
    }
}

// -------------------------------------------------------------- Socket.IO

/// CONNECT: a valid token in `auth.token`, or connect_error (server.mjs's
/// io.use()).
async fn authenticate(s: SocketRef, TryData(auth): TryData<Value>) -> Result<(), &'static str> {
    let auth = auth.unwrap_or_default();
    let user = auth["token"].as_str().and_then(verify);
    let user = user.ok_or("unauthorized: bad or missing token")?;
    s.extensions.insert(User(user));
    Ok(())
}

static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

async fn on_connect(s: SocketRef, Extension(User(user)): Extension<User>) {
    // Handlers first: the client may send as soon as it has `hello`.
    s.on("join_conversation", join);
    s.on("leave_conversation", leave);
    s.on("send_message", send_message);
    let n = CONNECTIONS.fetch_add(1, Ordering::Relaxed) + 1;
    let hello = json!({"type": "hello", "user_id": user, "connection_id": n.to_string(), "server_time": now()});
    s.emit("hello", &hello).ok();
}

/// A reply to the event's callback, or (no callback) an error as an `error`
/// event: server.mjs's replier.
struct Reply {
    socket: SocketRef,
    ack: AckSender,
    callback: bool,
}

impl FromMessageParts<LocalAdapter> for Reply {
    type Error = Infallible;
    fn from_message_parts(
        s: &Arc<Socket>,
        v: &mut socketioxide::handler::Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, Infallible> {
        Ok(Reply {
            socket: SocketRef::from(s.clone()),
            ack: AckSender::from_message_parts(s, v, ack_id)?,
            callback: ack_id.is_some(),
        })
    }
}

impl Reply {
    fn send(self, r: Value) {
        if self.callback {
            self.ack.send(&r).ok();
        } else if r["type"] == "error" {
            self.socket.emit("error", &r).ok();
        }
    }
}

/// The event's `conversation_id`, lower-cased, or "".
fn conversation_id(d: &Value) -> String {
    d["conversation_id"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase()
}

fn joined(s: &SocketRef, id: &str) -> bool {
    s.rooms().iter().any(|r| r == id)
}

async fn join(
    s: SocketRef,
    State(store): State<Store>,
    Extension(User(user)): Extension<User>,
    reply: Reply,
    TryData(d): TryData<Value>,
) {
    let Some(id) = uuid(&conversation_id(&d.unwrap_or_default())) else {
        return reply.send(err("invalid", "conversation_id must be a UUID"));
    };
    let refused = match store.lock().unwrap().get(&id) {
        None => Some(err("not_found", "no such conversation")),
        Some(m) if !m.contains(&user) => Some(err("forbidden", "not a member")),
        Some(_) => None,
    };
    if let Some(e) = refused {
        return reply.send(e);
    }
    s.join(id.clone());
    reply.send(json!({"type": "ack", "conversation_id": id, "last_seq": 0}));
}

async fn leave(s: SocketRef, reply: Reply, TryData(d): TryData<Value>) {
    let id = conversation_id(&d.unwrap_or_default());
    if !joined(&s, &id) {
        return reply.send(err("not_joined", "not joined"));
    }
    s.leave(id.clone());
    reply.send(json!({"type": "ack", "conversation_id": id}));
}

async fn send_message(
    s: SocketRef,
    io: SocketIo,
    Extension(User(user)): Extension<User>,
    reply: Reply,
    TryData(d): TryData<Value>,
) {
    let d = d.unwrap_or_default();
    let id = conversation_id(&d);
    if !joined(&s, &id) {
        return reply.send(err("not_joined", "join the conversation first"));
    }
    let cmid = d["client_message_id"]
        .as_str()
        .filter(|c| !c.is_empty() && c.len() <= 64);
    let Some(cmid) = cmid else {
        return reply.send(err("invalid", "client_message_id must be 1-64 bytes"));
    };
    let Some(content) = d["content"].as_str().filter(|c| !c.trim().is_empty()) else {
        return reply.send(err("invalid", "content must be text"));
    };
    if content.len() > MAX_CONTENT_BYTES {
        return reply.send(err("too_large", "content too large"));
    }
    let message_id = Uuid::now_v7().to_string();
    let message = json!({
        "id": message_id, "conversation_id": id, "sender_id": user, "client_message_id": cmid,
        "kind": "text", "content": content, "created_at": now(),
    });
    // To the room, the sender included, then the ack.
    let event = json!({"type": "new_message", "message": message});
    io.to(id).emit("new_message", &event).await.ok();
    reply.send(json!({"type": "ack", "message_id": message_id, "client_message_id": cmid, "duplicate": false}));
}

// ------------------------------------------------------------------- main

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = match args.iter().position(|a| a == "--port") {
        Some(i) => args.get(i + 1).ok_or("--port needs a value")?.parse()?,
        None => std::env::var("PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(18091),
    };
    // As server.mjs: postline-bench's receivers never answer pings, so the
    // pong wait is COMPARE_WS_READ_TIMEOUT_MS (an hour) less the interval.
    let ping_interval = Duration::from_secs(25);
    let read_timeout = std::env::var("COMPARE_WS_READ_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_600_000);

    let store = Store::default();
    let routes = {
        let store = store.clone();
        service_fn(move |req| {
            let store = store.clone();
            async move { Ok::<_, Infallible>(http(req, store).await) }
        })
    };
    let (svc, io) = SocketIo::builder()
        .transports([TransportType::Websocket])
        .ping_interval(ping_interval)
        .ping_timeout(Duration::from_millis(read_timeout).saturating_sub(ping_interval))
        .max_payload(64 * 1024)
        .ws_max_message_size(64 * 1024)
        .with_state(store)
        .build_with_inner_svc(routes);
    io.ns("/", on_connect.with(authenticate));

    // SIGTERM (scripts/compare.sh stopping a run) or ^C: exit at once.
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        std::process::exit(0);
    });

    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("socketioxide on 127.0.0.1:{port} (no persistence)");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        stream.set_nodelay(true).ok();
        let svc = svc.clone();
        tokio::spawn(async move {
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            conn.with_upgrades().await.ok();
        });
    }
}

//! Test harness: one throwaway Postgres cluster per test run, a fresh
//! database per test, the real server on 127.0.0.1:0, and real clients.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use postline::auth::Jwt;
use postline::config::{Config, LimitsConfig, Rate};
use postline::domain::UserId;
use postline::pglocal::{Cluster, ClusterOptions};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use crate::raw::*;

pub const SECRET: &str = "test-secret-0123456789";
/// Every wait in a test is bounded by this.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        Cluster::start(ClusterOptions::default()).expect("start a throwaway Postgres")
    })
}

/// A fresh, migrated database on the shared cluster; returns its URL and a pool on it.
pub async fn fresh_database() -> (String, PgPool) {
    fresh_database_on(cluster()).await
}

/// A fresh, migrated database on `c`.
pub async fn fresh_database_on(c: &Cluster) -> (String, PgPool) {
    let admin = PgPool::connect(&c.url("postgres"))
        .await
        .expect("connect to the cluster");
    let name = format!("t_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("create database {name}"))
        .execute(&admin)
        .await
        .expect("create the test database");
    admin.close().await;
    let url = c.url(&name);
    let pool = postline::store::connect(&url, 10)
        .await
        .expect("connect to the test database");
    postline::store::migrate(&pool).await.expect("migrate");
    (url, pool)
}

pub fn uid() -> UserId {
    UserId(Uuid::new_v4())
}

/// What [`TestApp::pair`] sets up.
pub struct Pair {
    pub a: UserId,
    pub b: UserId,
    pub conv: Uuid,
    pub alice: Client,
    pub bob: Client,
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub pool: PgPool,
    pub db_url: String,
    pub jwt: Jwt,
    pub shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

pub struct Options {
    pub run_worker: bool,
    pub config: Config,
}

impl Default for Options {
    fn default() -> Self {
        let mut config = Config::with_secret(SECRET);
        // Keep crash-recovery waits short in tests.
        config.worker.visibility_timeout = Duration::from_secs(1);
        config.worker.poll_interval = Duration::from_millis(50);
        config.limits = loose_limits();
        Options {
            run_worker: true,
            config,
        }
    }
}

/// Limits no test reaches unless it means to: the other tests send, sync
/// and connect far faster than people do. The limits have their own tests
/// (limits.rs), each with tight values.
pub fn loose_limits() -> LimitsConfig {
    let loose = rate(1_000_000, 1_000_000);
    LimitsConfig {
        send_per_user: loose,
        send_per_conversation: loose,
        join_per_user: loose,
        history_per_user: loose,
        http_per_user: loose,
        http_per_ip: loose,
        upgrade_per_ip: loose,
        max_refusals: std::num::NonZeroU32::new(1_000_000).unwrap(),
    }
}

/// [`loose_limits`] for a server started as a process.
pub const LOOSE_LIMITS_ENV: &[(&str, &str)] = &[
    ("POSTLINE_SEND_RATE", "1000000"),
    ("POSTLINE_SEND_BURST", "1000000"),
    ("POSTLINE_CONVERSATION_SEND_RATE", "1000000"),
    ("POSTLINE_CONVERSATION_SEND_BURST", "1000000"),
    ("POSTLINE_JOIN_RATE", "1000000"),
    ("POSTLINE_JOIN_BURST", "1000000"),
    ("POSTLINE_HISTORY_RATE", "1000000"),
    ("POSTLINE_HISTORY_BURST", "1000000"),
    ("POSTLINE_HTTP_USER_RATE", "1000000"),
    ("POSTLINE_HTTP_USER_BURST", "1000000"),
    ("POSTLINE_HTTP_IP_RATE", "1000000"),
    ("POSTLINE_HTTP_IP_BURST", "1000000"),
    ("POSTLINE_UPGRADE_IP_RATE", "1000000"),
    ("POSTLINE_UPGRADE_IP_BURST", "1000000"),
    ("POSTLINE_MAX_REFUSALS", "1000000"),
];

/// `per_second` sustained, `burst` at once (both at least 1).
pub fn rate(per_second: u32, burst: u32) -> Rate {
    Rate {
        per_second: per_second.try_into().expect("a rate is at least 1"),
        burst: burst.try_into().expect("a burst is at least 1"),
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(opts: Options) -> TestApp {
        let (db_url, pool) = fresh_database().await;
        Self::spawn_on(db_url, pool, opts).await
    }

    pub async fn spawn_on(db_url: String, pool: PgPool, opts: Options) -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(postline::cli::serve(
            opts.config,
            opts.run_worker,
            listener,
            pool.clone(),
            shutdown.clone(),
        ));
        TestApp {
            addr,
            pool,
            db_url,
            jwt: Jwt::new(SECRET.as_bytes()),
            shutdown,
            server,
        }
    }

    pub fn token(&self, user: UserId) -> String {
        self.jwt.issue(user, Duration::from_secs(3600))
    }

    /// One HTTP/1.1 request over a fresh connection; returns status and JSON body
    /// (Value::Null when the body is empty or not JSON).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        user: Option<UserId>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let auth = user
            .map(|u| format!("Authorization: Bearer {}\r\n", self.token(u)))
            .unwrap_or_default();
        raw_http(self.addr, method, path, &auth, body).await
    }

    /// `GET /v1/conversations/{conv}/messages` as `user`: status and body.
    pub async fn history(&self, user: UserId, conv: Uuid) -> (u16, Value) {
        self.http(
            "GET",
            &format!("/v1/conversations/{conv}/messages"),
            Some(user),
            None,
        )
        .await
    }

    /// Create a conversation owned by `owner` with `members`; returns its id.
    pub async fn conversation(&self, owner: UserId, members: &[UserId]) -> Uuid {
        let body = json!({"title": "test", "member_ids": members}).to_string();
        let (status, v) = self
            .http("POST", "/v1/conversations", Some(owner), Some(&body))
            .await;
        assert_eq!(status, 201, "create conversation: {v}");
        v["id"].as_str().unwrap().parse().unwrap()
    }

    pub async fn ws(&self, user: UserId) -> Client {
        let url = format!("ws://{}/ws?token={}", self.addr, self.token(user));
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("websocket connect");
        let mut c = Client {
            ws,
            pending: VecDeque::new(),
            next_ref: 0,
        };
        let hello = c.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(hello["user_id"], user.to_string());
        c
    }

    /// Two users in a new conversation, each connected and joined.
    pub async fn pair(&self) -> Pair {
        let (a, b) = (uid(), uid());
        let conv = self.conversation(a, &[b]).await;
        let mut alice = self.ws(a).await;
        let mut bob = self.ws(b).await;
        alice.join(conv).await;
        bob.join(conv).await;
        Pair {
            a,
            b,
            conv,
            alice,
            bob,
        }
    }

    /// Request shutdown and wait for `serve` to return, failing the test if
    /// it takes longer than `bound`; returns how long it took.
    pub async fn stop_within(self, bound: Duration) -> Duration {
        let started = tokio::time::Instant::now();
        self.shutdown.cancel();
        tokio::time::timeout(bound, self.server)
            .await
            .unwrap_or_else(|_| panic!("serve() still running {bound:?} after shutdown"))
            .expect("server task")
            .expect("server result");
        started.elapsed()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.server)
            .await
            .expect("server stops within the deadline")
            .expect("server task")
            .expect("server result");
    }
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames received while waiting for a specific one.
    pending: VecDeque<Value>,
    next_ref: u64,
}

impl Client {
    /// Connect to any server with a token; reads hello.
    pub async fn connect(addr: SocketAddr, token: &str) -> Client {
        let url = format!("ws://{addr}/ws?token={token}");
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("websocket connect");
        let mut c = Client::from_stream(ws);
        let hello = c.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        c
    }

    /// A client over a socket the test set up itself (hello not read yet).
    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        Client {
            ws,
            pending: VecDeque::new(),
            next_ref: 0,
        }
    }

    pub async fn send_raw(&mut self, msg: WsMessage) {
        self.ws.send(msg).await.expect("ws send");
    }

    pub async fn send(&mut self, v: Value) {
        self.send_raw(WsMessage::Text(v.to_string().into())).await;
    }

    async fn next_frame(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("connection ended")
                .expect("ws error");
            match msg {
                WsMessage::Text(t) => {
                    return serde_json::from_str(&t).expect("server frames are JSON")
                }
                WsMessage::Close(c) => panic!("connection closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame, in order.
    pub async fn recv(&mut self) -> Value {
        match self.pending.pop_front() {
            Some(v) => v,
            None => self.next_frame().await,
        }
    }

    /// The first frame matching `pred`; frames skipped over are kept for `recv`.
    pub async fn recv_where(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i).unwrap();
        }
        loop {
            let v = self.next_frame().await;
            if pred(&v) {
                return v;
            }
            self.pending.push_back(v);
        }
    }

    /// Every frame that arrives within `d` (after those kept aside).
    pub async fn frames_for(&mut self, d: Duration) -> Vec<Value> {
        let mut out: Vec<Value> = self.pending.drain(..).collect();
        let until = tokio::time::Instant::now() + d;
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(until, self.ws.next()).await {
            if let WsMessage::Text(t) = msg {
                out.push(serde_json::from_str(&t).expect("server frames are JSON"));
            }
        }
        out
    }

    /// Whether a frame matching `pred` was already received and kept aside.
    pub fn pending_has(&self, pred: impl Fn(&Value) -> bool) -> bool {
        self.pending.iter().any(pred)
    }

    pub async fn recv_type(&mut self, ty: &str) -> Value {
        self.recv_where(|v| v["type"] == ty).await
    }

    /// Send `event` with a fresh ref and return the one reply to it.
    pub async fn request(&mut self, mut event: Value) -> Value {
        self.next_ref += 1;
        let r = format!("r{}", self.next_ref);
        event["ref"] = json!(r);
        self.send(event).await;
        self.recv_where(|v| v["ref"] == r.as_str()).await
    }

    pub async fn join(&mut self, conv: Uuid) -> Value {
        let reply = self
            .request(json!({"type": "join_conversation", "conversation_id": conv}))
            .await;
        assert_eq!(reply["type"], "ack", "join: {reply}");
        reply
    }

    pub async fn send_text(&mut self, conv: Uuid, cmid: &str, text: &str) -> Value {
        self.request(json!({
            "type": "send_message", "conversation_id": conv,
            "client_message_id": cmid, "content": text
        }))
        .await
    }

    /// Read until the connection ends: the close code, or None if it was
    /// dropped without a close frame.
    pub async fn close_or_reset(&mut self) -> Option<u16> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for the end of the connection");
            match msg {
                Some(Ok(WsMessage::Close(Some(frame)))) => return Some(u16::from(frame.code)),
                Some(Ok(WsMessage::Close(None))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next frame, or once the connection ends, Err with its close code
    /// (None if it was dropped without a close frame).
    pub async fn recv_or_close(&mut self) -> Result<Value, Option<u16>> {
        if let Some(v) = self.pending.pop_front() {
            return Ok(v);
        }
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for a frame or the end"));
            match msg {
                Some(Ok(WsMessage::Text(t))) => {
                    return Ok(serde_json::from_str(&t).expect("server frames are JSON"))
                }
                Some(Ok(WsMessage::Close(Some(frame)))) => return Err(Some(u16::from(frame.code))),
                Some(Ok(WsMessage::Close(None))) | None | Some(Err(_)) => return Err(None),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Wait for the close frame and return its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for close");
            match msg {
                Some(Ok(WsMessage::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(WsMessage::Close(None))) | None => return 1005,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("ws error before close: {e}"),
            }
        }
    }
}

/// Rows of the messages table for a conversation, as (seq, message id, client_message_id).
pub async fn stored(pool: &PgPool, conv: Uuid) -> Vec<(i64, Uuid, String)> {
    sqlx::query_as(
        "select seq, id, client_message_id from messages where conversation_id = $1 order by seq",
    )
    .bind(conv)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A single-number query (`select count(*) ...`).
pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Wait until the background queue is empty: the worker has applied every
/// background job (audit rows, receipts, reviews, webhooks) written so far.
pub async fn background_drained(pool: &PgPool, what: &str) {
    eventually(what, || async {
        (count(pool, "select count(*) from pgmq.q_postline_background").await == 0).then_some(())
    })
    .await
}

/// Poll `f` until it returns Some, bounded by WAIT.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! The hyper server: accept loop, routing, the `/v1` JSON API, health,
//! and the hand-off of `/ws` and `/socket.io/` upgrades to the gateway. Who
//! gets a connection at all, and for how long it may idle: [`admission`].
//! What operators read (`/metrics`, `/alerts`, the dashboard): [`ops`], also
//! served alone by a standalone worker. The demo web client at `/`:
//! [`static_files`], and its `--dev` sign-in: [`dev`].

mod admission;
mod api;
mod dashboard;
pub mod dev;
mod error;
mod ops;
mod service;
mod static_files;

pub use dashboard::WINDOW as DASHBOARD_WINDOW;
pub use error::ApiError;
pub use ops::{serve_ops, Ops};

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::admission::{AcceptBackoff, Admission, Admit, Counted, Pending, Slot};
use crate::auth::{self, AuthError, Jwt};
use crate::config::AdmissionConfig;
use crate::config::{DevLogin, Origins};
use crate::domain::UserId;
use crate::gateway::Gateway;
use crate::limits::{Decision, Limits};
use crate::protocol::http as wire;
use crate::queue::audit::Origin;
use crate::queue::Enqueuer;
use crate::store::Store;
use crate::telemetry::{Metrics, RateLimit};
use crate::worker::Heartbeat;

pub type Body = Full<Bytes>;

/// What the HTTP layer needs, and nothing more.
pub struct HttpContext {
    pub store: Store,
    pub gateway: Arc<Gateway>,
    /// Shared with every connection (it verifies their refreshed tokens):
    /// its keys and validation sets are not copied per connection.
    pub jwt: Arc<Jwt>,
    pub metrics: Arc<Metrics>,
    pub enqueuer: Enqueuer,
    /// The in-process worker's heartbeat, when this process runs one.
    pub worker: Option<Arc<Heartbeat>>,
    pub admission: AdmissionConfig,
    /// Browser origins allowed on `/ws` and, through CORS, the API.
    pub origins: Origins,
    pub limits: Arc<Limits>,
    /// `/metrics`, `/alerts`, the dashboard.
    pub ops: Arc<Ops>,
    /// Whether `/dev/...` mints demo users' tokens (`--dev` only).
    pub dev_login: DevLogin,
    /// Credentials of `/v1/service/...`; empty: the service API is off.
    pub service_keys: crate::config::ServiceKeys,
}

/// How long a browser may cache a preflight answer: ten minutes saves a
/// round trip per API call without pinning a changed policy for long.
const PREFLIGHT_MAX_AGE_SECS: &str = "600";

/// A worker that has not looped for this long is reported stuck by /readyz.
const WORKER_STUCK_AFTER: Duration = Duration::from_secs(30);

/// Accept connections until `shutdown`, then let in-flight requests finish.
/// Waits for them without a bound of its own: the caller bounds this by the
/// shutdown deadline it shares with the other stages (`cli::serve`).
pub async fn serve(listener: TcpListener, ctx: Arc<HttpContext>, shutdown: CancellationToken) {
    let conns = TaskTracker::new();
    let admission = Admission::new(ctx.admission);
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually EMFILE: back off instead of spinning (or logging).
                let pause = backoff.failed(&e, tokio::time::Instant::now());
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        backoff.succeeded();
        admission::tune(&stream, ctx.admission.tcp_keepalive);
        match admission.admit(peer.ip()) {
            Admit::Serve(slot, pending) => {
                conns.spawn(connection(
                    ctx.clone(),
                    stream,
                    peer.ip(),
                    slot,
                    pending,
                    shutdown.clone(),
                ));
            }
            Admit::Triage(permit) => {
                let ctx = ctx.clone();
                conns.spawn(async move {
                    triage(ctx, stream, peer.ip()).await;
                    drop(permit);
                });
            }
            Admit::Refuse => admission::refuse_now(stream),
        }
    }
    conns.close();
    conns.wait().await;
}

/// One admitted connection: HTTP/1.1 with a deadline on every request head
/// (the wait after a keep-alive response included) and on every request.
async fn connection(
    ctx: Arc<HttpContext>,
    stream: TcpStream,
    peer: IpAddr,
    slot: Slot,
    pending: Arc<Pending>,
    shutdown: CancellationToken,
) {
    let cfg = ctx.admission;
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        let pending = pending.clone();
        async move {
            if !pending.is_released() && has_valid_token(&ctx, &req) {
                pending.release();
            }
            let res =
                tokio::time::timeout(cfg.request_timeout, route(&ctx, peer, req, Some(&pending)))
                    .await
                    .unwrap_or_else(|_| ApiError::TimedOut(cfg.request_timeout).into_response());
            Ok::<_, Infallible>(res)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .serve_connection(TokioIo::new(Counted::new(stream, slot)), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// A connection over a cap: one request, answered if it is a health probe
/// (so probes keep working at the cap), refused with 503 otherwise.
async fn triage(ctx: Arc<HttpContext>, stream: TcpStream, peer: IpAddr) {
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move {
            let probe = req.method() == Method::GET
                && matches!(req.uri().path().trim_matches('/'), "healthz" | "readyz");
            let res = if probe {
                route(&ctx, peer, req, None).await
            } else {
                ApiError::AtCapacity.into_response()
            };
            Ok::<_, Infallible>(res)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(admission::TRIAGE_HEAD_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    let _ = tokio::time::timeout(admission::TRIAGE_BOUND, conn).await;
}

/// Whether the request carries a token that verifies (header or `?token=`).
fn has_valid_token<B>(ctx: &HttpContext, req: &Request<B>) -> bool {
    bearer_token(req)
        .or_else(|| req.uri().query().and_then(auth::query_token))
        .is_some_and(|t| ctx.jwt.verify(t).is_ok())
}

/// `peer` is the TCP peer: behind a proxy, the proxy (see docs/PROTOCOL.md).
/// `pending` is the connection's place among its IP's not-yet-authenticated
/// ones (none in triage).
async fn route(
    ctx: &HttpContext,
    peer: IpAddr,
    req: Request<Incoming>,
    pending: Option<&Arc<Pending>>,
) -> Response<Body> {
    // A browser names the page's origin; other clients send none and are
    // not subject to the allowlist.
    let origin = req
        .headers()
        .get(hyper::header::ORIGIN)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok());
    let allowed = origin
        .as_deref()
        .is_none_or(|o| ctx.origins.allows(o) || same_origin(o, host));
    let mut response = route_inner(ctx, peer, req, origin.as_deref(), allowed, pending).await;
    if response.status().is_server_error() {
        ctx.metrics.add_http_server_error();
    }
    if let (Some(o), true) = (&origin, allowed) {
        cors(&mut response, o);
    }
    response
}

/// Whether `origin` is this server as the browser reached it (the page at
/// `/`): its host and port are the request's Host. The scheme is not
/// compared, since behind a TLS-terminating proxy the request arrives as
/// plain HTTP. A page on another site sends its own host, so this opens
/// nothing to it.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| !host.is_empty() && o.eq_ignore_ascii_case(host))
}

/// CORS headers for an allowed origin, echoed (never `*`, so a response
/// never reads as public to every site) and varied on.
fn cors(response: &mut Response<Body>, origin: &str) {
    let Ok(origin) = hyper::header::HeaderValue::from_str(origin) else {
        return;
    };
    let h = response.headers_mut();
    h.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        hyper::header::ACCESS_CONTROL_ALLOW_METHODS,
        hyper::header::HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    h.insert(
        hyper::header::ACCESS_CONTROL_ALLOW_HEADERS,
        hyper::header::HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(
        hyper::header::VARY,
        hyper::header::HeaderValue::from_static("origin"),
    );
}

async fn route_inner(
    ctx: &HttpContext,
    peer: IpAddr,
    req: Request<Incoming>,
    origin: Option<&str>,
    allowed: bool,
    pending: Option<&Arc<Pending>>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let refused = || ApiError::OriginNotAllowed(origin.unwrap_or_default().to_owned());
    let result = match (req.method(), segments.as_slice()) {
        // A page on another origin may not open a socket with a user's token.
        (&Method::GET, ["ws"]) if !allowed => Err(refused()),
        // CORS preflight: answered without a token (browsers send none).
        (&Method::OPTIONS, ["v1", ..]) if origin.is_some() && !allowed => Err(refused()),
        (&Method::OPTIONS, ["v1", ..]) => Ok(preflight()),
        (&Method::GET, ["healthz"]) => Ok(json(StatusCode::OK, &wire::Health { status: "ok" })),
        (&Method::GET, ["readyz"]) => Ok(readyz(ctx).await),
        (_, ["metrics"] | ["alerts"] | ["dashboard"] | ["dashboard", "stats"]) => {
            match ops::route(&ctx.ops, &req, &segments).await {
                Some(res) => Ok(res),
                None => Err(ApiError::NotFound("no such route".into())),
            }
        }
        // Limited before the token is checked: guessing tokens costs too.
        (&Method::GET, ["ws"]) => limited(
            &ctx.metrics,
            RateLimit::UpgradePerIp,
            ctx.limits.upgrade_per_ip.check(&peer),
            "too many WebSocket upgrades from this address",
        )
        .and_then(|()| upgrade(ctx, req, peer)),
        (&Method::GET, ["socket.io"]) if !allowed => Err(refused()),
        (&Method::GET, ["socket.io"]) => limited(
            &ctx.metrics,
            RateLimit::UpgradePerIp,
            ctx.limits.upgrade_per_ip.check(&peer),
            "too many WebSocket upgrades from this address",
        )
        .and_then(|()| socketio_upgrade(ctx, req, peer, pending)),
        (_, ["healthz"] | ["readyz"] | ["ws"] | ["socket.io"]) => Err(ApiError::MethodNotAllowed),
        // The demo client: embedded files, no token needed to load them.
        (_, [""] | ["demo", _]) => static_files::handle(&req, &segments),
        (_, ["dev", ..]) => match limited(
            &ctx.metrics,
            RateLimit::HttpPerIp,
            ctx.limits.http_per_ip.check(&peer),
            "too many requests from this address",
        ) {
            Ok(()) => dev::handle(ctx, req, &segments[1..]).await,
            Err(e) => Err(e),
        },
        (_, ["v1", ..]) => match limited(
            &ctx.metrics,
            RateLimit::HttpPerIp,
            ctx.limits.http_per_ip.check(&peer),
            "too many requests from this address",
        ) {
            // Server to server, with a service key instead of a user's token.
            Ok(()) if segments.get(1) == Some(&"service") => {
                service::handle(ctx, req, &segments[2..], origin_of(ctx, peer)).await
            }
            Ok(()) => api::handle(ctx, req, &segments[1..], origin_of(ctx, peer)).await,
            Err(e) => Err(e),
        },
        _ => Err(ApiError::NotFound("no such route".into())),
    };
    result.unwrap_or_else(|e| e.into_response())
}

fn preflight() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(
            hyper::header::ACCESS_CONTROL_MAX_AGE,
            PREFLIGHT_MAX_AGE_SECS,
        )
        .body(Full::new(Bytes::new()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Where a request to this gateway came from, for the audit log: the TCP
/// peer (no proxy header is trusted) and this gateway's id.
fn origin_of(ctx: &HttpContext, peer: IpAddr) -> Origin {
    Origin::gateway(peer, ctx.gateway.id())
}

/// Authenticate, then upgrade. Auth failures are plain HTTP 401s, sent
/// before any upgrade, so browsers and tools see a normal error.
fn upgrade(
    ctx: &HttpContext,
    mut req: Request<Incoming>,
    peer: IpAddr,
) -> Result<Response<Body>, ApiError> {
    let token = bearer_token(&req)
        .or_else(|| req.uri().query().and_then(auth::query_token))
        .unwrap_or("");
    let verified = ctx.jwt.verify_token(token)?;
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Err(ApiError::BadRequest(
            "expected a WebSocket upgrade request".into(),
        ));
    }
    let slot = ctx.gateway.reserve(verified.user).inspect_err(|_| {
        ctx.metrics.add_rate_limited(RateLimit::ConnectionsPerUser);
    })?;
    let (response, fut) = fastwebsockets::upgrade::upgrade(&mut req)
        .map_err(|e| ApiError::BadRequest(format!("bad WebSocket upgrade: {e}")))?;
    ctx.gateway
        .accept(slot, verified, &ctx.jwt, fut, origin_of(ctx, peer));
    Ok(response.map(|_| Full::new(Bytes::new())))
}

/// A Socket.IO v4 client over the WebSocket transport. It authenticates
/// after the upgrade (its CONNECT packet's `auth`), so the upgrade itself
/// takes no token: until the token verifies, the connection still counts
/// among its IP's pending ones, and the handshake timeout bounds it.
fn socketio_upgrade(
    ctx: &HttpContext,
    mut req: Request<Incoming>,
    peer: IpAddr,
    pending: Option<&Arc<Pending>>,
) -> Result<Response<Body>, ApiError> {
    let query = req.uri().query().unwrap_or("");
    let param = |key: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    };
    if param("EIO") != Some(crate::protocol::socketio::ENGINE_IO_VERSION) {
        return Err(ApiError::BadRequest(
            "unsupported Engine.IO version: EIO=4 (socket.io-client v3 and v4) only".into(),
        ));
    }
    if param("transport") != Some("websocket") {
        return Err(ApiError::BadRequest(
            "only the websocket transport is served: use transports: [\"websocket\"] in socket.io-client".into(),
        ));
    }
    if param("sid").is_some() {
        return Err(ApiError::BadRequest(
            "no Engine.IO session to upgrade: connect over websocket without sid".into(),
        ));
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return Err(ApiError::BadRequest(
            "expected a WebSocket upgrade request".into(),
        ));
    }
    let header_token = bearer_token(&req)
        .or_else(|| auth::query_token(query))
        .map(str::to_owned);
    let (response, fut) = fastwebsockets::upgrade::upgrade(&mut req)
        .map_err(|e| ApiError::BadRequest(format!("bad WebSocket upgrade: {e}")))?;
    let pending = pending.cloned();
    ctx.gateway.accept_socketio(
        &ctx.jwt,
        header_token,
        fut,
        origin_of(ctx, peer),
        move || {
            if let Some(p) = pending {
                p.release();
            }
        },
    );
    Ok(response.map(|_| Full::new(Bytes::new())))
}

/// `Ok` if `decision` allows; else a 429 naming `what`, counted against `limit`.
pub(crate) fn limited(
    metrics: &Metrics,
    limit: RateLimit,
    decision: Decision,
    what: &'static str,
) -> Result<(), ApiError> {
    decision.into_result().map_err(|retry_after| {
        metrics.add_rate_limited(limit);
        ApiError::RateLimited { what, retry_after }
    })
}

fn bearer_token<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
}

/// The caller of an API request.
pub(crate) fn authenticate<B>(ctx: &HttpContext, req: &Request<B>) -> Result<UserId, ApiError> {
    let token = bearer_token(req).ok_or(AuthError::Missing)?;
    Ok(ctx.jwt.verify(token)?)
}

async fn readyz(ctx: &HttpContext) -> Response<Body> {
    let db = ctx.store.ping(Duration::from_secs(2)).await;
    let worker = match &ctx.worker {
        None => "not running here",
        Some(h) => match h.age() {
            Some(age) if age < WORKER_STUCK_AFTER => "ok",
            _ => "stuck",
        },
    };
    let buffer = ctx.enqueuer.buffer();
    let buffer_state = if buffer.retrying {
        "retrying"
    } else if buffer.buffered >= buffer.capacity {
        "full"
    } else {
        "ok"
    };
    let ready = db && worker != "stuck" && buffer_state == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &wire::Ready {
            status: if ready { "ready" } else { "unavailable" },
            database: if db { "ok" } else { "unreachable" },
            worker,
            persist_buffer: wire::PersistBuffer {
                buffered: buffer.buffered,
                capacity: buffer.capacity,
                state: buffer_state,
            },
        },
    )
}

pub(crate) fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::same_origin;

    #[test]
    fn same_origin_is_the_host_the_browser_reached() {
        assert!(same_origin("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(same_origin("https://Chat.Example", Some("chat.example")));
        assert!(!same_origin("https://evil.example", Some("chat.example")));
        assert!(!same_origin("http://chat.example:81", Some("chat.example")));
        assert!(!same_origin("chat.example", Some("chat.example")));
        assert!(!same_origin("http://chat.example", None));
        assert!(!same_origin("http://", Some("")));
    }
}

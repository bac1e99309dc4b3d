//! A server wired together: gateway, HTTP, enqueuers, LISTEN, presence and
//! (optionally) the worker, and the one shutdown order, bounded by one deadline.

use std::future::Future;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Jwt;
use crate::config::{Config, DevLogin};
use crate::crypto::Keyring;
use crate::gateway::{Enqueuers, Gateway, Policies};
use crate::http::{self, HttpContext};
use crate::limits::Limits;
use crate::queue::Enqueuer;
use crate::store::Store;
use crate::telemetry::Metrics;
use crate::worker::Worker;

/// Run a server on `listener` until `shutdown`, then stop in order: stop
/// accepting and finish in-flight requests, flush the persist buffer, close
/// WebSockets (1001), stop the background tasks (worker included) and the
/// LISTEN task. Returns by `cfg.shutdown_grace` after `shutdown` fires,
/// whatever hangs: each stage is bounded by that one deadline.
pub async fn serve(
    cfg: Config,
    run_worker: bool,
    listener: TcpListener,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let keyring = Arc::new(Keyring::new(&cfg.encryption));
    let mut store = Store::new(pool.clone()).with_keyring(keyring.clone());
    if let Some(hooks) = &cfg.webhooks {
        store = store.with_webhooks(hooks.endpoints.iter().map(ToString::to_string).collect());
    }
    if cfg.moderation.hook.is_some() {
        store = store.with_reviews();
    }
    // First, before anything starts: a bad word list refuses to start.
    let moderation = match &cfg.moderation.words {
        Some(words) => {
            let filter = crate::moderation::Filter::load(words, metrics.clone())?;
            let (words_n, patterns) = filter.counts();
            tracing::info!(path = %words.path.display(), words = words_n, patterns, action = ?words.action, "moderation word list loaded");
            Some(Arc::new(filter))
        }
        None => None,
    };
    // postline.publish() validates as this gateway does.
    if let Err(e) = store.share_settings(cfg.gateway.max_content_bytes).await {
        tracing::warn!(error = %e, "could not share settings with postline.publish()");
    }
    let wake = Arc::new(Notify::new());

    // Connections close only after the persist buffer is flushed, so the
    // last sends still get their ack (or `unavailable`) on the socket.
    let close_connections = CancellationToken::new();
    let flush = TaskTracker::new();
    let enqueue_stop = CancellationToken::new();
    let enqueuer = Enqueuer::spawn(
        pool.clone(),
        crate::queue::PERSIST_QUEUE,
        cfg.enqueue,
        wake.clone(),
        enqueue_stop.clone(),
        &flush,
    );
    let background = Enqueuer::spawn(
        pool.clone(),
        crate::queue::BACKGROUND_QUEUE,
        cfg.enqueue,
        wake.clone(),
        enqueue_stop.clone(),
        &flush,
    );
    let background_tasks = TaskTracker::new();
    let background_stop = CancellationToken::new();
    let limits = Arc::new(Limits::new(&cfg.limits, cfg.gateway.typing_interval));
    background_tasks.spawn(limits.clone().sweep_until(background_stop.clone()));
    let relay = crate::notify::Relay::spawn(
        pool.clone(),
        cfg.gateway_id,
        cfg.gateway.presence_heartbeat * crate::store::MISSED_BEATS as u32,
        background_stop.clone(),
        &background_tasks,
    );
    let gateway = Gateway::new(
        relay,
        store.clone(),
        Enqueuers {
            persist: enqueuer.clone(),
            background,
        },
        metrics.clone(),
        cfg.gateway,
        close_connections.clone(),
        Policies {
            limits: limits.clone(),
            moderation: moderation.clone(),
        },
    );
    let background = background_tasks;
    let (mut hints, listener_task) =
        crate::notify::listen(&pool, cfg.gateway_id, background_stop.clone()).await?;
    // Listening now: tell the other gateways before a client can join
    // anything here, so their relay includes this one from the start.
    if let Err(e) = gateway.announce_to_peers().await {
        tracing::warn!(error = %e, "could not announce this gateway; others relay to it from their next heartbeat");
    }
    let gw = gateway.clone();
    background.spawn(async move {
        while let Some(hint) = hints.recv().await {
            gw.on_hint(hint);
        }
    });
    background.spawn(gateway.clone().presence_keeper(background_stop.clone()));
    background.spawn(gateway.clone().liveness_keeper(background_stop.clone()));
    if let (Some(filter), Some(words)) = (moderation, &cfg.moderation.words) {
        background.spawn(filter.watch(words.poll, background_stop.clone()));
    }
    let ops = super::ops::start(
        &pool,
        metrics.clone(),
        &cfg.ops,
        Some(cfg.gateway_id),
        &background_stop,
        &background,
    );
    let heartbeat = run_worker.then(|| {
        let mut worker = Worker::with_metrics(pool.clone(), cfg.worker, wake, metrics.clone())
            .with_keyring(keyring);
        if let Some(hooks) = &cfg.webhooks {
            worker = worker.with_webhooks(crate::webhooks::Deliverer::spawn(
                pool.clone(),
                hooks,
                cfg.worker.retry,
                background_stop.clone(),
                &background,
            ));
        }
        if let Some(hook) = &cfg.moderation.hook {
            worker = worker.with_reviews(crate::moderation::Reviewer::spawn(
                pool.clone(),
                hook,
                cfg.worker.retry,
                metrics.clone(),
                background_stop.clone(),
                &background,
            ));
        }
        let hb = worker.heartbeat();
        background.spawn(worker.run(background_stop.clone()));
        hb
    });

    let ctx = Arc::new(HttpContext {
        store,
        gateway: gateway.clone(),
        jwt: Arc::new(Jwt::new(cfg.jwt_secret.as_bytes()).with_max_ttl(cfg.max_token_ttl)),
        metrics,
        enqueuer,
        worker: heartbeat,
        admission: cfg.admission,
        origins: cfg.allowed_origins.clone(),
        limits,
        ops,
        dev_login: DevLogin::for_server(cfg.dev_login == DevLogin::DemoUsers, &cfg.jwt_secret),
        service_keys: cfg.service_keys.clone(),
    });
    let mut http = tokio::spawn(http::serve(listener, ctx, shutdown.clone()));
    let http_ended = tokio::select! {
        biased;
        () = shutdown.cancelled() => false,
        r = &mut http => {
            // Only a panic ends it before shutdown; stop the rest in order.
            tracing::error!(error = ?r.err(), "the HTTP server ended on its own; shutting down");
            shutdown.cancel();
            true
        }
    };

    // The one deadline, fixed the moment shutdown is requested. Every stage
    // below is bounded by it, in order, so the whole stays within the grace
    // period however long any one stage would take; a stage cut short is
    // logged by name and later stages still run (at once, if time is up).
    let deadline = Instant::now() + cfg.shutdown_grace;
    // 1. Stop accepting (done as shutdown fired) and finish in-flight requests.
    if !http_ended {
        stage("HTTP: in-flight requests", deadline, http).await;
    }
    // 2. Flush what was accepted: new sends on open connections now get
    // `unavailable`.
    enqueue_stop.cancel();
    flush.close();
    stage("persist flush", deadline, flush.wait()).await;
    // 3. Close connections, after their queued frames (acks included), with
    // reconnect notices. Gateway::drain logs its own cut-short line.
    close_connections.cancel();
    gateway.drain(deadline).await;
    // 4. Background tasks: the hint forwarder, the presence keeper, the
    // liveness keeper (which removes this gateway's heartbeat row), the
    // alerts, and the worker (which ends its batch).
    background_stop.cancel();
    background.close();
    stage("background tasks", deadline, background.wait()).await;
    // 5. The LISTEN connection, last: hints matter until connections are gone.
    stage("LISTEN task", deadline, listener_task).await;
    tracing::info!("shutdown complete");
    Ok(())
}

/// One shutdown stage, bounded by the shared deadline; a stage cut short is
/// logged by name, and what it left unfinished is abandoned.
pub(super) async fn stage<F: Future>(
    name: &'static str,
    deadline: Instant,
    work: F,
) -> Option<F::Output> {
    let out = tokio::time::timeout_at(deadline, work).await.ok();
    if out.is_none() {
        tracing::error!(stage = name, "shutdown stage cut short by the deadline");
    }
    out
}

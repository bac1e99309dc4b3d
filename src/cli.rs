//! The composition root: `serve | worker | migrate | token`, and the one
//! shutdown order. Tests call [`serve`] directly with a listener bound to
//! port 0 and their own shutdown token.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Jwt;
use crate::config::{
    Config, DatabaseArgs, DatabaseUrl, RuntimeArgs, RuntimeConfig, ServerArgs, WorkerArgs,
    WorkerConfig, DEV_JWT_SECRET,
};
use crate::domain::UserId;
use crate::gateway::{Enqueuers, Gateway};
use crate::http::{self, HttpContext};
use crate::pglocal::{Cluster, ClusterOptions};
use crate::queue::Enqueuer;
use crate::store::{self, Store};
use crate::telemetry::{self, Metrics};
use crate::worker::Worker;

#[derive(Parser)]
#[command(
    name = "postline",
    version,
    about = "Real-time chat over WebSocket, made durable through a queue inside Postgres"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (HTTP + WebSocket) and, unless --no-worker, the persistence worker.
    Serve {
        #[command(flatten)]
        args: ServerArgs,
        /// Run the gateway alone; a `postline worker` elsewhere stores messages.
        #[arg(long)]
        no_worker: bool,
        /// Do not apply the schema at start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Run the persistence worker alone.
    Worker {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Apply the schema (pgmq from its SQL, then migrations/) and exit.
    Migrate {
        #[command(flatten)]
        database: DatabaseUrl,
    },
    /// Inspect and re-drive dead letters.
    Dlq {
        #[command(flatten)]
        database: DatabaseUrl,
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Print a signed token for local use.
    Token {
        /// The user id (UUID) to put in `sub`.
        #[arg(long)]
        user: uuid::Uuid,
        /// Lifetime, e.g. 30s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        /// HS256 secret; without it, the --dev secret.
        #[arg(long, env = "POSTLINE_JWT_SECRET", hide_env_values = true)]
        jwt_secret: Option<String>,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// The newest dead letters, one line each.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// One dead letter in full, as JSON.
    Show { id: i64 },
    /// Put dead letters back into their queue (idempotent for messages).
    Replay {
        /// The dead letter to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete dead letters older than a duration (e.g. 7d).
    Purge {
        #[arg(long, value_parser = parse_ttl)]
        older_than: Duration,
    },
}

async fn dlq(database_url: &str, action: DlqAction) -> anyhow::Result<()> {
    use crate::queue::dead_letters;
    let pool = store::connect(database_url, 2).await?;
    match action {
        DlqAction::List { limit } => {
            let rows = dead_letters::list(&pool, limit).await?;
            println!(
                "{:>8}  {:<20}  {:>10}  {:>8}  {:<25}  error",
                "id", "queue", "msg_id", "attempts", "dead_at"
            );
            for r in &rows {
                let mut error = r.error.replace('\n', " ");
                if error.len() > 80 {
                    let cut = (0..=80)
                        .rev()
                        .find(|i| error.is_char_boundary(*i))
                        .unwrap_or(0);
                    error.truncate(cut);
                    error.push('…');
                }
                println!(
                    "{:>8}  {:<20}  {:>10}  {:>8}  {:<25}  {error}",
                    r.id,
                    r.queue,
                    r.msg_id,
                    r.attempts,
                    r.dead_at.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string(),
                );
            }
            println!("{} dead letter(s)", rows.len());
        }
        DlqAction::Show { id } => match dead_letters::get(&pool, id).await? {
            Some(r) => println!("{}", serde_json::to_string_pretty(&r)?),
            None => anyhow::bail!("no dead letter with id {id}"),
        },
        DlqAction::Replay { id, all } => {
            let n = dead_letters::replay(&pool, if all { None } else { id }).await?;
            if n == 0 && !all {
                anyhow::bail!("no dead letter with id {}", id.unwrap_or_default());
            }
            println!("replayed {n} dead letter(s)");
        }
        DlqAction::Purge { older_than } => {
            let n = dead_letters::purge_older_than(&pool, older_than).await?;
            println!("purged {n} dead letter(s)");
        }
    }
    Ok(())
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 30s, 15m, 1h, 7d"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("bad duration unit in {s:?}: use s, m, h or d")),
    };
    if secs == 0 {
        return Err("ttl must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

/// A command line, validated: everything a command needs, checked before
/// the runtime starts or anything connects.
enum Job {
    Serve {
        // Boxed: it is most of the enum's size, and built once.
        cfg: Box<Config>,
        database_url: Option<String>,
        run_worker: bool,
        migrate: bool,
        threads: Option<usize>,
    },
    Worker {
        database_url: String,
        max_connections: u32,
        worker: WorkerConfig,
        runtime: RuntimeConfig,
    },
    Migrate {
        database_url: String,
    },
    Dlq {
        database_url: String,
        action: DlqAction,
    },
    Token {
        user: uuid::Uuid,
        ttl: Duration,
        jwt_secret: String,
    },
}

impl Job {
    fn from_cli(cli: Cli) -> Result<Job, crate::config::ConfigError> {
        Ok(match cli.command {
            Command::Serve {
                args,
                no_worker,
                no_migrate,
            } => Job::Serve {
                cfg: Box::new(Config::from_args(
                    &args,
                    std::env::var("PORT").ok().as_deref(),
                )?),
                threads: RuntimeConfig::try_from(&args.runtime)?.threads,
                database_url: args.database.url.database_url,
                run_worker: !no_worker,
                migrate: !no_migrate,
            },
            Command::Worker {
                database,
                worker,
                runtime,
            } => Job::Worker {
                database_url: database.url.required()?.to_owned(),
                max_connections: database.max_connections()?,
                worker: WorkerConfig::try_from(&worker)?,
                runtime: RuntimeConfig::try_from(&runtime)?,
            },
            Command::Migrate { database } => Job::Migrate {
                database_url: database.required()?.to_owned(),
            },
            Command::Dlq { database, action } => Job::Dlq {
                database_url: database.required()?.to_owned(),
                action,
            },
            Command::Token {
                user,
                ttl,
                jwt_secret,
            } => Job::Token {
                user,
                ttl,
                jwt_secret: jwt_secret.unwrap_or_else(|| DEV_JWT_SECRET.to_owned()),
            },
        })
    }

    /// POSTLINE_THREADS, for the commands that take it.
    fn threads(&self) -> Option<usize> {
        match self {
            Job::Serve { threads, .. } => *threads,
            Job::Worker { runtime, .. } => runtime.threads,
            _ => None,
        }
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing();
    let job = match Job::from_cli(cli) {
        Ok(job) => job,
        Err(e) => {
            eprintln!("postline: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match job.threads() {
        // One thread: everything on the main thread (blocking calls still
        // get tokio's separate blocking pool).
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("postline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(job)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postline: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(job: Job) -> anyhow::Result<()> {
    match job {
        Job::Token {
            user,
            ttl,
            jwt_secret,
        } => {
            println!(
                "{}",
                Jwt::new(jwt_secret.as_bytes()).issue(UserId(user), ttl)
            );
            Ok(())
        }
        Job::Dlq {
            database_url,
            action,
        } => dlq(&database_url, action).await,
        Job::Migrate { database_url } => {
            let pool = store::connect(&database_url, 2).await?;
            store::migrate(&pool).await?;
            println!("schema is up to date");
            Ok(())
        }
        Job::Serve {
            cfg,
            database_url,
            run_worker,
            migrate,
            threads: _,
        } => {
            let (pool, _cluster) = open_database(database_url, cfg.db_max_connections).await?;
            if migrate {
                store::migrate(&pool).await.context("applying the schema")?;
            }
            let listener = TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("binding {}", cfg.listen))?;
            tracing::info!(addr = %listener.local_addr()?, worker = run_worker, "postline serving");
            tracing::debug!(config = ?cfg, "configuration");
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            serve(*cfg, run_worker, listener, pool, shutdown).await
        }
        Job::Worker {
            database_url,
            max_connections,
            worker,
            runtime,
        } => {
            let pool = store::connect(&database_url, max_connections)
                .await
                .context("connecting to DATABASE_URL")?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            tracing::info!("postline worker running");
            let mut task = tokio::spawn(
                Worker::new(pool, worker, Arc::new(Notify::new())).run(shutdown.clone()),
            );
            tokio::select! {
                r = &mut task => return r.context("the worker task failed"),
                () = shutdown.cancelled() => {}
            }
            let deadline = Instant::now() + runtime.shutdown_grace;
            stage("worker: finish the batch in hand", deadline, task).await;
            Ok(())
        }
    }
}

/// The configured database, or without one (`serve --dev`; validation
/// refused it otherwise) a throwaway local cluster, returned so it lives as
/// long as the caller.
async fn open_database(url: Option<String>, max: u32) -> anyhow::Result<(PgPool, Option<Cluster>)> {
    match url {
        Some(url) => Ok((
            store::connect(&url, max)
                .await
                .context("connecting to DATABASE_URL")?,
            None,
        )),
        None => {
            let cluster =
                tokio::task::spawn_blocking(|| Cluster::start(ClusterOptions::default())).await??;
            let url = cluster.url("postgres");
            tracing::info!(%url, "started a throwaway local Postgres (removed at exit)");
            Ok((store::connect(&url, max).await?, Some(cluster)))
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}

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
    let store = Store::new(pool.clone());
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
    let relay = crate::notify::Relay::spawn(
        pool.clone(),
        cfg.gateway_id,
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
    );
    let background = background_tasks;
    let (mut hints, listener_task) =
        crate::notify::listen(&pool, cfg.gateway_id, background_stop.clone()).await?;
    let gw = gateway.clone();
    background.spawn(async move {
        while let Some(hint) = hints.recv().await {
            gw.on_hint(hint);
        }
    });
    background.spawn(gateway.clone().presence_keeper(background_stop.clone()));
    let heartbeat = run_worker.then(|| {
        let worker = Worker::with_metrics(pool.clone(), cfg.worker, wake, metrics.clone());
        let hb = worker.heartbeat();
        background.spawn(worker.run(background_stop.clone()));
        hb
    });

    let ctx = Arc::new(HttpContext {
        store,
        gateway: gateway.clone(),
        jwt: Jwt::new(cfg.jwt_secret.as_bytes()),
        metrics,
        enqueuer,
        worker: heartbeat,
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
    // 4. Background tasks: the hint forwarder, the presence keeper (which
    // clears this gateway's sessions) and the worker (which ends its batch).
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
async fn stage<F: Future>(name: &'static str, deadline: Instant, work: F) -> Option<F::Output> {
    let out = tokio::time::timeout_at(deadline, work).await.ok();
    if out.is_none() {
        tracing::error!(stage = name, "shutdown stage cut short by the deadline");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parses_units_and_refuses_junk() {
        assert_eq!(parse_ttl("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_ttl("45").unwrap(), Duration::from_secs(45));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0s").is_err());
    }
}

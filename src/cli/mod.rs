//! The composition root: the command line (`serve | worker | migrate | dlq | keys |
//! chat | token`) and the runtime. [`serve`] wires a server together and owns the
//! one shutdown order; tests call it directly with a listener bound to port 0
//! and their own shutdown token. `dlq` is the dead-letter tooling; `keys`
//! makes encryption keys and rotates stored content to the active one;
//! `chat` a command-line client of a running server.

mod chat;
mod dlq;
mod keys;
mod ops;
mod serve;

use chat::{chat, ChatArgs};
use dlq::{dlq, DlqAction};
use keys::{KeysCommand, Rotation};
pub use serve::serve;
use serve::stage;

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
    Config, DatabaseArgs, DatabaseUrl, EncryptionArgs, EncryptionConfig, ModerationHookArgs,
    ModerationHookConfig, OpsArgs, OpsConfig, RuntimeArgs, RuntimeConfig, ServerArgs, WebhookArgs,
    WebhookConfig, WorkerArgs, WorkerConfig, WorkerHttpArgs, DEV_JWT_SECRET,
};
use crate::crypto::Keyring;
use crate::domain::UserId;
use crate::pglocal::{Cluster, ClusterOptions};
use crate::store;
use crate::telemetry;
use crate::worker::Worker;

#[derive(Parser)]
#[command(
    name = "postline",
    version,
    about = "Real-time chat over WebSocket, made durable through a queue inside Postgres"
)]
struct Cli {
    /// Log lines as `text` (coloured only on a terminal) or `json` (one
    /// object a line, for a log collector).
    #[arg(
        long,
        global = true,
        env = "POSTLINE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (HTTP + WebSocket) and, unless --no-worker, the persistence worker.
    Serve {
        /// Boxed: serve's options outweigh every other subcommand's.
        #[command(flatten)]
        args: Box<ServerArgs>,
        /// Run the gateway alone; a `postline worker` elsewhere stores messages.
        #[arg(long)]
        no_worker: bool,
        /// Do not apply the schema at start.
        #[arg(long)]
        no_migrate: bool,
        /// With a throwaway dev database: write `DATABASE_URL=...` to this
        /// file (removed at exit), so `. FILE` readies `psql` for `sql/`.
        #[arg(long, env = "POSTLINE_DEV_ENV_FILE")]
        dev_env_file: Option<std::path::PathBuf>,
    },
    /// Run the persistence worker alone (with /metrics, /healthz and /alerts
    /// on POSTLINE_WORKER_LISTEN).
    Worker {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
        #[command(flatten)]
        http: WorkerHttpArgs,
        /// Boxed, as serve's are: the largest groups stay off the stack.
        #[command(flatten)]
        ops: Box<OpsArgs>,
        #[command(flatten)]
        webhooks: Box<WebhookArgs>,
        #[command(flatten)]
        encryption: EncryptionArgs,
        #[command(flatten)]
        moderation_hook: Box<ModerationHookArgs>,
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
    /// Encryption at rest: make a key, re-encrypt stored messages under the
    /// active one.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// A command-line client of a running server: create a conversation,
    /// listen to one, send to one.
    Chat(Box<ChatArgs>),
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
        dev_env_file: Option<std::path::PathBuf>,
    },
    Worker {
        database_url: String,
        max_connections: u32,
        worker: WorkerConfig,
        runtime: RuntimeConfig,
        listen: std::net::SocketAddr,
        // Boxed, as serve's Config is: the alert settings outweigh the rest.
        ops: Box<OpsConfig>,
        webhooks: Option<Box<WebhookConfig>>,
        keyring: Arc<Keyring>,
        moderation_hook: Option<Box<ModerationHookConfig>>,
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
    KeysGenerate,
    KeysRotate(Box<Rotation>),
    Chat(Box<ChatArgs>),
}

impl Job {
    fn from_cli(cli: Cli) -> Result<Job, crate::config::ConfigError> {
        Ok(match cli.command {
            Command::Serve {
                args,
                no_worker,
                no_migrate,
                dev_env_file,
            } => Job::Serve {
                dev_env_file,
                cfg: Box::new({
                    for w in args.warnings() {
                        tracing::warn!("{w}");
                    }
                    let cfg = Config::from_args(&args, std::env::var("PORT").ok().as_deref())?;
                    // Not for `--dev`'s throwaway database: removed at
                    // exit, it never rests anywhere.
                    let throwaway = args.dev && args.database.url.database_url.is_none();
                    if let (Some(w), false) = (cfg.encryption.warning(), throwaway) {
                        tracing::warn!("{w}");
                    }
                    cfg
                }),
                threads: RuntimeConfig::try_from(&args.runtime)?.threads,
                database_url: args.database.url.database_url,
                run_worker: !no_worker,
                migrate: !no_migrate,
            },
            Command::Worker {
                database,
                worker,
                runtime,
                http,
                ops,
                webhooks,
                encryption,
                moderation_hook,
            } => Job::Worker {
                keyring: {
                    let cfg = EncryptionConfig::new(&encryption)?;
                    if let Some(w) = cfg.warning() {
                        tracing::warn!("{w}");
                    }
                    Arc::new(Keyring::new(&cfg))
                },
                webhooks: WebhookConfig::new(&webhooks)?.map(Box::new),
                moderation_hook: ModerationHookConfig::new(&moderation_hook)?.map(Box::new),
                database_url: database.url.required()?.to_owned(),
                max_connections: database.max_connections()?,
                worker: WorkerConfig::try_from(&worker)?,
                runtime: RuntimeConfig::try_from(&runtime)?,
                listen: http.worker_listen,
                // A worker has no --dev: its /alerts always needs the token.
                ops: Box::new(OpsConfig::new(&ops, false)?),
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
            Command::Keys {
                command: KeysCommand::Generate,
            } => Job::KeysGenerate,
            Command::Keys {
                command:
                    KeysCommand::Rotate {
                        database,
                        encryption,
                        batch,
                        throttle_ms,
                    },
            } => {
                let encryption = EncryptionConfig::new(&encryption)?;
                if encryption.active_id().is_none() {
                    return Err(crate::config::ConfigError::NoActiveKey);
                }
                Job::KeysRotate(Box::new(Rotation {
                    database_url: database.required()?.to_owned(),
                    keyring: Keyring::new(&encryption),
                    batch: crate::config::positive("--batch", batch)?,
                    throttle: Duration::from_millis(throttle_ms),
                }))
            }
            Command::Chat(args) => Job::Chat(args),
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
    telemetry::init_tracing(cli.log_format);
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
        Job::Chat(args) => chat(*args).await,
        Job::KeysGenerate => {
            keys::generate();
            Ok(())
        }
        Job::KeysRotate(rotation) => keys::rotate(*rotation).await,
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
            dev_env_file,
        } => {
            if let Some(words) = &cfg.moderation.words {
                // Before connecting anywhere: a bad word list is a mistake
                // in the configuration, reported at once (serve reads it
                // again, to use it).
                crate::moderation::Filter::load(words, Arc::default())?;
            }
            let (pool, _cluster) =
                open_database(database_url, cfg.db_max_connections, dev_env_file).await?;
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
            listen,
            ops: ops_cfg,
            webhooks,
            keyring,
            moderation_hook,
        } => {
            let retry = worker.retry;
            let pool = store::connect(&database_url, max_connections)
                .await
                .context("connecting to DATABASE_URL")?;
            let listener = TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding POSTLINE_WORKER_LISTEN {listen}"))?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            tracing::info!(metrics = %listener.local_addr()?, "postline worker running");
            let metrics = Arc::new(telemetry::Metrics::default());
            let (ops_stop, ops_tasks) = (CancellationToken::new(), TaskTracker::new());
            let ops = ops::start(
                &pool,
                metrics.clone(),
                &ops_cfg,
                None,
                &ops_stop,
                &ops_tasks,
            );
            let http = tokio::spawn(crate::http::serve_ops(listener, ops, shutdown.clone()));
            let mut worker = Worker::with_metrics(
                pool.clone(),
                worker,
                Arc::new(Notify::new()),
                metrics.clone(),
            )
            .with_keyring(keyring);
            if let Some(hook) = &moderation_hook {
                // Stopped with the alerts, as the webhook pool is.
                worker = worker.with_reviews(crate::moderation::Reviewer::spawn(
                    pool.clone(),
                    hook,
                    retry,
                    metrics,
                    ops_stop.clone(),
                    &ops_tasks,
                ));
            }
            if let Some(hooks) = &webhooks {
                // Stopped with the alerts: after the batch in hand is finished.
                worker = worker.with_webhooks(crate::webhooks::Deliverer::spawn(
                    pool,
                    hooks,
                    retry,
                    ops_stop.clone(),
                    &ops_tasks,
                ));
            }
            let mut task = tokio::spawn(worker.run(shutdown.clone()));
            tokio::select! {
                r = &mut task => return r.context("the worker task failed"),
                () = shutdown.cancelled() => {}
            }
            // The same order as serve: requests, then the batch, then the rest.
            let deadline = Instant::now() + runtime.shutdown_grace;
            stage("ops HTTP: in-flight requests", deadline, http).await;
            stage("worker: finish the batch in hand", deadline, task).await;
            ops_stop.cancel();
            ops_tasks.close();
            stage("alerts and metrics tasks", deadline, ops_tasks.wait()).await;
            Ok(())
        }
    }
}

/// The configured database, or without one (`serve --dev`; validation
/// refused it otherwise) a throwaway local cluster, returned so it lives as
/// long as the caller.
async fn open_database(
    url: Option<String>,
    max: u32,
    env_file: Option<std::path::PathBuf>,
) -> anyhow::Result<(PgPool, Option<DevDatabase>)> {
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
            // Plain on stdout, so the ops queries in sql/ are one paste away.
            println!(
                "dev database: psql \"{url}\"    (e.g. psql \"{url}\" -f sql/queue_depth.sql)"
            );
            let env_file = match env_file {
                Some(path) => {
                    std::fs::write(&path, format!("DATABASE_URL={url}\nexport DATABASE_URL\n"))
                        .with_context(|| format!("writing {}", path.display()))?;
                    Some(path)
                }
                None => None,
            };
            let pool = store::connect(&url, max).await?;
            Ok((
                pool,
                Some(DevDatabase {
                    _cluster: cluster,
                    env_file,
                }),
            ))
        }
    }
}

/// A throwaway cluster and the file naming it: both gone when this drops,
/// so a stale file never points at a dead cluster.
struct DevDatabase {
    /// Held for its Drop: the cluster is stopped and removed.
    _cluster: Cluster,
    env_file: Option<std::path::PathBuf>,
}

impl Drop for DevDatabase {
    fn drop(&mut self) {
        if let Some(path) = &self.env_file {
            let _ = std::fs::remove_file(path);
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

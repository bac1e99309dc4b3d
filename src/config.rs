//! All configuration in one place: flags mirror environment variables, each
//! default is documented next to its field, and `Config` is validated once.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::gateway::GatewayConfig;
use crate::queue::EnqueueConfig;
use crate::worker::WorkerConfig;

/// Secret used by `--dev` when no POSTLINE_JWT_SECRET is set. Public on
/// purpose: dev tokens must never be accepted by a real deployment.
pub const DEV_JWT_SECRET: &str = "postline-dev-secret-do-not-use-in-production";

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Postgres URL. Unset with --dev: a throwaway local cluster is started.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Address to listen on (default 0.0.0.0:8080, or 0.0.0.0:$PORT when PORT is set).
    #[arg(long, env = "POSTLINE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HS256 secret for client tokens. Required unless --dev.
    #[arg(long, env = "POSTLINE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Development mode: a default JWT secret and a local Postgres if none is given.
    #[arg(long)]
    pub dev: bool,
    /// Largest message content in bytes.
    #[arg(long, env = "POSTLINE_MAX_CONTENT_BYTES", default_value_t = 4096)]
    pub max_content_bytes: usize,
    /// Largest WebSocket message in bytes; larger closes the connection (1009).
    #[arg(long, env = "POSTLINE_MAX_FRAME_BYTES", default_value_t = 65536)]
    pub max_frame_bytes: usize,
    /// Frames queued per connection before it is closed as a slow consumer.
    #[arg(long, env = "POSTLINE_OUTBOX_CAPACITY", default_value_t = 1024)]
    pub outbox_capacity: usize,
    /// Milliseconds a user stays online after their last connection closes
    /// (a reconnect within it shows no offline/online flap).
    #[arg(long, env = "POSTLINE_PRESENCE_GRACE_MS", default_value_t = 5000)]
    pub presence_grace_ms: u64,
    /// Milliseconds after which an unrefreshed typing indicator is turned off.
    #[arg(long, env = "POSTLINE_TYPING_TTL_MS", default_value_t = 6000)]
    pub typing_ttl_ms: u64,
    /// This gateway's id among those sharing the database (default: random
    /// per start).
    #[arg(long, env = "POSTLINE_GATEWAY_ID")]
    pub gateway_id: Option<uuid::Uuid>,
    /// Milliseconds over which clients are told to reconnect on shutdown.
    #[arg(long, env = "POSTLINE_DRAIN_WINDOW_MS", default_value_t = 5000)]
    pub drain_window_ms: u64,
    /// Milliseconds between presence heartbeats; a gateway silent for three
    /// is taken for dead and its users go offline.
    #[arg(long, env = "POSTLINE_PRESENCE_HEARTBEAT_MS", default_value_t = 5000)]
    pub presence_heartbeat_ms: u64,
    /// Postgres connections in the pool (the LISTEN connection is extra).
    #[arg(long, env = "POSTLINE_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Persist jobs buffered in memory before sends are refused with `unavailable`.
    #[arg(long, env = "POSTLINE_ENQUEUE_CAPACITY", default_value_t = 8192)]
    pub enqueue_capacity: usize,
    /// Most jobs per pgmq.send_batch.
    #[arg(long, env = "POSTLINE_ENQUEUE_MAX_BATCH", default_value_t = 512)]
    pub enqueue_max_batch: usize,
    /// Microseconds a persist batch may wait for more jobs (0: send at once;
    /// batches still form under load).
    #[arg(long, env = "POSTLINE_ENQUEUE_LINGER_US", default_value_t = 0)]
    pub enqueue_linger_us: u64,
    /// Jobs the worker reads and stores per transaction.
    #[arg(long, env = "POSTLINE_WORKER_BATCH", default_value_t = 500)]
    pub worker_batch: i32,
    /// Seconds a read job stays invisible (how soon a crashed worker's jobs are retried).
    #[arg(long, env = "POSTLINE_WORKER_VISIBILITY_TIMEOUT", default_value_t = 30)]
    pub worker_visibility_timeout_secs: u64,
    /// Milliseconds between polls of an idle worker.
    #[arg(long, env = "POSTLINE_WORKER_POLL_MS", default_value_t = 250)]
    pub worker_poll_ms: u64,
    /// Milliseconds a worker waits after draining the queue, so batches gather
    /// (fewer commits and NOTIFYs; adds this much to message_persisted latency).
    #[arg(long, env = "POSTLINE_WORKER_LINGER_MS", default_value_t = 10)]
    pub worker_linger_ms: u64,
    /// Delay before the first retry of a failed job, in milliseconds (doubles per attempt).
    #[arg(long, env = "POSTLINE_RETRY_BASE_MS", default_value_t = 1000)]
    pub retry_base_ms: u64,
    /// Longest delay between retries, in seconds.
    #[arg(long, env = "POSTLINE_RETRY_CAP_SECS", default_value_t = 300)]
    pub retry_cap_secs: u64,
    /// Attempts after which a failing job is moved to the dead-letter table.
    #[arg(long, env = "POSTLINE_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: i32,
    /// High-priority batches in a row before a waiting background batch gets a turn.
    #[arg(long, env = "POSTLINE_STARVATION_LIMIT", default_value_t = 4)]
    pub starvation_limit: u32,
    /// Seconds between cleanups of pgmq's archive.
    #[arg(long, env = "POSTLINE_CLEANUP_INTERVAL_SECS", default_value_t = 600)]
    pub cleanup_interval_secs: u64,
    /// Hours archived (dead-lettered) jobs are kept in pgmq's archive tables.
    #[arg(long, env = "POSTLINE_ARCHIVE_RETENTION_HOURS", default_value_t = 168)]
    pub archive_retention_hours: u64,
    /// Seconds shutdown may take before remaining work is abandoned.
    #[arg(long, env = "POSTLINE_SHUTDOWN_GRACE", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("POSTLINE_JWT_SECRET is required (or run with --dev for local use)")]
    MissingSecret,
    #[error("POSTLINE_JWT_SECRET must be at least 16 bytes")]
    WeakSecret,
    #[error("PORT must be a port number, got {0:?}")]
    BadPort(String),
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
}

/// Validated settings of a server process.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub gateway_id: uuid::Uuid,
    pub jwt_secret: String,
    pub gateway: GatewayConfig,
    pub enqueue: EnqueueConfig,
    pub worker: WorkerConfig,
    pub db_max_connections: u32,
    pub shutdown_grace: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("gateway_id", &self.gateway_id)
            .field("jwt_secret", &"<redacted>")
            .field("gateway", &self.gateway)
            .field("enqueue", &self.enqueue)
            .field("worker", &self.worker)
            .field("db_max_connections", &self.db_max_connections)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

impl Config {
    /// Defaults suitable for tests and local use, with the given secret.
    pub fn with_secret(secret: &str) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            gateway_id: uuid::Uuid::new_v4(),
            jwt_secret: secret.to_owned(),
            gateway: GatewayConfig::default(),
            enqueue: EnqueueConfig::default(),
            worker: WorkerConfig::default(),
            db_max_connections: 16,
            shutdown_grace: Duration::from_secs(10),
        }
    }

    /// `port_env` is the value of PORT (Fly.io), used when no listen address is given.
    pub fn from_args(args: &ServerArgs, port_env: Option<&str>) -> Result<Self, ConfigError> {
        let jwt_secret = match (&args.jwt_secret, args.dev) {
            (Some(s), _) if s.len() >= 16 => s.clone(),
            (Some(_), _) => return Err(ConfigError::WeakSecret),
            (None, true) => DEV_JWT_SECRET.to_owned(),
            (None, false) => return Err(ConfigError::MissingSecret),
        };
        let listen = match (args.listen, port_env) {
            (Some(addr), _) => addr,
            (None, Some(p)) => {
                let port: u16 = p.parse().map_err(|_| ConfigError::BadPort(p.to_owned()))?;
                SocketAddr::from(([0, 0, 0, 0], port))
            }
            (None, None) => SocketAddr::from(([0, 0, 0, 0], 8080)),
        };
        for (name, v) in [
            ("POSTLINE_MAX_CONTENT_BYTES", args.max_content_bytes),
            ("POSTLINE_MAX_FRAME_BYTES", args.max_frame_bytes),
            ("POSTLINE_OUTBOX_CAPACITY", args.outbox_capacity),
            ("POSTLINE_ENQUEUE_CAPACITY", args.enqueue_capacity),
            ("POSTLINE_ENQUEUE_MAX_BATCH", args.enqueue_max_batch),
            ("POSTLINE_WORKER_BATCH", args.worker_batch.max(0) as usize),
            (
                "POSTLINE_DB_MAX_CONNECTIONS",
                args.db_max_connections as usize,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        let mut cfg = Config::with_secret(&jwt_secret);
        cfg.listen = listen;
        cfg.gateway.max_content_bytes = args.max_content_bytes;
        cfg.gateway.max_frame_bytes = args.max_frame_bytes;
        cfg.gateway.outbox_capacity = args.outbox_capacity;
        cfg.gateway.presence_grace = Duration::from_millis(args.presence_grace_ms);
        cfg.gateway.drain_window = Duration::from_millis(args.drain_window_ms);
        cfg.gateway.presence_heartbeat = Duration::from_millis(args.presence_heartbeat_ms.max(10));
        if let Some(id) = args.gateway_id {
            cfg.gateway_id = id;
        }
        cfg.gateway.typing_ttl = Duration::from_millis(args.typing_ttl_ms.max(1));
        cfg.enqueue.capacity = args.enqueue_capacity;
        cfg.enqueue.max_batch = args.enqueue_max_batch;
        cfg.enqueue.linger = Duration::from_micros(args.enqueue_linger_us);
        cfg.worker.batch_size = args.worker_batch;
        cfg.worker.visibility_timeout =
            Duration::from_secs(args.worker_visibility_timeout_secs.max(1));
        cfg.worker.poll_interval = Duration::from_millis(args.worker_poll_ms.max(1));
        cfg.worker.linger = Duration::from_millis(args.worker_linger_ms);
        cfg.worker.retry.base = Duration::from_millis(args.retry_base_ms);
        cfg.worker.retry.cap = Duration::from_secs(args.retry_cap_secs).max(cfg.worker.retry.base);
        cfg.worker.retry.max_attempts = args.max_attempts;
        cfg.worker.starvation_limit = args.starvation_limit;
        cfg.worker.cleanup_interval = Duration::from_secs(args.cleanup_interval_secs);
        cfg.worker.retention = Duration::from_secs(args.archive_retention_hours * 3600);
        cfg.db_max_connections = args.db_max_connections;
        cfg.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ServerArgs,
    }

    fn args(extra: &[&str]) -> ServerArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(extra);
        T::try_parse_from(v).unwrap().a
    }

    #[test]
    fn secret_is_required_outside_dev() {
        let mut a = args(&[]);
        a.jwt_secret = None;
        assert!(matches!(
            Config::from_args(&a, None),
            Err(ConfigError::MissingSecret)
        ));
        a.dev = true;
        assert_eq!(
            Config::from_args(&a, None).unwrap().jwt_secret,
            DEV_JWT_SECRET
        );
        a.jwt_secret = Some("short".into());
        assert!(matches!(
            Config::from_args(&a, None),
            Err(ConfigError::WeakSecret)
        ));
    }

    #[test]
    fn port_env_is_honoured_and_checked() {
        let mut a = args(&["--jwt-secret", "0123456789abcdef"]);
        a.listen = None;
        assert_eq!(
            Config::from_args(&a, Some("9000")).unwrap().listen.port(),
            9000
        );
        assert!(matches!(
            Config::from_args(&a, Some("http")),
            Err(ConfigError::BadPort(_))
        ));
        assert_eq!(Config::from_args(&a, None).unwrap().listen.port(), 8080);
    }

    #[test]
    fn zero_limits_are_refused_and_secret_is_redacted() {
        let mut a = args(&["--jwt-secret", "0123456789abcdef", "--outbox-capacity", "0"]);
        assert!(matches!(
            Config::from_args(&a, None),
            Err(ConfigError::Zero(_))
        ));
        a.outbox_capacity = 4;
        let cfg = Config::from_args(&a, None).unwrap();
        assert!(!format!("{cfg:?}").contains("0123456789abcdef"));
    }
}

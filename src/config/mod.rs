//! All configuration in one place. Every option is a flag mirrored by an
//! environment variable, and its default is written once: in the clap
//! attribute next to the field and its doc. The `Default` of each settings
//! struct is those same clap defaults, parsed (see [`defaults`]). Values are
//! validated once, at start: a bad one is refused with a [`ConfigError`]
//! naming its variable, never clamped into range.
//!
//! Argument groups are flattened into the subcommands that use them, so each
//! subcommand takes only its own options:
//! - `serve`: [`ServerArgs`] = [`DatabaseArgs`] + [`HttpArgs`] +
//!   [`GatewayArgs`] + [`EnqueueArgs`] + [`WorkerArgs`] + [`RuntimeArgs`] +
//!   [`AdmissionArgs`] + [`LimitsArgs`] + [`OpsArgs`] + [`WebhookArgs`] +
//!   [`EncryptionArgs`] + [`ModerationArgs`] + [`ModerationHookArgs`];
//! - `worker`: [`DatabaseArgs`] + [`WorkerArgs`] + [`RuntimeArgs`] +
//!   [`OpsArgs`] + [`WorkerHttpArgs`] + [`WebhookArgs`] + [`EncryptionArgs`] +
//!   [`ModerationHookArgs`];
//! - `keys rotate`: [`DatabaseUrl`] + [`EncryptionArgs`];
//! - `migrate`, `dlq`: [`DatabaseUrl`].
//!
//! This module sits at the bottom of the import graph and imports nothing
//! from the crate: the gateway, queue and worker take their settings from here.

mod admission;
mod encryption;
mod enqueue;
mod gateway;
mod limits;
mod moderation;
mod ops;
mod service;
mod webhooks;
mod worker;

pub use admission::{open_file_limit, AdmissionArgs, AdmissionConfig};
pub use encryption::{EncryptionArgs, EncryptionConfig, EncryptionKey, KEY_BYTES};
pub use enqueue::{EnqueueArgs, EnqueueConfig};
pub use gateway::{GatewayArgs, GatewayConfig};
pub use limits::{LimitsArgs, LimitsConfig, Rate};
pub use moderation::{
    ModerationAction, ModerationArgs, ModerationConfig, ModerationHookArgs, ModerationHookConfig,
    WordListConfig,
};
pub use ops::{
    AlertConfig, OperatorAuth, OperatorToken, OpsArgs, OpsConfig, SigningSecret, WebhookUrl,
    WorkerHttpArgs,
};
pub use service::ServiceKeys;
pub use webhooks::{WebhookArgs, WebhookConfig};
pub use worker::{RetryPolicy, WorkerArgs, WorkerConfig};

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

/// Secret used by `--dev` when no POSTLINE_JWT_SECRET is set. Public on
/// purpose: dev tokens must never be accepted by a real deployment.
pub const DEV_JWT_SECRET: &str = "postline-dev-secret-do-not-use-in-production";

/// HS256 keys shorter than this are guessable offline from one token.
const MIN_SECRET_BYTES: usize = 16;

/// No duration setting may exceed this. Far beyond any sensible value, and
/// far below what would overflow `Instant + Duration` (a panic at runtime).
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("POSTLINE_JWT_SECRET is required (or run with --dev for local use)")]
    MissingSecret,
    #[error("POSTLINE_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")]
    WeakSecret,
    #[error("DATABASE_URL is required (or run `serve --dev` for a throwaway local Postgres)")]
    MissingDatabaseUrl,
    #[error("PORT must be a port number, got {0:?}")]
    BadPort(String),
    #[error("{0} must be greater than zero")]
    NotPositive(&'static str),
    #[error("{var} must be at least {min}, got {got}")]
    TooSmall {
        var: &'static str,
        min: u64,
        got: u64,
    },
    #[error("{var} is too large: durations are limited to {MAX_DURATION:?}")]
    TooLarge { var: &'static str },
    #[error(
        "POSTLINE_RETRY_CAP_SECS ({cap:?}) must not be less than POSTLINE_RETRY_BASE_MS ({base:?})"
    )]
    RetryCapBelowBase { cap: Duration, base: Duration },
    #[error(
        "{var} is {got}, but the open-file limit (RLIMIT_NOFILE {nofile}) leaves room for \
         {room} connections: raise the limit (ulimit -n) or lower {var}"
    )]
    AboveFileLimit {
        var: &'static str,
        got: u64,
        room: u64,
        nofile: u64,
    },
    #[error(
        "the open-file limit (RLIMIT_NOFILE {nofile}) leaves no room for connections once \
         {reserved} descriptors are kept for the database and files: raise it (ulimit -n)"
    )]
    TooFewFiles { nofile: u64, reserved: u64 },
    #[error(
        "POSTLINE_ALLOWED_ORIGINS: {0:?} is not an origin (scheme://host[:port], no path), nor *"
    )]
    BadOrigin(String),
    #[error("POSTLINE_SERVICE_KEYS: {0}")]
    BadServiceKeys(String),
    #[error("POSTLINE_OPERATOR_TOKEN must be at least {MIN_SECRET_BYTES} bytes")]
    WeakOperatorToken,
    #[error("{var}: {url:?} is not an http://host[:port]/path URL")]
    BadWebhookUrl { var: &'static str, url: String },
    #[error(
        "{var}: https is not supported (Postline carries no TLS client); \
         use http:// to a relay on a trusted network"
    )]
    HttpsWebhook { var: &'static str },
    #[error("POSTLINE_WEBHOOK_SECRET is required when POSTLINE_WEBHOOK_URLS is set")]
    MissingWebhookSecret,
    #[error("POSTLINE_WEBHOOK_SECRET must be at least {MIN_SECRET_BYTES} bytes")]
    WeakWebhookSecret,
    #[error("POSTLINE_ENCRYPTION_KEYS: {0}")]
    BadEncryptionKeys(String),
    #[error("POSTLINE_ENCRYPTION_ACTIVE_KEY is {0:?}, but no key has that id in POSTLINE_ENCRYPTION_KEYS")]
    UnknownActiveKey(String),
    #[error("POSTLINE_ENCRYPTION_ACTIVE_KEY is {0:?}, but POSTLINE_ENCRYPTION_KEYS is not set")]
    ActiveKeyWithoutKeys(String),
    #[error("`keys rotate` needs a key to rotate to: set POSTLINE_ENCRYPTION_KEYS")]
    NoActiveKey,
    #[error(
        "POSTLINE_MODERATION_HOOK_SECRET is required when POSTLINE_MODERATION_HOOK_URL is set"
    )]
    MissingModerationHookSecret,
    #[error("POSTLINE_MODERATION_HOOK_SECRET must be at least {MIN_SECRET_BYTES} bytes")]
    WeakModerationHookSecret,
}

/// Whether the server mints tokens for the demo users (`POST /dev/token`,
/// behind the demo page at `/`). An enum, not a flag, so that the only way
/// to turn it on is [`DevLogin::for_server`], which checks both conditions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DevLogin {
    /// No `/dev/...` routes (404): always outside `--dev`.
    #[default]
    Off,
    /// `--dev` signing with the public [`DEV_JWT_SECRET`]: what is minted
    /// is accepted by no deployment that set its own secret.
    DemoUsers,
}

impl DevLogin {
    /// On only for `--dev` with the public dev secret: a `--dev` server
    /// given a real POSTLINE_JWT_SECRET must not hand out tokens for it.
    pub fn for_server(dev: bool, jwt_secret: &str) -> DevLogin {
        if dev && jwt_secret == DEV_JWT_SECRET {
            DevLogin::DemoUsers
        } else {
            DevLogin::Off
        }
    }
}

/// Which browser origins may use the server cross-origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    Any,
    /// Lowercase `scheme://host[:port]`, as browsers send them.
    List(Vec<String>),
}

impl Default for Origins {
    /// None: only clients that send no Origin header (not browsers).
    fn default() -> Self {
        Origins::List(Vec::new())
    }
}

impl Origins {
    fn parse(list: &str) -> Result<Origins, ConfigError> {
        let mut out = Vec::new();
        for o in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            if o == "*" {
                return Ok(Origins::Any);
            }
            let o = o.trim_end_matches('/').to_ascii_lowercase();
            let host = o
                .strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"))
                .filter(|h| !h.is_empty() && !h.contains(['/', '?', '#', '@', ' ']));
            if host.is_none() {
                return Err(ConfigError::BadOrigin(o));
            }
            out.push(o);
        }
        Ok(Origins::List(out))
    }

    /// Whether a request carrying this Origin header may proceed.
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Origins::Any => true,
            Origins::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }
}

/// The database URL alone: all `migrate` and `dlq` take.
#[derive(Debug, Clone, Default, Args)]
pub struct DatabaseUrl {
    /// Postgres URL. Required, except by `serve --dev`, which starts a
    /// throwaway local cluster when it is unset.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

impl DatabaseUrl {
    pub fn required(&self) -> Result<&str, ConfigError> {
        self.database_url
            .as_deref()
            .ok_or(ConfigError::MissingDatabaseUrl)
    }
}

/// The database of a long-running process (`serve`, `worker`).
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    #[command(flatten)]
    pub url: DatabaseUrl,
    /// Postgres connections in the pool, at least 2 (a gateway's LISTEN connection is one of them).
    #[arg(long, env = "POSTLINE_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
}

impl Default for DatabaseArgs {
    fn default() -> Self {
        defaults()
    }
}

/// The smallest pool that works: a gateway's LISTEN connection is one of
/// the pool's for as long as it listens (sqlx's `PgListener` takes it from
/// the pool), and everything else needs at least one more. With one, joins,
/// conversations and the worker waited out the pool timeout forever.
pub const MIN_DB_CONNECTIONS: u32 = 2;

impl DatabaseArgs {
    pub fn max_connections(&self) -> Result<u32, ConfigError> {
        let var = "POSTLINE_DB_MAX_CONNECTIONS";
        let n = positive(var, self.db_max_connections)?;
        if n < MIN_DB_CONNECTIONS {
            return Err(ConfigError::TooSmall {
                var,
                min: MIN_DB_CONNECTIONS.into(),
                got: n.into(),
            });
        }
        Ok(n)
    }
}

/// What the HTTP side of `serve` needs: where to listen, how to verify tokens.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Address to listen on (default 0.0.0.0:8080, or 0.0.0.0:$PORT when PORT is set).
    #[arg(long, env = "POSTLINE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HS256 secret for client tokens. Required unless --dev.
    #[arg(long, env = "POSTLINE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Longest token lifetime accepted, in seconds (`exp - iat`, or `exp -
    /// now` without `iat`); longer-lived tokens are refused with 401. A day:
    /// a leaked token stops working by tomorrow, and clients refresh long
    /// before (`refresh_token`).
    #[arg(long, env = "POSTLINE_MAX_TOKEN_TTL", default_value_t = 86_400)]
    pub max_token_ttl_secs: u64,
    /// Browser origins allowed to open `/ws` and read the HTTP API
    /// (comma-separated, e.g. `https://chat.example.com`; `*` for any).
    /// Default: none; requests without an Origin header (non-browser
    /// clients) are always allowed. `--dev` without it: any.
    #[arg(long, env = "POSTLINE_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Service credentials for `/v1/service/...`: `name=secret,...`
    /// (secrets of at least 16 bytes; several at once for rotation).
    #[arg(long, env = "POSTLINE_SERVICE_KEYS", hide_env_values = true)]
    pub service_keys: Option<String>,
}

impl Default for HttpArgs {
    fn default() -> Self {
        defaults()
    }
}

/// The process itself (`serve`, `worker`): its runtime and its shutdown.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Runtime worker threads (default: one per core; 1: single-threaded).
    #[arg(long, env = "POSTLINE_THREADS")]
    pub threads: Option<usize>,
    /// Seconds from the shutdown signal to exit: every shutdown stage shares
    /// this one deadline, and what is unfinished by then is abandoned.
    #[arg(long, env = "POSTLINE_SHUTDOWN_GRACE", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
}

impl Default for RuntimeArgs {
    fn default() -> Self {
        defaults()
    }
}

/// The validated [`RuntimeArgs`].
#[derive(Debug, Clone, Copy)]
pub struct RuntimeConfig {
    /// None: tokio's default, one worker thread per core.
    pub threads: Option<usize>,
    pub shutdown_grace: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig::try_from(&RuntimeArgs::default())
            .expect("the runtime's defaults are valid (tested)")
    }
}

impl TryFrom<&RuntimeArgs> for RuntimeConfig {
    type Error = ConfigError;

    fn try_from(a: &RuntimeArgs) -> Result<Self, ConfigError> {
        Ok(RuntimeConfig {
            threads: a
                .threads
                .map(|n| positive("POSTLINE_THREADS", n))
                .transpose()?,
            // Zero would abandon everything at once: no graceful shutdown at all.
            shutdown_grace: secs(
                "POSTLINE_SHUTDOWN_GRACE",
                positive("POSTLINE_SHUTDOWN_GRACE", a.shutdown_grace_secs)?,
            )?,
        })
    }
}

/// Everything `serve` takes.
#[derive(Debug, Clone, Default, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Development mode: a default JWT secret and a local Postgres if none is given.
    #[arg(long)]
    pub dev: bool,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub enqueue: EnqueueArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub admission: AdmissionArgs,
    #[command(flatten)]
    pub limits: LimitsArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
    #[command(flatten)]
    pub webhooks: WebhookArgs,
    #[command(flatten)]
    pub encryption: EncryptionArgs,
    #[command(flatten)]
    pub moderation: ModerationArgs,
    #[command(flatten)]
    pub moderation_hook: ModerationHookArgs,
}

impl ServerArgs {
    /// What is accepted but deserves an operator's attention, one sentence
    /// each: logged as warnings at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.dev && self.database.url.database_url.is_some() {
            out.push(if self.http.jwt_secret.is_none() {
                "--dev against DATABASE_URL: a real database is served with the PUBLIC dev \
                 JWT secret, so anyone can sign a token for any user of it; set \
                 POSTLINE_JWT_SECRET (it is used even with --dev) or drop --dev"
                    .to_owned()
            } else {
                "--dev against DATABASE_URL: POSTLINE_JWT_SECRET is used, but browser \
                 origins are not checked unless POSTLINE_ALLOWED_ORIGINS is set; drop --dev \
                 in production"
                    .to_owned()
            });
        }
        if self.gateway.outbox_capacity.is_some() {
            out.push(
                "POSTLINE_OUTBOX_CAPACITY is deprecated and ignored: outboxes are bounded \
                 in bytes, set POSTLINE_OUTBOX_BYTES instead"
                    .to_owned(),
            );
        }
        out
    }
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
    /// Time from the shutdown request to the return of `cli::serve`.
    pub shutdown_grace: Duration,
    pub admission: AdmissionConfig,
    /// Tokens living longer than this are refused.
    pub max_token_ttl: Duration,
    /// Browser origins allowed on `/ws` and the HTTP API (CORS).
    pub allowed_origins: Origins,
    pub limits: LimitsConfig,
    /// The operator token and the alerts.
    pub ops: OpsConfig,
    /// Demo users' tokens for the page at `/` (`--dev` only).
    pub dev_login: DevLogin,
    /// Credentials of the service API (`/v1/service/...`); empty: off.
    pub service_keys: ServiceKeys,
    /// Outgoing webhooks; `None` when no endpoint is set.
    pub webhooks: Option<WebhookConfig>,
    /// Keys message content is sealed under at rest; none: stored plain.
    pub encryption: EncryptionConfig,
    /// The word list and the review hook, each off unless set.
    pub moderation: ModerationConfig,
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
            .field("admission", &self.admission)
            .field("max_token_ttl", &self.max_token_ttl)
            .field("allowed_origins", &self.allowed_origins)
            .field("limits", &self.limits)
            .field("ops", &self.ops)
            .field("dev_login", &self.dev_login)
            .field("service_keys", &self.service_keys)
            .field("webhooks", &self.webhooks)
            .field("encryption", &self.encryption)
            .field("moderation", &self.moderation)
            .finish()
    }
}

impl Config {
    /// The defaults, on 127.0.0.1 port 0, with the given secret: for tests
    /// and local use.
    pub fn with_secret(secret: &str) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            gateway_id: uuid::Uuid::new_v4(),
            jwt_secret: secret.to_owned(),
            gateway: GatewayConfig::default(),
            enqueue: EnqueueConfig::default(),
            worker: WorkerConfig::default(),
            db_max_connections: DatabaseArgs::default().db_max_connections,
            shutdown_grace: RuntimeConfig::default().shutdown_grace,
            admission: AdmissionConfig::default(),
            max_token_ttl: Duration::from_secs(HttpArgs::default().max_token_ttl_secs),
            allowed_origins: Origins::default(),
            limits: LimitsConfig::default(),
            ops: OpsConfig {
                operator: OperatorAuth::NotConfigured,
                alerts: AlertConfig::default(),
            },
            dev_login: DevLogin::Off,
            service_keys: ServiceKeys::default(),
            webhooks: None,
            encryption: EncryptionConfig::default(),
            moderation: ModerationConfig::default(),
        }
    }

    /// `port_env` is the value of PORT (Fly.io), used when no listen address
    /// is given. Checks all of `args`, so also that a database URL is given
    /// (outside --dev), though `Config` does not keep it: the caller connects.
    pub fn from_args(args: &ServerArgs, port_env: Option<&str>) -> Result<Self, ConfigError> {
        let jwt_secret = match (&args.http.jwt_secret, args.dev) {
            (Some(s), _) if s.len() >= MIN_SECRET_BYTES => s.clone(),
            (Some(_), _) => return Err(ConfigError::WeakSecret),
            (None, true) => DEV_JWT_SECRET.to_owned(),
            (None, false) => return Err(ConfigError::MissingSecret),
        };
        if !args.dev {
            args.database.url.required()?;
        }
        let listen = match (args.http.listen, port_env) {
            (Some(addr), _) => addr,
            (None, Some(p)) => {
                let port: u16 = p.parse().map_err(|_| ConfigError::BadPort(p.to_owned()))?;
                SocketAddr::from(([0, 0, 0, 0], port))
            }
            (None, None) => SocketAddr::from(([0, 0, 0, 0], 8080)),
        };
        let shutdown_grace = RuntimeConfig::try_from(&args.runtime)?.shutdown_grace;
        Ok(Config {
            listen,
            gateway_id: args.gateway.gateway_id.unwrap_or_else(uuid::Uuid::new_v4),
            gateway: GatewayConfig::try_from(&args.gateway)?,
            enqueue: EnqueueConfig::try_from(&args.enqueue)?.within_grace(shutdown_grace),
            worker: WorkerConfig::try_from(&args.worker)?,
            db_max_connections: args.database.max_connections()?,
            shutdown_grace,
            admission: AdmissionConfig::new(
                &args.admission,
                args.database.max_connections()?,
                open_file_limit(),
            )?,
            // Zero would refuse every token.
            max_token_ttl: secs(
                "POSTLINE_MAX_TOKEN_TTL",
                positive("POSTLINE_MAX_TOKEN_TTL", args.http.max_token_ttl_secs)?,
            )?,
            allowed_origins: match (&args.http.allowed_origins, args.dev) {
                (Some(list), _) => Origins::parse(list)?,
                // Local development: pages served from anywhere may connect.
                (None, true) => Origins::Any,
                (None, false) => Origins::default(),
            },
            limits: LimitsConfig::try_from(&args.limits)?,
            ops: OpsConfig::new(&args.ops, args.dev)?,
            dev_login: DevLogin::for_server(args.dev, &jwt_secret),
            service_keys: ServiceKeys::parse(args.http.service_keys.as_deref().unwrap_or(""))?,
            webhooks: WebhookConfig::new(&args.webhooks)?,
            encryption: EncryptionConfig::new(&args.encryption)?,
            moderation: ModerationConfig {
                words: WordListConfig::new(&args.moderation)?,
                hook: ModerationHookConfig::new(&args.moderation_hook)?,
            },
            jwt_secret,
        })
    }
}

/// The defaults of an argument group: its clap defaults, parsed from an
/// empty command line. So each default is written only once, in the clap
/// attribute, and does not depend on who runs the code.
fn defaults<A: Args + clap::FromArgMatches>() -> A {
    // Cannot fail: every option of a group has a default or is optional, and
    // the unit tests build each group's defaults.
    parse_ignoring_env(&[]).expect("every option has a default or is optional")
}

/// An argument group from `argv` alone, the environment ignored.
fn parse_ignoring_env<A: Args + clap::FromArgMatches>(argv: &[&str]) -> Result<A, clap::Error> {
    let cmd = A::augment_args(clap::Command::new("postline").no_binary_name(true))
        .mut_args(|arg| arg.env(None));
    A::from_arg_matches(&cmd.try_get_matches_from(argv)?)
}

/// `v`, if it is greater than zero.
pub fn positive<T: PartialOrd + Default>(var: &'static str, v: T) -> Result<T, ConfigError> {
    if v > T::default() {
        Ok(v)
    } else {
        Err(ConfigError::NotPositive(var))
    }
}

fn bounded(var: &'static str, d: Option<Duration>) -> Result<Duration, ConfigError> {
    d.filter(|d| *d <= MAX_DURATION)
        .ok_or(ConfigError::TooLarge { var })
}

fn micros(var: &'static str, v: u64) -> Result<Duration, ConfigError> {
    bounded(var, Some(Duration::from_micros(v)))
}

fn millis(var: &'static str, v: u64) -> Result<Duration, ConfigError> {
    bounded(var, Some(Duration::from_millis(v)))
}

fn secs(var: &'static str, v: u64) -> Result<Duration, ConfigError> {
    bounded(var, Some(Duration::from_secs(v)))
}

fn hours(var: &'static str, v: u64) -> Result<Duration, ConfigError> {
    bounded(var, v.checked_mul(3600).map(Duration::from_secs))
}

#[cfg(test)]
mod tests;

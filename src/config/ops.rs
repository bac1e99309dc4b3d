//! What operators use (`serve` and `worker`): the operator token guarding
//! the dashboard's data and `/alerts`, the alert thresholds and webhook, and
//! where a standalone worker serves `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use super::{defaults, millis, positive, secs, ConfigError, MIN_SECRET_BYTES};

#[derive(Debug, Clone, Args)]
pub struct OpsArgs {
    /// Bearer token for `/dashboard/stats` and `/alerts` (at least 16
    /// bytes). Unset: they answer 403 outside --dev, and are open in --dev.
    #[arg(long, env = "POSTLINE_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,
    /// Seconds between evaluations of the alert rules.
    #[arg(long, env = "POSTLINE_ALERT_INTERVAL_SECS", default_value_t = 5)]
    pub alert_interval_secs: u64,
    /// Seconds over which dead-letter growth, persist p99 and the error
    /// rate are measured.
    #[arg(long, env = "POSTLINE_ALERT_WINDOW_SECS", default_value_t = 300)]
    pub alert_window_secs: u64,
    /// Fire when a queue's oldest job is older than this many seconds.
    #[arg(long, env = "POSTLINE_ALERT_OLDEST_JOB_SECS", default_value_t = 60)]
    pub alert_oldest_job_secs: u64,
    /// Fire when more than this many jobs were dead-lettered within the window.
    #[arg(long, env = "POSTLINE_ALERT_DEAD_LETTERS", default_value_t = 0)]
    pub alert_dead_letters: u64,
    /// Fire when enqueue→persisted p99 over the window exceeds this (ms).
    #[arg(long, env = "POSTLINE_ALERT_PERSIST_P99_MS", default_value_t = 1000)]
    pub alert_persist_p99_ms: u64,
    /// Fire when failed job attempts plus HTTP 5xx responses exceed this
    /// many per minute over the window.
    #[arg(long, env = "POSTLINE_ALERT_ERRORS_PER_MIN", default_value_t = 10)]
    pub alert_errors_per_min: u64,
    /// `http://host[:port]/path` to POST every alert transition to (JSON).
    /// https is not supported: point it at a local relay.
    #[arg(long, env = "POSTLINE_ALERT_WEBHOOK_URL")]
    pub alert_webhook_url: Option<String>,
}

impl Default for OpsArgs {
    fn default() -> Self {
        defaults()
    }
}

/// Where `postline worker` serves `/metrics`, `/healthz` and `/alerts`.
#[derive(Debug, Clone, Args)]
pub struct WorkerHttpArgs {
    #[arg(long, env = "POSTLINE_WORKER_LISTEN", default_value = "0.0.0.0:9091")]
    pub worker_listen: SocketAddr,
}

/// The operator token, compared in constant time and never printed.
#[derive(Clone)]
pub struct OperatorToken(String);

impl OperatorToken {
    /// Whether `given` is the token. Constant time in the token's contents,
    /// so a caller cannot find it a byte at a time by timing refusals.
    pub fn matches(&self, given: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), given.as_bytes())
    }
}

/// Whether `given` equals `secret`, in time that depends on neither's
/// contents (only on `secret`'s length).
pub(crate) fn constant_time_eq(secret: &[u8], given: &[u8]) -> bool {
    let mut diff = secret.len() ^ given.len();
    for (i, x) in secret.iter().enumerate() {
        diff |= usize::from(x ^ given.get(i).copied().unwrap_or(0));
    }
    std::hint::black_box(diff) == 0
}

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The HMAC key that signs outgoing requests (webhooks, the moderation
/// hook): at least [`MIN_SECRET_BYTES`], never printed.
#[derive(Clone)]
pub struct SigningSecret(String);

impl SigningSecret {
    /// `None` if `s` is shorter than [`MIN_SECRET_BYTES`].
    pub fn new(s: &str) -> Option<SigningSecret> {
        (s.len() >= MIN_SECRET_BYTES).then(|| SigningSecret(s.to_owned()))
    }

    /// The setting's value: `weak` if too short, `missing` if unset.
    pub(super) fn parse(
        given: Option<&str>,
        weak: ConfigError,
        missing: ConfigError,
    ) -> Result<SigningSecret, ConfigError> {
        SigningSecret::new(given.ok_or(missing)?).ok_or(weak)
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Who may read the dashboard's data and `/alerts`.
#[derive(Debug, Clone)]
pub enum OperatorAuth {
    /// Holders of the token.
    Token(OperatorToken),
    /// Anyone: `--dev` without a token.
    Open,
    /// No one: no token outside `--dev`.
    NotConfigured,
}

/// A webhook target: plain HTTP/1.1 only (see [`OpsArgs::alert_webhook_url`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// `host:port`, to connect to and to send as Host.
    pub authority: String,
    pub path: String,
}

impl WebhookUrl {
    /// `var` names the setting in the error.
    pub(super) fn parse(var: &'static str, url: &str) -> Result<WebhookUrl, ConfigError> {
        let bad = || ConfigError::BadWebhookUrl {
            var,
            url: url.to_owned(),
        };
        let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(ConfigError::HttpsWebhook { var }),
            _ => return Err(bad()),
        }
        let auth = uri
            .authority()
            .filter(|a| !a.host().is_empty())
            .ok_or_else(bad)?;
        if auth.as_str().contains('@') {
            return Err(bad());
        }
        Ok(WebhookUrl {
            authority: format!("{}:{}", auth.host(), auth.port_u16().unwrap_or(80)),
            path: uri
                .path_and_query()
                .map_or("/".to_owned(), |p| p.as_str().to_owned()),
        })
    }
}

/// `http://host:port/path`: how the endpoint is named in the
/// `webhook_deliveries` table and in logs.
impl std::fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// Alert thresholds and where transitions go.
#[derive(Debug, Clone)]
pub struct AlertConfig {
    pub interval: Duration,
    pub window: Duration,
    pub oldest_job: Duration,
    pub dead_letters: u64,
    pub persist_p99: Duration,
    pub errors_per_min: u64,
    pub webhook: Option<WebhookUrl>,
}

impl Default for AlertConfig {
    fn default() -> Self {
        OpsConfig::new(&OpsArgs::default(), true)
            .expect("the alerts' defaults are valid (tested)")
            .alerts
    }
}

/// The validated [`OpsArgs`].
#[derive(Debug, Clone)]
pub struct OpsConfig {
    pub operator: OperatorAuth,
    pub alerts: AlertConfig,
}

impl OpsConfig {
    /// `dev`: whether a missing token opens the data (`serve --dev`).
    pub fn new(a: &OpsArgs, dev: bool) -> Result<OpsConfig, ConfigError> {
        let operator = match &a.operator_token {
            Some(t) if t.len() >= MIN_SECRET_BYTES => OperatorAuth::Token(OperatorToken(t.clone())),
            Some(_) => return Err(ConfigError::WeakOperatorToken),
            None if dev => OperatorAuth::Open,
            None => OperatorAuth::NotConfigured,
        };
        Ok(OpsConfig {
            operator,
            alerts: AlertConfig {
                // Zero would evaluate (and query Postgres) in a tight loop.
                interval: secs(
                    "POSTLINE_ALERT_INTERVAL_SECS",
                    positive("POSTLINE_ALERT_INTERVAL_SECS", a.alert_interval_secs)?,
                )?,
                // Zero would measure nothing.
                window: secs(
                    "POSTLINE_ALERT_WINDOW_SECS",
                    positive("POSTLINE_ALERT_WINDOW_SECS", a.alert_window_secs)?,
                )?,
                // Zero is meaningful for the thresholds: fire on anything.
                oldest_job: secs("POSTLINE_ALERT_OLDEST_JOB_SECS", a.alert_oldest_job_secs)?,
                dead_letters: a.alert_dead_letters,
                persist_p99: millis("POSTLINE_ALERT_PERSIST_P99_MS", a.alert_persist_p99_ms)?,
                errors_per_min: a.alert_errors_per_min,
                webhook: a
                    .alert_webhook_url
                    .as_deref()
                    .filter(|u| !u.is_empty())
                    .map(|u| WebhookUrl::parse("POSTLINE_ALERT_WEBHOOK_URL", u))
                    .transpose()?,
            },
        })
    }
}

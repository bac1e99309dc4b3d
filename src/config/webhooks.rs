//! Outgoing webhooks (`serve` and `worker`): where chat events are POSTed,
//! the secret that signs them, and how long one attempt may take. Retries
//! use the worker's [`super::RetryPolicy`]: a delivery is a background job.

use std::time::Duration;

use clap::Args;

use super::{defaults, millis, positive, ConfigError, SigningSecret, WebhookUrl};

#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {
    /// Endpoints that receive every chat event, comma-separated
    /// `http://host[:port]/path` URLs. Unset: no webhooks. https is not
    /// supported (no TLS client): point them at a relay on a trusted network.
    #[arg(long, env = "POSTLINE_WEBHOOK_URLS")]
    pub webhook_urls: Option<String>,
    /// HMAC-SHA256 key of `Postline-Signature` (at least 16 bytes); required
    /// with POSTLINE_WEBHOOK_URLS.
    #[arg(long, env = "POSTLINE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Milliseconds one delivery attempt may take (connect, send, response
    /// head); longer counts as a failure and is retried with backoff.
    #[arg(long, env = "POSTLINE_WEBHOOK_TIMEOUT_MS", default_value_t = 10_000)]
    pub webhook_timeout_ms: u64,
    /// Deliveries in flight at once per process. Past this, webhook jobs wait
    /// in the queue; chat never waits for them.
    #[arg(long, env = "POSTLINE_WEBHOOK_CONCURRENCY", default_value_t = 16)]
    pub webhook_concurrency: usize,
}

impl Default for WebhookArgs {
    fn default() -> Self {
        defaults()
    }
}

/// The validated [`WebhookArgs`], present only when endpoints are set.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub endpoints: Vec<WebhookUrl>,
    pub secret: SigningSecret,
    pub timeout: Duration,
    pub concurrency: usize,
}

impl WebhookConfig {
    /// `None` when no endpoint is configured.
    pub fn new(a: &WebhookArgs) -> Result<Option<WebhookConfig>, ConfigError> {
        const VAR: &str = "POSTLINE_WEBHOOK_URLS";
        let mut endpoints: Vec<WebhookUrl> = Vec::new();
        for u in a
            .webhook_urls
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            let url = WebhookUrl::parse(VAR, u)?;
            if !endpoints.contains(&url) {
                endpoints.push(url);
            }
        }
        if endpoints.is_empty() {
            return Ok(None);
        }
        let secret = SigningSecret::parse(
            a.webhook_secret.as_deref(),
            ConfigError::WeakWebhookSecret,
            ConfigError::MissingWebhookSecret,
        )?;
        Ok(Some(WebhookConfig {
            endpoints,
            secret,
            // Zero would fail every attempt.
            timeout: millis(
                "POSTLINE_WEBHOOK_TIMEOUT_MS",
                positive("POSTLINE_WEBHOOK_TIMEOUT_MS", a.webhook_timeout_ms)?,
            )?,
            // Zero would deliver nothing.
            concurrency: positive("POSTLINE_WEBHOOK_CONCURRENCY", a.webhook_concurrency)?,
        }))
    }
}

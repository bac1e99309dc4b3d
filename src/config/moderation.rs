//! Moderation (docs/PROTOCOL.md, "Moderation"): the word list checked on
//! the send path before anything is broadcast (`serve`), and the review
//! hook called from the low-priority queue after a message is stored
//! (`serve` and `worker`; retries use the worker's [`super::RetryPolicy`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{defaults, millis, positive, ConfigError, SigningSecret, WebhookUrl};

/// What a message that matches the word list becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ModerationAction {
    /// Refused: the sender gets `moderated`; nothing is broadcast or stored.
    #[default]
    Reject,
    /// Delivered and stored with each matched character (but spaces) as `*`.
    Mask,
}

#[derive(Debug, Clone, Args)]
pub struct ModerationArgs {
    /// The word list: one word, phrase or `/regex/` a line, `#` comments
    /// (format in docs/PROTOCOL.md, "Moderation"). Read at start (a bad
    /// file refuses to start) and again on SIGHUP or when it changes (a bad
    /// file then keeps the list in use). Unset: no check.
    #[arg(long, env = "POSTLINE_MODERATION_FILE")]
    pub moderation_file: Option<PathBuf>,
    /// What a match does: `reject` or `mask`.
    #[arg(
        long,
        env = "POSTLINE_MODERATION_ACTION",
        value_enum,
        default_value = "reject"
    )]
    pub moderation_action: ModerationAction,
    /// Milliseconds between looks at the file's modification time and size;
    /// 0: reload on SIGHUP only.
    #[arg(long, env = "POSTLINE_MODERATION_POLL_MS", default_value_t = 2000)]
    pub moderation_poll_ms: u64,
}

impl Default for ModerationArgs {
    fn default() -> Self {
        defaults()
    }
}

/// The validated [`ModerationArgs`], present only when a file is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordListConfig {
    pub path: PathBuf,
    pub action: ModerationAction,
    /// None: SIGHUP only.
    pub poll: Option<Duration>,
}

impl WordListConfig {
    pub fn new(a: &ModerationArgs) -> Result<Option<WordListConfig>, ConfigError> {
        let Some(path) = a.moderation_file.clone() else {
            return Ok(None);
        };
        let poll = millis("POSTLINE_MODERATION_POLL_MS", a.moderation_poll_ms)?;
        Ok(Some(WordListConfig {
            path,
            action: a.moderation_action,
            poll: (!poll.is_zero()).then_some(poll),
        }))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ModerationHookArgs {
    /// `http://host[:port]/path` that reviews every stored message (text,
    /// image, file; not `system`) after the fact and may retract it. Unset:
    /// no review. https is refused (no TLS client). Set the same value on
    /// `serve` and `worker`.
    #[arg(long, env = "POSTLINE_MODERATION_HOOK_URL")]
    pub moderation_hook_url: Option<String>,
    /// HMAC-SHA256 key of the hook's `Postline-Signature` (at least 16
    /// bytes); required with POSTLINE_MODERATION_HOOK_URL.
    #[arg(long, env = "POSTLINE_MODERATION_HOOK_SECRET", hide_env_values = true)]
    pub moderation_hook_secret: Option<String>,
    /// Milliseconds one review may take (connect, send, answer); longer
    /// counts as a failure and is retried with backoff.
    #[arg(
        long,
        env = "POSTLINE_MODERATION_HOOK_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub moderation_hook_timeout_ms: u64,
    /// Reviews in flight at once per worker process. Past this, review jobs
    /// wait in the queue; chat never waits for them.
    #[arg(
        long,
        env = "POSTLINE_MODERATION_HOOK_CONCURRENCY",
        default_value_t = 8
    )]
    pub moderation_hook_concurrency: usize,
}

impl Default for ModerationHookArgs {
    fn default() -> Self {
        defaults()
    }
}

/// The validated [`ModerationHookArgs`], present only when a URL is set.
#[derive(Debug, Clone)]
pub struct ModerationHookConfig {
    pub url: WebhookUrl,
    pub secret: SigningSecret,
    pub timeout: Duration,
    pub concurrency: usize,
}

impl ModerationHookConfig {
    /// `None` when no URL is configured.
    pub fn new(a: &ModerationHookArgs) -> Result<Option<ModerationHookConfig>, ConfigError> {
        const VAR: &str = "POSTLINE_MODERATION_HOOK_URL";
        let Some(url) = a
            .moderation_hook_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        else {
            return Ok(None);
        };
        let url = WebhookUrl::parse(VAR, url)?;
        let secret = SigningSecret::parse(
            a.moderation_hook_secret.as_deref(),
            ConfigError::WeakModerationHookSecret,
            ConfigError::MissingModerationHookSecret,
        )?;
        Ok(Some(ModerationHookConfig {
            url,
            secret,
            // Zero would fail every review.
            timeout: millis(
                "POSTLINE_MODERATION_HOOK_TIMEOUT_MS",
                positive(
                    "POSTLINE_MODERATION_HOOK_TIMEOUT_MS",
                    a.moderation_hook_timeout_ms,
                )?,
            )?,
            // Zero would review nothing.
            concurrency: positive(
                "POSTLINE_MODERATION_HOOK_CONCURRENCY",
                a.moderation_hook_concurrency,
            )?,
        }))
    }
}

/// Both halves of moderation; each off unless configured.
#[derive(Debug, Clone, Default)]
pub struct ModerationConfig {
    pub words: Option<WordListConfig>,
    pub hook: Option<ModerationHookConfig>,
}

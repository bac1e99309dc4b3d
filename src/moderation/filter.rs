//! The synchronous check: the current [`WordList`] behind an `ArcSwap`, so
//! the send path reads it with no lock (a load is a few atomic operations
//! on a thread-local slot, never contended), and a reload swaps a whole new
//! list in. A reload that fails keeps the list in use and says why in the log.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::words::{ListError, WordList, MAX_FILE_BYTES};
use crate::config::{ModerationAction, WordListConfig};
use crate::domain::{Content, MessageKind};
use crate::telemetry::Metrics;

/// Why the word list could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("POSTLINE_MODERATION_FILE {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("POSTLINE_MODERATION_FILE {path}: {size} bytes, over the {MAX_FILE_BYTES}-byte limit")]
    TooBig { path: PathBuf, size: u64 },
    #[error("POSTLINE_MODERATION_FILE {path}: {error}")]
    List { path: PathBuf, error: ListError },
}

/// What the check decided about one message or edit.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Nothing matched: send it as it is.
    Clean,
    /// It matched and the action is `reject`: refuse it with `moderated`.
    Rejected,
    /// It matched and the action is `mask`: send this instead.
    Masked(Content),
}

/// The word list in use and what a match does. Shared by every session.
pub struct Filter {
    list: ArcSwap<WordList>,
    action: ModerationAction,
    /// Where reloads read from (None: built from a list in memory).
    path: Option<PathBuf>,
    metrics: Arc<Metrics>,
}

impl Filter {
    /// A filter over `list`, never reloaded (unit tests, benches).
    pub fn new(list: WordList, action: ModerationAction) -> Filter {
        Filter {
            list: ArcSwap::from_pointee(list),
            action,
            path: None,
            metrics: Arc::default(),
        }
    }

    /// Read and compile the configured file: at start, where a bad file
    /// refuses to start.
    pub fn load(cfg: &WordListConfig, metrics: Arc<Metrics>) -> Result<Filter, LoadError> {
        let list = read_list(&cfg.path)?;
        Ok(Filter {
            list: ArcSwap::from_pointee(list),
            action: cfg.action,
            path: Some(cfg.path.clone()),
            metrics,
        })
    }

    /// Check a message (or an edit) of `kind` from a user. What is read:
    /// a text's content; an image's or file's `name` (what others read; the
    /// url and mime are left alone: masking would break the link, and the
    /// review hook sees them whole); never a `system` message, which only
    /// the application posts (SQL and the service API are trusted).
    pub fn check(&self, kind: MessageKind, content: &Content) -> Verdict {
        let text = match kind {
            MessageKind::Text => content.as_json().as_str(),
            MessageKind::Image | MessageKind::File => {
                content.as_json().get("name").and_then(|n| n.as_str())
            }
            MessageKind::System => None,
        };
        let Some(text) = text else {
            return Verdict::Clean;
        };
        let list = self.list.load();
        let verdict = match self.action {
            ModerationAction::Reject if list.is_match(text) => Verdict::Rejected,
            ModerationAction::Reject => Verdict::Clean,
            ModerationAction::Mask => match list.mask(text) {
                None => Verdict::Clean,
                Some(masked) => match masked_content(kind, content, masked) {
                    Some(c) => Verdict::Masked(c),
                    // Cannot happen (masking keeps a valid content valid);
                    // refusing is the safe side if it ever did.
                    None => Verdict::Rejected,
                },
            },
        };
        let m = &self.metrics.moderation;
        match verdict {
            Verdict::Clean => {}
            Verdict::Rejected => {
                m.rejected.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Masked(_) => {
                m.masked.fetch_add(1, Ordering::Relaxed);
            }
        }
        verdict
    }

    /// How many words and /patterns/ the list in use holds.
    pub fn counts(&self) -> (usize, usize) {
        self.list.load().counts()
    }

    /// Read the file again and swap the new list in; on any error the list
    /// in use stays. Returns the new list's (words, patterns).
    pub fn reload(&self) -> Result<(usize, usize), LoadError> {
        let Some(path) = &self.path else {
            return Ok(self.list.load().counts());
        };
        let m = &self.metrics.moderation;
        match read_list(path) {
            Ok(list) => {
                let counts = list.counts();
                self.list.store(Arc::new(list));
                m.reloaded.fetch_add(1, Ordering::Relaxed);
                Ok(counts)
            }
            Err(e) => {
                m.reload_failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Reload on SIGHUP, and every `poll` when the file's modification time
    /// or size changed, until `stop`. Reads and compiles off the runtime's
    /// threads: a large list takes milliseconds to build.
    pub async fn watch(self: Arc<Self>, poll: Option<Duration>, stop: CancellationToken) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; the moderation list reloads only when the file changes");
                None
            }
        };
        let mut seen = stamp(&path).await;
        // With no poll, a tick that never comes.
        let period = poll.unwrap_or(Duration::from_secs(86_400 * 365));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let why = tokio::select! {
                _ = stop.cancelled() => return,
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => "SIGHUP",
                _ = tick.tick(), if poll.is_some() => {
                    let now = stamp(&path).await;
                    if now == seen {
                        continue;
                    }
                    "the file changed"
                }
            };
            // Taken before reading: a write that lands during the read
            // changes the stamp again and is read on the next tick.
            seen = stamp(&path).await;
            let filter = self.clone();
            match tokio::task::spawn_blocking(move || filter.reload()).await {
                Ok(Ok((words, patterns))) => {
                    tracing::info!(path = %path.display(), words, patterns, why, "moderation word list reloaded")
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, why, "moderation word list NOT reloaded; the previous list stays in use")
                }
                Err(e) => tracing::error!(error = %e, "moderation reload task failed"),
            }
        }
    }
}

/// What tells a changed file apart without reading it.
async fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = tokio::fs::metadata(path).await.ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn read_list(path: &Path) -> Result<WordList, LoadError> {
    let read = |error| LoadError::Read {
        path: path.to_owned(),
        error,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_FILE_BYTES {
        return Err(LoadError::TooBig {
            path: path.to_owned(),
            size,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    WordList::parse(&text).map_err(|error| LoadError::List {
        path: path.to_owned(),
        error,
    })
}

/// `content` with its checked text replaced by `masked`, validated again as
/// any content is (masking only shortens and never blanks a text).
fn masked_content(kind: MessageKind, content: &Content, masked: String) -> Option<Content> {
    let value = match kind {
        MessageKind::Text => serde_json::Value::String(masked),
        _ => {
            let mut v = content.as_json().clone();
            *v.get_mut("name")? = serde_json::Value::String(masked);
            v
        }
    };
    Content::parse(kind, value, usize::MAX).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn filter(action: ModerationAction) -> Filter {
        Filter::new(WordList::parse("darn\n/sp[a@]m+/\n").unwrap(), action)
    }

    fn text(s: &str) -> Content {
        Content::parse(MessageKind::Text, json!(s), 4096).unwrap()
    }

    #[test]
    fn reject_refuses_a_match_and_passes_the_rest() {
        let f = filter(ModerationAction::Reject);
        assert_eq!(
            f.check(MessageKind::Text, &text("oh DARN")),
            Verdict::Rejected
        );
        assert_eq!(
            f.check(MessageKind::Text, &text("buy SP@MMM")),
            Verdict::Rejected
        );
        assert_eq!(
            f.check(MessageKind::Text, &text("darning socks")),
            Verdict::Clean
        );
    }

    #[test]
    fn mask_replaces_the_match_and_keeps_the_kind_valid() {
        let f = filter(ModerationAction::Mask);
        assert_eq!(
            f.check(MessageKind::Text, &text("oh darn it")),
            Verdict::Masked(text("oh **** it"))
        );
        let file = Content::parse(
            MessageKind::File,
            json!({"url": "https://x/darn.pdf", "name": "darn report.pdf", "size": 3}),
            4096,
        )
        .unwrap();
        let Verdict::Masked(c) = f.check(MessageKind::File, &file) else {
            panic!("the name matched");
        };
        assert_eq!(
            c.as_json(),
            &json!({"url": "https://x/darn.pdf", "name": "**** report.pdf", "size": 3}),
            "the name is masked, the url left whole"
        );
    }

    #[test]
    fn system_messages_and_nameless_attachments_are_not_read() {
        let f = filter(ModerationAction::Reject);
        let system = Content::parse(MessageKind::System, json!("darn"), 4096).unwrap();
        assert_eq!(f.check(MessageKind::System, &system), Verdict::Clean);
        let image = Content::parse(
            MessageKind::Image,
            json!({"url": "https://x/darn.png"}),
            4096,
        )
        .unwrap();
        assert_eq!(f.check(MessageKind::Image, &image), Verdict::Clean);
    }

    #[test]
    fn a_reload_swaps_the_list_and_a_bad_file_keeps_the_old_one() {
        let dir = std::env::temp_dir().join(format!("postline-mod-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("words.txt");
        std::fs::write(&path, "first\n").unwrap();
        let cfg = WordListConfig {
            path: path.clone(),
            action: ModerationAction::Reject,
            poll: None,
        };
        let metrics = Arc::new(Metrics::default());
        let f = Filter::load(&cfg, metrics.clone()).unwrap();
        assert_eq!(
            f.check(MessageKind::Text, &text("first")),
            Verdict::Rejected
        );

        std::fs::write(&path, "second\n").unwrap();
        assert_eq!(f.reload().unwrap(), (1, 0));
        assert_eq!(f.check(MessageKind::Text, &text("first")), Verdict::Clean);
        assert_eq!(
            f.check(MessageKind::Text, &text("second")),
            Verdict::Rejected
        );

        std::fs::write(&path, "third\n/(unclosed/\n").unwrap();
        let e = f.reload().unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert_eq!(
            f.check(MessageKind::Text, &text("second")),
            Verdict::Rejected
        );
        assert_eq!(f.check(MessageKind::Text, &text("third")), Verdict::Clean);
        assert_eq!(metrics.moderation.reloaded.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.moderation.reload_failed.load(Ordering::Relaxed), 1);

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(f.reload(), Err(LoadError::Read { .. })));
        assert!(matches!(
            Filter::load(&cfg, metrics),
            Err(LoadError::Read { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! The moderation review hook's wire shapes (docs/PROTOCOL.md,
//! "Moderation"): what is POSTed about a stored message, and the answers
//! the endpoint may give.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::server::StoredView;
use crate::domain::StoredMessage;

/// The longest reason kept; a longer one is cut (at a character boundary).
pub const MAX_REASON_BYTES: usize = 256;
/// The reason of a `retract` that gives none.
pub const DEFAULT_REASON: &str = "moderated";

/// `{"id","type":"message.review","created_at","data":{"message"}}`: the
/// same envelope as webhook events. `id` (also `Postline-Event-Id`) is the
/// same for every attempt at one version of one message.
#[derive(Serialize)]
pub struct Review<'a> {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub created_at: DateTime<Utc>,
    pub data: ReviewData<'a>,
}

#[derive(Serialize)]
pub struct ReviewData<'a> {
    pub message: StoredView<'a>,
}

impl<'a> Review<'a> {
    pub fn new(m: &'a StoredMessage) -> Self {
        Review {
            id: Self::id_of(m),
            kind: "message.review",
            created_at: crate::domain::now_micros(),
            data: ReviewData { message: m.into() },
        }
    }

    /// One id per (message, version): a retried review keeps it, an edit's
    /// review gets its own.
    pub fn id_of(m: &StoredMessage) -> Uuid {
        Uuid::new_v5(&m.message.id.0, m.version.to_string().as_bytes())
    }
}

/// The endpoint's answer, a 2xx with `{"action":"allow"}` or
/// `{"action":"retract","reason"?:string}`. Anything else is a failed
/// attempt, retried.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Answer {
    Allow,
    Retract {
        #[serde(default)]
        reason: Option<String>,
    },
}

impl Answer {
    pub fn parse(body: &[u8]) -> Result<Answer, String> {
        serde_json::from_slice(body).map_err(|e| {
            format!(
                "the answer is not {{\"action\":\"allow\"}} or {{\"action\":\"retract\",\"reason\":...}}: {e}"
            )
        })
    }
}

/// A retraction's reason as kept and broadcast: trimmed, never empty, at
/// most [`MAX_REASON_BYTES`].
pub fn reason(given: Option<&str>) -> &str {
    let r = given.map(str::trim).filter(|r| !r.is_empty());
    let Some(r) = r else {
        return DEFAULT_REASON;
    };
    let mut end = r.len().min(MAX_REASON_BYTES);
    while !r.is_char_boundary(end) {
        end -= 1;
    }
    &r[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_anything_else_is_refused() {
        assert_eq!(Answer::parse(br#"{"action":"allow"}"#), Ok(Answer::Allow));
        assert_eq!(
            Answer::parse(br#"{"action":"retract","reason":"spam"}"#),
            Ok(Answer::Retract {
                reason: Some("spam".into())
            })
        );
        assert_eq!(
            Answer::parse(br#"{"action":"retract"}"#),
            Ok(Answer::Retract { reason: None })
        );
        assert!(Answer::parse(b"").is_err());
        assert!(Answer::parse(br#"{"action":"ban"}"#).is_err());
        assert!(Answer::parse(br#"{"ok":true}"#).is_err());
    }

    #[test]
    fn reasons_are_trimmed_defaulted_and_cut_at_a_character() {
        assert_eq!(reason(Some("  spam ")), "spam");
        assert_eq!(reason(Some("   ")), DEFAULT_REASON);
        assert_eq!(reason(None), DEFAULT_REASON);
        let long = "é".repeat(200);
        let cut = reason(Some(&long));
        assert!(cut.len() <= MAX_REASON_BYTES && cut.chars().all(|c| c == 'é'));
    }
}

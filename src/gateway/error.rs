//! Why a client event was refused: one enum for every handler, mapped to the
//! contract's error code, message and extra fields in one place.

use bytes::Bytes;

use crate::protocol::server::{self, ErrorDetail};
use crate::protocol::ErrorCode;
use crate::store::EditRefusal;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    #[error("join the conversation first")]
    NotJoined,
    #[error("not joined to this conversation")]
    NotInRoom,
    #[error("not a member of this conversation")]
    NotMember,
    #[error("no such conversation")]
    NoSuchConversation,
    /// Postgres did not answer; the request may succeed if repeated.
    #[error("the database is unavailable; retry shortly")]
    DatabaseUnavailable,
    #[error("too many messages waiting to be stored; retry shortly")]
    PersistBufferFull,
    #[error("too much background work queued; retry shortly")]
    BackgroundBufferFull,
    #[error(
        "the message could not be made durable; send it again with the same client_message_id"
    )]
    NotDurable,
    #[error("the original of this message could not be made durable; send it again with the same client_message_id")]
    OriginalNotDurable,
    #[error("the receipt could not be stored; send it again")]
    ReceiptNotStored,
    /// Postgres refused the job on its own merits: it can never be stored.
    #[error("the message cannot be stored: {0}")]
    Unstorable(String),
    #[error("{what}: retry after {retry_after_ms} ms")]
    RateLimited {
        what: &'static str,
        retry_after_ms: u64,
    },
    #[error("no such message (or not stored yet: wait for message_persisted)")]
    NoSuchMessage,
    #[error("only the sender may change a message")]
    NotSender,
    #[error("only text messages can be edited")]
    NotText,
    #[error("{}", if *.deleted { "the message was deleted" } else { "the message changed since that version" })]
    Conflict { current_version: i32, deleted: bool },
    #[error("timed out; sync this conversation on its own")]
    TimedOut,
    #[error("this connection has joined {limit} conversations, the most allowed; leave one first")]
    TooManyJoined { limit: usize },
    /// `refresh_token` with a token that does not verify (the reason, in words).
    #[error("{0}; the connection keeps its current token")]
    BadToken(String),
    #[error("the token is for another user; the connection keeps its current token")]
    TokenForAnotherUser,
    /// The text matched the moderation word list (action `reject`).
    #[error("the message contains words or patterns this server does not accept; it was not sent")]
    Moderated,
}

impl HandlerError {
    pub fn code(&self) -> ErrorCode {
        use HandlerError::*;
        match self {
            NotJoined | NotInRoom => ErrorCode::NotJoined,
            NotMember | NotSender | TokenForAnotherUser => ErrorCode::Forbidden,
            BadToken(_) => ErrorCode::Unauthorized,
            NoSuchConversation | NoSuchMessage => ErrorCode::NotFound,
            DatabaseUnavailable | PersistBufferFull | BackgroundBufferFull | NotDurable
            | OriginalNotDurable | ReceiptNotStored | TimedOut => ErrorCode::Unavailable,
            Unstorable(_) | NotText | TooManyJoined { .. } => ErrorCode::Invalid,
            RateLimited { .. } => ErrorCode::RateLimited,
            Conflict { .. } => ErrorCode::Conflict,
            Moderated => ErrorCode::Moderated,
        }
    }

    pub fn detail(&self) -> Option<ErrorDetail> {
        match *self {
            HandlerError::RateLimited { retry_after_ms, .. } => {
                Some(ErrorDetail::RetryAfter { retry_after_ms })
            }
            HandlerError::Conflict {
                current_version,
                deleted,
            } => Some(ErrorDetail::Conflict {
                current_version,
                deleted,
            }),
            _ => None,
        }
    }

    /// The `error` frame answering the request `r#ref`.
    pub fn frame(&self, r#ref: Option<&str>) -> Bytes {
        server::error_with(r#ref, self.code(), &self.to_string(), self.detail())
    }

    /// A store failure: logged here (with what was being done), reported to
    /// the client as a retryable outage.
    /// Over a rate limit: wait `wait`, rounded up to whole milliseconds so
    /// a client that waits exactly that long is let through.
    pub fn rate_limited(what: &'static str, wait: std::time::Duration) -> Self {
        let ms = wait.as_nanos().div_ceil(1_000_000);
        HandlerError::RateLimited {
            what,
            retry_after_ms: u64::try_from(ms).unwrap_or(u64::MAX),
        }
    }

    pub fn database(doing: &'static str, e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "{doing} failed");
        HandlerError::DatabaseUnavailable
    }
}

impl From<EditRefusal> for HandlerError {
    fn from(r: EditRefusal) -> Self {
        match r {
            EditRefusal::NotFound => HandlerError::NoSuchMessage,
            EditRefusal::NotSender => HandlerError::NotSender,
            EditRefusal::NotText => HandlerError::NotText,
            EditRefusal::Conflict {
                current_version,
                deleted,
            } => HandlerError::Conflict {
                current_version,
                deleted,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_contract_code_and_fields() {
        let v: serde_json::Value = serde_json::from_slice(
            &HandlerError::Conflict {
                current_version: 3,
                deleted: true,
            }
            .frame(Some("r")),
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "error", "ref": "r", "code": "conflict",
                "message": "the message was deleted", "current_version": 3, "deleted": true})
        );
        let e = HandlerError::RateLimited {
            what: "typing",
            retry_after_ms: 40,
        };
        assert_eq!(e.code(), ErrorCode::RateLimited);
        assert_eq!(
            e.detail(),
            Some(ErrorDetail::RetryAfter { retry_after_ms: 40 })
        );
        assert_eq!(HandlerError::NotJoined.code(), ErrorCode::NotJoined);
        assert_eq!(
            HandlerError::from(EditRefusal::NotText).code(),
            ErrorCode::Invalid
        );
    }
}

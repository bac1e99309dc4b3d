//! Moderation, in two halves (docs/PROTOCOL.md, "Moderation"):
//!
//! - [`Filter`]: the synchronous check of a user's send or edit against the
//!   word list of `POSTLINE_MODERATION_FILE` ([`words`]: whole words,
//!   phrases and `/regex/`), before anything is broadcast or queued: a
//!   match is refused (`moderated`) or masked, by `POSTLINE_MODERATION_ACTION`.
//!   Read lock-free on the send path; reloaded without a restart on SIGHUP
//!   or when the file changes, a bad file keeping the list in use.
//! - [`Reviewer`]: the asynchronous review hook ([`hook`]), called from the
//!   low-priority queue after a message is stored; it may retract the message
//!   (a tombstone, and `message_deleted` with a reason to every member).
//!
//! What is trusted: `system` messages, and whatever an application posts
//! through SQL (`postline.publish()`) or the service API, is never checked
//! by the word list (it is the gateway's check, on user input); the review
//! hook sees every stored message but `system` ones, whatever its source.

mod filter;
mod hook;
pub mod words;

pub use filter::{Filter, LoadError, Verdict};
pub use hook::Reviewer;

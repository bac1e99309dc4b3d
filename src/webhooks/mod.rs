//! Outgoing webhooks: chat events POSTed, signed, to the endpoints in
//! `POSTLINE_WEBHOOK_URLS` (docs/INTEGRATION.md, "Webhooks").
//!
//! - producers (the worker's persist batch, `store`'s edits, members and
//!   conversations) write one `webhook_deliveries` row and one background
//!   job per (event, endpoint) in their own transaction
//!   ([`crate::queue::webhooks`]);
//! - the worker hands those jobs to the [`Deliverer`], a bounded pool beside
//!   it ([`pool`], which moderation's review hook runs on too), so no HTTP
//!   ever runs inside a worker batch;
//! - [`sign`] makes `Postline-Signature`; [`post`] is the one HTTP POST
//!   (the alert webhook sends with it too).
//!
//! Order: deliveries of one conversation to one endpoint are sent one at a
//! time in commit order; the next waits until the one before was delivered
//! or dead-lettered.

mod deliver;
pub mod pool;
pub mod post;
pub mod sign;

pub use deliver::Deliverer;
pub use pool::PoolHandle;
pub use post::PostError;

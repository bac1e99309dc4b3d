//! # Postline
//!
//! Real-time chat over WebSocket, with every message made durable through a
//! queue that lives in Postgres (pgmq). One Postgres, nothing else to run.
//!
//! # Layout
//! Imports flow down this list, never up.
//! - [`config`]: one `Config` and every part's settings; flags mirrored by
//!   env vars, each default written once, bad values refused at start.
//!   Imports nothing from the crate.
//! - [`domain`]: ids, `Seq`, validated values, the message at each stage
//!   (`Message` accepted, `StoredMessage` with its seq). No I/O.
//! - [`protocol`]: every wire shape. `client` decodes frames into events
//!   (nesting depth checked first by `depth`); `server` encodes each server
//!   frame once into shared `Bytes`; `http` types the API's bodies. No sockets.
//! - [`crypto`]: message content sealed at rest (AES-256-GCM) under the
//!   configured keys, bound to its row; pure functions, no I/O.
//! - [`auth`]: HS256 JWT verify/issue. [`telemetry`]: logs, counters, and
//!   their recent history (`window`) for rates and p50/p99.
//!   [`limits`]: keyed rate limits (governor) answering allow or retry-after,
//!   bounded in keys; imports only `config` and `domain`.
//! - [`rooms`]: conversation -> joined connections; fan-out of pre-encoded
//!   frames into bounded outboxes; the ledger `sync` relies on for no gap and
//!   no duplicate. Memory only, never awaits under a lock.
//! - [`store`]: the chat tables and the schema. [`queue`]: pgmq, every call
//!   taking an executor, and the gateway's batching enqueuer; `queue::audit`
//!   records an audited action in the caller's transaction (one call,
//!   `audit::record`). [`notify`]: LISTEN/NOTIFY hints and the relay between
//!   gateways.
//! - [`webhooks`]: chat events POSTed, signed (HMAC-SHA256), to configured
//!   endpoints by a bounded pool beside the worker, from jobs the producers
//!   wrote in their own transactions; one HTTP POST shared with `alerts`.
//!   Never runs inside a worker batch.
//! - [`moderation`]: the word list checked before a user's message is
//!   broadcast (`Filter`: memory only, lock-free to read, reloaded in place),
//!   and the review hook that may retract a stored message (`Reviewer`, a
//!   pool beside the worker like webhooks'; retracts through `store` and
//!   tells gateways through `notify`). Never runs inside a worker batch.
//! - [`worker`]: queue -> messages table, job delete and NOTIFY in one
//!   transaction, through `store`, `queue` and `notify` (it also runs its own
//!   transaction with sqlx). Never touches a socket.
//! - [`gateway`]: WebSocket sessions; the one place an event enters
//!   (`session`), handlers by concern, and the one place a frame is
//!   published, here and to other gateways (`publish`). [`http`]: hyper
//!   server, admission (connection caps and timeouts), `/v1` API, health,
//!   `/ws` hand-off, the demo page at `/` (`web/demo/`, embedded) and its
//!   `--dev`-only sign-in. Only these two touch hyper's server and
//!   fastwebsockets (hyper's client: `webhooks::post`); only `store`,
//!   `queue`, `notify`, `worker` and `webhooks`' pool touch sqlx.
//! - [`alerts`]: threshold rules over the counters and the queue tables,
//!   evaluated in the process; `/alerts` and an optional webhook (sent with
//!   `webhooks::post`). Reads Postgres only through `store` and `queue`.
//! - [`cli`]: the composition root and shutdown order; `chat`, a client that
//!   speaks only the public contract.
//! - [`pglocal`]: a throwaway local Postgres for `--dev` and tests.

pub mod alerts;
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod gateway;
pub mod http;
pub mod limits;
pub mod moderation;
pub mod notify;
pub mod pglocal;
pub mod protocol;
pub mod queue;
pub mod rooms;
pub mod store;
pub mod telemetry;
pub mod webhooks;
pub mod worker;

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
//! - [`domain`]: ids, `Seq`, validated values. No I/O.
//! - [`protocol`]: client event decoding and server event encoding. No sockets.
//! - [`auth`]: HS256 JWT verify/issue. [`telemetry`]: logs and counters.
//! - [`rooms`]: conversation -> joined connections; fan-out of pre-encoded
//!   frames into bounded outboxes. Memory only, never awaits under a lock.
//! - [`store`]: the chat tables and the schema. [`queue`]: pgmq, every call
//!   taking an executor, and the gateway's batching enqueuer. [`notify`]:
//!   LISTEN/NOTIFY hints. Only these three touch sqlx.
//! - [`worker`]: queue -> messages table, job delete and NOTIFY in one
//!   transaction. Never touches a socket.
//! - [`gateway`]: WebSocket connections and event dispatch; the one place an
//!   event enters. [`http`]: hyper server, `/v1` API, health, `/ws` hand-off.
//!   Only these two touch hyper and fastwebsockets.
//! - [`cli`]: the composition root and shutdown order.
//! - [`pglocal`]: a throwaway local Postgres for `--dev` and tests.

pub mod auth;
pub mod cli;
pub mod config;
pub mod domain;
pub mod gateway;
pub mod http;
pub mod notify;
pub mod pglocal;
pub mod protocol;
pub mod queue;
pub mod rooms;
pub mod store;
pub mod telemetry;
pub mod worker;

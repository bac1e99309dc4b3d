//! End-to-end tests: the real server over real sockets, against a real
//! (throwaway) Postgres. One cluster for the whole run, one database per test.

mod harness;
mod raw;

mod alerts;
mod audit;
mod audit_log;
mod auth;
mod bad_input;
mod budgets;
mod chat;
mod cli;
mod demo;
mod durability;
mod encryption;
mod gateways;
mod http_api;
mod limits;
mod liveness;
mod moderation;
mod ops;
mod origins;
mod process;
mod publish;
mod realtime;
mod reliability;
mod room_presence;
mod service;
mod shutdown;
mod socketio;
mod sync;
mod webhooks;

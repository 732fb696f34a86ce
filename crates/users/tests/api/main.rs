//! The users API, black-box over HTTP, on both backends: SQLite + in-process cache, and
//! PostgreSQL + Redis. One binary (see `helpers.rs` for `spawn_app`).

mod accounts;
mod cache;
mod crud;
mod errors;
mod helpers;
mod parsers;

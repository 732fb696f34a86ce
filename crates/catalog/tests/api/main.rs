//! The catalog API, black-box over HTTP, on both backends: SQLite + in-process cache + in-process
//! bus, and PostgreSQL + Redis + NATS JetStream. One binary (see `helpers.rs` for `spawn_app`).

mod events;
mod helpers;
mod parsers;
mod products;
mod reservations;
mod stock;

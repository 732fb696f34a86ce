//! The orders service and its worker as users rely on them, through the gateway, on both
//! backends: SQLite + in-process cache and bus, and PostgreSQL + Redis + NATS.

mod flow;
mod helpers;
mod idempotency;
mod ownership;
mod rules;

//! The notification service as users and operators rely on it, on both backends: SQLite + the
//! in-process bus, and PostgreSQL + Redis + NATS, fed by the real users, catalog, orders and
//! worker services, delivering to an SMTP sink and webhook receivers the tests start.

mod delivery;
mod helpers;
mod ownership;
mod support;
mod webhook;

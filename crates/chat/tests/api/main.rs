//! The chat service as clients rely on it, on every store: SQLite + the in-process bus,
//! PostgreSQL + Redis + NATS, and DynamoDB (moto's server, `TEST_DYNAMODB_URL`) + the in-process
//! bus; the seed's sequence and the live streams also through the gateway.

mod chats;
mod helpers;
mod live;
mod messages;
mod seed;

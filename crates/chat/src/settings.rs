//! `[services.chat]`: the store, the bounds on what clients send, and the live streams' limits.
//! Read once at start; a bad value is a start-up error naming its key.

use kit::Settings;
use kit::config::ConfigError;
use serde::Deserialize;

use crate::NAME;

/// Where chats live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The service's SQLite file or PostgreSQL schema (`database.url`), the default.
    Sql,
    /// DynamoDB (`[services.chat.dynamodb]`).
    Dynamodb,
}

/// `[services.chat.dynamodb]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoSettings {
    /// A local DynamoDB (moto, DynamoDB Local); unset: AWS's endpoint for `region`.
    pub endpoint: Option<String>,
    pub region: String,
    /// Table names start with it: `<prefix>Chats`, `<prefix>ChatParticipants`,
    /// `<prefix>ChatMessages`, `<prefix>ChatOutbox`.
    pub table_prefix: String,
    /// Create missing tables (and the GSI) at start.
    pub create_tables: bool,
    /// The outbox relay's poll when nothing woke it.
    pub relay_poll_ms: u64,
}

impl Default for DynamoSettings {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".into(),
            table_prefix: String::new(),
            create_tables: true,
            relay_poll_ms: 500,
        }
    }
}

/// `[services.chat]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatSettings {
    pub store: StoreKind,
    /// Largest `metadata` object, as JSON bytes (422 beyond).
    pub max_metadata_bytes: usize,
    /// Longest chat name, in characters.
    pub max_name_chars: usize,
    /// Longest message text, in bytes.
    pub max_text_bytes: usize,
    /// Most participant ids one `POST /chats/{id}/participants` adds.
    pub max_participants_per_request: usize,
    /// WebSocket subscribers of one chat on one replica; beyond: 503 `too_many_subscribers`.
    pub max_subscribers_per_chat: usize,
    /// A ping to every subscriber this often; one that has not answered for three is closed.
    pub heartbeat_secs: u64,
    pub dynamodb: DynamoSettings,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            store: StoreKind::Sql,
            max_metadata_bytes: 16 * 1024,
            max_name_chars: 200,
            max_text_bytes: 8 * 1024,
            max_participants_per_request: 100,
            max_subscribers_per_chat: 1000,
            heartbeat_secs: 20,
            dynamodb: DynamoSettings::default(),
        }
    }
}

impl ChatSettings {
    pub fn load(settings: &Settings) -> Result<Self, ConfigError> {
        let loaded: Self = settings.section(NAME)?;
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: format!("services.{NAME}.{key}"),
            message: message.to_owned(),
        };
        for (key, value) in [
            ("max_metadata_bytes", loaded.max_metadata_bytes),
            ("max_name_chars", loaded.max_name_chars),
            ("max_text_bytes", loaded.max_text_bytes),
            (
                "max_participants_per_request",
                loaded.max_participants_per_request,
            ),
            ("max_subscribers_per_chat", loaded.max_subscribers_per_chat),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if loaded.heartbeat_secs == 0 {
            return Err(invalid("heartbeat_secs", "must be at least 1"));
        }
        let prefix = &loaded.dynamodb.table_prefix;
        if !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            || prefix.len() > 200
        {
            return Err(invalid(
                "dynamodb.table_prefix",
                "letters, digits, `_`, `-` and `.` only (DynamoDB table names)",
            ));
        }
        Ok(loaded)
    }
}

//! What the chat service stores and shows, the same on every store: chats, participants,
//! messages, the opaque cursors of its pages, and the events that announce changes.

use chrono::{DateTime, SubsecRound as _, Utc};
use kit::event::Event;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The `source` of the chat service's events.
pub const SOURCE: &str = "chat";
pub const CHAT_CREATED: &str = "chat.created";
pub const CHAT_DELETED: &str = "chat.deleted";
pub const PARTICIPANT_ADDED: &str = "chat.participant_added";
pub const PARTICIPANT_REMOVED: &str = "chat.participant_removed";
pub const MESSAGE_POSTED: &str = "chat.message_posted";
/// Every topic the service publishes (its replicas listen to them all, for the live streams).
pub const TOPICS: &str = "chat.>";

/// Timestamps as stored: microseconds, as PostgreSQL keeps them.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A new chat id, `chat-` and 32 hex digits (a UUID v7: ids sort by creation time).
pub fn new_chat_id() -> String {
    format!("chat-{}", uuid::Uuid::now_v7().simple())
}

/// A new message id (UUID v7).
pub fn new_message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A chat without its participants (as listed for a participant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Chat {
    #[schema(example = "chat-0193a1b2c3d4e5f60718293a4b5c6d7e")]
    pub id: String,
    #[schema(example = "Project Alpha")]
    pub name: String,
    /// Any JSON object the client gave.
    #[schema(value_type = Object, example = json!({"type": "project"}))]
    pub metadata: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// One participant of a chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Participant {
    #[schema(example = "user-1")]
    pub participant_id: String,
    pub joined_at: DateTime<Utc>,
}

/// A chat with its participants (`GET /chats/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChatWithParticipants {
    #[serde(flatten)]
    pub chat: Chat,
    /// By participant id.
    pub participants: Vec<Participant>,
}

/// A message of a chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChatMessage {
    #[schema(example = "0193a1b2-c3d4-7e5f-8071-8293a4b5c6d7")]
    pub id: String,
    #[schema(example = "chat-0193a1b2c3d4e5f60718293a4b5c6d7e")]
    pub chat_id: String,
    /// The message's place in its chat: 1, 2, 3, ... in the order they were posted.
    #[schema(example = 1)]
    pub seq: i64,
    #[schema(example = "user-1")]
    pub sender_id: String,
    #[schema(example = "Hello!")]
    pub text: String,
    pub created_at: DateTime<Utc>,
}

/// What removing a participant found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Removed,
    NoChat,
    NotAParticipant,
}

/// What posting a message found.
#[derive(Debug, Clone, PartialEq)]
pub enum PostOutcome {
    Posted(ChatMessage),
    NoChat,
    NotAParticipant,
}

/// An opaque page cursor: a store's position, hex-encoded with a version tag, so clients cannot
/// build one (and a store can change what is inside).
pub fn encode_cursor(position: &str) -> String {
    format!("c1{}", hex::encode(position))
}

/// The position in a cursor; `None` for anything [`encode_cursor`] did not make.
pub fn decode_cursor(cursor: &str) -> Option<String> {
    let bytes = hex::decode(cursor.strip_prefix("c1")?).ok()?;
    String::from_utf8(bytes).ok()
}

fn event(topic: &str, chat_id: &str, data: serde_json::Value) -> anyhow::Result<Event> {
    Event::new(SOURCE, topic, format!("chat:{chat_id}"), &data)
}

pub fn chat_created(chat: &Chat) -> anyhow::Result<Event> {
    event(
        CHAT_CREATED,
        &chat.id,
        json!({"chat_id": chat.id, "chat": chat}),
    )
}

pub fn chat_deleted(chat_id: &str) -> anyhow::Result<Event> {
    event(CHAT_DELETED, chat_id, json!({"chat_id": chat_id}))
}

pub fn participant_added(chat_id: &str, participant: &Participant) -> anyhow::Result<Event> {
    event(
        PARTICIPANT_ADDED,
        chat_id,
        json!({"chat_id": chat_id, "participant_id": participant.participant_id,
            "joined_at": participant.joined_at}),
    )
}

pub fn participant_removed(chat_id: &str, participant_id: &str) -> anyhow::Result<Event> {
    event(
        PARTICIPANT_REMOVED,
        chat_id,
        json!({"chat_id": chat_id, "participant_id": participant_id}),
    )
}

pub fn message_posted(message: &ChatMessage) -> anyhow::Result<Event> {
    event(
        MESSAGE_POSTED,
        &message.chat_id,
        json!({"chat_id": message.chat_id, "message": message}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        for position in ["1", "250", "chat-x|user-1"] {
            assert_eq!(
                decode_cursor(&encode_cursor(position)).as_deref(),
                Some(position)
            );
        }
        for bad in ["", "12", "c1zz", "c", "x1" /* wrong tag */] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }
}

//! The chat store: one trait, two backends chosen by `services.chat.store` — SQL (the service's
//! SQLite file or PostgreSQL schema, the default; module `sql`) and DynamoDB (module `dynamo`).
//!
//! Every change writes the events that announce it atomically with the change (SQL: kit's outbox
//! in the same transaction; DynamoDB: an outbox item in the same `TransactWriteItems`), so a
//! committed change is always announced and an announced change always committed. The consistency
//! rules both backends keep are in the README (Chat section).

use async_trait::async_trait;

use crate::model::{Chat, ChatMessage, ChatWithParticipants, Participant, PostOutcome, Removal};

pub mod dynamo;
pub mod sql;

/// A page of chats of one participant.
#[derive(Debug, Clone)]
pub struct ChatPage {
    pub chats: Vec<Chat>,
    /// Where the next page starts (a store position, see [`crate::model::encode_cursor`]).
    pub next: Option<String>,
}

/// What the handlers need from a backend.
#[async_trait]
pub trait ChatStore: Send + Sync {
    /// `sqlite`, `postgres` or `dynamodb`.
    fn backend(&self) -> &'static str;

    /// Stores a new chat (its id is fresh; an existing id is an error) and `chat.created`.
    async fn create_chat(&self, chat: &Chat) -> anyhow::Result<()>;

    /// The chat with its participants (by participant id).
    async fn chat(&self, id: &str) -> anyhow::Result<Option<ChatWithParticipants>>;

    /// Deletes the chat, its participants and its messages, and writes `chat.deleted`; false when
    /// there was no such chat.
    async fn delete_chat(&self, id: &str) -> anyhow::Result<bool>;

    /// Adds those of `participant_ids` who are not in the chat yet (one
    /// `chat.participant_added` each); returns them, or `None` when there is no such chat.
    async fn add_participants(
        &self,
        chat_id: &str,
        participant_ids: &[String],
    ) -> anyhow::Result<Option<Vec<Participant>>>;

    /// Removes one participant (and writes `chat.participant_removed`).
    async fn remove_participant(
        &self,
        chat_id: &str,
        participant_id: &str,
    ) -> anyhow::Result<Removal>;

    /// Whether `participant_id` is in the chat (`None`: no such chat).
    async fn is_participant(
        &self,
        chat_id: &str,
        participant_id: &str,
    ) -> anyhow::Result<Option<bool>>;

    /// The chats `participant_id` is in, by chat id, `limit` at a time from `after` (a position
    /// a previous page returned).
    async fn chats_of(
        &self,
        participant_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<ChatPage>;

    /// Posts a message from a participant: it gets the chat's next sequence number, and
    /// `chat.message_posted` is written with it.
    async fn post_message(
        &self,
        chat_id: &str,
        sender_id: &str,
        text: &str,
    ) -> anyhow::Result<PostOutcome>;

    /// Messages of the chat, newest first, with `seq` below `before` when given; `None` when
    /// there is no such chat.
    async fn messages(
        &self,
        chat_id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> anyhow::Result<Option<Vec<ChatMessage>>>;

    /// `/ready`: the backend answers.
    async fn ping(&self) -> anyhow::Result<()>;

    /// Asks the outbox relay to publish what was just written (rather than at its next poll).
    fn wake_relay(&self);
}

//! The SQL store: the service's SQLite file or PostgreSQL schema (`chat`), queries written once
//! for both (see `kit::db`), every change and its events in one transaction (kit's outbox).
//!
//! Posting takes the chat row's lock (`update chats set last_seq = last_seq + 1 ... returning`),
//! so posts to one chat are serialised and sequence order is commit order: a page read by `seq`
//! never misses a message that commits later with a smaller number.

use anyhow::Context as _;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kit::Db;
use kit::db::{Tx, query};
use kit::relay::Notifier;

use super::{ChatPage, ChatStore};
use crate::model::{
    self, Chat, ChatMessage, ChatWithParticipants, Participant, PostOutcome, Removal, now,
};

pub struct SqlStore {
    db: Db,
    relay: Notifier,
}

impl SqlStore {
    pub fn new(db: Db, relay: Notifier) -> Self {
        Self { db, relay }
    }
}

#[derive(sqlx::FromRow)]
struct ChatRow {
    id: String,
    name: String,
    metadata: String,
    created_at: DateTime<Utc>,
}

impl ChatRow {
    fn into_chat(self) -> anyhow::Result<Chat> {
        Ok(Chat {
            metadata: serde_json::from_str(&self.metadata)
                .with_context(|| format!("metadata of chat {}", self.id))?,
            id: self.id,
            name: self.name,
            created_at: self.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct MessageRow {
    id: String,
    chat_id: String,
    seq: i64,
    sender_id: String,
    text: String,
    created_at: DateTime<Utc>,
}

impl From<MessageRow> for ChatMessage {
    fn from(row: MessageRow) -> Self {
        ChatMessage {
            id: row.id,
            chat_id: row.chat_id,
            seq: row.seq,
            sender_id: row.sender_id,
            text: row.text,
            created_at: row.created_at,
        }
    }
}

async fn chat_exists(tx: &mut Tx, id: &str) -> sqlx::Result<bool> {
    let found: Option<String> = query("select id from chats where id = $1")
        .bind(id)
        .fetch_optional_scalar(&mut *tx)
        .await?;
    Ok(found.is_some())
}

async fn participant_in(tx: &mut Tx, chat_id: &str, participant_id: &str) -> sqlx::Result<bool> {
    let found: Option<String> = query(
        "select participant_id from chat_participants where chat_id = $1 and participant_id = $2",
    )
    .bind(chat_id)
    .bind(participant_id)
    .fetch_optional_scalar(&mut *tx)
    .await?;
    Ok(found.is_some())
}

#[async_trait]
impl ChatStore for SqlStore {
    fn backend(&self) -> &'static str {
        self.db.backend()
    }

    async fn create_chat(&self, chat: &Chat) -> anyhow::Result<()> {
        let mut tx = self.db.begin().await?;
        query("insert into chats (id, name, metadata, last_seq, created_at) values ($1, $2, $3, 0, $4)")
            .bind(&chat.id)
            .bind(&chat.name)
            .bind(serde_json::to_string(&chat.metadata)?)
            .bind(chat.created_at)
            .execute(&mut tx)
            .await
            .context("inserting a chat")?;
        kit::outbox::enqueue(&mut tx, &[model::chat_created(chat)?]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn chat(&self, id: &str) -> anyhow::Result<Option<ChatWithParticipants>> {
        let Some(row) = query("select id, name, metadata, created_at from chats where id = $1")
            .bind(id)
            .fetch_optional::<ChatRow>(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let participants: Vec<(String, DateTime<Utc>)> = query(
            "select participant_id, joined_at from chat_participants where chat_id = $1 \
             order by participant_id",
        )
        .bind(id)
        .fetch_all(&self.db)
        .await?;
        Ok(Some(ChatWithParticipants {
            chat: row.into_chat()?,
            participants: participants
                .into_iter()
                .map(|(participant_id, joined_at)| Participant {
                    participant_id,
                    joined_at,
                })
                .collect(),
        }))
    }

    async fn delete_chat(&self, id: &str) -> anyhow::Result<bool> {
        let mut tx = self.db.begin().await?;
        // Participants and messages go with it (`on delete cascade`), in this transaction.
        let deleted = query("delete from chats where id = $1")
            .bind(id)
            .execute(&mut tx)
            .await?;
        if deleted == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        kit::outbox::enqueue(&mut tx, &[model::chat_deleted(id)?]).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn add_participants(
        &self,
        chat_id: &str,
        participant_ids: &[String],
    ) -> anyhow::Result<Option<Vec<Participant>>> {
        let mut tx = self.db.begin().await?;
        if !chat_exists(&mut tx, chat_id).await? {
            tx.rollback().await?;
            return Ok(None);
        }
        let joined_at = now();
        let mut added = Vec::new();
        let mut events = Vec::new();
        for participant_id in participant_ids {
            let inserted = query(
                "insert into chat_participants (chat_id, participant_id, joined_at) \
                 values ($1, $2, $3) on conflict do nothing",
            )
            .bind(chat_id)
            .bind(participant_id)
            .bind(joined_at)
            .execute(&mut tx)
            .await?;
            if inserted == 1 {
                let participant = Participant {
                    participant_id: participant_id.clone(),
                    joined_at,
                };
                events.push(model::participant_added(chat_id, &participant)?);
                added.push(participant);
            }
        }
        kit::outbox::enqueue(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(Some(added))
    }

    async fn remove_participant(
        &self,
        chat_id: &str,
        participant_id: &str,
    ) -> anyhow::Result<Removal> {
        let mut tx = self.db.begin().await?;
        let removed =
            query("delete from chat_participants where chat_id = $1 and participant_id = $2")
                .bind(chat_id)
                .bind(participant_id)
                .execute(&mut tx)
                .await?;
        if removed == 0 {
            let exists = chat_exists(&mut tx, chat_id).await?;
            tx.rollback().await?;
            return Ok(if exists {
                Removal::NotAParticipant
            } else {
                Removal::NoChat
            });
        }
        kit::outbox::enqueue(
            &mut tx,
            &[model::participant_removed(chat_id, participant_id)?],
        )
        .await?;
        tx.commit().await?;
        Ok(Removal::Removed)
    }

    async fn is_participant(
        &self,
        chat_id: &str,
        participant_id: &str,
    ) -> anyhow::Result<Option<bool>> {
        let row: Option<(String, Option<String>)> = query(
            "select c.id, p.participant_id from chats c left join chat_participants p \
             on p.chat_id = c.id and p.participant_id = $2 where c.id = $1",
        )
        .bind(chat_id)
        .bind(participant_id)
        .fetch_optional(&self.db)
        .await?;
        Ok(row.map(|(_, p)| p.is_some()))
    }

    async fn chats_of(
        &self,
        participant_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<ChatPage> {
        let rows: Vec<ChatRow> = query(
            "select c.id, c.name, c.metadata, c.created_at from chat_participants p \
             join chats c on c.id = p.chat_id \
             where p.participant_id = $1 and ($2 is null or p.chat_id > $2) \
             order by p.chat_id limit $3",
        )
        .bind(participant_id)
        .bind(after.map(str::to_owned))
        .bind(i64::try_from(limit + 1)?)
        .fetch_all(&self.db)
        .await?;
        let more = rows.len() > limit;
        let chats = rows
            .into_iter()
            .take(limit)
            .map(ChatRow::into_chat)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let next = more.then(|| chats.last().map(|c| c.id.clone())).flatten();
        Ok(ChatPage { chats, next })
    }

    async fn post_message(
        &self,
        chat_id: &str,
        sender_id: &str,
        text: &str,
    ) -> anyhow::Result<PostOutcome> {
        let mut tx = self.db.begin().await?;
        // Checked first, so a refused post does not take a number.
        if !participant_in(&mut tx, chat_id, sender_id).await? {
            let exists = chat_exists(&mut tx, chat_id).await?;
            tx.rollback().await?;
            return Ok(if exists {
                PostOutcome::NotAParticipant
            } else {
                PostOutcome::NoChat
            });
        }
        let seq: Option<i64> =
            query("update chats set last_seq = last_seq + 1 where id = $1 returning last_seq")
                .bind(chat_id)
                .fetch_optional_scalar(&mut tx)
                .await?;
        let Some(seq) = seq else {
            tx.rollback().await?;
            return Ok(PostOutcome::NoChat);
        };
        let message = ChatMessage {
            id: model::new_message_id(),
            chat_id: chat_id.to_owned(),
            seq,
            sender_id: sender_id.to_owned(),
            text: text.to_owned(),
            created_at: now(),
        };
        query(
            "insert into chat_messages (chat_id, seq, id, sender_id, text, created_at) \
             values ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&message.chat_id)
        .bind(message.seq)
        .bind(&message.id)
        .bind(&message.sender_id)
        .bind(&message.text)
        .bind(message.created_at)
        .execute(&mut tx)
        .await?;
        kit::outbox::enqueue(&mut tx, &[model::message_posted(&message)?]).await?;
        tx.commit().await?;
        Ok(PostOutcome::Posted(message))
    }

    async fn messages(
        &self,
        chat_id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> anyhow::Result<Option<Vec<ChatMessage>>> {
        let exists: Option<String> = query("select id from chats where id = $1")
            .bind(chat_id)
            .fetch_optional_scalar(&self.db)
            .await?;
        if exists.is_none() {
            return Ok(None);
        }
        let rows: Vec<MessageRow> = query(
            "select id, chat_id, seq, sender_id, text, created_at from chat_messages \
             where chat_id = $1 and ($2 is null or seq < $2) order by seq desc limit $3",
        )
        .bind(chat_id)
        .bind(before)
        .bind(i64::try_from(limit)?)
        .fetch_all(&self.db)
        .await?;
        Ok(Some(rows.into_iter().map(ChatMessage::from).collect()))
    }

    async fn ping(&self) -> anyhow::Result<()> {
        self.db.ping().await
    }

    fn wake_relay(&self) {
        self.relay.notify();
    }
}

//! The DynamoDB store (`services.chat.store = "dynamodb"`), through the official AWS SDK, with
//! seed 004's key design:
//!
//! | table | partition key | sort key | index |
//! |---|---|---|---|
//! | `<prefix>Chats` | `id` | - | - |
//! | `<prefix>ChatParticipants` | `chatId` | `participantId` | GSI `participantId-index` (`participantId`, `chatId`), all attributes |
//! | `<prefix>ChatMessages` | `chatId` | `seq` (number) | - |
//! | `<prefix>ChatOutbox` | `shard` (`"outbox"`) | `id` (the event's UUID v7: time order) | - |
//!
//! A participant item carries its chat's name, metadata and creation time (they never change),
//! so "chats of a participant" is one `Query` on the GSI, paginated by `LastEvaluatedKey`.
//! Tables and the GSI are created at start when missing (`create_tables`).
//!
//! The outbox: DynamoDB has no transaction with the SQL outbox, so the event is an item of the
//! `ChatOutbox` table written in the same `TransactWriteItems` as the change (both or neither).
//! The relay here reads the outbox in id order, publishes to the bus and then deletes what was
//! published: a crash in between re-publishes (JetStream drops a re-publish of the same event id
//! within 2 minutes; live subscribers dedupe on `seq`), it never loses. Several replicas' relays
//! may publish the same item: at-least-once, as everywhere.
//!
//! Writes are conditional: a chat is created only if its id is new; a participant is added only
//! if the chat exists and they are not in it (so adding twice adds nothing and announces
//! nothing); a message is posted with an optimistic update of the chat's `last_seq` (condition:
//! it is still the value read, and the sender is still a participant), retried on a conflict, so
//! sequence numbers are dense and in commit order, like the SQL store's row lock.
//!
//! Deleting a chat deletes the chat item and writes `chat.deleted` in one transaction, then its
//! participants and messages with `BatchWriteItem` (25 at a time, `UnprocessedItems` retried with
//! back-off). An interrupted delete leaves participant and message items of a chat that no longer
//! exists: nothing reads messages of a missing chat, but "chats of a participant" may list it
//! until `DELETE` is sent again (which sweeps the rest even though the chat is gone: 404).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata as _;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, Delete, DeleteRequest,
    GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType, Put,
    ScalarAttributeType, TransactWriteItem, Update, WriteRequest,
};
use chrono::{DateTime, Utc};
use kit::bus::{Bus, Message};
use kit::event::Event;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{ChatPage, ChatStore};
use crate::model::{
    self, Chat, ChatMessage, ChatWithParticipants, Participant, PostOutcome, Removal, now,
};
use crate::settings::DynamoSettings;

/// The GSI of the participants table.
pub const PARTICIPANT_INDEX: &str = "participantId-index";
const OUTBOX_SHARD: &str = "outbox";
/// Tries of an optimistic post before giving up (each re-reads `last_seq`).
const POST_ATTEMPTS: u32 = 50;
/// Items one `BatchWriteItem` takes.
const BATCH: usize = 25;

type Item = HashMap<String, AttributeValue>;
/// A key attribute of a table: name, type, role.
type KeySpec<'a> = (&'a str, ScalarAttributeType, KeyType);

#[derive(Clone)]
struct Tables {
    chats: String,
    participants: String,
    messages: String,
    outbox: String,
}

/// The store; cheap to clone.
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    tables: Arc<Tables>,
    wake: Arc<Notify>,
}

/// Publishes the outbox table's items to the bus.
pub struct DynamoRelay {
    store: DynamoStore,
    bus: Bus,
    poll: Duration,
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: i64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn get_s(item: &Item, key: &str) -> anyhow::Result<String> {
    match item.get(key) {
        Some(AttributeValue::S(v)) => Ok(v.clone()),
        _ => anyhow::bail!("attribute {key} missing or not a string"),
    }
}

fn get_n(item: &Item, key: &str) -> anyhow::Result<i64> {
    match item.get(key) {
        Some(AttributeValue::N(v)) => v.parse().with_context(|| format!("attribute {key}")),
        _ => anyhow::bail!("attribute {key} missing or not a number"),
    }
}

fn get_time(item: &Item, key: &str) -> anyhow::Result<DateTime<Utc>> {
    let text = get_s(item, key)?;
    Ok(DateTime::parse_from_rfc3339(&text)
        .with_context(|| format!("attribute {key}"))?
        .with_timezone(&Utc))
}

fn time(value: DateTime<Utc>) -> AttributeValue {
    s(value.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

/// Whether a cancelled transaction's item `index` failed its condition.
fn failed_condition(err: &TransactWriteItemsError, index: usize) -> bool {
    match err {
        TransactWriteItemsError::TransactionCanceledException(e) => e
            .cancellation_reasons()
            .get(index)
            .and_then(|r| r.code())
            .is_some_and(|c| c == "ConditionalCheckFailed"),
        _ => false,
    }
}

/// Whether the transaction lost a race (another transaction on the same items): try again.
fn conflicted(err: &TransactWriteItemsError) -> bool {
    match err {
        TransactWriteItemsError::TransactionCanceledException(e) => e
            .cancellation_reasons()
            .iter()
            .any(|r| r.code() == Some("TransactionConflict")),
        TransactWriteItemsError::TransactionInProgressException(_) => true,
        _ => false,
    }
}

impl DynamoStore {
    /// Connects (creating the tables when missing and configured to) and returns the store with
    /// its relay, which the service runs as a task.
    pub async fn connect(
        settings: &DynamoSettings,
        bus: Bus,
    ) -> anyhow::Result<(DynamoStore, DynamoRelay)> {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .http_client(http);
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
            // A local DynamoDB takes any credentials; AWS's own come from the usual chain.
            if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
                loader = loader.credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                    "agora-local",
                    "agora-local",
                    None,
                    None,
                    "agora-local-endpoint",
                ));
            }
        }
        let config = loader.load().await;
        let client = Client::new(&config);
        let prefix = &settings.table_prefix;
        let store = DynamoStore {
            client,
            tables: Arc::new(Tables {
                chats: format!("{prefix}Chats"),
                participants: format!("{prefix}ChatParticipants"),
                messages: format!("{prefix}ChatMessages"),
                outbox: format!("{prefix}ChatOutbox"),
            }),
            wake: Arc::new(Notify::new()),
        };
        if settings.create_tables {
            store.create_tables().await.with_context(|| {
                format!(
                    "creating the chat tables on DynamoDB ({})",
                    settings.endpoint.as_deref().unwrap_or("AWS")
                )
            })?;
        }
        let relay = DynamoRelay {
            store: store.clone(),
            bus,
            poll: Duration::from_millis(settings.relay_poll_ms.max(10)),
        };
        Ok((store, relay))
    }

    async fn create_tables(&self) -> anyhow::Result<()> {
        let key = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
        };
        let attr = |name: &str, kind: ScalarAttributeType| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(kind)
                .build()
        };
        let t = &self.tables;
        let specs: Vec<(&str, Vec<KeySpec>)> = vec![
            (
                &t.chats,
                vec![("id", ScalarAttributeType::S, KeyType::Hash)],
            ),
            (
                &t.participants,
                vec![
                    ("chatId", ScalarAttributeType::S, KeyType::Hash),
                    ("participantId", ScalarAttributeType::S, KeyType::Range),
                ],
            ),
            (
                &t.messages,
                vec![
                    ("chatId", ScalarAttributeType::S, KeyType::Hash),
                    ("seq", ScalarAttributeType::N, KeyType::Range),
                ],
            ),
            (
                &t.outbox,
                vec![
                    ("shard", ScalarAttributeType::S, KeyType::Hash),
                    ("id", ScalarAttributeType::S, KeyType::Range),
                ],
            ),
        ];
        for (table, keys) in specs {
            let exists = match self.client.describe_table().table_name(table).send().await {
                Ok(_) => true,
                Err(err) => {
                    let err = err.into_service_error();
                    if err.is_resource_not_found_exception() {
                        false
                    } else {
                        return Err(anyhow::Error::new(err))
                            .with_context(|| format!("describing table {table}"));
                    }
                }
            };
            if exists {
                continue;
            }
            let mut create = self
                .client
                .create_table()
                .table_name(table)
                .billing_mode(BillingMode::PayPerRequest);
            for (name, kind, key_type) in &keys {
                create = create
                    .attribute_definitions(attr(name, kind.clone())?)
                    .key_schema(key(name, key_type.clone())?);
            }
            if table == t.participants {
                create = create.global_secondary_indexes(
                    GlobalSecondaryIndex::builder()
                        .index_name(PARTICIPANT_INDEX)
                        .key_schema(key("participantId", KeyType::Hash)?)
                        .key_schema(key("chatId", KeyType::Range)?)
                        .projection(
                            Projection::builder()
                                .projection_type(ProjectionType::All)
                                .build(),
                        )
                        .build()?,
                );
            }
            match create.send().await {
                Ok(_) => tracing::info!(table, "created DynamoDB table"),
                // Another replica created it meanwhile.
                Err(err) if err.code() == Some("ResourceInUseException") => {}
                Err(err) => {
                    return Err(anyhow::Error::new(err.into_service_error()))
                        .with_context(|| format!("creating table {table}"));
                }
            }
            // Usable once ACTIVE (at once on a local DynamoDB).
            for _ in 0..120 {
                let described = self
                    .client
                    .describe_table()
                    .table_name(table)
                    .send()
                    .await
                    .context("describing a new table")?;
                let active = described
                    .table()
                    .and_then(|t| t.table_status())
                    .is_some_and(|s| s.as_str() == "ACTIVE");
                if active {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }

    fn outbox_put(&self, event: &Event) -> anyhow::Result<TransactWriteItem> {
        Ok(TransactWriteItem::builder()
            .put(
                Put::builder()
                    .table_name(&self.tables.outbox)
                    .item("shard", s(OUTBOX_SHARD))
                    .item("id", s(event.id.to_string()))
                    .item("topic", s(&event.topic))
                    .item("payload", s(serde_json::to_string(event)?))
                    .build()?,
            )
            .build())
    }

    fn chat_exists_check(&self, chat_id: &str) -> anyhow::Result<TransactWriteItem> {
        Ok(TransactWriteItem::builder()
            .condition_check(
                ConditionCheck::builder()
                    .table_name(&self.tables.chats)
                    .key("id", s(chat_id))
                    .condition_expression("attribute_exists(id)")
                    .build()?,
            )
            .build())
    }

    async fn get_chat_item(&self, id: &str) -> anyhow::Result<Option<Item>> {
        let found = self
            .client
            .get_item()
            .table_name(&self.tables.chats)
            .key("id", s(id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| anyhow::Error::new(e.into_service_error()))
            .context("reading a chat")?;
        Ok(found.item)
    }

    async fn participant_item(&self, chat_id: &str, pid: &str) -> anyhow::Result<Option<Item>> {
        let found = self
            .client
            .get_item()
            .table_name(&self.tables.participants)
            .key("chatId", s(chat_id))
            .key("participantId", s(pid))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| anyhow::Error::new(e.into_service_error()))
            .context("reading a participant")?;
        Ok(found.item)
    }

    fn chat_of(item: &Item) -> anyhow::Result<Chat> {
        Ok(Chat {
            id: get_s(item, "id")?,
            name: get_s(item, "name")?,
            metadata: serde_json::from_str(&get_s(item, "metadata")?)?,
            created_at: get_time(item, "created_at")?,
        })
    }

    /// Every item of `table` under partition `chat_id`: its key attributes only.
    async fn keys_of(&self, table: &str, sort: &str, chat_id: &str) -> anyhow::Result<Vec<Item>> {
        let mut keys = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(table)
                .key_condition_expression("chatId = :c")
                .expression_attribute_values(":c", s(chat_id))
                .projection_expression("chatId, #s")
                .expression_attribute_names("#s", sort)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| anyhow::Error::new(e.into_service_error()))
                .with_context(|| format!("listing the items of {chat_id} in {table}"))?;
            keys.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(keys),
            }
        }
    }

    /// Deletes `keys` from `table`, 25 per `BatchWriteItem`, retrying `UnprocessedItems`.
    async fn batch_delete(&self, table: &str, keys: Vec<Item>) -> anyhow::Result<()> {
        for chunk in keys.chunks(BATCH) {
            let mut requests: Vec<WriteRequest> = chunk
                .iter()
                .map(|key| {
                    DeleteRequest::builder()
                        .set_key(Some(key.clone()))
                        .build()
                        .map(|d| WriteRequest::builder().delete_request(d).build())
                })
                .collect::<Result<_, _>>()?;
            let mut backoff = Duration::from_millis(20);
            for attempt in 0.. {
                let done = self
                    .client
                    .batch_write_item()
                    .request_items(table, requests.clone())
                    .send()
                    .await
                    .map_err(|e| anyhow::Error::new(e.into_service_error()))
                    .with_context(|| format!("deleting from {table}"))?;
                requests = done
                    .unprocessed_items
                    .and_then(|mut u| u.remove(table))
                    .unwrap_or_default();
                if requests.is_empty() {
                    break;
                }
                anyhow::ensure!(
                    attempt < 20,
                    "{} deletes from {table} still unprocessed after 20 tries",
                    requests.len()
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
        Ok(())
    }

    /// Deletes whatever participants and messages chat `chat_id` has left.
    async fn sweep(&self, chat_id: &str) -> anyhow::Result<()> {
        let participants = self
            .keys_of(&self.tables.participants, "participantId", chat_id)
            .await?;
        self.batch_delete(&self.tables.participants, participants)
            .await?;
        let messages = self.keys_of(&self.tables.messages, "seq", chat_id).await?;
        self.batch_delete(&self.tables.messages, messages).await
    }
}

#[async_trait]
impl ChatStore for DynamoStore {
    fn backend(&self) -> &'static str {
        "dynamodb"
    }

    async fn create_chat(&self, chat: &Chat) -> anyhow::Result<()> {
        let put = Put::builder()
            .table_name(&self.tables.chats)
            .item("id", s(&chat.id))
            .item("name", s(&chat.name))
            .item("metadata", s(serde_json::to_string(&chat.metadata)?))
            .item("created_at", time(chat.created_at))
            .item("last_seq", n(0))
            .condition_expression("attribute_not_exists(id)")
            .build()?;
        self.client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(put).build())
            .transact_items(self.outbox_put(&model::chat_created(chat)?)?)
            .send()
            .await
            .map_err(|e| anyhow::Error::new(e.into_service_error()))
            .context("creating a chat")?;
        Ok(())
    }

    async fn chat(&self, id: &str) -> anyhow::Result<Option<ChatWithParticipants>> {
        let Some(item) = self.get_chat_item(id).await? else {
            return Ok(None);
        };
        let chat = Self::chat_of(&item)?;
        let mut participants = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.tables.participants)
                .key_condition_expression("chatId = :c")
                .expression_attribute_values(":c", s(id))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| anyhow::Error::new(e.into_service_error()))
                .context("reading a chat's participants")?;
            for item in page.items.unwrap_or_default() {
                participants.push(Participant {
                    participant_id: get_s(&item, "participantId")?,
                    joined_at: get_time(&item, "joined_at")?,
                });
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        Ok(Some(ChatWithParticipants { chat, participants }))
    }

    async fn delete_chat(&self, id: &str) -> anyhow::Result<bool> {
        let delete = Delete::builder()
            .table_name(&self.tables.chats)
            .key("id", s(id))
            .condition_expression("attribute_exists(id)")
            .build()?;
        let deleted = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().delete(delete).build())
            .transact_items(self.outbox_put(&model::chat_deleted(id)?)?)
            .send()
            .await;
        let existed = match deleted {
            Ok(_) => true,
            Err(err) => {
                let err = err.into_service_error();
                if !failed_condition(&err, 0) {
                    return Err(anyhow::Error::new(err).context("deleting a chat"));
                }
                false
            }
        };
        // After the chat item: adds and posts are conditioned on it, so nothing new lands here.
        self.sweep(id).await?;
        Ok(existed)
    }

    async fn add_participants(
        &self,
        chat_id: &str,
        participant_ids: &[String],
    ) -> anyhow::Result<Option<Vec<Participant>>> {
        let Some(chat_item) = self.get_chat_item(chat_id).await? else {
            return Ok(None);
        };
        let chat = Self::chat_of(&chat_item)?;
        let joined_at = now();
        let mut added = Vec::new();
        // One transaction per participant: one already in must not cancel the others.
        for pid in participant_ids {
            let participant = Participant {
                participant_id: pid.clone(),
                joined_at,
            };
            let put = Put::builder()
                .table_name(&self.tables.participants)
                .item("chatId", s(chat_id))
                .item("participantId", s(pid))
                .item("joined_at", time(joined_at))
                .item("chat_name", s(&chat.name))
                .item("chat_metadata", s(serde_json::to_string(&chat.metadata)?))
                .item("chat_created_at", time(chat.created_at))
                .condition_expression("attribute_not_exists(participantId)")
                .build()?;
            let result = self
                .client
                .transact_write_items()
                .transact_items(self.chat_exists_check(chat_id)?)
                .transact_items(TransactWriteItem::builder().put(put).build())
                .transact_items(self.outbox_put(&model::participant_added(chat_id, &participant)?)?)
                .send()
                .await;
            match result {
                Ok(_) => added.push(participant),
                Err(err) => {
                    let err = err.into_service_error();
                    if failed_condition(&err, 0) {
                        // Deleted meanwhile.
                        return Ok(None);
                    }
                    if !failed_condition(&err, 1) {
                        return Err(anyhow::Error::new(err).context("adding a participant"));
                    }
                }
            }
        }
        Ok(Some(added))
    }

    async fn remove_participant(
        &self,
        chat_id: &str,
        participant_id: &str,
    ) -> anyhow::Result<Removal> {
        let delete = Delete::builder()
            .table_name(&self.tables.participants)
            .key("chatId", s(chat_id))
            .key("participantId", s(participant_id))
            .condition_expression("attribute_exists(participantId)")
            .build()?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().delete(delete).build())
            .transact_items(self.outbox_put(&model::participant_removed(chat_id, participant_id)?)?)
            .send()
            .await;
        match result {
            Ok(_) => Ok(Removal::Removed),
            Err(err) => {
                let err = err.into_service_error();
                if !failed_condition(&err, 0) {
                    return Err(anyhow::Error::new(err).context("removing a participant"));
                }
                Ok(if self.get_chat_item(chat_id).await?.is_some() {
                    Removal::NotAParticipant
                } else {
                    Removal::NoChat
                })
            }
        }
    }

    async fn is_participant(
        &self,
        chat_id: &str,
        participant_id: &str,
    ) -> anyhow::Result<Option<bool>> {
        if self.get_chat_item(chat_id).await?.is_none() {
            return Ok(None);
        }
        if participant_id.is_empty() {
            return Ok(Some(false));
        }
        Ok(Some(
            self.participant_item(chat_id, participant_id)
                .await?
                .is_some(),
        ))
    }

    async fn chats_of(
        &self,
        participant_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<ChatPage> {
        let start = after.map(|chat_id| {
            HashMap::from([
                ("participantId".to_owned(), s(participant_id)),
                ("chatId".to_owned(), s(chat_id)),
            ])
        });
        let page = self
            .client
            .query()
            .table_name(&self.tables.participants)
            .index_name(PARTICIPANT_INDEX)
            .key_condition_expression("participantId = :p")
            .expression_attribute_values(":p", s(participant_id))
            .limit(i32::try_from(limit)?)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| anyhow::Error::new(e.into_service_error()))
            .context("querying the chats of a participant")?;
        let chats = page
            .items
            .unwrap_or_default()
            .iter()
            .map(|item| {
                Ok(Chat {
                    id: get_s(item, "chatId")?,
                    name: get_s(item, "chat_name")?,
                    metadata: serde_json::from_str(&get_s(item, "chat_metadata")?)?,
                    created_at: get_time(item, "chat_created_at")?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let next = page
            .last_evaluated_key
            .filter(|k| !k.is_empty())
            .and_then(|k| match k.get("chatId") {
                Some(AttributeValue::S(id)) => Some(id.clone()),
                _ => None,
            });
        Ok(ChatPage { chats, next })
    }

    async fn post_message(
        &self,
        chat_id: &str,
        sender_id: &str,
        text: &str,
    ) -> anyhow::Result<PostOutcome> {
        let mut backoff = Duration::from_millis(2);
        for _ in 0..POST_ATTEMPTS {
            let Some(chat) = self.get_chat_item(chat_id).await? else {
                return Ok(PostOutcome::NoChat);
            };
            if self.participant_item(chat_id, sender_id).await?.is_none() {
                return Ok(PostOutcome::NotAParticipant);
            }
            let last = get_n(&chat, "last_seq")?;
            let message = ChatMessage {
                id: model::new_message_id(),
                chat_id: chat_id.to_owned(),
                seq: last + 1,
                sender_id: sender_id.to_owned(),
                text: text.to_owned(),
                created_at: now(),
            };
            let bump = Update::builder()
                .table_name(&self.tables.chats)
                .key("id", s(chat_id))
                .update_expression("SET last_seq = :next")
                .condition_expression("last_seq = :last")
                .expression_attribute_values(":next", n(message.seq))
                .expression_attribute_values(":last", n(last))
                .build()?;
            let member = ConditionCheck::builder()
                .table_name(&self.tables.participants)
                .key("chatId", s(chat_id))
                .key("participantId", s(sender_id))
                .condition_expression("attribute_exists(participantId)")
                .build()?;
            let put = Put::builder()
                .table_name(&self.tables.messages)
                .item("chatId", s(chat_id))
                .item("seq", n(message.seq))
                .item("id", s(&message.id))
                .item("sender_id", s(sender_id))
                .item("text", s(text))
                .item("created_at", time(message.created_at))
                .build()?;
            let result = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().update(bump).build())
                .transact_items(TransactWriteItem::builder().condition_check(member).build())
                .transact_items(TransactWriteItem::builder().put(put).build())
                .transact_items(self.outbox_put(&model::message_posted(&message)?)?)
                .send()
                .await;
            match result {
                Ok(_) => return Ok(PostOutcome::Posted(message)),
                Err(err) => {
                    let err = err.into_service_error();
                    if failed_condition(&err, 1) {
                        return Ok(PostOutcome::NotAParticipant);
                    }
                    if !failed_condition(&err, 0) && !conflicted(&err) {
                        return Err(anyhow::Error::new(err).context("posting a message"));
                    }
                    // Another post took this number (or the chat is gone): read again.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
            }
        }
        anyhow::bail!("posting to chat {chat_id}: {POST_ATTEMPTS} conflicting tries")
    }

    async fn messages(
        &self,
        chat_id: &str,
        before: Option<i64>,
        limit: usize,
    ) -> anyhow::Result<Option<Vec<ChatMessage>>> {
        if self.get_chat_item(chat_id).await?.is_none() {
            return Ok(None);
        }
        let mut query = self
            .client
            .query()
            .table_name(&self.tables.messages)
            .expression_attribute_values(":c", s(chat_id))
            .scan_index_forward(false)
            .consistent_read(true)
            .limit(i32::try_from(limit)?);
        query = match before {
            Some(before) => query
                .key_condition_expression("chatId = :c AND seq < :b")
                .expression_attribute_values(":b", n(before)),
            None => query.key_condition_expression("chatId = :c"),
        };
        let page = query
            .send()
            .await
            .map_err(|e| anyhow::Error::new(e.into_service_error()))
            .context("reading messages")?;
        let messages = page
            .items
            .unwrap_or_default()
            .iter()
            .map(|item| {
                Ok(ChatMessage {
                    id: get_s(item, "id")?,
                    chat_id: get_s(item, "chatId")?,
                    seq: get_n(item, "seq")?,
                    sender_id: get_s(item, "sender_id")?,
                    text: get_s(item, "text")?,
                    created_at: get_time(item, "created_at")?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Some(messages))
    }

    async fn ping(&self) -> anyhow::Result<()> {
        self.client
            .describe_table()
            .table_name(&self.tables.chats)
            .send()
            .await
            .map_err(|e| anyhow::Error::new(e.into_service_error()))
            .context("DynamoDB")?;
        Ok(())
    }

    fn wake_relay(&self) {
        self.wake.notify_one();
    }
}

impl DynamoRelay {
    /// Publishes until `stop`: woken by the store after each write, and every poll.
    pub fn spawn(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                let published = match self.run_once().await {
                    Ok(n) => {
                        if failing {
                            tracing::info!("the DynamoDB outbox relay works again");
                        }
                        failing = false;
                        n
                    }
                    Err(err) => {
                        if !failing {
                            tracing::warn!(error.message = %format!("{err:#}"), "the DynamoDB outbox relay failed; retrying");
                        }
                        failing = true;
                        0
                    }
                };
                if published > 0 {
                    continue;
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.store.wake.notified() => {}
                    () = tokio::time::sleep(self.poll) => {}
                }
            }
        })
    }

    /// One batch: the oldest outbox items, published in order, then deleted.
    pub async fn run_once(&self) -> anyhow::Result<usize> {
        let tables = &self.store.tables;
        let page = self
            .store
            .client
            .query()
            .table_name(&tables.outbox)
            .key_condition_expression("shard = :s")
            .expression_attribute_values(":s", s(OUTBOX_SHARD))
            .consistent_read(true)
            .limit(100)
            .send()
            .await
            .map_err(|e| anyhow::Error::new(e.into_service_error()))
            .context("reading the outbox")?;
        let items = page.items.unwrap_or_default();
        if items.is_empty() {
            return Ok(0);
        }
        let mut messages = Vec::with_capacity(items.len());
        for item in &items {
            let event: Event = serde_json::from_str(&get_s(item, "payload")?)?;
            messages.push(Message::from_event(&event)?);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let results = self.bus.publish_all(&messages, deadline).await;
        let published = results.iter().take_while(|r| r.is_ok()).count();
        let keys: Vec<Item> = items[..published]
            .iter()
            .map(|item| {
                HashMap::from([
                    ("shard".to_owned(), s(OUTBOX_SHARD)),
                    (
                        "id".to_owned(),
                        item.get("id").cloned().unwrap_or_else(|| s("")),
                    ),
                ])
            })
            .collect();
        self.store.batch_delete(&tables.outbox, keys).await?;
        if let Some(Err(err)) = results.into_iter().nth(published) {
            return Err(err.context("publishing the outbox"));
        }
        Ok(published)
    }
}

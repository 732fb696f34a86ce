//! The consumer's handler: each event becomes one recorded delivery per channel and recipient,
//! in the consumer's transaction (kit's consumer skips a redelivered message id; the unique key
//! on (event, channel, recipient) makes an event handled again under another message id, or
//! after its record was pruned, add nothing). Nothing is sent here: see `deliver`.
//!
//! Recipients. `user.registered` carries the user, email included. Order events carry only the
//! `user_id`, so the user's current name and email are asked of the users service
//! (`GET /api/v1/users/{id}` through `kit::client::ServiceClient`: time-limited, a breaker,
//! retried on another replica). That is the owner's answer at the time of the event, with no copy
//! to keep in step here when a user changes their email; if users is down, the handler fails and
//! the consumer retries the event with back-off. The call and the rendering run before the
//! consumer's transaction opens (`Handler::prepare`), so no database connection waits on them.
//! `stock.low` concerns no user and goes to `ops_email`. A user without an
//! email gets their SMTP delivery recorded as `failed` with the reason, so it shows in the API.

use std::sync::Arc;

use async_trait::async_trait;
use kit::client::ServiceClient;
use kit::consumer::Handler;
use kit::db::{Dialect, Tx};
use kit::event::Event;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::settings::{Channel, NotifySettings};
use crate::store::{self, NewNotification};
use crate::templates::{self, Templates};

/// Records the deliveries of each event.
pub struct Recorder {
    pub templates: Arc<Templates>,
    pub settings: Arc<NotifySettings>,
    pub users: Arc<ServiceClient>,
    pub wake: Arc<Notify>,
}

/// Who an event concerns.
struct Person {
    user_id: Option<i64>,
    email: Option<String>,
    /// What templates see as `user`.
    view: Value,
}

impl Recorder {
    async fn person(&self, event: &Event) -> anyhow::Result<Person> {
        let data = &event.data;
        match event.topic.as_str() {
            "user.registered" => Ok(Person {
                user_id: data["id"].as_i64(),
                email: data["email"].as_str().map(str::to_owned),
                view: json!({"id": data["id"], "name": data["name"], "email": data["email"]}),
            }),
            "stock.low" => Ok(Person {
                user_id: None,
                email: Some(self.settings.ops_email.clone()),
                view: json!({"id": null, "name": "operators", "email": self.settings.ops_email}),
            }),
            _ => {
                let id = data["user_id"]
                    .as_i64()
                    .ok_or_else(|| anyhow::anyhow!("{} event without a user_id", event.topic))?;
                let user: Option<Value> = self
                    .users
                    .get_json(&format!("/api/v1/users/{id}"))
                    .await
                    .map_err(|e| anyhow::anyhow!("looking up user {id}: {e}"))?;
                let user = user.unwrap_or_else(|| json!({"id": id}));
                Ok(Person {
                    user_id: Some(id),
                    email: user["email"].as_str().map(str::to_owned),
                    view: json!({"id": id, "name": user["name"], "email": user["email"]}),
                })
            }
        }
    }
}

/// What an event is to record, found before the consumer's transaction opens: the recipient
/// looked up, the template rendered, one delivery per channel and recipient (none when the event's
/// type goes to no channel).
#[derive(Default)]
pub struct Deliveries {
    event_id: String,
    user_id: Option<i64>,
    subject: String,
    body: String,
    payload: String,
    /// (channel, recipient, why it failed at once)
    each: Vec<(Channel, String, Option<String>)>,
}

impl Deliveries {
    /// The deliveries to record for `event`.
    fn to_record<'a>(&'a self, event: &'a Event) -> impl Iterator<Item = NewNotification<'a>> {
        self.each
            .iter()
            .map(move |(channel, recipient, failed)| NewNotification {
                event_id: &self.event_id,
                event_type: &event.topic,
                channel: channel.as_str(),
                recipient,
                user_id: self.user_id,
                subject: &self.subject,
                body: &self.body,
                payload: &self.payload,
                failed: failed.as_deref(),
            })
    }
}

#[async_trait]
impl Handler for Recorder {
    type Prepared = Deliveries;

    /// The user lookup (a call to the users service) and the rendering, outside the consumer's
    /// transaction: no database connection (on SQLite, no write lock) is held during the call.
    async fn prepare(&self, event: &Event) -> anyhow::Result<Deliveries> {
        let channels = self.settings.channels_for(&event.topic);
        if channels.is_empty() {
            return Ok(Deliveries::default());
        }
        let mut each = Vec::new();
        let person = self.person(event).await?;
        let rendered = self
            .templates
            .render(&event.topic, &templates::context(event, Some(&person.view)))?;
        let fallback = match person.user_id {
            Some(id) => format!("user:{id}"),
            None => "unknown".to_owned(),
        };
        for channel in channels {
            match channel {
                Channel::Log => each.push((
                    Channel::Log,
                    person.email.clone().unwrap_or_else(|| fallback.clone()),
                    None,
                )),
                Channel::Smtp => match &person.email {
                    Some(email) => each.push((Channel::Smtp, email.clone(), None)),
                    None => each.push((
                        Channel::Smtp,
                        fallback.clone(),
                        Some(format!("{fallback} has no email address")),
                    )),
                },
                Channel::Webhook => {
                    for hook in self
                        .settings
                        .webhooks
                        .iter()
                        .filter(|h| h.takes(&event.topic))
                    {
                        each.push((Channel::Webhook, hook.name.clone(), None));
                    }
                }
            }
        }
        Ok(Deliveries {
            event_id: event.id.to_string(),
            user_id: person.user_id,
            subject: rendered.subject,
            body: rendered.body,
            payload: serde_json::to_string(event)?,
            each,
        })
    }

    async fn handle(&self, tx: &mut Tx, event: &Event, found: Deliveries) -> anyhow::Result<()> {
        for new in found.to_record(event) {
            store::insert(&mut *tx, &new).await?;
        }
        Ok(())
    }

    /// The deliveries of a group in one statement on PostgreSQL ([`store::insert_many`]).
    async fn handle_all(&self, tx: &mut Tx, jobs: Vec<(&Event, Deliveries)>) -> anyhow::Result<()> {
        if tx.dialect() != Dialect::Postgres {
            for (event, found) in jobs {
                self.handle(tx, event, found).await?;
            }
            return Ok(());
        }
        let all: Vec<NewNotification> = jobs
            .iter()
            .flat_map(|(event, found)| found.to_record(event))
            .collect();
        if !all.is_empty() {
            store::insert_many(&mut *tx, &all).await?;
        }
        Ok(())
    }

    async fn committed(&self, _event: &Event) {
        self.wake.notify_one();
    }
}

//! The event every service announces and every consumer receives: its JSON is a bus message's
//! body. Written to the outbox by producers ([`crate::outbox`]), carried by the bus
//! ([`crate::bus`]), handled by consumers ([`crate::consumer`]).

use chrono::{DateTime, SubsecRound as _, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// An event as published on the bus (the JSON of this struct is the message body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique (UUID v7, so ids sort by time); consumers dedupe on it, and JetStream drops a
    /// re-publish with the same id.
    pub id: Uuid,
    /// What happened, `<resource>.<verb>` (e.g. `stock.low`); the bus subject ends with it.
    #[serde(rename = "type")]
    pub topic: String,
    /// The service that wrote it.
    pub source: String,
    /// The aggregate it concerns (e.g. `product:7`).
    pub key: String,
    pub occurred_at: DateTime<Utc>,
    pub data: serde_json::Value,
}

impl Event {
    /// A new event with a fresh id. Refuses a topic the bus could never publish (wildcards,
    /// spaces, empty tokens): such a row would block the service's outbox for good, since the
    /// relay never skips one.
    pub fn new(
        source: &str,
        topic: &str,
        key: impl Into<String>,
        data: &impl Serialize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            is_topic(topic),
            "invalid event topic `{topic}`: use dot-separated tokens without spaces or wildcards"
        );
        Ok(Self {
            id: Uuid::now_v7(),
            topic: topic.to_owned(),
            source: source.to_owned(),
            key: key.into(),
            occurred_at: Utc::now().trunc_subsecs(6),
            data: serde_json::to_value(data)?,
        })
    }
}

/// A topic one can publish to: dot-separated non-empty tokens, no spaces, no wildcards.
pub fn is_topic(topic: &str) -> bool {
    topic
        .split('.')
        .all(|t| !t.is_empty() && !t.contains(|c: char| c.is_whitespace() || c == '*' || c == '>'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_a_type_and_sortable_ids() {
        let first = Event::new(
            "catalog",
            "stock.low",
            "product:1",
            &serde_json::json!({"stock": 2}),
        )
        .expect("event");
        let second =
            Event::new("catalog", "stock.low", "product:1", &serde_json::json!({})).expect("event");
        assert!(first.id < second.id, "v7 ids sort by creation");
        let json = serde_json::to_value(&first).expect("json");
        assert_eq!(json["type"], "stock.low");
        assert_eq!(json["data"]["stock"], 2);
        let back: Event = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, first);
    }

    #[test]
    fn unpublishable_topics_are_refused() {
        for topic in ["", "stock.", "stock.*", "stock low", "orders.>"] {
            assert!(
                Event::new("t", topic, "k", &serde_json::json!({})).is_err(),
                "{topic:?}"
            );
        }
    }
}

//! `[services.notify]`: which channels each event goes to, the SMTP server, the webhook
//! endpoints, retry limits and where template overrides live. Read once at start; a bad value is
//! a start-up error naming its key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use kit::Settings;
use kit::auth::Secret;
use kit::config::ConfigError;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::NAME;

/// The event types the service consumes, each with a shipped template.
pub const EVENT_TYPES: [&str; 6] = [
    "user.registered",
    "order.created",
    "order.processed",
    "order.failed",
    "order.cancelled",
    "stock.low",
];

/// A way of delivering a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// A structured log line (always works: the default, and the development channel).
    Log,
    /// An email through the configured SMTP server.
    Smtp,
    /// An HTTP POST of the event to every configured endpoint that takes its type.
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Log => "log",
            Channel::Smtp => "smtp",
            Channel::Webhook => "webhook",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "log" => Some(Channel::Log),
            "smtp" => Some(Channel::Smtp),
            "webhook" => Some(Channel::Webhook),
            _ => None,
        }
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain text (a local relay or a test sink only).
    None,
    /// STARTTLS, required (the connection fails rather than go on unencrypted). Port 587.
    Starttls,
    /// TLS from the first byte (SMTPS). Port 465.
    Tls,
}

/// `[services.notify.smtp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// Accept a certificate that does not verify (a self-signed relay). Never in production.
    pub accept_invalid_certs: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Connecting and each SMTP command.
    pub timeout_ms: u64,
    /// The `From:` of every email.
    pub from: String,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 25,
            tls: SmtpTls::None,
            accept_invalid_certs: false,
            username: None,
            password: None,
            timeout_ms: 10_000,
            from: "Agora <no-reply@agora.local>".into(),
        }
    }
}

/// One `[[services.notify.webhooks]]` endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Names the endpoint: the recipient of its deliveries (unique).
    pub name: String,
    pub url: Url,
    /// Signs every delivery (HMAC-SHA256; see the `deliver` module).
    pub secret: Secret,
    /// The whole request, connect to last byte.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
    /// Event types (or `order.*`-style patterns) it takes; empty: every type routed to `webhook`.
    #[serde(default)]
    pub events: Vec<String>,
}

fn default_webhook_timeout() -> u64 {
    5_000
}

impl WebhookSettings {
    pub fn takes(&self, event_type: &str) -> bool {
        self.events.is_empty()
            || self.events.iter().any(|pattern| {
                pattern == event_type
                    || pattern
                        .strip_suffix(".*")
                        .is_some_and(|prefix| event_type.split('.').next() == Some(prefix))
            })
    }
}

/// `[services.notify]` (besides port, upstreams and schema).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifySettings {
    /// A directory whose `<event type>.txt` files replace the shipped templates.
    pub templates_dir: Option<PathBuf>,
    /// Channels per event type (`order_created = ["log", "smtp"]`; `_` or `.` between words);
    /// a type not listed goes to `default_channels`.
    pub channels: BTreeMap<String, Vec<Channel>>,
    pub default_channels: Vec<Channel>,
    /// Where `stock.low` (an operator's event, no user) is sent.
    pub ops_email: String,
    /// Tries per delivery before it is `failed` (a retry through the API starts a new round).
    pub max_attempts: u32,
    /// The wait after the first failed try; doubled after each next one, up to `backoff_max_ms`.
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
    /// The longest the dispatcher sleeps: it also wakes for new deliveries, retries and the
    /// due time of the next pending one; this bound is for what other replicas recorded.
    pub poll_ms: u64,
    /// Deliveries sent at once, and events recorded at once (their users calls in parallel, their
    /// records committed together by kit's consumer).
    pub concurrency: usize,
    /// Time limit of each call to the users service (for an order's recipient).
    pub call_timeout_ms: u64,
    pub smtp: SmtpSettings,
    pub webhooks: Vec<WebhookSettings>,
}

impl Default for NotifySettings {
    fn default() -> Self {
        Self {
            templates_dir: None,
            channels: BTreeMap::new(),
            default_channels: vec![Channel::Log],
            ops_email: "ops@agora.local".into(),
            max_attempts: 5,
            backoff_ms: 1_000,
            backoff_max_ms: 300_000,
            poll_ms: 30_000,
            concurrency: 8,
            call_timeout_ms: 2_000,
            smtp: SmtpSettings::default(),
            webhooks: Vec::new(),
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("services.{NAME}.{key}"),
        message: message.into(),
    }
}

impl NotifySettings {
    /// Reads and checks the section; errors name the key.
    pub fn load(settings: &Settings) -> Result<Self, ConfigError> {
        let mut notify: NotifySettings = settings.section(NAME)?;
        let mut channels = BTreeMap::new();
        for (key, list) in std::mem::take(&mut notify.channels) {
            let event_type = key.replace('_', ".");
            if !EVENT_TYPES.contains(&event_type.as_str()) {
                return Err(invalid(
                    &format!("channels.{key}"),
                    format!("unknown event type; use one of {}", EVENT_TYPES.join(", ")),
                ));
            }
            channels.insert(event_type, list);
        }
        notify.channels = channels;
        if notify.max_attempts == 0 {
            return Err(invalid("max_attempts", "must be 1 or more"));
        }
        if notify.backoff_ms == 0 || notify.backoff_max_ms < notify.backoff_ms {
            return Err(invalid(
                "backoff_ms",
                "must be 1 or more, and at most backoff_max_ms",
            ));
        }
        if notify.poll_ms == 0 {
            return Err(invalid("poll_ms", "must be 1 or more"));
        }
        if notify.concurrency == 0 {
            return Err(invalid("concurrency", "must be 1 or more"));
        }
        if notify.smtp.username.is_some() != notify.smtp.password.is_some() {
            return Err(invalid(
                "smtp.password",
                "username and password go together",
            ));
        }
        if notify
            .smtp
            .from
            .parse::<lettre::message::Mailbox>()
            .is_err()
        {
            return Err(invalid("smtp.from", "not an email address"));
        }
        if notify.ops_email.parse::<lettre::Address>().is_err() {
            return Err(invalid("ops_email", "not an email address"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, hook) in notify.webhooks.iter().enumerate() {
            if hook.name.trim().is_empty() || !names.insert(hook.name.clone()) {
                return Err(invalid(
                    &format!("webhooks[{i}].name"),
                    "must be non-empty and unique",
                ));
            }
            if !matches!(hook.url.scheme(), "http" | "https") {
                return Err(invalid(&format!("webhooks[{i}].url"), "use http or https"));
            }
            if hook.secret.expose().len() < 16 {
                return Err(invalid(
                    &format!("webhooks[{i}].secret"),
                    "at least 16 characters",
                ));
            }
            if hook.timeout_ms == 0 {
                return Err(invalid(
                    &format!("webhooks[{i}].timeout_ms"),
                    "must be 1 or more",
                ));
            }
        }
        let routed_to_webhook = notify
            .default_channels
            .iter()
            .chain(notify.channels.values().flatten())
            .any(|c| *c == Channel::Webhook);
        if routed_to_webhook && notify.webhooks.is_empty() {
            return Err(invalid(
                "webhooks",
                "events are routed to `webhook` but no endpoint is configured",
            ));
        }
        Ok(notify)
    }

    /// The channels `event_type` goes to.
    pub fn channels_for(&self, event_type: &str) -> &[Channel] {
        self.channels
            .get(event_type)
            .map_or(&self.default_channels, Vec::as_slice)
    }

    /// The wait before try `attempt + 1` after `attempt` tries failed.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let exponent = attempt.saturating_sub(1).min(20);
        std::time::Duration::from_millis(
            self.backoff_ms
                .saturating_mul(1u64 << exponent)
                .min(self.backoff_max_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(extra: &[(&str, figment::value::Value)]) -> Settings {
        let mut settings = Settings::defaults();
        let section = settings.services.entry(NAME.into()).or_default();
        for (key, value) in extra {
            section.extra.insert((*key).into(), value.clone());
        }
        settings
    }

    #[test]
    fn defaults_log_everything() {
        let notify = NotifySettings::load(&Settings::defaults()).expect("defaults");
        for event in EVENT_TYPES {
            assert_eq!(notify.channels_for(event), [Channel::Log], "{event}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let value =
            |json: serde_json::Value| figment::value::Value::serialize(json).expect("value");
        let cases = [
            (
                "channels",
                value(serde_json::json!({"order_shipped": ["log"]})),
                "services.notify.channels.order_shipped",
            ),
            (
                "max_attempts",
                value(serde_json::json!(0)),
                "services.notify.max_attempts",
            ),
            (
                "default_channels",
                value(serde_json::json!(["webhook"])),
                "services.notify.webhooks",
            ),
            (
                "default_channels",
                value(serde_json::json!(["pigeon"])),
                "services.notify.default_channels",
            ),
            (
                "ops_email",
                value(serde_json::json!("nobody")),
                "services.notify.ops_email",
            ),
        ];
        for (key, value, named) in cases {
            let err = NotifySettings::load(&with(&[(key, value)])).expect_err(key);
            assert!(err.to_string().contains(named), "{key}: {err}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let notify = NotifySettings {
            backoff_ms: 100,
            backoff_max_ms: 500,
            ..Default::default()
        };
        let waits: Vec<u128> = (1..=5).map(|a| notify.backoff(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
    }

    #[test]
    fn webhook_event_patterns() {
        let hook = WebhookSettings {
            name: "h".into(),
            url: "http://127.0.0.1:1/".parse().expect("url"),
            secret: Secret::new("0123456789abcdef"),
            timeout_ms: 1,
            events: vec!["order.*".into(), "stock.low".into()],
        };
        assert!(hook.takes("order.created"));
        assert!(hook.takes("stock.low"));
        assert!(!hook.takes("user.registered"));
    }
}

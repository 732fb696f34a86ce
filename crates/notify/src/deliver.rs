//! Sending what the consumer recorded: the dispatcher and the three channels.
//!
//! The consumer only records deliveries (in its transaction, so a redelivered event adds
//! nothing); the dispatcher sends them, outside any transaction, so a slow SMTP server or
//! webhook never holds the database. It claims a batch of due `pending` deliveries by counting
//! an attempt of each and moving its due time forward by a lease longer than any channel's time
//! limit, in one conditional update (two dispatchers, in one process or many, never send one at once; a
//! dispatcher that dies mid-send leaves a claim that lapses and the delivery is tried again).
//! Then: sent; or failed for now and due again after `backoff_ms`, doubling up to
//! `backoff_max_ms`; or `failed` for good after `max_attempts` tries (or at once for what no
//! retry can fix). `POST /api/v1/notifications/{id}/retry` starts a new round.
//!
//! Delivery to the channel is at least once: a crash between a channel accepting and the row
//! being marked sent sends it again after the lease. Webhooks carry the delivery id
//! (`x-agora-delivery`) so a receiver can drop that repeat.
//!
//! Webhook requests: `POST` of the event's JSON, with `x-agora-event` (its type),
//! `x-agora-delivery` (the notification id), `x-agora-timestamp` (Unix seconds) and
//! `x-agora-signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`. A receiver recomputes
//! the signature over the raw body and refuses stale timestamps (replays).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hmac::{Hmac, Mac as _};
use kit::Db;
use kit::batch::Batcher;
use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::settings::{Channel, NotifySettings, SmtpTls, WebhookSettings};
use crate::store::{self, Notification};

/// Why a try failed.
#[derive(Debug)]
pub enum SendError {
    /// Worth another try (a timeout, a 5xx, a refused connection).
    Transient(String),
    /// No retry can fix it (a malformed address, an endpoint no longer configured).
    Permanent(String),
}

impl SendError {
    fn message(&self) -> &str {
        match self {
            SendError::Transient(m) | SendError::Permanent(m) => m,
        }
    }
}

/// The header value of a webhook signature: `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn webhook_signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The channels, built once at start (nothing connects until a delivery).
pub struct Channels {
    smtp: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    webhooks: HashMap<String, WebhookSettings>,
    http: reqwest::Client,
}

impl Channels {
    pub fn new(settings: &NotifySettings) -> anyhow::Result<Self> {
        let smtp = &settings.smtp;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host)
            .port(smtp.port)
            .timeout(Some(Duration::from_millis(smtp.timeout_ms)));
        if smtp.tls != SmtpTls::None {
            let params = TlsParameters::builder(smtp.host.clone())
                .dangerous_accept_invalid_certs(smtp.accept_invalid_certs)
                .build_rustls()
                .context("services.notify.smtp: TLS settings")?;
            builder = builder.tls(match smtp.tls {
                SmtpTls::Tls => Tls::Wrapper(params),
                _ => Tls::Required(params),
            });
        }
        if let (Some(user), Some(password)) = (&smtp.username, &smtp.password) {
            builder =
                builder.credentials(Credentials::new(user.clone(), password.expose().to_owned()));
        }
        Ok(Self {
            smtp: builder.build(),
            from: smtp
                .from
                .parse()
                .context("services.notify.smtp.from is not an address")?,
            webhooks: settings
                .webhooks
                .iter()
                .map(|w| (w.name.clone(), w.clone()))
                .collect(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .context("building the webhook HTTP client")?,
        })
    }

    /// Sends `n` once through its channel.
    pub async fn send(&self, n: &Notification) -> Result<(), SendError> {
        match Channel::parse(&n.channel) {
            Some(Channel::Log) => {
                tracing::info!(
                    notification = n.id,
                    event = %n.event_type,
                    recipient = %n.recipient,
                    subject = %n.subject,
                    body = %n.body,
                    "notification"
                );
                Ok(())
            }
            Some(Channel::Smtp) => self.email(n).await,
            Some(Channel::Webhook) => self.webhook(n).await,
            None => Err(SendError::Permanent(format!(
                "unknown channel `{}`",
                n.channel
            ))),
        }
    }

    async fn email(&self, n: &Notification) -> Result<(), SendError> {
        let to: Mailbox = n
            .recipient
            .parse()
            .map_err(|e| SendError::Permanent(format!("recipient is not an address: {e}")))?;
        let message = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(n.subject.clone())
            .header(ContentType::TEXT_PLAIN)
            .body(n.body.clone())
            .map_err(|e| SendError::Permanent(format!("building the email: {e}")))?;
        match self.smtp.send(message).await {
            Ok(_) => Ok(()),
            Err(err) if err.is_permanent() => {
                Err(SendError::Permanent(format!("SMTP server refused: {err}")))
            }
            Err(err) => Err(SendError::Transient(format!("SMTP: {err}"))),
        }
    }

    async fn webhook(&self, n: &Notification) -> Result<(), SendError> {
        let hook = self.webhooks.get(&n.recipient).ok_or_else(|| {
            SendError::Permanent(format!("no webhook endpoint named `{}`", n.recipient))
        })?;
        let timestamp = chrono::Utc::now().timestamp();
        let body = n.payload.clone().into_bytes();
        let signature = webhook_signature(hook.secret.expose().as_bytes(), timestamp, &body);
        let response = self
            .http
            .post(hook.url.clone())
            .timeout(Duration::from_millis(hook.timeout_ms))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-agora-event", &n.event_type)
            .header("x-agora-delivery", n.id.to_string())
            .header("x-agora-timestamp", timestamp.to_string())
            .header("x-agora-signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let what = if e.is_timeout() {
                    format!("no answer within {} ms", hook.timeout_ms)
                } else {
                    format!("{e}")
                };
                SendError::Transient(format!("webhook {}: {what}", hook.name))
            })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(SendError::Transient(format!(
                "webhook {} answered {}",
                hook.name,
                response.status()
            )))
        }
    }

    /// Longer than any send can take: how long a claim holds a delivery.
    fn lease(&self, settings: &NotifySettings) -> Duration {
        let webhook = self
            .webhooks
            .values()
            .map(|w| w.timeout_ms)
            .max()
            .unwrap_or(0);
        // An email is a connection, a handshake and a few commands, each within the timeout.
        let smtp = settings.smtp.timeout_ms.saturating_mul(8);
        Duration::from_millis(webhook.max(smtp)) + Duration::from_secs(30)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChannelLabel {
    channel: String,
    outcome: String,
}

/// Sends due deliveries; see the module docs.
/// How long a woken dispatcher waits for more deliveries before its round. Under load a round
/// then carries several deliveries instead of one; a notification is late by this much at most.
const GATHER: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct Dispatcher {
    pub db: Db,
    pub channels: Arc<Channels>,
    pub settings: Arc<NotifySettings>,
    /// Woken after the consumer committed new deliveries, or a retry was asked for.
    pub wake: Arc<Notify>,
    tried: Family<ChannelLabel, Counter>,
    /// Deliveries sent at the same moment are marked sent together (one statement, one commit).
    sent: Arc<Batcher<i64, Result<(), Arc<sqlx::Error>>>>,
}

/// The most deliveries one statement marks sent.
const SENT_PER_BATCH: usize = 64;

impl Dispatcher {
    pub fn new(
        db: Db,
        channels: Arc<Channels>,
        settings: Arc<NotifySettings>,
        wake: Arc<Notify>,
        metrics: &kit::metrics::Metrics,
    ) -> Self {
        let tried = Family::<ChannelLabel, Counter>::default();
        metrics.register(
            "notify_deliveries",
            "Delivery tries by channel and outcome (sent, retry, failed)",
            tried.clone(),
        );
        let sent = {
            let db = db.clone();
            Batcher::new(
                kit::batch::flushers_for(&db),
                SENT_PER_BATCH,
                move |ids: Vec<i64>| {
                    let db = db.clone();
                    async move {
                        // Every delivery of the batch gets the statement's own error.
                        let marked = store::mark_sent(&db, &ids).await.map_err(Arc::new);
                        ids.iter().map(|_| marked.clone()).collect()
                    }
                },
            )
        };
        Self {
            db,
            channels,
            settings,
            wake,
            tried,
            sent: Arc::new(sent),
        }
    }

    /// Until `shutdown`: every due delivery, then sleep until the next pending one is due, a
    /// wake-up (a new delivery recorded here, a retry asked for; then [`GATHER`] more) or
    /// `poll_ms` at most (what other
    /// replicas recorded). So an idle service does not query its database every second, and a
    /// retry runs when its back-off ends. Deliveries in flight when it fires are finished.
    pub async fn run(self, shutdown: CancellationToken) {
        let outage = kit::outage::Outage::new("notification dispatcher (database)".to_owned());
        let poll = Duration::from_millis(self.settings.poll_ms);
        loop {
            let mut wait = poll;
            match self.round().await {
                Ok(true) if !shutdown.is_cancelled() => continue,
                Ok(_) => match store::next_due(&self.db).await {
                    Ok(next) => {
                        outage.succeeded();
                        if let Some(next) = next {
                            let until = (next - store::now()).to_std().unwrap_or_default();
                            wait = wait.min(until.max(Duration::from_millis(5)));
                        }
                    }
                    Err(err) => {
                        outage.failed(&format_args!("{err:#}"));
                    }
                },
                Err(err) => {
                    outage.failed(&format_args!("{err:#}"));
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified() => {
                    // Woken by a delivery just recorded: gather the ones recorded right after it
                    // into the same round (one claim and one look at what is due next for all).
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(GATHER) => {}
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One batch of due deliveries, claimed together; `true` when the batch was full (more may
    /// be due).
    async fn round(&self) -> anyhow::Result<bool> {
        use futures::StreamExt as _;
        let concurrency = self.settings.concurrency;
        let limit = concurrency * 4;
        let lease = chrono::Duration::from_std(self.channels.lease(&self.settings))?;
        let claimed = store::claim_due(&self.db, limit as i64, store::now() + lease).await?;
        let full = claimed.len() == limit;
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(claimed)
            .map(|n| self.deliver(n))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        for result in results {
            result?;
        }
        Ok(full)
    }

    /// One try of delivery `n`, claimed by this dispatcher.
    #[tracing::instrument(name = "deliver", skip_all, fields(notification = n.id))]
    async fn deliver(&self, n: store::Notification) -> anyhow::Result<()> {
        let id = n.id;
        let outcome = match self.channels.send(&n).await {
            Ok(()) => {
                self.sent.submit(id).await??;
                "sent"
            }
            Err(err) => {
                let attempts = u32::try_from(n.attempts).unwrap_or(u32::MAX);
                let give_up = matches!(err, SendError::Permanent(_))
                    || attempts >= self.settings.max_attempts;
                let retry_at = (!give_up).then(|| {
                    store::now()
                        + chrono::Duration::from_std(self.settings.backoff(attempts))
                            .unwrap_or_default()
                });
                tracing::warn!(
                    notification = id,
                    channel = %n.channel,
                    attempts,
                    error.message = err.message(),
                    retry = !give_up,
                    "a delivery failed"
                );
                store::mark_attempt_failed(&self.db, id, err.message(), retry_at).await?;
                if give_up { "failed" } else { "retry" }
            }
        };
        self.tried
            .get_or_create(&ChannelLabel {
                channel: n.channel.clone(),
                outcome: outcome.to_owned(),
            })
            .inc();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_an_hmac_of_timestamp_and_body() {
        // RFC 4231 style check against an independently known value would need a vector; check
        // the properties that matter instead: deterministic, and bound to every input.
        let a = webhook_signature(b"secret", 1, b"{}");
        assert!(a.starts_with("v1=") && a.len() == 3 + 64, "{a}");
        assert_eq!(a, webhook_signature(b"secret", 1, b"{}"));
        assert_ne!(a, webhook_signature(b"secret", 2, b"{}"));
        assert_ne!(a, webhook_signature(b"secret", 1, b"{ }"));
        assert_ne!(a, webhook_signature(b"other", 1, b"{}"));
    }
}

//! A bus that can be switched off, to test how publishers survive an outage (tests only).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::{Bus, BusBackend, Message, SubscriptionBackend};

/// `inner` behind a switch: while [`FaultSwitch::set_unavailable`] is on, every publish and ping
/// through the returned bus fails, as in an outage; everything else (subscribing, acking,
/// `delete_stream`) goes through to `inner` untouched. The returned bus keeps `inner`'s backend name and ack wait, and
/// `inner` itself (and its other clones) is never affected.
pub fn faulty(inner: Bus) -> (Bus, FaultSwitch) {
    let unavailable = Arc::new(AtomicBool::new(false));
    let delay_ms = Arc::new(AtomicU64::new(0));
    let bus = Bus {
        backend: Arc::new(Faulty {
            inner: inner.backend,
            unavailable: unavailable.clone(),
            delay_ms: delay_ms.clone(),
        }),
        ack_wait: inner.ack_wait,
    };
    (
        bus,
        FaultSwitch {
            unavailable,
            delay_ms,
        },
    )
}

/// Switches the bus made by [`faulty`] off and on; cheap to clone.
#[derive(Clone, Debug)]
pub struct FaultSwitch {
    unavailable: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

impl FaultSwitch {
    /// Makes every publish fail until called with `false`.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Makes every publish take `delay` before it goes through (a slow bus).
    pub fn set_publish_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
}

struct Faulty {
    inner: Arc<dyn BusBackend>,
    unavailable: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
}

#[async_trait]
impl BusBackend for Faulty {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn publish(&self, message: &Message) -> anyhow::Result<()> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        anyhow::ensure!(
            !self.unavailable.load(Ordering::SeqCst),
            "publishing {} ({}): bus switched off by a test",
            message.id,
            message.topic
        );
        self.inner.publish(message).await
    }

    async fn subscribe(
        &self,
        consumer: &str,
        topics: Vec<String>,
        ack_wait: Duration,
    ) -> anyhow::Result<Box<dyn SubscriptionBackend>> {
        self.inner.subscribe(consumer, topics, ack_wait).await
    }

    async fn listen(&self, topics: Vec<String>) -> anyhow::Result<Box<dyn SubscriptionBackend>> {
        self.inner.listen(topics).await
    }

    async fn ping(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.unavailable.load(Ordering::SeqCst),
            "bus switched off by a test"
        );
        self.inner.ping().await
    }

    async fn delete_stream(&self) -> anyhow::Result<()> {
        self.inner.delete_stream().await
    }
}

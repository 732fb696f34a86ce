//! The in-process backend: per consumer name a queue, shared by its subscriptions.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Acker, BusBackend, Delivery, Message, NoAck, SubscriptionBackend, topic_matches};

#[derive(Default)]
pub(super) struct MemoryBus {
    consumers: Mutex<HashMap<String, Arc<MemoryConsumer>>>,
    /// Listeners ([`super::Bus::listen`]): their topics and channel; a closed one (its
    /// subscription dropped) is forgotten at the next publish.
    listeners: Mutex<Vec<(Vec<String>, tokio::sync::mpsc::UnboundedSender<Message>)>>,
}

/// A listener's side: messages in the order published.
struct MemoryListener {
    messages: tokio::sync::mpsc::UnboundedReceiver<Message>,
}

#[async_trait]
impl SubscriptionBackend for MemoryListener {
    async fn next(&mut self) -> Option<anyhow::Result<Delivery>> {
        let message = self.messages.recv().await?;
        Some(Ok(Delivery {
            message,
            attempt: 1,
            acker: Box::new(NoAck),
        }))
    }
}

/// One consumer name's queue, shared by its subscriptions and its outstanding deliveries.
#[derive(Default)]
struct MemoryConsumer {
    state: Mutex<ConsumerState>,
    /// Wakes one waiting subscription per message made ready (or per new earliest due time).
    ready: Notify,
}

#[derive(Default)]
struct ConsumerState {
    topics: Vec<String>,
    queue: VecDeque<Queued>,
    /// Nacked or dropped deliveries, by due time (then by order of arrival).
    delayed: BinaryHeap<Reverse<(Instant, u64, Queued)>>,
    arrivals: u64,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Queued {
    attempt: u64,
    id: String,
    topic: String,
    payload: Bytes,
}

struct MemorySubscription {
    consumer: Arc<MemoryConsumer>,
    ack_wait: Duration,
}

/// The un-acked message of a delivery; redelivered after the ack wait if dropped un-acked.
struct MemoryAck {
    consumer: Arc<MemoryConsumer>,
    item: Option<Queued>,
    ack_wait: Duration,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state stays consistent even if a holder panicked (no code panics mid-update).
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl BusBackend for MemoryBus {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, message: &Message) -> anyhow::Result<()> {
        lock(&self.listeners).retain(|(topics, sender)| {
            if topics.iter().any(|p| topic_matches(p, &message.topic)) {
                sender.send(message.clone()).is_ok()
            } else {
                !sender.is_closed()
            }
        });
        let consumers: Vec<Arc<MemoryConsumer>> = lock(&self.consumers).values().cloned().collect();
        for consumer in consumers {
            let mut state = lock(&consumer.state);
            if state
                .topics
                .iter()
                .any(|p| topic_matches(p, &message.topic))
            {
                state.queue.push_back(Queued {
                    attempt: 1,
                    id: message.id.clone(),
                    topic: message.topic.clone(),
                    payload: message.payload.clone(),
                });
                drop(state);
                consumer.ready.notify_one();
            }
        }
        Ok(())
    }

    /// Subscribes as `consumer`; its topics become `topics`.
    async fn subscribe(
        &self,
        consumer: &str,
        topics: Vec<String>,
        ack_wait: Duration,
    ) -> anyhow::Result<Box<dyn SubscriptionBackend>> {
        let consumer = lock(&self.consumers)
            .entry(consumer.to_owned())
            .or_default()
            .clone();
        lock(&consumer.state).topics = topics;
        Ok(Box::new(MemorySubscription { consumer, ack_wait }))
    }

    async fn listen(&self, topics: Vec<String>) -> anyhow::Result<Box<dyn SubscriptionBackend>> {
        let (sender, messages) = tokio::sync::mpsc::unbounded_channel();
        lock(&self.listeners).push((topics, sender));
        Ok(Box::new(MemoryListener { messages }))
    }

    async fn ping(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Forgets every consumer and its queue.
    async fn delete_stream(&self) -> anyhow::Result<()> {
        lock(&self.consumers).clear();
        Ok(())
    }
}

impl MemoryConsumer {
    fn redeliver(&self, mut item: Queued, delay: Duration) {
        item.attempt += 1;
        let mut state = lock(&self.state);
        if delay.is_zero() {
            state.queue.push_back(item);
        } else {
            state.arrivals += 1;
            let arrival = state.arrivals;
            state
                .delayed
                .push(Reverse((Instant::now() + delay, arrival, item)));
        }
        drop(state);
        // A waiting subscription may be sleeping until a later due time (or forever).
        self.ready.notify_one();
    }
}

#[async_trait]
impl SubscriptionBackend for MemorySubscription {
    /// Never ends, never fails.
    async fn next(&mut self) -> Option<anyhow::Result<Delivery>> {
        loop {
            // Registered before looking at the queue, so a publish in between is not missed.
            let notified = self.consumer.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut state = lock(&self.consumer.state);
                let now = Instant::now();
                while let Some(Reverse((due, _, _))) = state.delayed.peek()
                    && *due <= now
                {
                    if let Some(Reverse((_, _, item))) = state.delayed.pop() {
                        state.queue.push_back(item);
                    }
                }
                if let Some(item) = state.queue.pop_front() {
                    let more = !state.queue.is_empty();
                    drop(state);
                    if more {
                        // Pass the turn on, in case the wake-up for the rest went to us.
                        self.consumer.ready.notify_one();
                    }
                    return Some(Ok(Delivery {
                        message: Message {
                            id: item.id.clone(),
                            topic: item.topic.clone(),
                            payload: item.payload.clone(),
                        },
                        attempt: item.attempt,
                        acker: Box::new(MemoryAck {
                            consumer: self.consumer.clone(),
                            item: Some(item),
                            ack_wait: self.ack_wait,
                        }),
                    }));
                }
                state.delayed.peek().map(|Reverse((due, _, _))| *due)
            };
            match wake_at {
                Some(due) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
                None => notified.await,
            }
        }
    }
}

#[async_trait]
impl Acker for MemoryAck {
    /// Nothing to redeliver.
    async fn ack(mut self: Box<Self>) -> anyhow::Result<()> {
        self.item = None;
        Ok(())
    }

    /// Back in the queue after `delay`.
    async fn nack(mut self: Box<Self>, delay: Duration) -> anyhow::Result<()> {
        if let Some(item) = self.item.take() {
            self.consumer.redeliver(item, delay);
        }
        Ok(())
    }
}

impl Drop for MemoryAck {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.consumer.redeliver(item, self.ack_wait);
        }
    }
}

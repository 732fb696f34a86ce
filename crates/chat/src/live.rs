//! Live streams: `GET /api/v1/chats/{id}/stream` upgrades to a WebSocket that receives every
//! event of that chat (new messages, participants added and removed, the chat's deletion) as
//! JSON text frames `{"type", "event_id", "data"}`.
//!
//! Across replicas: every replica listens to the bus (`kit::bus::Bus::listen`, a fan-out
//! subscription of its own, not a shared durable consumer), so each one sees every event any
//! replica's outbox relay published, and hands it to its own subscribers through one broadcast
//! channel per chat ([`Hub`]). Events come at least once (a relay that crashed mid-batch
//! re-publishes): a subscriber skips a message whose `seq` it has sent already, so it sees each
//! message once, in order.
//!
//! Limits: at most `max_subscribers_per_chat` subscribers per chat and replica (503
//! `too_many_subscribers` before the upgrade, with `Retry-After`); a ping every `heartbeat_secs`,
//! and a subscriber that has not answered for three heartbeats is closed; a subscriber too slow
//! to keep up with its chat (more than [`BUFFER`] frames behind) is closed with code 1013 (try
//! again: reconnect and read the history with `GET .../messages`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use kit::bus::Bus;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::model;

/// Frames a subscriber may be behind before it is closed.
pub const BUFFER: usize = 1024;

/// One event of a chat, ready to send.
#[derive(Debug, Clone)]
pub struct Frame {
    pub topic: String,
    /// The message's sequence number (`chat.message_posted` only), for dedupe.
    pub seq: Option<i64>,
    /// The participant it concerns (participant events), to close a removed subscriber.
    pub participant_id: Option<String>,
    pub json: Utf8Bytes,
}

struct Room {
    sender: broadcast::Sender<Arc<Frame>>,
    subscribers: usize,
}

/// The subscribers of this replica, by chat.
#[derive(Default)]
pub struct Hub {
    rooms: Mutex<HashMap<String, Room>>,
}

/// A subscriber's place in its chat's room; leaving (drop) frees it.
pub struct Subscription {
    hub: Arc<Hub>,
    chat_id: String,
    pub frames: broadcast::Receiver<Arc<Frame>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut rooms = self.hub.lock();
        if let Some(room) = rooms.get_mut(&self.chat_id) {
            room.subscribers = room.subscribers.saturating_sub(1);
            if room.subscribers == 0 {
                rooms.remove(&self.chat_id);
            }
        }
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Room>> {
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place in `chat_id`'s room, unless it has `max` subscribers.
    pub fn join(self: &Arc<Self>, chat_id: &str, max: usize) -> Result<Subscription, Error> {
        let mut rooms = self.lock();
        let room = rooms.entry(chat_id.to_owned()).or_insert_with(|| Room {
            sender: broadcast::channel(BUFFER).0,
            subscribers: 0,
        });
        if room.subscribers >= max {
            return Err(Error::TooManySubscribers {
                chat: chat_id.to_owned(),
                max,
            });
        }
        room.subscribers += 1;
        Ok(Subscription {
            hub: self.clone(),
            chat_id: chat_id.to_owned(),
            frames: room.sender.subscribe(),
        })
    }

    /// Hands `frame` to the subscribers of `chat_id` here, if any.
    fn deliver(&self, chat_id: &str, frame: Frame) {
        if let Some(room) = self.lock().get(chat_id) {
            let _ = room.sender.send(Arc::new(frame));
        }
    }

    /// `(chats with subscribers, subscribers)` on this replica.
    pub fn counts(&self) -> (usize, usize) {
        let rooms = self.lock();
        (rooms.len(), rooms.values().map(|r| r.subscribers).sum())
    }

    /// Turns a bus message into a frame for its chat's room.
    fn route(&self, message: &kit::bus::Message) {
        let Ok(event) = message.event() else {
            tracing::warn!(id = %message.id, topic = %message.topic, "an undecodable chat event");
            return;
        };
        let Some(chat_id) = event.data["chat_id"].as_str() else {
            return;
        };
        let frame = Frame {
            topic: event.topic.clone(),
            seq: event.data["message"]["seq"].as_i64(),
            participant_id: event.data["participant_id"].as_str().map(str::to_owned),
            json: json!({"type": event.topic, "event_id": event.id, "data": event.data})
                .to_string()
                .into(),
        };
        self.deliver(chat_id, frame);
    }
}

/// Starts listening to the chat topics on `bus` now (so the service is not ready to serve before
/// it would see events), and returns the task that routes them to `hub` until `stop`.
pub async fn listener(
    hub: Arc<Hub>,
    bus: Bus,
) -> impl FnOnce(CancellationToken) -> tokio::task::JoinHandle<()> {
    let first = match bus.listen(&[model::TOPICS]).await {
        Ok(subscription) => Some(subscription),
        Err(err) => {
            tracing::warn!(error.message = %format!("{err:#}"), "cannot listen to the bus yet; live streams wait for it");
            None
        }
    };
    move |stop: CancellationToken| {
        tokio::spawn(async move {
            let mut subscription = first;
            loop {
                let current = match subscription.as_mut() {
                    Some(current) => current,
                    None => {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        subscription = bus.listen(&[model::TOPICS]).await.ok();
                        continue;
                    }
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    next = current.next() => match next {
                        Some(Ok(delivery)) => hub.route(&delivery.message),
                        Some(Err(err)) => {
                            tracing::debug!(error.message = %format!("{err:#}"), "bus listener");
                        }
                        None => subscription = None,
                    },
                }
            }
        })
    }
}

/// Serves one subscriber (`participant_id`) of one chat until either side closes.
pub async fn serve(
    mut socket: WebSocket,
    mut subscription: Subscription,
    participant_id: String,
    heartbeat: Duration,
    stop: CancellationToken,
) {
    let mut last_seq = 0_i64;
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.tick().await;
    let mut unanswered = 0_u32;
    let close = |code: u16, reason: &'static str| {
        WsMessage::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                let _ = socket.send(close(1001, "the service is stopping")).await;
                return;
            }
            _ = ticker.tick() => {
                if unanswered >= 3 {
                    let _ = socket.send(close(1011, "no answer to pings")).await;
                    return;
                }
                unanswered += 1;
                if socket.send(WsMessage::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
                // Any sign of life counts as an answer (axum answers pings itself).
                Some(Ok(_)) => unanswered = 0,
            },
            frame = subscription.frames.recv() => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = socket.send(close(1013, "too far behind; reconnect and read the history")).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if let Some(seq) = frame.seq {
                    if seq <= last_seq {
                        continue;
                    }
                    last_seq = seq;
                }
                if socket.send(WsMessage::Text(frame.json.clone())).await.is_err() {
                    return;
                }
                let removed = frame.topic == model::PARTICIPANT_REMOVED
                    && frame.participant_id.as_deref() == Some(participant_id.as_str());
                if removed {
                    let _ = socket.send(close(1008, "removed from the chat")).await;
                    return;
                }
                if frame.topic == model::CHAT_DELETED {
                    let _ = socket.send(close(1000, "the chat was deleted")).await;
                    return;
                }
            }
        }
    }
}

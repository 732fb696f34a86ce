//! Live streams: a WebSocket per chat gets what is posted over HTTP, in order, on this replica
//! and (on NATS) from another; only participants subscribe; bounds and heartbeats hold.

use std::time::Duration;

use futures::StreamExt as _;
use kit::testing::{Backend, TestServer};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::helpers::{Store, add, configure, create_chat, env, post, spawn_chat, start_chat};

const V1: &str = "/api/v1";

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_url(server: &TestServer, path: &str) -> String {
    server.url(path).replacen("http://", "ws://", 1)
}

/// Subscribes to `chat` as `participant` on `server` (at `prefix`).
pub async fn subscribe(server: &TestServer, prefix: &str, chat: &str, query: &str) -> Socket {
    let url = ws_url(server, &format!("{prefix}/chats/{chat}/stream?{query}"));
    let (socket, response) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("subscribing at {url}: {e}"));
    assert_eq!(response.status(), 101);
    socket
}

/// The status a refused subscription gets.
pub async fn refused(server: &TestServer, path: &str) -> u16 {
    match tokio_tungstenite::connect_async(ws_url(server, path).as_str()).await {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{path}: {other}"),
        Ok(_) => panic!("{path}: subscribed"),
    }
}

/// The next JSON frame (pings skipped), within 10 s.
pub async fn next_event(socket: &mut Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame within 10 s")
            .expect("the stream is open")
            .expect("a frame");
        match frame {
            Message::Text(text) => return serde_json::from_str(&text).expect("json frame"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The next `count` messages' texts, skipping other events.
pub async fn next_messages(socket: &mut Socket, count: usize) -> Vec<(i64, String)> {
    let mut messages = Vec::new();
    while messages.len() < count {
        let event = next_event(socket).await;
        if event["type"] == "chat.message_posted" {
            let message = &event["data"]["message"];
            messages.push((
                message["seq"].as_i64().expect("seq"),
                message["text"].as_str().expect("text").to_owned(),
            ));
        }
    }
    messages
}

async fn a_subscriber_gets_every_message_posted_over_http_in_order(store: Store) {
    let chat = spawn_chat(store).await;
    let id = create_chat(&chat, V1, "Live").await;
    add(&chat, V1, &id, &["user-1", "user-2"]).await;
    let mut first = subscribe(&chat, V1, &id, "participant_id=user-1").await;
    let mut second = subscribe(&chat, V1, &id, "participant_id=user-2").await;
    for i in 1..=25 {
        post(
            &chat,
            V1,
            &id,
            if i % 2 == 0 { "user-1" } else { "user-2" },
            &format!("m{i}"),
        )
        .await;
    }
    let want: Vec<(i64, String)> = (1..=25).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(next_messages(&mut first, 25).await, want);
    assert_eq!(next_messages(&mut second, 25).await, want);
    // Participant changes come too.
    add(&chat, V1, &id, &["user-3"]).await;
    let event = next_event(&mut first).await;
    assert_eq!(event["type"], "chat.participant_added", "{event}");
    assert_eq!(event["data"]["participant_id"], "user-3");
    assert!(event["event_id"].is_string());
    let (status, stats) = chat.get_json("/api/v1/chats/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["live_subscribers"], 2, "{stats}");
    // A removed participant's stream closes after telling them.
    let path = format!("/api/v1/chats/{id}/participants/user-2");
    assert_eq!(
        chat.request(reqwest::Method::DELETE, &path, None)
            .await
            .status(),
        200
    );
    assert_eq!(
        next_event(&mut second).await["type"],
        "chat.participant_added"
    );
    let event = next_event(&mut second).await;
    assert_eq!(event["type"], "chat.participant_removed", "{event}");
    let closed = tokio::time::timeout(Duration::from_secs(5), second.next())
        .await
        .expect("closed in time");
    assert!(
        matches!(closed, Some(Ok(Message::Close(Some(ref f)))) if u16::from(f.code) == 1008),
        "{closed:?}"
    );
    first.close(None).await.ok();
}

async fn only_participants_of_an_existing_chat_may_subscribe(store: Store) {
    let chat = spawn_chat(store).await;
    let id = create_chat(&chat, V1, "Private").await;
    add(&chat, V1, &id, &["user-1"]).await;
    let base = format!("{V1}/chats/{id}/stream");
    assert_eq!(
        refused(&chat, &format!("{base}?participant_id=user-2")).await,
        403
    );
    assert_eq!(refused(&chat, &base).await, 403, "anonymous");
    assert_eq!(
        refused(
            &chat,
            &format!("{V1}/chats/chat-nope/stream?participant_id=user-1")
        )
        .await,
        404
    );
    // A plain GET (no upgrade) by a participant is told what the endpoint is.
    let response = chat.get(&format!("{base}?participant_id=user-1")).await;
    kit::testing::assert_problem(response, 400, "not_a_websocket").await;
}

crate::on_every_store!(
    a_subscriber_gets_every_message_posted_over_http_in_order,
    only_participants_of_an_existing_chat_may_subscribe,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_beyond_the_bound_are_refused_and_pings_keep_them_alive() {
    let mut env = env(Store::Sqlite).await;
    configure(&mut env, "max_subscribers_per_chat", json!(2));
    configure(&mut env, "heartbeat_secs", json!(1));
    let chat = start_chat(&env, None).await;
    let id = create_chat(&chat, V1, "Crowded").await;
    add(&chat, V1, &id, &["user-1"]).await;
    let mut one = subscribe(&chat, V1, &id, "participant_id=user-1").await;
    let two = subscribe(&chat, V1, &id, "participant_id=user-1").await;
    let path = format!("{V1}/chats/{id}/stream?participant_id=user-1");
    assert_eq!(refused(&chat, &path).await, 503);
    // A ping within two heartbeats.
    let ping = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Some(Ok(Message::Ping(_))) = one.next().await {
                return;
            }
        }
    })
    .await;
    assert!(ping.is_ok(), "no ping within 3 s");
    // Leaving frees a place.
    drop(two);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let url = ws_url(&chat, &path);
        if tokio_tungstenite::connect_async(url.as_str()).await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two chat replicas on one PostgreSQL schema and NATS stream: a message posted to one reaches
/// the subscribers of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_posted_to_one_replica_reaches_subscribers_of_another() {
    let env = env(Store::Postgres).await;
    assert_eq!(env.backend, Backend::Postgres);
    let a = start_chat(&env, None).await;
    let b = start_chat(&env, None).await;
    let id = create_chat(&a, V1, "Distributed").await;
    add(&a, V1, &id, &["user-1"]).await;
    let mut on_a = subscribe(&a, V1, &id, "participant_id=user-1").await;
    let mut on_b = subscribe(&b, V1, &id, "participant_id=user-1").await;
    for i in 1..=10 {
        let server = if i % 2 == 0 { &a } else { &b };
        post(server, V1, &id, "user-1", &format!("m{i}")).await;
    }
    let want: Vec<(i64, String)> = (1..=10).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(next_messages(&mut on_a, 10).await, want, "replica a");
    assert_eq!(next_messages(&mut on_b, 10).await, want, "replica b");
}

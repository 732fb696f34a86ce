//! Chats and participants: the contract of seed 004's endpoints, on every store.

use std::time::{Duration, Instant};

use kit::testing::assert_problem;
use serde_json::{Value, json};

use crate::helpers::{Store, add, create_chat, env, post, spawn_chat, start_chat};

const V1: &str = "/api/v1";

async fn a_created_chat_is_read_back_with_its_participants(store: Store) {
    let chat = spawn_chat(store).await;
    let response = chat
        .post(
            "/api/v1/chats",
            json!({"name": "Project Alpha", "metadata": {"type": "project", "n": [1, 2]}}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .expect("location");
    let created: Value = response.json().await.expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("chat-"), "{id}");
    assert_eq!(location, format!("/api/v1/chats/{id}"));
    assert_eq!(created["name"], "Project Alpha");
    assert_eq!(created["metadata"], json!({"type": "project", "n": [1, 2]}));
    assert_eq!(created["participants"], json!([]));

    let (status, read) = chat.get_json(&location).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read, created, "read back as created");

    let added = add(&chat, V1, &id, &["user-1", "user-2", "user-3"]).await;
    assert_eq!(added["added"], json!(["user-1", "user-2", "user-3"]));
    let (_, read) = chat.get_json(&location).await;
    let ids: Vec<&str> = read["participants"]
        .as_array()
        .expect("participants")
        .iter()
        .map(|p| p["participant_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["user-1", "user-2", "user-3"]);
    assert!(read["participants"][0]["joined_at"].is_string(), "{read}");
}

async fn invalid_chats_are_422_and_unknown_ones_404(store: Store) {
    let chat = spawn_chat(store).await;
    let big = "x".repeat(17 * 1024);
    let cases = [
        (json!({"name": "", "metadata": {}}), "name"),
        (json!({"name": "A", "metadata": [1, 2]}), "metadata"),
        (json!({"name": "A", "metadata": "text"}), "metadata"),
        (json!({"name": "A", "metadata": {"blob": big}}), "metadata"),
    ];
    for (body, field) in cases {
        let problem = assert_problem(
            chat.post("/api/v1/chats", body).await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    // Just under the bound is fine; no metadata at all is an empty object.
    let fits = "x".repeat(16 * 1024 - 20);
    let response = chat
        .post(
            "/api/v1/chats",
            json!({"name": "A", "metadata": {"b": fits}}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let response = chat.post("/api/v1/chats", json!({"name": "B"})).await;
    let created: Value = response.json().await.expect("json");
    assert_eq!(created["metadata"], json!({}));

    for path in [
        "/api/v1/chats/chat-nope",
        "/api/v1/chats/chat-nope/messages",
    ] {
        assert_problem(chat.get(path).await, 404, "chat_not_found").await;
    }
    let response = chat
        .request(reqwest::Method::DELETE, "/api/v1/chats/chat-nope", None)
        .await;
    assert_problem(response, 404, "chat_not_found").await;
    let response = chat
        .post(
            "/api/v1/chats/chat-nope/participants",
            json!({"participant_ids": ["user-1"]}),
        )
        .await;
    assert_problem(response, 404, "chat_not_found").await;
    let response = chat
        .post(
            "/api/v1/chats/chat-nope/participants",
            json!({"participant_ids": []}),
        )
        .await;
    assert_problem(response, 422, "validation_failed").await;
}

async fn adding_participants_twice_adds_nothing_and_removing_is_exact(store: Store) {
    let chat = spawn_chat(store).await;
    let id = create_chat(&chat, V1, "Team").await;
    add(&chat, V1, &id, &["user-1", "user-2"]).await;
    let again = add(&chat, V1, &id, &["user-2", "user-1", "user-3", "user-3"]).await;
    assert_eq!(again["added"], json!(["user-3"]), "{again}");
    assert_eq!(again["participants"].as_array().map(Vec::len), Some(3));

    let path = format!("/api/v1/chats/{id}/participants/user-2");
    let response = chat.request(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("user-2")),
        "{body}"
    );
    let response = chat.request(reqwest::Method::DELETE, &path, None).await;
    assert_problem(response, 404, "participant_not_found").await;
    let (_, read) = chat.get_json(&format!("/api/v1/chats/{id}")).await;
    let ids: Vec<&str> = read["participants"]
        .as_array()
        .expect("participants")
        .iter()
        .filter_map(|p| p["participant_id"].as_str())
        .collect();
    assert_eq!(ids, ["user-1", "user-3"]);
}

/// The chats of a participant, all pages (the GSI may lag on DynamoDB: polled until `want`).
async fn chats_of(
    chat: &kit::testing::TestServer,
    pid: &str,
    limit: usize,
    want: usize,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut ids = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut path = format!("/api/v1/chats/participant/{pid}?limit={limit}");
            if let Some(cursor) = &cursor {
                path.push_str(&format!("&cursor={cursor}"));
            }
            let (status, page) = chat.get_json(&path).await;
            assert_eq!(status, 200, "{page}");
            assert_eq!(page["participant_id"], pid);
            pages += 1;
            let chats = page["chats"].as_array().expect("chats");
            assert!(chats.len() <= limit, "{page}");
            ids.extend(
                chats
                    .iter()
                    .map(|c| c["id"].as_str().expect("id").to_owned()),
            );
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
            assert!(pages < 100, "pagination does not end");
        }
        if ids.len() == want || Instant::now() > deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn the_chats_of_a_participant_come_a_page_at_a_time_each_once(store: Store) {
    let chat = spawn_chat(store).await;
    let mut mine = Vec::new();
    for i in 0..5 {
        let id = create_chat(&chat, V1, &format!("chat {i}")).await;
        add(&chat, V1, &id, &["user-1", "user-9"]).await;
        mine.push(id);
    }
    let other = create_chat(&chat, V1, "not mine").await;
    add(&chat, V1, &other, &["user-9"]).await;
    let mut ids = chats_of(&chat, "user-1", 2, 5).await;
    ids.sort();
    mine.sort();
    assert_eq!(ids, mine, "every chat of user-1 once, none of another's");
    assert_eq!(chats_of(&chat, "user-9", 4, 6).await.len(), 6);
    assert!(chats_of(&chat, "nobody", 10, 0).await.is_empty());
    let response = chat
        .get("/api/v1/chats/participant/user-1?cursor=forged")
        .await;
    assert_problem(response, 422, "validation_failed").await;
    let response = chat.get("/api/v1/chats/participant/user-1?limit=0").await;
    assert_problem(response, 422, "validation_failed").await;
}

async fn deleting_a_chat_deletes_its_participants_and_messages(store: Store) {
    let chat = spawn_chat(store).await;
    let id = create_chat(&chat, V1, "Short-lived").await;
    let kept = create_chat(&chat, V1, "Kept").await;
    add(&chat, V1, &id, &["user-1", "user-2"]).await;
    add(&chat, V1, &kept, &["user-1"]).await;
    for i in 0..30 {
        post(&chat, V1, &id, "user-1", &format!("m{i}")).await;
    }
    assert_eq!(chats_of(&chat, "user-1", 10, 2).await.len(), 2);
    let path = format!("/api/v1/chats/{id}");
    let response = chat.request(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["message"], format!("Chat {id} deleted"));
    assert_problem(chat.get(&path).await, 404, "chat_not_found").await;
    assert_problem(
        chat.get(&format!("{path}/messages")).await,
        404,
        "chat_not_found",
    )
    .await;
    assert_eq!(chats_of(&chat, "user-1", 10, 1).await, [kept]);
    assert_eq!(chats_of(&chat, "user-2", 10, 0).await.len(), 0);
    let response = chat.request(reqwest::Method::DELETE, &path, None).await;
    assert_problem(response, 404, "chat_not_found").await;
    // Posting to it or adding to it finds no chat.
    let response = chat
        .post(
            &format!("{path}/messages"),
            json!({"sender_id": "user-1", "text": "late"}),
        )
        .await;
    assert_problem(response, 404, "chat_not_found").await;
}

async fn every_change_is_announced_on_the_bus(store: Store) {
    let env = env(store).await;
    let shared = kit::service::Shared::connect(&env.settings)
        .await
        .expect("bus");
    let mut events = shared.bus().listen(&["chat.>"]).await.expect("listen");
    let chat = start_chat(&env, Some(&shared)).await;
    let id = create_chat(&chat, V1, "Announced").await;
    add(&chat, V1, &id, &["user-1", "user-2"]).await;
    add(&chat, V1, &id, &["user-1"]).await;
    post(&chat, V1, &id, "user-1", "hello").await;
    let path = format!("/api/v1/chats/{id}/participants/user-2");
    assert_eq!(
        chat.request(reqwest::Method::DELETE, &path, None)
            .await
            .status(),
        200
    );
    let path = format!("/api/v1/chats/{id}");
    assert_eq!(
        chat.request(reqwest::Method::DELETE, &path, None)
            .await
            .status(),
        200
    );
    let want = [
        "chat.created",
        "chat.participant_added",
        "chat.participant_added",
        "chat.message_posted",
        "chat.participant_removed",
        "chat.deleted",
    ];
    let mut got = Vec::new();
    while got.len() < want.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap_or_else(|_| panic!("only {got:?} announced"))
            .expect("listening")
            .expect("delivery");
        let event = delivery.message.event().expect("an event");
        assert_eq!(event.source, "chat");
        assert_eq!(event.data["chat_id"], id.as_str(), "{event:?}");
        if event.topic == "chat.message_posted" {
            assert_eq!(event.data["message"]["text"], "hello");
            assert_eq!(event.data["message"]["seq"], 1);
        }
        got.push(event.topic);
    }
    assert_eq!(
        got, want,
        "one event per change, in order; the repeated add announces nothing"
    );
}

crate::on_every_store!(
    a_created_chat_is_read_back_with_its_participants,
    invalid_chats_are_422_and_unknown_ones_404,
    adding_participants_twice_adds_nothing_and_removing_is_exact,
    the_chats_of_a_participant_come_a_page_at_a_time_each_once,
    deleting_a_chat_deletes_its_participants_and_messages,
    every_change_is_announced_on_the_bus,
);

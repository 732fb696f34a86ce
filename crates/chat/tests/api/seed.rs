//! Seed 004's README, chat sections, replayed through the gateway at its own paths
//! (`/api/chats...`, `/health`), and the live stream through the gateway's WebSocket proxy.

use kit::auth::{AuthMode, Role, Tokens};
use kit::testing::assert_problem;
use serde_json::{Value, json};

use crate::helpers::{Store, post, spawn_system};
use crate::live::{next_messages, refused, subscribe};

async fn seed_004_chat_sequence_through_the_gateway(store: Store) {
    let system = spawn_system(store, None).await;
    // Health checks.
    let (status, health) = system.get_json("/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["services"]["chat"]["status"], "up", "{health}");
    let (status, health) = system.get_json("/api/chats/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["service"], "chat", "{health}");

    // Create a chat.
    let response = system
        .post(
            "/api/chats",
            json!({"name": "Project Alpha", "metadata": {"type": "project"}}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("json");
    let chat_id = created["id"].as_str().expect("id").to_owned();
    assert!(
        chat_id.starts_with("chat-"),
        "the seed's chat-XXXX ids: {chat_id}"
    );
    assert_eq!(created["name"], "Project Alpha");
    assert_eq!(created["metadata"], json!({"type": "project"}));

    // Get chat with participants (none yet).
    let (status, chat) = system.get_json(&format!("/api/chats/{chat_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(chat["participants"], json!([]));

    // Add participants to chat.
    let response = system
        .post(
            &format!("/api/chats/{chat_id}/participants"),
            json!({"participant_ids": ["user-1", "user-2", "user-3"]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let added: Value = response.json().await.expect("json");
    assert_eq!(added["added"], json!(["user-1", "user-2", "user-3"]));

    // Get chat again (now with participants).
    let (_, chat) = system.get_json(&format!("/api/chats/{chat_id}")).await;
    let ids: Vec<&str> = chat["participants"]
        .as_array()
        .expect("participants")
        .iter()
        .filter_map(|p| p["participant_id"].as_str())
        .collect();
    assert_eq!(ids, ["user-1", "user-2", "user-3"]);

    // Get all chats for a participant (uses GSI; it may lag a moment on DynamoDB).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, chats) = system.get_json("/api/chats/participant/user-1").await;
        assert_eq!(status, 200, "{chats}");
        let listed: Vec<&str> = chats["chats"]
            .as_array()
            .expect("chats")
            .iter()
            .filter_map(|c| c["id"].as_str())
            .collect();
        if listed == [chat_id.as_str()] {
            assert_eq!(chats["chats"][0]["name"], "Project Alpha");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{chats}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Remove a participant.
    let response = system
        .request(
            reqwest::Method::DELETE,
            &format!("/api/chats/{chat_id}/participants/user-2"),
            None,
        )
        .await;
    assert_eq!(response.status(), 200);
    let (_, chat) = system.get_json(&format!("/api/chats/{chat_id}")).await;
    assert_eq!(chat["participants"].as_array().map(Vec::len), Some(2));

    // Messages and the live stream at the seed's spelling.
    let mut socket = subscribe(&system, "/api", &chat_id, "participant_id=user-3").await;
    post(
        &system,
        "/api",
        &chat_id,
        "user-1",
        "hello from the gateway",
    )
    .await;
    assert_eq!(
        next_messages(&mut socket, 1).await,
        [(1, "hello from the gateway".to_owned())]
    );
    let (status, page) = system
        .get_json(&format!("/api/chats/{chat_id}/messages"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["messages"][0]["text"], "hello from the gateway");
    socket.close(None).await.ok();

    // Delete entire chat.
    let response = system
        .request(
            reqwest::Method::DELETE,
            &format!("/api/chats/{chat_id}"),
            None,
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_problem(
        system.get(&format!("/api/chats/{chat_id}")).await,
        404,
        "chat_not_found",
    )
    .await;
}

crate::on_every_store!(seed_004_chat_sequence_through_the_gateway);

/// `required` mode: the gateway checks the token (header, or `access_token` on the upgrade),
/// the service acts as participant `user-<id>`; a non-participant is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_through_the_gateway_need_a_participants_token_in_required_mode() {
    let system = spawn_system(Store::Sqlite, Some(AuthMode::Required)).await;
    let tokens = Tokens::new(&system.env.settings.auth).expect("tokens");
    let alice = tokens.issue(1, Role::User).expect("token").access_token;
    let mallory = tokens.issue(5, Role::User).expect("token").access_token;
    let client = &system.gateway.client;
    let response = client
        .post(system.url("/api/v1/chats"))
        .bearer_auth(&alice)
        .json(&json!({"name": "Secure", "metadata": {}}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 201);
    let chat: Value = response.json().await.expect("json");
    let id = chat["id"].as_str().expect("id").to_owned();
    let response = client
        .post(system.url(&format!("/api/v1/chats/{id}/participants")))
        .bearer_auth(&alice)
        .json(&json!({"participant_ids": ["user-1"]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);

    let stream = format!("/api/v1/chats/{id}/stream");
    assert_eq!(refused(&system, &stream).await, 401, "no token");
    assert_eq!(
        refused(&system, &format!("{stream}?access_token=garbage")).await,
        401
    );
    assert_eq!(
        refused(&system, &format!("{stream}?access_token={mallory}")).await,
        403,
        "not a participant"
    );
    let mut socket = subscribe(&system, "/api/v1", &id, &format!("access_token={alice}")).await;
    // Posted as the caller: no sender_id needed.
    let response = client
        .post(system.url(&format!("/api/v1/chats/{id}/messages")))
        .bearer_auth(&alice)
        .json(&json!({"text": "signed"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 201);
    let posted: Value = response.json().await.expect("json");
    assert_eq!(posted["sender_id"], "user-1");
    assert_eq!(
        next_messages(&mut socket, 1).await,
        [(1, "signed".to_owned())]
    );
    let response = client
        .post(system.url(&format!("/api/v1/chats/{id}/messages")))
        .bearer_auth(&mallory)
        .json(&json!({"text": "intruding"}))
        .send()
        .await
        .expect("sent");
    assert_problem(response, 403, "not_a_participant").await;
}

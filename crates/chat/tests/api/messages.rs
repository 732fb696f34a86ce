//! Messages: who may post, and cursor pagination that stays exact while messages keep coming.

use std::collections::HashSet;

use kit::auth::{Identity, Role};
use kit::testing::assert_problem;
use serde_json::{Value, json};

use crate::helpers::{Store, add, create_chat, post, spawn_chat};

const V1: &str = "/api/v1";

async fn only_participants_post_and_a_signed_in_caller_posts_as_themselves(store: Store) {
    let chat = spawn_chat(store).await;
    let id = create_chat(&chat, V1, "Posting").await;
    add(&chat, V1, &id, &["user-1", "user-2"]).await;
    let path = format!("/api/v1/chats/{id}/messages");

    let first = post(&chat, V1, &id, "user-1", "hello").await;
    assert_eq!(first["seq"], 1);
    assert_eq!(first["sender_id"], "user-1");
    assert_eq!(first["chat_id"], id.as_str());
    assert!(
        first["id"].is_string() && first["created_at"].is_string(),
        "{first}"
    );

    let response = chat
        .post(&path, json!({"sender_id": "user-7", "text": "let me in"}))
        .await;
    let problem = assert_problem(response, 403, "not_a_participant").await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("user-7")),
        "{problem}"
    );
    for body in [
        json!({"sender_id": "user-1", "text": "  "}),
        json!({"sender_id": "user-1"}),
        json!({"text": "who am I"}),
        json!({"sender_id": "user-1", "text": "x".repeat(9000)}),
    ] {
        let response = chat.post(&path, body.clone()).await;
        let status = response.status().as_u16();
        assert_eq!(status, 422, "{body}");
    }

    // Through the gateway a signed-in user 2 is participant user-2, whatever the body says.
    let me = Identity {
        user_id: 2,
        role: Role::User,
    };
    let response = chat
        .as_identity(reqwest::Method::POST, &path, me)
        .json(&json!({"text": "from the token"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 201);
    let posted: Value = response.json().await.expect("json");
    assert_eq!(posted["sender_id"], "user-2");
    assert_eq!(posted["seq"], 2);
    let response = chat
        .as_identity(reqwest::Method::POST, &path, me)
        .json(&json!({"sender_id": "user-1", "text": "pretending"}))
        .send()
        .await
        .expect("sent");
    assert_problem(response, 403, "sender_mismatch").await;
    let outsider = Identity {
        user_id: 9,
        role: Role::User,
    };
    let response = chat
        .as_identity(reqwest::Method::POST, &path, outsider)
        .json(&json!({"text": "hi"}))
        .send()
        .await
        .expect("sent");
    assert_problem(response, 403, "not_a_participant").await;
}

/// 250 messages read back through the cursor, newest first, each exactly once and in order,
/// while another client keeps posting.
async fn pages_of_messages_are_exact_while_more_are_posted(store: Store) {
    let chat = spawn_chat(store).await;
    let id = create_chat(&chat, V1, "Busy").await;
    add(&chat, V1, &id, &["user-1", "user-2"]).await;
    for i in 1..=250 {
        post(&chat, V1, &id, "user-1", &format!("m{i}")).await;
    }
    let client = chat.client.clone();
    let url = chat.url(&format!("/api/v1/chats/{id}/messages"));
    let poster = tokio::spawn(async move {
        let mut posted = 0;
        for i in 251..=330 {
            let response = client
                .post(&url)
                .json(&json!({"sender_id": "user-2", "text": format!("m{i}")}))
                .send()
                .await
                .expect("sent");
            assert_eq!(response.status(), 201);
            posted += 1;
        }
        posted
    });
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/chats/{id}/messages?limit=37");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&before={cursor}"));
        }
        let (status, page) = chat.get_json(&path).await;
        assert_eq!(status, 200, "{page}");
        for message in page["messages"].as_array().expect("messages") {
            let seq = message["seq"].as_i64().expect("seq");
            assert_eq!(message["text"], format!("m{seq}"), "{message}");
            seen.push(seq);
        }
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert!(!next.chars().all(|c| c.is_ascii_digit()), "opaque: {next}");
                cursor = Some(next.to_owned());
            }
            None => break,
        }
        // Give the poster a turn between pages.
        tokio::task::yield_now().await;
    }
    let posted = poster.await.expect("poster");
    assert_eq!(posted, 80);
    let top = seen[0];
    assert!(
        top >= 250,
        "the first page starts at the newest message: {top}"
    );
    let want: Vec<i64> = (1..=top).rev().collect();
    assert_eq!(
        seen, want,
        "every message up to the first page's newest, once, newest first"
    );
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), seen.len());

    // After the posting stopped: all 330, and the messages are the ones posted.
    let (_, newest) = chat
        .get_json(&format!("/api/v1/chats/{id}/messages?limit=1"))
        .await;
    assert_eq!(newest["messages"][0]["seq"], 330);
    assert_eq!(newest["messages"][0]["sender_id"], "user-2");
    for bad in ["before=123", "before=zz", "limit=101", "limit=0"] {
        let response = chat
            .get(&format!("/api/v1/chats/{id}/messages?{bad}"))
            .await;
        assert_problem(response, 422, "validation_failed").await;
    }
}

/// Concurrent posts to one chat get distinct, gap-free numbers.
async fn concurrent_posts_get_distinct_consecutive_numbers(store: Store) {
    let chat = spawn_chat(store).await;
    let id = create_chat(&chat, V1, "Race").await;
    add(&chat, V1, &id, &["user-1"]).await;
    let url = chat.url(&format!("/api/v1/chats/{id}/messages"));
    let posts = (0..40).map(|i| {
        let client = chat.client.clone();
        let url = url.clone();
        async move {
            let response = client
                .post(&url)
                .json(&json!({"sender_id": "user-1", "text": format!("c{i}")}))
                .send()
                .await
                .expect("sent");
            assert_eq!(response.status(), 201);
            let body: Value = response.json().await.expect("json");
            body["seq"].as_i64().expect("seq")
        }
    });
    let mut seqs = futures::future::join_all(posts).await;
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
}

crate::on_every_store!(
    only_participants_post_and_a_signed_in_caller_posts_as_themselves,
    pages_of_messages_are_exact_while_more_are_posted,
    concurrent_posts_get_distinct_consecutive_numbers,
);

//! The chats the OpenAPI examples name (`agora seed` loads them): a chat with three
//! participants and a message, and one to delete.

use crate::model::{Chat, PostOutcome};
use crate::store::ChatStore;

/// The chat every example reads, writes and subscribes to.
pub const CHAT: &str = "chat-0193a1b2c3d4e5f60718293a4b5c6d7e";
/// The chat the `DELETE /api/v1/chats/{id}` example deletes.
pub const DELETABLE: &str = "chat-0193a1b2c3d4e5f60718293a4b5c6d7f";

pub async fn load(store: &dyn ChatStore) -> anyhow::Result<String> {
    let mut created = 0;
    for (id, name) in [(CHAT, "Project Alpha"), (DELETABLE, "Old project")] {
        if store.chat(id).await?.is_some() {
            continue;
        }
        let chat = Chat {
            id: id.to_owned(),
            name: name.to_owned(),
            metadata: serde_json::json!({"type": "project"}),
            created_at: crate::model::now(),
        };
        store.create_chat(&chat).await?;
        let ids: Vec<String> = ["user-1", "user-2", "user-3"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        store.add_participants(id, &ids).await?;
        if let PostOutcome::Posted(_) = store.post_message(id, "user-1", "Hello!").await? {
            created += 1;
        }
    }
    Ok(format!("{created} example chats"))
}

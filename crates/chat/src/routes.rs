//! HTTP handlers (canonical paths; the gateway maps seed 004's `/api/chats…` onto them).
//!
//! Who is who: participant ids are the client's strings (`user-1`). A request the gateway
//! forwards with a signed-in identity acts as participant `user-<id>`: it posts as that
//! participant (a different `sender_id` is 403 `sender_mismatch`) and subscribes as them. Without
//! an identity (`open` mode, other services) the body's `sender_id` and the stream's
//! `participant_id` query parameter say who it is.

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use kit::auth::Identity;
use kit::error::FieldError;
use kit::http::{Json, Path, Query};
use kit::{ApiError, ApiResult};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::OpenApi;

use crate::AppState;
use crate::error::{Error, Result};
use crate::model::{
    self, Chat, ChatMessage, ChatWithParticipants, Participant, PostOutcome, Removal, now,
};

/// The service's API.
#[derive(OpenApi)]
#[openapi(
    info(title = "chat", description = "Agora's chats: chats, participants and messages, live over WebSocket."),
    paths(create_chat, get_chat, delete_chat, add_participants, remove_participant,
        chats_of_participant, post_message, list_messages, stream_chat, get_stats),
    tags((name = "chats"))
)]
struct ApiDoc;

/// The service's OpenAPI document (served at `/openapi.json`; the gateway merges it).
pub fn openapi() -> serde_json::Value {
    kit::openapi::finish_service(ApiDoc::openapi(), "/api/v1/chats/stats")
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/chats", post(create_chat))
        .route("/api/v1/chats/stats", get(get_stats))
        .route(
            "/api/v1/chats/participant/{participant_id}",
            get(chats_of_participant),
        )
        .route("/api/v1/chats/{id}", get(get_chat).delete(delete_chat))
        .route("/api/v1/chats/{id}/participants", post(add_participants))
        .route(
            "/api/v1/chats/{id}/participants/{participant_id}",
            delete(remove_participant),
        )
        .route(
            "/api/v1/chats/{id}/messages",
            post(post_message).get(list_messages),
        )
        .route("/api/v1/chats/{id}/stream", get(stream_chat))
        .route("/api/v1/stats", get(get_stats))
        .with_state(state)
}

/// The participant a signed-in caller is.
pub fn participant_of(identity: &Identity) -> String {
    format!("user-{}", identity.user_id)
}

fn valid_id(value: &str) -> bool {
    !value.is_empty() && value.len() <= 200 && !value.chars().any(char::is_control)
}

/// `{"message": ...}` and more: the acknowledgement of a change (seed 004's `MessageResponse`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Done {
    #[schema(example = "Chat chat-0193a1b2c3d4e5f60718293a4b5c6d7e deleted")]
    pub message: String,
}

/// `POST /chats`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewChat {
    #[schema(example = "Project Alpha")]
    name: String,
    /// Any JSON object (at most `services.chat.max_metadata_bytes`, 16 KiB by default).
    #[serde(default)]
    #[schema(value_type = Option<Object>, example = json!({"type": "project"}))]
    metadata: Option<serde_json::Value>,
}

/// Creates a chat (no participants yet); `chat.created` is published.
#[utoipa::path(
    post,
    path = "/api/v1/chats",
    tag = "chats",
    request_body(content = NewChat, examples(
        ("seed 004" = (summary = "seed 004's chat", value = json!({"name": "Project Alpha", "metadata": {"type": "project"}}))),
    )),
    responses(
        (status = 201, description = "Created (`Location` is its URL)", body = ChatWithParticipants),
        (status = 422, description = "No name, a name too long, metadata not an object or too large (`validation_failed`)"),
    )
)]
#[tracing::instrument(skip_all)]
async fn create_chat(State(state): State<AppState>, Json(body): Json<NewChat>) -> Result<Response> {
    let mut errors = Vec::new();
    let name = body.name.trim().to_owned();
    if name.is_empty() {
        errors.push(FieldError::new("name", "required", "A chat needs a name"));
    } else if name.chars().count() > state.settings.max_name_chars {
        errors.push(FieldError::new(
            "name",
            "too_long",
            format!("At most {} characters", state.settings.max_name_chars),
        ));
    }
    let metadata = body.metadata.unwrap_or_else(|| json!({}));
    if !metadata.is_object() {
        errors.push(FieldError::new(
            "metadata",
            "invalid",
            "metadata must be a JSON object",
        ));
    } else if serde_json::to_vec(&metadata).map_or(usize::MAX, |b| b.len())
        > state.settings.max_metadata_bytes
    {
        errors.push(FieldError::new(
            "metadata",
            "too_large",
            format!(
                "metadata is at most {} bytes of JSON",
                state.settings.max_metadata_bytes
            ),
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors).into());
    }
    let chat = Chat {
        id: model::new_chat_id(),
        name,
        metadata,
        created_at: now(),
    };
    state.store.create_chat(&chat).await?;
    state.store.wake_relay();
    let location = format!("/api/v1/chats/{}", chat.id);
    let body = ChatWithParticipants {
        chat,
        participants: Vec::new(),
    };
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// A chat with its participants.
#[utoipa::path(
    get,
    path = "/api/v1/chats/{id}",
    tag = "chats",
    params(("id" = String, Path, description = "The chat's id", example = "chat-0193a1b2c3d4e5f60718293a4b5c6d7e")),
    responses(
        (status = 200, description = "The chat", body = ChatWithParticipants),
        (status = 404, description = "No such chat (`chat_not_found`)"),
    )
)]
#[tracing::instrument(skip(state))]
async fn get_chat(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ChatWithParticipants>> {
    state
        .store
        .chat(&id)
        .await?
        .map(Json)
        .ok_or(Error::ChatNotFound(id))
}

/// Deletes a chat with its participants and messages; `chat.deleted` is published (live
/// subscribers get it, then their stream closes).
#[utoipa::path(
    delete,
    path = "/api/v1/chats/{id}",
    tag = "chats",
    params(("id" = String, Path, description = "The chat's id", example = "chat-0193a1b2c3d4e5f60718293a4b5c6d7f")),
    responses(
        (status = 200, description = "Deleted", body = Done),
        (status = 404, description = "No such chat (`chat_not_found`)"),
    )
)]
#[tracing::instrument(skip(state))]
async fn delete_chat(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Done>> {
    if !state.store.delete_chat(&id).await? {
        return Err(Error::ChatNotFound(id));
    }
    state.store.wake_relay();
    Ok(Json(Done {
        message: format!("Chat {id} deleted"),
    }))
}

/// `POST /chats/{id}/participants`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewParticipants {
    #[schema(example = json!(["user-1", "user-2", "user-3"]))]
    participant_ids: Vec<String>,
}

/// What adding participants did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ParticipantsAdded {
    #[schema(example = "Added 3 participants")]
    message: String,
    chat_id: String,
    /// Those who were not in the chat before (adding someone twice adds nothing).
    #[schema(example = json!(["user-1", "user-2", "user-3"]))]
    added: Vec<String>,
    /// Everyone in the chat now.
    participants: Vec<Participant>,
}

/// Adds participants (idempotent: those already in are left as they are); one
/// `chat.participant_added` per participant added.
#[utoipa::path(
    post,
    path = "/api/v1/chats/{id}/participants",
    tag = "chats",
    params(("id" = String, Path, description = "The chat's id", example = "chat-0193a1b2c3d4e5f60718293a4b5c6d7e")),
    request_body(content = NewParticipants, examples(
        ("seed 004" = (summary = "seed 004's participants", value = json!({"participant_ids": ["user-1", "user-2", "user-3"]}))),
    )),
    responses(
        (status = 200, description = "Added", body = ParticipantsAdded),
        (status = 404, description = "No such chat (`chat_not_found`)"),
        (status = 422, description = "No ids, too many, or an empty one (`validation_failed`)"),
    )
)]
#[tracing::instrument(skip(state, body))]
async fn add_participants(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<NewParticipants>,
) -> Result<Json<ParticipantsAdded>> {
    let max = state.settings.max_participants_per_request;
    let mut errors = Vec::new();
    if body.participant_ids.is_empty() {
        errors.push(FieldError::new(
            "participant_ids",
            "required",
            "Give at least one participant id",
        ));
    } else if body.participant_ids.len() > max {
        errors.push(FieldError::new(
            "participant_ids",
            "too_many",
            format!("At most {max} ids per request"),
        ));
    }
    for (i, pid) in body.participant_ids.iter().enumerate() {
        if !valid_id(pid) {
            errors.push(FieldError::new(
                format!("participant_ids[{i}]"),
                "invalid",
                "An id is 1 to 200 characters, no control characters",
            ));
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors).into());
    }
    let mut ids = body.participant_ids;
    ids.sort();
    ids.dedup();
    let added = state
        .store
        .add_participants(&id, &ids)
        .await?
        .ok_or_else(|| Error::ChatNotFound(id.clone()))?;
    state.store.wake_relay();
    let participants = state
        .store
        .chat(&id)
        .await?
        .map(|c| c.participants)
        .unwrap_or_default();
    Ok(Json(ParticipantsAdded {
        message: format!("Added {} participants", added.len()),
        chat_id: id,
        added: added.into_iter().map(|p| p.participant_id).collect(),
        participants,
    }))
}

/// Removes a participant; `chat.participant_removed` is published (their live stream closes).
#[utoipa::path(
    delete,
    path = "/api/v1/chats/{id}/participants/{participant_id}",
    tag = "chats",
    params(
        ("id" = String, Path, description = "The chat's id", example = "chat-0193a1b2c3d4e5f60718293a4b5c6d7e"),
        ("participant_id" = String, Path, description = "The participant", example = "user-2"),
    ),
    responses(
        (status = 200, description = "Removed", body = Done),
        (status = 404, description = "No such chat (`chat_not_found`) or participant (`participant_not_found`)"),
    )
)]
#[tracing::instrument(skip(state))]
async fn remove_participant(
    State(state): State<AppState>,
    Path((id, participant_id)): Path<(String, String)>,
) -> Result<Json<Done>> {
    match state.store.remove_participant(&id, &participant_id).await? {
        Removal::Removed => {
            state.store.wake_relay();
            Ok(Json(Done {
                message: format!("Participant {participant_id} removed from chat {id}"),
            }))
        }
        Removal::NoChat => Err(Error::ChatNotFound(id)),
        Removal::NotAParticipant => Err(Error::ParticipantNotFound {
            chat: id,
            participant: participant_id,
        }),
    }
}

/// A page query: `limit` and an opaque `cursor` (from the previous page's `next_cursor`).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ChatsQuery {
    /// 1 to 100, default 50.
    #[param(minimum = 1, maximum = 100, example = 50)]
    limit: Option<usize>,
    /// Where to go on from (the previous page's `next_cursor`).
    cursor: Option<String>,
}

/// The chats of one participant.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ParticipantChats {
    #[schema(example = "user-1")]
    participant_id: String,
    /// By chat id.
    chats: Vec<Chat>,
    /// The next page's cursor; `null` on the last page.
    next_cursor: Option<String>,
}

/// A `limit` of 1 to [`kit::page::MAX_PER_PAGE`], the bound of every paginated list.
fn limit(value: Option<usize>, default: usize) -> ApiResult<usize> {
    const MAX: usize = kit::page::MAX_PER_PAGE as usize;
    match value.unwrap_or(default) {
        n @ 1..=MAX => Ok(n),
        _ => Err(ApiError::validation(vec![FieldError::new(
            "limit",
            "out_of_range",
            format!("limit is 1 to {MAX}"),
        )])),
    }
}

fn bad_cursor() -> ApiError {
    ApiError::validation(vec![FieldError::new(
        "cursor",
        "invalid",
        "Not a cursor this API gave",
    )])
}

/// Every chat a participant is in (one index query: a GSI `Query` on DynamoDB), a page at a
/// time.
#[utoipa::path(
    get,
    path = "/api/v1/chats/participant/{participant_id}",
    tag = "chats",
    params(
        ("participant_id" = String, Path, description = "The participant", example = "user-1"),
        ChatsQuery,
    ),
    responses(
        (status = 200, description = "One page of their chats (none: an empty list)", body = ParticipantChats),
        (status = 422, description = "`limit` out of range or a cursor this API did not give (`validation_failed`)"),
    )
)]
#[tracing::instrument(skip(state))]
async fn chats_of_participant(
    State(state): State<AppState>,
    Path(participant_id): Path<String>,
    Query(query): Query<ChatsQuery>,
) -> Result<Json<ParticipantChats>> {
    let limit = limit(query.limit, 50)?;
    let after = match query.cursor.as_deref() {
        None => None,
        Some(cursor) => Some(model::decode_cursor(cursor).ok_or_else(bad_cursor)?),
    };
    let page = state
        .store
        .chats_of(&participant_id, after.as_deref(), limit)
        .await?;
    Ok(Json(ParticipantChats {
        participant_id,
        chats: page.chats,
        next_cursor: page.next.as_deref().map(model::encode_cursor),
    }))
}

/// `POST /chats/{id}/messages`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewMessage {
    /// Who sends it (a participant). A signed-in caller may leave it out: they are the sender.
    #[schema(example = "user-1")]
    sender_id: Option<String>,
    #[schema(example = "Hello!")]
    text: String,
}

/// Posts a message from a participant; it gets the chat's next `seq`, live subscribers get it,
/// and `chat.message_posted` is published.
#[utoipa::path(
    post,
    path = "/api/v1/chats/{id}/messages",
    tag = "chats",
    params(("id" = String, Path, description = "The chat's id", example = "chat-0193a1b2c3d4e5f60718293a4b5c6d7e")),
    request_body(content = NewMessage, examples(
        ("message" = (summary = "a participant's message", value = json!({"sender_id": "user-1", "text": "Hello!"}))),
    )),
    responses(
        (status = 201, description = "Posted", body = ChatMessage),
        (status = 403, description = "The sender is not a participant (`not_a_participant`), or a signed-in caller sends as someone else (`sender_mismatch`)"),
        (status = 404, description = "No such chat (`chat_not_found`)"),
        (status = 422, description = "No sender, or the text empty or too long (`validation_failed`)"),
    )
)]
#[tracing::instrument(skip(state, body))]
async fn post_message(
    State(state): State<AppState>,
    identity: Option<Identity>,
    Path(id): Path<String>,
    Json(body): Json<NewMessage>,
) -> Result<Response> {
    let caller = identity.as_ref().map(participant_of);
    let sender = match (caller, body.sender_id) {
        (Some(caller), Some(sender)) if caller != sender => {
            return Err(Error::SenderMismatch { caller, sender });
        }
        (Some(caller), _) => caller,
        (None, Some(sender)) => sender,
        (None, None) => {
            return Err(ApiError::validation(vec![FieldError::new(
                "sender_id",
                "required",
                "Say who sends the message (or sign in)",
            )])
            .into());
        }
    };
    let mut errors = Vec::new();
    if !valid_id(&sender) {
        errors.push(FieldError::new(
            "sender_id",
            "invalid",
            "An id is 1 to 200 characters, no control characters",
        ));
    }
    if body.text.trim().is_empty() {
        errors.push(FieldError::new("text", "required", "A message needs text"));
    } else if body.text.len() > state.settings.max_text_bytes {
        errors.push(FieldError::new(
            "text",
            "too_long",
            format!("At most {} bytes", state.settings.max_text_bytes),
        ));
    }
    if !errors.is_empty() {
        return Err(ApiError::validation(errors).into());
    }
    match state.store.post_message(&id, &sender, &body.text).await? {
        PostOutcome::Posted(message) => {
            state.store.wake_relay();
            Ok((StatusCode::CREATED, Json(message)).into_response())
        }
        PostOutcome::NoChat => Err(Error::ChatNotFound(id)),
        PostOutcome::NotAParticipant => Err(Error::NotAParticipant {
            chat: id,
            participant: sender,
        }),
    }
}

/// `GET /chats/{id}/messages`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct MessagesQuery {
    /// Messages older than this cursor (the previous page's `next_cursor`); absent: the newest.
    before: Option<String>,
    /// 1 to 100, default 50.
    #[param(minimum = 1, maximum = 100, example = 50)]
    limit: Option<usize>,
}

/// A page of messages, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct MessagePage {
    messages: Vec<ChatMessage>,
    /// `before` of the next (older) page; `null` when there is none.
    next_cursor: Option<String>,
}

/// The chat's messages, newest first, a page at a time: each page goes on strictly below the
/// previous one, so messages posted meanwhile never shift it (no repeats, no gaps).
#[utoipa::path(
    get,
    path = "/api/v1/chats/{id}/messages",
    tag = "chats",
    params(
        ("id" = String, Path, description = "The chat's id", example = "chat-0193a1b2c3d4e5f60718293a4b5c6d7e"),
        MessagesQuery,
    ),
    responses(
        (status = 200, description = "One page", body = MessagePage),
        (status = 404, description = "No such chat (`chat_not_found`)"),
        (status = 422, description = "`limit` out of range or a cursor this API did not give (`validation_failed`)"),
    )
)]
#[tracing::instrument(skip(state))]
async fn list_messages(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<MessagesQuery>,
) -> Result<Json<MessagePage>> {
    let limit = limit(query.limit, 50)?;
    let before = match query.before.as_deref() {
        None => None,
        Some(cursor) => Some(
            model::decode_cursor(cursor)
                .and_then(|p| p.parse::<i64>().ok())
                .ok_or_else(bad_cursor)?,
        ),
    };
    let messages = state
        .store
        .messages(&id, before, limit)
        .await?
        .ok_or_else(|| Error::ChatNotFound(id.clone()))?;
    let next_cursor = match messages.last() {
        Some(last) if messages.len() == limit && last.seq > 1 => {
            Some(model::encode_cursor(&last.seq.to_string()))
        }
        _ => None,
    };
    Ok(Json(MessagePage {
        messages,
        next_cursor,
    }))
}

/// `GET /chats/{id}/stream`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct StreamQuery {
    /// Who subscribes, without a signed-in identity (a signed-in caller is `user-<id>`).
    #[param(example = "user-1")]
    participant_id: Option<String>,
    /// Through the gateway: the bearer token, for clients that cannot set headers on a
    /// WebSocket (the gateway checks it and does not forward it).
    #[allow(dead_code)]
    access_token: Option<String>,
}

/// A WebSocket of the chat's live events: text frames `{"type", "event_id", "data"}` for every
/// message posted (`chat.message_posted`, once each, in `seq` order), participant added or
/// removed, and the chat's deletion; a ping every `heartbeat_secs`. Only participants may
/// subscribe.
#[utoipa::path(
    get,
    path = "/api/v1/chats/{id}/stream",
    tag = "chats",
    params(
        ("id" = String, Path, description = "The chat's id", example = "chat-0193a1b2c3d4e5f60718293a4b5c6d7e"),
        StreamQuery,
    ),
    responses(
        (status = 101, description = "Switching protocols: the WebSocket is open; frames like `{\"type\": \"chat.message_posted\", \"event_id\": \"...\", \"data\": {\"chat_id\": \"...\", \"message\": {...}}}`"),
        (status = 400, description = "Not a WebSocket upgrade request (`not_a_websocket`)"),
        (status = 403, description = "Not a participant of the chat (`not_a_participant`)"),
        (status = 404, description = "No such chat (`chat_not_found`)"),
        (status = 503, description = "The chat has as many subscribers as allowed here (`too_many_subscribers`, with `Retry-After`)"),
    )
)]
#[tracing::instrument(skip(state, upgrade))]
async fn stream_chat(
    State(state): State<AppState>,
    identity: Option<Identity>,
    Path(id): Path<String>,
    Query(query): Query<StreamQuery>,
    upgrade: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    let participant = identity
        .as_ref()
        .map(participant_of)
        .or(query.participant_id)
        .unwrap_or_default();
    match state.store.is_participant(&id, &participant).await? {
        None => return Err(Error::ChatNotFound(id)),
        Some(false) => {
            return Err(Error::NotAParticipant {
                chat: id,
                participant: if participant.is_empty() {
                    "an anonymous caller".into()
                } else {
                    participant
                },
            });
        }
        Some(true) => {}
    }
    let Ok(upgrade) = upgrade else {
        return Err(ApiError::bad_request(
            "not_a_websocket",
            "This is a WebSocket endpoint: send an upgrade request (Connection: Upgrade, Upgrade: websocket)",
        )
        .into());
    };
    // Joined before the upgrade: from the 101 on, the subscriber gets every event.
    let subscription = state
        .hub
        .join(&id, state.settings.max_subscribers_per_chat)?;
    let heartbeat = std::time::Duration::from_secs(state.settings.heartbeat_secs);
    let stop = state.stop.clone();
    Ok(upgrade.on_upgrade(move |socket| {
        crate::live::serve(socket, subscription, participant, heartbeat, stop)
    }))
}

/// The store in use and the live streams of this replica (`/api/v1/chats/stats`,
/// `/api/v1/stats`).
#[utoipa::path(
    get,
    path = "/api/v1/chats/stats",
    tag = "chats",
    responses((status = 200, description = "Store and live streams", body = Object, example = json!({
        "service": "chat", "store": "sqlite", "live_chats": 1, "live_subscribers": 2})))
)]
#[tracing::instrument(skip(state))]
async fn get_stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let (chats, subscribers) = state.hub.counts();
    Json(json!({
        "service": crate::NAME,
        "store": state.store.backend(),
        "live_chats": chats,
        "live_subscribers": subscribers,
    }))
}

//! Accounts: register, log in, and the caller's own record (`/api/v1/users/me`).
//!
//! A password is hashed and verified on the bounded blocking pool ([`crate::password`]); a
//! failed login does the same work whether the email exists or not, and both answer the same
//! 401 `invalid_credentials`.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kit::FieldError;
use kit::auth::{AccessToken, Identity, Role};
use kit::http::{Json, RawJson};
use serde::Deserialize;

use crate::domain::{UserFields, parse_email, parse_name, parse_username};
use crate::error::{Error, Result};
use crate::password::Password;
use crate::{AppState, events, store};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/auth/register", post(register))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/users/me", get(get_me))
        .with_state(state)
}

/// `POST /api/v1/auth/register` (seed 003: `{email, name, password}`; `username` optional).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterBody {
    /// Required; unique.
    email: Option<String>,
    /// Required, 1 to 100 characters (`full_name` is accepted as its alias).
    #[serde(alias = "full_name")]
    name: Option<String>,
    /// Optional, 3 to 32 characters.
    username: Option<String>,
    /// Required, 8 to 128 characters; never stored, logged or returned.
    #[schema(value_type = Option<String>, format = Password)]
    password: Option<Password>,
}

impl RegisterBody {
    /// Every field checked, all problems reported at once.
    fn validate(self) -> Result<(UserFields, Password), Vec<FieldError>> {
        let mut errors = Vec::new();
        let required = |field: &str, errors: &mut Vec<FieldError>| {
            errors.push(FieldError::new(field, "required", "is required"));
        };
        let field = |result: Result<String, (&'static str, String)>,
                     name: &str,
                     errors: &mut Vec<FieldError>| {
            result
                .map_err(|(code, message)| errors.push(FieldError::new(name, code, message)))
                .ok()
        };
        let email = match self.email {
            Some(email) => field(parse_email(&email), "email", &mut errors),
            None => {
                required("email", &mut errors);
                None
            }
        };
        let name = match self.name {
            Some(name) => field(parse_name(&name), "name", &mut errors),
            None => {
                required("name", &mut errors);
                None
            }
        };
        let username = self
            .username
            .and_then(|u| field(parse_username(&u), "username", &mut errors));
        let password = match self.password {
            Some(password) => match password.check(true) {
                Ok(()) => Some(password),
                Err((code, message)) => {
                    errors.push(FieldError::new("password", code, message));
                    None
                }
            },
            None => {
                required("password", &mut errors);
                None
            }
        };
        match (errors.is_empty(), password) {
            (true, Some(password)) => Ok((
                UserFields {
                    username,
                    email,
                    name,
                },
                password,
            )),
            _ => Err(errors),
        }
    }
}

/// Registers an account (role `user`); `user.registered` is published.
#[utoipa::path(
    post,
    path = "/api/v1/auth/register",
    tag = "accounts",
    request_body(content = RegisterBody, examples(
        ("seed 003" = (summary = "seed 003's user, with a password",
            value = json!({"email": "user@example.com", "name": "John Doe",
                "password": "correct-horse-battery"}))),
    )),
    responses(
        (status = 201, description = "Registered; `Location` names the user", body = crate::domain::User),
        (status = 409, description = "The email or username is taken"),
    )
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn register(
    State(state): State<AppState>,
    Json(body): Json<RegisterBody>,
) -> Result<Response> {
    let (fields, password) = body.validate().map_err(Error::Invalid)?;
    let hash = state.hasher.hash(password).await?;
    let mut tx = state.db.begin().await?;
    let user = crate::routes::on_unique(
        store::insert_account(&mut tx, &fields, &hash, Role::User).await,
        &fields,
    )?;
    // In the same transaction: no account without its event, no event without its account.
    kit::outbox::enqueue(&mut tx, &[events::user_registered(&user)?]).await?;
    tx.commit().await?;
    crate::routes::invalidate_after_write(&state, None).await;
    state.outbox.notify();
    tracing::info!(user_id = user.id, "account registered");
    let location = HeaderValue::from_str(&format!("/api/v1/users/{}", user.id))
        .map_err(anyhow::Error::from)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(user),
    )
        .into_response())
}

/// `POST /api/v1/auth/login`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginBody {
    email: String,
    /// At most 128 characters.
    #[schema(value_type = String, format = Password)]
    password: Password,
}

/// Logs in: an access token (JWT with subject, role, issuer, audience, expiry).
#[utoipa::path(
    post,
    path = "/api/v1/auth/login",
    tag = "accounts",
    request_body(content = LoginBody, examples(
        ("registered" = (summary = "the account the register example creates",
            value = json!({"email": "user@example.com", "password": "correct-horse-battery"}))),
    )),
    responses(
        (status = 200, description = "Logged in", body = kit::auth::AccessToken),
        (status = 401, description = "Wrong email or password (`invalid_credentials`), the same either way"),
    )
)]
#[tracing::instrument(skip_all)]
pub(crate) async fn login(
    State(state): State<AppState>,
    Json(body): Json<LoginBody>,
) -> Result<Json<AccessToken>> {
    // Only the upper bound: a short password may predate a rule, and says nothing anyway.
    body.password.check(false).map_err(|(code, message)| {
        Error::Invalid(vec![FieldError::new("password", code, message)])
    })?;
    // A malformed email finds nobody, and is answered like an unknown one.
    let account = match parse_email(&body.email) {
        Ok(email) => store::find_account(&state.db, &email).await?,
        Err(_) => None,
    };
    let hash = account.as_ref().and_then(|a| a.password_hash.clone());
    let verified = state.hasher.verify(body.password, hash).await?;
    match account {
        Some(account) if verified => {
            let role = Role::parse(&account.role).unwrap_or(Role::User);
            tracing::info!(user_id = account.id, "logged in");
            Ok(Json(state.tokens.issue(account.id, role)?))
        }
        _ => {
            tracing::info!("login refused");
            Err(Error::InvalidCredentials)
        }
    }
}

/// The caller, from the identity the gateway verified (401 without one).
#[utoipa::path(
    get,
    path = "/api/v1/users/me",
    tag = "accounts",
    responses(
        (status = 200, description = "The caller", body = crate::domain::User),
        (status = 401, description = "No token (`unauthenticated`)"),
        (status = 404, description = "The caller's account is gone (`user_not_found`)"),
    )
)]
#[tracing::instrument(skip_all, fields(user_id = identity.user_id))]
pub(crate) async fn get_me(State(state): State<AppState>, identity: Identity) -> Result<RawJson> {
    crate::routes::user_json(&state, identity.user_id).await
}

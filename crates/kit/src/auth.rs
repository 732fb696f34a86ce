//! Identity, shared by every service: the `[auth]` settings, the secrets they hold, JWT issue and
//! verification, the headers that carry a verified identity from the gateway to a service, and
//! the guard every service's router gets ([`guard`]).
//!
//! Trust model. Only the gateway verifies bearer tokens. It strips [`USER_ID_HEADER`],
//! [`USER_ROLE_HEADER`] and [`SERVICE_TOKEN_HEADER`] from every incoming request, then sets the
//! identity headers from a verified token and adds the service credential (`auth.service_token`)
//! to what it forwards. A service believes identity headers only when the same request carries
//! that credential, so a client (or a pod in the same network) that reaches a service directly
//! cannot pose as a user; and `/internal/...` endpoints refuse any caller without it.
//!
//! Services read the caller with the [`Identity`] extractor (`Option<Identity>` where a caller
//! is optional). An ownership rule such as "another user's order is 404" is written in the
//! service owning the data, against `Identity::user_id` / `Identity::is_admin`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::extract::{FromRequestParts, OptionalFromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use crate::ApiError;
use crate::config::ConfigError;

/// The verified user id, set by the gateway (stripped from every incoming request).
pub static USER_ID_HEADER: HeaderName = HeaderName::from_static("x-agora-user-id");
/// The verified role (`user` or `admin`), set by the gateway.
pub static USER_ROLE_HEADER: HeaderName = HeaderName::from_static("x-agora-user-role");
/// The service credential: the gateway and services calling each other send it.
pub static SERVICE_TOKEN_HEADER: HeaderName = HeaderName::from_static("x-agora-service-token");

/// Every header a client must never be able to set: the gateway removes them all.
pub fn trusted_headers() -> [&'static HeaderName; 3] {
    [&USER_ID_HEADER, &USER_ROLE_HEADER, &SERVICE_TOKEN_HEADER]
}

/// Shortest secret accepted (`auth.jwt_secret`, `auth.previous_jwt_secret`,
/// `auth.service_token`): HS256 wants at least 256 bits of key.
pub const MIN_SECRET_CHARS: usize = 32;

/// Clock skew tolerated on `exp` between the issuer and the gateway.
const LEEWAY_SECS: u64 = 30;

/// Longest bearer token looked at; anything longer is refused without parsing.
const MAX_TOKEN_CHARS: usize = 4096;

/// A secret from the configuration. Its `Debug` and `Serialize` print `***`, so neither a log line
/// nor `agora config` can show it; the value is read only through [`Secret::expose`].
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// 32 random bytes from the OS, hex-encoded (64 characters).
    pub fn generate() -> anyhow::Result<Self> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).context("reading random bytes from the OS")?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self::new(hex))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Constant-time comparison (a credential check must not tell how much of a guess matched).
    pub fn matches(&self, candidate: &[u8]) -> bool {
        use subtle::ConstantTimeEq as _;
        let own = self.expose().as_bytes();
        own.len() == candidate.len() && bool::from(own.ct_eq(candidate))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Environment values are parsed by figment: a secret of digits arrives as a number.
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a secret string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// How the gateway treats requests without a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Tokens are verified when sent (and their role checked); requests without one are let
    /// through, so the seeds' token-less flows work. The default of `agora up`.
    Open,
    /// Requests without a token get 401 except on public routes. The default of `agora serve`.
    Required,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Required => "required",
        }
    }
}

/// `[auth]`: see `config/default.toml` for every key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Unset: `open` under `agora up`, `required` under `agora serve` (and for a gateway built
    /// by other code: [`AuthSettings::mode`]).
    #[serde(default)]
    pub mode: Option<AuthMode>,
    pub issuer: String,
    pub audience: String,
    pub token_ttl_secs: u64,
    /// HS256 signing key of the users service, verification key of the gateway.
    #[serde(default)]
    pub jwt_secret: Option<Secret>,
    /// The key before the last rotation: tokens it signed are still accepted until they expire.
    #[serde(default)]
    pub previous_jwt_secret: Option<Secret>,
    /// EdDSA instead of HS256: the Ed25519 public key (PEM, `BEGIN PUBLIC KEY`) every verifier
    /// uses. With it set, `jwt_secret` no longer signs or verifies tokens, and a verifier (the
    /// gateway) holds nothing that can sign one.
    #[serde(default)]
    pub ed25519_public_key: Option<String>,
    /// The matching private key (PEM, `BEGIN PRIVATE KEY`): only the signer (users) needs it.
    #[serde(default)]
    pub ed25519_private_key: Option<Secret>,
    /// The public key before the last rotation: tokens it verifies are still accepted.
    #[serde(default)]
    pub previous_ed25519_public_key: Option<String>,
    /// The credential internal endpoints and identity headers need.
    #[serde(default)]
    pub service_token: Option<Secret>,
    /// Password hashes computed at once (each on a blocking thread); more wait their turn.
    pub hash_concurrency: usize,
}

impl AuthSettings {
    /// The mode in force: as configured, `required` when unset.
    pub fn mode(&self) -> AuthMode {
        self.mode.unwrap_or(AuthMode::Required)
    }

    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: key.to_owned(),
            message: message.to_owned(),
        };
        if self.issuer.trim().is_empty() {
            return Err(invalid("auth.issuer", "must not be empty"));
        }
        if self.audience.trim().is_empty() {
            return Err(invalid("auth.audience", "must not be empty"));
        }
        if !(60..=7 * 24 * 3600).contains(&self.token_ttl_secs) {
            return Err(invalid(
                "auth.token_ttl_secs",
                "must be from 60 to 604800 (7 days)",
            ));
        }
        if !(1..=64).contains(&self.hash_concurrency) {
            return Err(invalid("auth.hash_concurrency", "must be from 1 to 64"));
        }
        if self.ed25519_public_key.is_none() {
            for (key, set) in [
                (
                    "auth.ed25519_private_key",
                    self.ed25519_private_key.is_some(),
                ),
                (
                    "auth.previous_ed25519_public_key",
                    self.previous_ed25519_public_key.is_some(),
                ),
            ] {
                if set {
                    return Err(invalid(key, "needs auth.ed25519_public_key as well"));
                }
            }
        }
        for (key, pem) in [
            ("auth.ed25519_public_key", &self.ed25519_public_key),
            (
                "auth.previous_ed25519_public_key",
                &self.previous_ed25519_public_key,
            ),
        ] {
            if let Some(pem) = pem {
                ed25519_public(key, pem)?;
            }
        }
        if let Some(pem) = &self.ed25519_private_key {
            ed25519_private(pem)?;
        }
        for (key, secret) in [
            ("auth.jwt_secret", &self.jwt_secret),
            ("auth.previous_jwt_secret", &self.previous_jwt_secret),
            ("auth.service_token", &self.service_token),
        ] {
            if let Some(secret) = secret
                && secret.expose().chars().count() < MIN_SECRET_CHARS
            {
                return Err(ConfigError::Invalid {
                    key: key.to_owned(),
                    message: format!("must be at least {MIN_SECRET_CHARS} characters"),
                });
            }
        }
        Ok(())
    }

    /// The service credential, or a start-up error naming the key.
    pub fn require_service_token(&self) -> Result<&Secret, ConfigError> {
        self.service_token.as_ref().ok_or_else(|| {
            missing(
                "auth.service_token",
                "AGORA_AUTH__SERVICE_TOKEN",
                "the credential of internal endpoints, shared by every service and the gateway",
            )
        })
    }
}

fn ed25519_public(key: &str, pem: &str) -> Result<DecodingKey, ConfigError> {
    DecodingKey::from_ed_pem(pem.as_bytes()).map_err(|_| ConfigError::Invalid {
        key: key.to_owned(),
        message: "is not an Ed25519 public key in PEM (-----BEGIN PUBLIC KEY-----; \
                  `openssl pkey -in private.pem -pubout`)"
            .to_owned(),
    })
}

fn ed25519_private(pem: &Secret) -> Result<EncodingKey, ConfigError> {
    EncodingKey::from_ed_pem(pem.expose().as_bytes()).map_err(|_| ConfigError::Invalid {
        key: "auth.ed25519_private_key".to_owned(),
        message: "is not an Ed25519 private key in PEM (-----BEGIN PRIVATE KEY-----; \
                  `openssl genpkey -algorithm ed25519`)"
            .to_owned(),
    })
}

fn ed25519_mismatch() -> ConfigError {
    ConfigError::Invalid {
        key: "auth.ed25519_private_key".to_owned(),
        message: "does not match auth.ed25519_public_key (tokens it signs would be refused)"
            .to_owned(),
    }
}

fn missing(key: &str, env: &str, what: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: format!(
            "is required ({what}); set {env} to a random string of at least {MIN_SECRET_CHARS} \
             characters (e.g. `openssl rand -hex 32`)"
        ),
    }
}

/// What a user may do beyond their own records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Admin => "admin",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "user" => Some(Self::User),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// A verified caller: from a token at the gateway, from the identity headers in a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub user_id: i64,
    pub role: Role,
}

impl Identity {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// The headers the gateway forwards for this identity.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert(USER_ID_HEADER.clone(), HeaderValue::from(self.user_id));
        headers.insert(
            USER_ROLE_HEADER.clone(),
            HeaderValue::from_static(self.role.as_str()),
        );
    }

    fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let user_id = headers.get(&USER_ID_HEADER)?.to_str().ok()?.parse().ok()?;
        let role = Role::parse(headers.get(&USER_ROLE_HEADER)?.to_str().ok()?)?;
        Some(Self { user_id, role })
    }
}

/// The claims of an Agora access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id, as a string (RFC 7519 says so).
    pub sub: String,
    pub role: Role,
    pub iss: String,
    pub aud: String,
    pub iat: u64,
    pub exp: u64,
}

/// An issued access token, as `POST /api/v1/auth/login` returns it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[schema(example = json!({"access_token": "eyJhbGciOiJIUzI1NiJ9…", "token_type": "Bearer", "expires_in": 3600}))]
pub struct AccessToken {
    /// A JWT: send it as `Authorization: Bearer <access_token>`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// Why a token was refused (logged at debug; the client only learns it is invalid).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token too long")]
    TooLong,
    #[error("{0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("subject is not a user id")]
    BadSubject,
}

/// Issues and verifies HS256 tokens with the configured issuer, audience and keys. Cheap to clone.
#[derive(Clone)]
pub struct Tokens(Arc<TokensInner>);

struct TokensInner {
    algorithm: Algorithm,
    /// `None`: this process only verifies (an Ed25519 public key without its private key).
    encoding: Option<EncodingKey>,
    /// The current key first, then the previous one (rotation).
    decoding: Vec<DecodingKey>,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl: Duration,
    verified: Verified,
}

/// Slots of the verified-token memo ([`Verified`]): a power of two.
const VERIFIED_SLOTS: usize = 1024;

/// The tokens verified lately, each with its identity and expiry: a client sends the same token
/// with every request, and checking its signature (HMAC, or Ed25519 at several times the cost)
/// and decoding its claims was the largest part of the gateway's work per authenticated
/// request. Direct-mapped by a hash of the token, each slot holding the whole token, compared
/// in full; a token colliding with another takes its slot. Bounded (at most
/// [`VERIFIED_SLOTS`] tokens), and an entry is used only while its token is unexpired.
/// Only what verified is kept: a token is valid or not by its bytes and the keys, which do not
/// change while the process runs, so the memo answers as verifying again would.
struct Verified {
    slots: Box<[std::sync::Mutex<Option<VerifiedToken>>]>,
    hasher: foldhash::fast::FixedState,
}

struct VerifiedToken {
    token: Box<str>,
    identity: Identity,
    /// `exp` plus the leeway: valid while the clock has not passed it.
    valid_until: u64,
}

impl Verified {
    fn new() -> Self {
        Self {
            slots: (0..VERIFIED_SLOTS)
                .map(|_| std::sync::Mutex::new(None))
                .collect(),
            hasher: foldhash::fast::FixedState::with_seed(unix_now()),
        }
    }

    fn slot(&self, token: &str) -> &std::sync::Mutex<Option<VerifiedToken>> {
        use std::hash::BuildHasher as _;
        let hash = self.hasher.hash_one(token) as usize;
        &self.slots[hash & (VERIFIED_SLOTS - 1)]
    }

    /// The identity of `token` if it verified lately and has not expired since.
    fn get(&self, token: &str, now: u64) -> Option<Identity> {
        let slot = self.slot(token).lock().unwrap_or_else(|p| p.into_inner());
        slot.as_ref()
            .filter(|v| &*v.token == token && now <= v.valid_until)
            .map(|v| v.identity)
    }

    fn remember(&self, token: &str, identity: Identity, exp: u64) {
        let entry = VerifiedToken {
            token: token.into(),
            identity,
            valid_until: exp.saturating_add(LEEWAY_SECS),
        };
        *self.slot(token).lock().unwrap_or_else(|p| p.into_inner()) = Some(entry);
    }
}

impl Tokens {
    /// From `[auth]`: EdDSA when `auth.ed25519_public_key` is set (signing too when the private
    /// key is), HS256 with `auth.jwt_secret` otherwise; a start-up error naming the key that is
    /// missing or wrong.
    pub fn new(auth: &AuthSettings) -> Result<Self, ConfigError> {
        let (algorithm, encoding, decoding) = match &auth.ed25519_public_key {
            Some(public) => {
                let mut decoding = vec![ed25519_public("auth.ed25519_public_key", public)?];
                if let Some(previous) = &auth.previous_ed25519_public_key {
                    decoding.push(ed25519_public(
                        "auth.previous_ed25519_public_key",
                        previous,
                    )?);
                }
                let encoding = auth
                    .ed25519_private_key
                    .as_ref()
                    .map(ed25519_private)
                    .transpose()?;
                (Algorithm::EdDSA, encoding, decoding)
            }
            None => {
                let secret = auth.jwt_secret.as_ref().ok_or_else(|| {
                    missing(
                        "auth.jwt_secret",
                        "AGORA_AUTH__JWT_SECRET",
                        "the key that signs and verifies access tokens",
                    )
                })?;
                let mut decoding = vec![DecodingKey::from_secret(secret.expose().as_bytes())];
                if let Some(previous) = &auth.previous_jwt_secret {
                    decoding.push(DecodingKey::from_secret(previous.expose().as_bytes()));
                }
                let encoding = EncodingKey::from_secret(secret.expose().as_bytes());
                (Algorithm::HS256, Some(encoding), decoding)
            }
        };
        // One algorithm: a token whose header names any other (`none`, RS256, HS512, or HS256
        // under EdDSA) is refused before its signature is looked at.
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.set_issuer(&[&auth.issuer]);
        validation.set_audience(&[&auth.audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        let tokens = Self(Arc::new(TokensInner {
            algorithm,
            encoding,
            decoding,
            validation,
            issuer: auth.issuer.clone(),
            audience: auth.audience.clone(),
            ttl: Duration::from_secs(auth.token_ttl_secs),
            verified: Verified::new(),
        }));
        if algorithm == Algorithm::EdDSA && tokens.can_sign() {
            // A private key that is not the public key's pair would sign tokens nobody accepts.
            let probe = tokens
                .issue(0, Role::User)
                .map_err(|_| ed25519_mismatch())?;
            tokens
                .verify(&probe.access_token)
                .map_err(|_| ed25519_mismatch())?;
        }
        Ok(tokens)
    }

    /// Whether this process holds a signing key (the gateway, given only an Ed25519 public
    /// key, does not).
    pub fn can_sign(&self) -> bool {
        self.0.encoding.is_some()
    }

    /// A signed token for `user_id` with `role`, valid for `auth.token_ttl_secs`.
    pub fn issue(&self, user_id: i64, role: Role) -> anyhow::Result<AccessToken> {
        let now = unix_now();
        let claims = Claims {
            sub: user_id.to_string(),
            role,
            iss: self.0.issuer.clone(),
            aud: self.0.audience.clone(),
            iat: now,
            exp: now + self.0.ttl.as_secs(),
        };
        let key = self
            .0
            .encoding
            .as_ref()
            .context("this process holds no signing key (auth.ed25519_private_key is unset)")?;
        let token = jsonwebtoken::encode(&Header::new(self.0.algorithm), &claims, key)
            .context("signing an access token")?;
        Ok(AccessToken {
            access_token: token,
            token_type: "Bearer",
            expires_in: self.0.ttl.as_secs(),
        })
    }

    /// The identity in `token` when its signature (current or previous key), algorithm, expiry,
    /// issuer and audience are all right. A token verified lately is not verified again while
    /// it is unexpired ([`Verified`]).
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::TooLong);
        }
        if let Some(identity) = self.0.verified.get(token, unix_now()) {
            return Ok(identity);
        }
        let (identity, exp) = self.verify_signed(token)?;
        self.0.verified.remember(token, identity, exp);
        Ok(identity)
    }

    /// [`Tokens::verify`] without the memo: the identity and the expiry.
    fn verify_signed(&self, token: &str) -> Result<(Identity, u64), TokenError> {
        let mut last = None;
        for key in &self.0.decoding {
            match jsonwebtoken::decode::<Claims>(token, key, &self.0.validation) {
                Ok(data) => {
                    let user_id = data
                        .claims
                        .sub
                        .parse()
                        .map_err(|_| TokenError::BadSubject)?;
                    let identity = Identity {
                        user_id,
                        role: data.claims.role,
                    };
                    return Ok((identity, data.claims.exp));
                }
                // Only a bad signature is worth trying the previous key for.
                Err(err)
                    if matches!(
                        err.kind(),
                        jsonwebtoken::errors::ErrorKind::InvalidSignature
                    ) =>
                {
                    last = Some(err);
                }
                Err(err) => return Err(err.into()),
            }
        }
        Err(last.map_or(TokenError::BadSubject, TokenError::from))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A 401 problem with `WWW-Authenticate: Bearer` (RFC 6750): `code` is `unauthenticated` (no
/// token) or `invalid_token`.
pub fn unauthorized(code: &str, detail: impl Into<String>) -> Response {
    let challenge = if code == "invalid_token" {
        r#"Bearer realm="agora", error="invalid_token""#
    } else {
        r#"Bearer realm="agora""#
    };
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, code, detail).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// 403 `forbidden`.
pub fn forbidden(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
}

/// The rejection of [`Identity`]: 401 `unauthenticated`.
#[derive(Debug)]
pub struct Unauthenticated;

impl IntoResponse for Unauthenticated {
    fn into_response(self) -> Response {
        unauthorized(
            "unauthenticated",
            "Sign in first: send `Authorization: Bearer <token>` (POST /api/v1/auth/login)",
        )
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Identity {
    type Rejection = Unauthenticated;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Identity>()
            .copied()
            .ok_or(Unauthenticated)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Identity {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Identity>().copied())
    }
}

/// True for the paths only services may call (`/internal` and everything under it).
pub fn is_internal(path: &str) -> bool {
    path == "/internal" || path.starts_with("/internal/")
}

/// The layer in front of every service's routes (see `Deps::app`): requests carrying the
/// service credential get their identity headers turned into an [`Identity`]; from anyone else
/// those headers are dropped, and `/internal/...` is refused with 403 `forbidden`. The credential
/// and identity headers are removed before handlers run. With no credential configured nothing
/// is trusted and every internal endpoint is refused.
pub async fn guard(
    State(credential): State<Option<Secret>>,
    mut req: Request,
    next: Next,
) -> Response {
    let trusted = match (&credential, req.headers().get(&SERVICE_TOKEN_HEADER)) {
        (Some(secret), Some(sent)) => secret.matches(sent.as_bytes()),
        _ => false,
    };
    if !trusted && is_internal(req.uri().path()) {
        return forbidden("Internal endpoints answer only callers with the service credential")
            .into_response();
    }
    let identity = trusted
        .then(|| Identity::from_headers(req.headers()))
        .flatten();
    for name in trusted_headers() {
        req.headers_mut().remove(name);
    }
    if let Some(identity) = identity {
        req.extensions_mut().insert(identity);
    }
    next.run(req).await
}

/// The secret kept in `path`: read when the file exists, else generated and written there
/// readable by its owner only (0600), so it survives restarts. `agora up` keeps its JWT key and
/// service credential this way under `data_dir`.
pub fn load_or_create_secret(path: &Path) -> anyhow::Result<Secret> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match read_secret(path)? {
        Some(secret) => Ok(secret),
        None => {
            let secret = Secret::generate()?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            match options.open(path) {
                Ok(mut file) => {
                    use std::io::Write as _;
                    file.write_all(secret.expose().as_bytes())
                        .and_then(|()| file.sync_all())
                        .with_context(|| format!("writing {}", path.display()))?;
                    Ok(secret)
                }
                // Another process wrote it a moment ago: use theirs.
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                    read_secret(path)?.with_context(|| format!("{} is empty", path.display()))
                }
                Err(err) => Err(err).with_context(|| format!("creating {}", path.display())),
            }
        }
    }
}

fn read_secret(path: &Path) -> anyhow::Result<Option<Secret>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            // Someone widened it: narrow it again rather than serve with a readable key.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("restricting {} to its owner", path.display()))?;
            tracing::warn!(path = %path.display(), "secret file was readable by others; now 0600");
        }
    }
    let secret = text.trim();
    anyhow::ensure!(
        secret.chars().count() >= MIN_SECRET_CHARS,
        "{} holds a secret shorter than {MIN_SECRET_CHARS} characters; delete it to get a new one",
        path.display()
    );
    Ok(Some(Secret::new(secret)))
}

#[cfg(test)]
mod tests;

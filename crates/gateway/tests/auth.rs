//! Authorization at the edge: real users and catalog services behind the gateway, in `required`
//! and `open` mode, on both backends. Tokens come from the users service's login; forged ones are
//! signed here with the test's key (or another).

use std::collections::BTreeMap;

use kit::auth::AuthMode;
use kit::testing::{Backend, TestEnv, TestServer, assert_problem};
use reqwest::Method;
use serde_json::{Value, json};
use url::Url;

struct Stack {
    gateway: TestServer,
    users: TestServer,
    catalog: TestServer,
    env: TestEnv,
    client: reqwest::Client,
}

async fn spawn(backend: Backend, mode: AuthMode) -> Stack {
    let mut env = TestEnv::new(backend).await;
    env.settings.auth.mode = Some(mode);
    let users = TestServer::start(
        users::app(env.deps(&users::SERVICE).await)
            .await
            .expect("users"),
        &env.settings,
    )
    .await;
    let catalog = TestServer::start(
        catalog::app(env.deps(&catalog::SERVICE).await)
            .await
            .expect("catalog"),
        &env.settings,
    )
    .await;
    let url = |s: &TestServer| vec![Url::parse(&s.url("")).expect("url")];
    let upstreams = BTreeMap::from([
        ("users".to_owned(), url(&users)),
        ("catalog".to_owned(), url(&catalog)),
    ]);
    let gateway = gateway::app_with_upstreams(&env.settings, upstreams).expect("gateway");
    let gateway = TestServer::start(gateway, &env.settings).await;
    Stack {
        gateway,
        users,
        catalog,
        env,
        client: reqwest::Client::new(),
    }
}

impl Stack {
    fn request(&self, method: Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let request = self.client.request(method, self.gateway.url(path));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = self.request(method, path, token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.expect("sent")
    }

    /// Registers (through the gateway, seed 003's path) and logs in; returns (id, token).
    async fn account(&self, email: &str) -> (i64, String) {
        let body = json!({"email": email, "name": "Someone", "password": "long-enough-pw"});
        let response = self
            .send(Method::POST, "/api/users/register", None, Some(body))
            .await;
        assert_eq!(response.status(), 201, "register {email}");
        let user: Value = response.json().await.expect("json");
        let login = json!({"email": email, "password": "long-enough-pw"});
        let response = self
            .send(Method::POST, "/api/users/login", None, Some(login))
            .await;
        assert_eq!(response.status(), 200, "login {email}");
        let token: Value = response.json().await.expect("json");
        (
            user["id"].as_i64().expect("id"),
            token["access_token"].as_str().expect("token").to_owned(),
        )
    }

    /// An admin: made one in the database (as `agora seed` does), then logged in.
    async fn admin(&self) -> String {
        let (id, _) = self.account("root@example.com").await;
        let db = kit::Db::connect_only(&self.env.settings, "users")
            .await
            .expect("users db");
        kit::db::query("update users set role = 'admin' where id = $1")
            .bind(id)
            .execute(&db)
            .await
            .expect("promote");
        db.close().await;
        let login = json!({"email": "root@example.com", "password": "long-enough-pw"});
        let token: Value = self
            .send(Method::POST, "/api/v1/auth/login", None, Some(login))
            .await
            .json()
            .await
            .expect("json");
        token["access_token"].as_str().expect("token").to_owned()
    }

    /// A token with these claims, signed HS256 with `key` (default: the configured one).
    fn forge(&self, claims: Value, key: Option<&str>) -> String {
        let configured = self.env.settings.auth.jwt_secret.as_ref().expect("key");
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key.unwrap_or(configured.expose()).as_bytes()),
        )
        .expect("encode")
    }

    fn claims(&self, sub: i64, role: &str) -> Value {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        json!({"sub": sub.to_string(), "role": role, "iss": "agora", "aud": "agora-api",
               "iat": now, "exp": now + 600})
    }
}

fn product() -> Value {
    json!({"name": "Webcam", "price": 59.99, "stock": 3})
}

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

async fn required_mode_enforces_the_policy(backend: Backend) {
    let stack = spawn(backend, AuthMode::Required).await;
    let (alice, alice_token) = stack.account("alice@example.com").await;
    let (bob, _) = stack.account("bob@example.com").await;
    let admin = stack.admin().await;

    // Public without a token: health, catalog reads, register and login (above).
    for path in [
        "/health",
        "/api/v1/products",
        "/api/v1/categories",
        "/api/users/health",
    ] {
        let status = stack.send(Method::GET, path, None, None).await.status();
        assert_eq!(status, 200, "{path}");
    }
    // Anything else without a token: 401 with a Bearer challenge.
    for (method, path) in [
        (Method::GET, "/api/v1/users/me"),
        (Method::GET, "/api/v1/users"),
        (Method::GET, &format!("/api/v1/users/{alice}")),
        (Method::POST, "/api/v1/products"),
    ] {
        let response = stack
            .send(method.clone(), path, None, Some(product()))
            .await;
        assert_eq!(
            response.headers()["www-authenticate"],
            r#"Bearer realm="agora""#,
            "{method} {path}"
        );
        assert_problem(response, 401, "unauthenticated").await;
    }

    // me, through the gateway, from the token.
    let response = stack
        .send(Method::GET, "/api/v1/users/me", Some(&alice_token), None)
        .await;
    assert_eq!(response.status(), 200);
    let me: Value = response.json().await.expect("json");
    assert_eq!(
        (me["id"].as_i64(), me["role"].as_str()),
        (Some(alice), Some("user"))
    );

    // A user reads and changes only themself; an admin anyone.
    let own = format!("/api/v1/users/{alice}");
    let other = format!("/users/{bob}"); // seed 002's spelling: the same rule
    assert_eq!(
        stack
            .send(Method::GET, &own, Some(&alice_token), None)
            .await
            .status(),
        200
    );
    let renamed = stack
        .send(
            Method::PATCH,
            &own,
            Some(&alice_token),
            Some(json!({"name": "Alice B"})),
        )
        .await;
    assert_eq!(renamed.status(), 200);
    for (method, path) in [
        (Method::GET, other.as_str()),
        (Method::PUT, other.as_str()),
        (Method::GET, "/api/v1/users"),
        (Method::GET, "/api/v1/users/stats"),
        (Method::POST, "/api/v1/users"),
    ] {
        let response = stack
            .send(
                method.clone(),
                path,
                Some(&alice_token),
                Some(json!({"name": "X"})),
            )
            .await;
        assert_problem(response, 403, "forbidden").await;
    }
    assert_eq!(
        stack
            .send(Method::GET, &other, Some(&admin), None)
            .await
            .status(),
        200
    );
    assert_eq!(
        stack
            .send(Method::GET, "/api/v1/users", Some(&admin), None)
            .await
            .status(),
        200
    );

    // Catalog writes need the admin role.
    let response = stack
        .send(
            Method::POST,
            "/api/v1/products",
            Some(&alice_token),
            Some(product()),
        )
        .await;
    let body = assert_problem(response, 403, "forbidden").await;
    assert_eq!(body["detail"], "This needs the admin role");
    let response = stack
        .send(
            Method::POST,
            "/api/v1/products",
            Some(&admin),
            Some(product()),
        )
        .await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.expect("json");
    let stock = format!("/api/inventory/products/{}/stock", created["id"]);
    let response = stack
        .send(
            Method::PATCH,
            &stock,
            Some(&alice_token),
            Some(json!({"delta": -1})),
        )
        .await;
    assert_problem(response, 403, "forbidden").await;
    let response = stack
        .send(
            Method::PATCH,
            &stock,
            Some(&admin),
            Some(json!({"delta": -1})),
        )
        .await;
    assert_eq!(response.status(), 200);
}

async fn bad_tokens_are_401_invalid_token(backend: Backend) {
    let stack = spawn(backend, AuthMode::Required).await;
    let (alice, token) = stack.account("alice@example.com").await;
    let mut expired = stack.claims(alice, "user");
    expired["exp"] = (expired["iat"].as_u64().expect("iat") - 3600).into();
    expired["iat"] = (expired["iat"].as_u64().expect("iat") - 7200).into();
    let mut wrong_issuer = stack.claims(alice, "user");
    wrong_issuer["iss"] = "evil".into();
    let mut wrong_audience = stack.claims(alice, "user");
    wrong_audience["aud"] = "other-api".into();
    // The real token with its payload changed to claim admin: the signature no longer matches.
    let (head, rest) = token.split_once('.').expect("jwt");
    let signature = rest.rsplit_once('.').expect("jwt").1;
    let tampered = format!(
        "{head}.{}.{signature}",
        b64(stack.claims(alice, "admin").to_string().as_bytes())
    );
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(stack.claims(alice, "admin").to_string().as_bytes())
    );
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &stack.claims(alice, "admin"),
        &jsonwebtoken::EncodingKey::from_secret(
            stack
                .env
                .settings
                .auth
                .jwt_secret
                .as_ref()
                .expect("key")
                .expose()
                .as_bytes(),
        ),
    )
    .expect("encode");
    let cases = [
        ("tampered", tampered),
        ("expired", stack.forge(expired, None)),
        ("alg none", alg_none),
        ("HS512", hs512),
        ("wrong issuer", stack.forge(wrong_issuer, None)),
        ("wrong audience", stack.forge(wrong_audience, None)),
        (
            "another key",
            stack.forge(stack.claims(alice, "admin"), Some(&"z".repeat(40))),
        ),
        ("garbage", "abc".to_owned()),
    ];
    // On a public route too: a token that is sent is checked.
    for path in ["/api/v1/users/me", "/api/v1/products"] {
        for (case, bad) in &cases {
            let response = stack.send(Method::GET, path, Some(bad), None).await;
            assert_eq!(
                response.headers()["www-authenticate"],
                r#"Bearer realm="agora", error="invalid_token""#,
                "{case}"
            );
            assert_problem(response, 401, "invalid_token").await;
        }
    }
    let response = stack
        .client
        .get(stack.gateway.url("/api/v1/users/me"))
        .header("authorization", "Basic YWxpY2U6cHc=")
        .send()
        .await
        .expect("sent");
    assert_problem(response, 401, "invalid_token").await;
    // The control: the real token works.
    let response = stack
        .send(Method::GET, "/api/v1/users/me", Some(&token), None)
        .await;
    assert_eq!(response.status(), 200);
}

async fn spoofed_identity_headers_are_ignored(backend: Backend) {
    let stack = spawn(backend, AuthMode::Open).await;
    let (alice, alice_token) = stack.account("alice@example.com").await;
    let (bob, _) = stack.account("bob@example.com").await;
    let credential = stack
        .env
        .settings
        .auth
        .service_token
        .as_ref()
        .expect("token")
        .expose();
    let spoof = |request: reqwest::RequestBuilder| {
        request
            .header("x-agora-user-id", bob.to_string())
            .header("x-agora-user-role", "admin")
            // Even a leaked credential sent by a client is stripped at the gateway.
            .header("x-agora-service-token", credential)
    };
    // Without a token: anonymous (open mode), so /me is 401, and a product write is not admin's.
    let response = spoof(stack.request(Method::GET, "/api/v1/users/me", None))
        .send()
        .await
        .expect("sent");
    assert_problem(response, 401, "unauthenticated").await;
    // With Alice's token: Alice, not Bob, not admin.
    let response = spoof(stack.request(Method::GET, "/api/v1/users/me", Some(&alice_token)))
        .send()
        .await
        .expect("sent");
    let me: Value = response.json().await.expect("json");
    assert_eq!(
        (me["id"].as_i64(), me["role"].as_str()),
        (Some(alice), Some("user"))
    );
    let response = spoof(stack.request(Method::POST, "/api/v1/products", Some(&alice_token)))
        .json(&product())
        .send()
        .await
        .expect("sent");
    assert_problem(response, 403, "forbidden").await;
}

async fn open_mode_allows_no_token_and_checks_a_sent_one(backend: Backend) {
    let stack = spawn(backend, AuthMode::Open).await;
    // The seeds' token-less flows.
    let response = stack
        .send(Method::POST, "/users", None, Some(json!({"name": "Dave"})))
        .await;
    assert_eq!(response.status(), 201);
    let response = stack
        .send(Method::POST, "/api/v1/products", None, Some(product()))
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(
        stack
            .send(Method::GET, "/api/v1/users", None, None)
            .await
            .status(),
        200
    );
    // A token that is sent is verified and its role checked.
    let (_, token) = stack.account("alice@example.com").await;
    let response = stack
        .send(
            Method::POST,
            "/api/v1/products",
            Some(&token),
            Some(product()),
        )
        .await;
    assert_problem(response, 403, "forbidden").await;
    let response = stack
        .send(Method::GET, "/api/v1/users", Some("not-a-token"), None)
        .await;
    assert_problem(response, 401, "invalid_token").await;
    let admin = stack.admin().await;
    let response = stack
        .send(
            Method::POST,
            "/api/v1/products",
            Some(&admin),
            Some(product()),
        )
        .await;
    assert_eq!(response.status(), 201);
}

async fn internal_endpoints_are_for_services_only(backend: Backend) {
    let stack = spawn(backend, AuthMode::Open).await;
    let admin = stack.admin().await;
    let body = json!({"order_id": "o-1", "items": [{"product_id": 1, "quantity": 1}]});
    // Not routed by the gateway, whatever the caller.
    for token in [None, Some(admin.as_str())] {
        for (method, path) in [
            (Method::POST, "/internal/v1/reservations"),
            (Method::GET, "/internal/v1/reservations/o-1"),
            (Method::POST, "/internal/v1/reservations/o-1/release"),
        ] {
            let response = stack.send(method, path, token, Some(body.clone())).await;
            assert_problem(response, 404, "not_found").await;
        }
    }
    // Directly at the service: 403 without the credential (or with a wrong one)...
    for credential in [None, Some("wrong-credential-wrong-credential-x")] {
        let mut request = stack
            .client
            .post(stack.catalog.url("/internal/v1/reservations"))
            .json(&body);
        if let Some(credential) = credential {
            request = request.header("x-agora-service-token", credential);
        }
        let response = request.send().await.expect("sent");
        assert_problem(response, 403, "forbidden").await;
        let response = stack
            .client
            .get(stack.catalog.url("/internal/v1/reservations/o-1"))
            .send()
            .await
            .expect("sent");
        assert_problem(response, 403, "forbidden").await;
    }
    // ... and served with it (422: product 1 does not exist here; past the guard).
    let response = stack.catalog.post("/internal/v1/reservations", body).await;
    assert_problem(response, 422, "validation_failed").await;
    // The users service refuses an /internal path the same way (the guard is kit's).
    let response = stack
        .client
        .get(stack.users.url("/internal/anything"))
        .send()
        .await
        .expect("sent");
    assert_problem(response, 403, "forbidden").await;
}

kit::on_both_backends!(
    required_mode_enforces_the_policy,
    bad_tokens_are_401_invalid_token,
    spoofed_identity_headers_are_ignored,
    open_mode_allows_no_token_and_checks_a_sent_one,
    internal_endpoints_are_for_services_only,
);

#[test]
fn the_gateway_refuses_to_start_without_its_keys() {
    let mut settings = kit::Settings::defaults();
    settings.auth.service_token = Some(kit::auth::Secret::new("s".repeat(40)));
    let err = gateway::app_with_upstreams(&settings, BTreeMap::new())
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("auth.jwt_secret"), "{err}");
    settings.auth.jwt_secret = Some(kit::auth::Secret::new("j".repeat(40)));
    settings.auth.service_token = None;
    let err = gateway::app_with_upstreams(&settings, BTreeMap::new())
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("auth.service_token"), "{err}");
}

// An Ed25519 key pair (openssl genpkey -algorithm ed25519), for this test only.
const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIKcamT+naxbsSHOyLkQ3syuYZ+5NTRwPFReFsRugfD7E\n-----END PRIVATE KEY-----\n";
const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA5lT8cql3QuQLFVWpkKQ6NUFUXzfXm+GO+4u7IR2Z6hw=\n-----END PUBLIC KEY-----\n";

/// `required` mode with an Ed25519 pair: users (which holds the pair) issues EdDSA tokens at
/// login, the gateway (which holds only the public key) accepts them and refuses an HS256 token
/// signed with the shared secret; users refuses to start with the public key alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ed25519_tokens_from_users_are_verified_by_a_gateway_holding_only_the_public_key() {
    let mut env = TestEnv::new(Backend::Sqlite).await;
    env.settings.auth.mode = Some(AuthMode::Required);
    env.settings.auth.ed25519_public_key = Some(ED_PUBLIC.to_owned());
    let refused = users::app(env.deps(&users::SERVICE).await)
        .await
        .err()
        .expect("users needs the private key")
        .to_string();
    assert!(refused.contains("auth.ed25519_private_key"), "{refused}");
    let mut signer = env.settings.clone();
    signer.auth.ed25519_private_key = Some(kit::auth::Secret::new(ED_PRIVATE.to_owned()));
    let users = TestServer::start(
        users::app(
            kit::service::Deps::connect(&users::SERVICE, &signer, None)
                .await
                .expect("deps"),
        )
        .await
        .expect("users"),
        &signer,
    )
    .await;
    let upstreams = BTreeMap::from([(
        "users".to_owned(),
        vec![Url::parse(&users.url("")).expect("url")],
    )]);
    let gateway = gateway::app_with_upstreams(&env.settings, upstreams).expect("gateway");
    let gateway = TestServer::start(gateway, &env.settings).await;
    let client = reqwest::Client::new();
    let body = json!({"email": "ed@example.com", "name": "Ed", "password": "long-enough-pw"});
    let response = client
        .post(gateway.url("/api/v1/auth/register"))
        .json(&body)
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), 201);
    let login: Value = client
        .post(gateway.url("/api/v1/auth/login"))
        .json(&json!({"email": "ed@example.com", "password": "long-enough-pw"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("json");
    let token = login["access_token"].as_str().expect("a token");
    let header = jsonwebtoken::decode_header(token).expect("header");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::EdDSA);
    let me = client
        .get(gateway.url("/api/v1/users/me"))
        .bearer_auth(token)
        .send()
        .await
        .expect("me");
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.expect("json");
    assert_eq!(me["email"], "ed@example.com");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({"sub": me["id"].to_string(), "role": "admin", "iss": "agora",
                        "aud": "agora-api", "iat": now, "exp": now + 600});
    let secret = env.settings.auth.jwt_secret.as_ref().expect("secret");
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .expect("encode");
    let response = client
        .get(gateway.url("/api/v1/users/me"))
        .bearer_auth(hs)
        .send()
        .await
        .expect("me");
    assert_problem(response, 401, "invalid_token").await;
}

//! Create, read, list, update, delete, lookups, uniqueness and validation.

use serde_json::json;

use crate::helpers::{assert_problem, spawn_app};
use kit::testing::Backend;

kit::on_both_backends!(
    every_seed_body_creates_a_user,
    users_are_found_by_id_username_and_name,
    list_is_paginated_in_id_order,
    put_and_patch_change_only_the_given_fields,
    delete_removes_the_user,
    duplicate_username_or_email_is_409,
    invalid_fields_are_422_with_one_entry_each,
    concurrent_creates_all_succeed_with_distinct_ids,
    concurrent_reads_of_different_users_each_get_their_own,
    concurrent_creates_each_get_their_own_user_and_only_a_duplicate_is_409,
    seeded_ids_are_kept_and_new_ids_follow_them,
    seed_never_promotes_an_existing_account,
);

async fn every_seed_body_creates_a_user(backend: Backend) {
    let app = spawn_app(backend).await;
    let cases = [
        (
            json!({"name": "Alice Smith", "email": "alice@example.com"}),
            "Alice Smith",
            Some("alice@example.com"),
            None,
        ),
        (
            json!({"username": "bob", "email": "Bob@Example.com"}),
            "",
            Some("bob@example.com"),
            Some("bob"),
        ),
        (
            json!({"email": "carol@example.com", "full_name": "Carol"}),
            "Carol",
            Some("carol@example.com"),
            None,
        ),
        (json!({"name": "Dave"}), "Dave", None, None),
    ];
    for (body, name, email, username) in cases {
        let response = app.post("/api/v1/users", body.clone()).await;
        assert_eq!(response.status(), 201, "{body}");
        let location = response.headers()["location"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let user: serde_json::Value = response.json().await.expect("json");
        assert_eq!(location, format!("/api/v1/users/{}", user["id"]), "{body}");
        if !name.is_empty() {
            assert_eq!(user["name"], name, "{body}");
        }
        assert_eq!(user["email"].as_str(), email, "{body}");
        assert_eq!(user["username"].as_str(), username, "{body}");
        assert!(
            user["created_at"].is_string() && user["updated_at"].is_string(),
            "{body}"
        );
        let (status, fetched) = app.get_json(&location).await;
        assert_eq!(
            (status, &fetched),
            (200, &user),
            "{body}: read back what was created"
        );
    }
}

async fn users_are_found_by_id_username_and_name(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app
        .create_user(json!({"username": "alice", "name": "Alice"}))
        .await;
    let second = app.create_user(json!({"name": "Alice"})).await;
    let id = first["id"].as_i64().expect("id");

    for path in [
        format!("/api/v1/users/{id}"),
        format!("/api/v1/users/id/{id}"),
        "/api/v1/users/username/alice".into(),
    ] {
        let (status, user) = app.get_json(&path).await;
        assert_eq!((status, &user), (200, &first), "{path}");
    }
    let (status, user) = app.get_json("/api/v1/users/name/Alice").await;
    assert_eq!(
        (status, user["id"].clone()),
        (200, first["id"].clone()),
        "the oldest Alice"
    );
    assert_ne!(first["id"], second["id"]);

    for path in [
        "/api/v1/users/999999",
        "/api/v1/users/username/nobody",
        "/api/v1/users/name/Nobody",
    ] {
        assert_problem(app.get(path).await, 404, "user_not_found").await;
    }
}

async fn list_is_paginated_in_id_order(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            app.create_user(json!({"name": format!("User {i}")})).await["id"]
                .as_i64()
                .expect("id"),
        );
    }
    let mut seen = Vec::new();
    for page in 1..=3 {
        let (status, body) = app
            .get_json(&format!("/api/v1/users?page={page}&per_page=2"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["total"], 5);
        assert_eq!(body["page"], page);
        assert_eq!(body["per_page"], 2);
        let items = body["items"].as_array().expect("items");
        assert_eq!(items.len(), if page < 3 { 2 } else { 1 }, "page {page}");
        seen.extend(items.iter().map(|u| u["id"].as_i64().expect("id")));
    }
    assert_eq!(seen, ids, "every user once, in id order");
    let (_, beyond) = app.get_json("/api/v1/users?page=4&per_page=2").await;
    assert_eq!(beyond["items"], json!([]));
    let (_, default) = app.get_json("/api/v1/users").await;
    assert_eq!(
        (default["page"].clone(), default["per_page"].clone()),
        (json!(1), json!(20))
    );

    for bad in ["page=0", "page=10001", "per_page=0", "per_page=101"] {
        assert_problem(
            app.get(&format!("/api/v1/users?{bad}")).await,
            422,
            "validation_failed",
        )
        .await;
    }
    for bad in ["page=abc", "per_page=-1"] {
        assert_problem(
            app.get(&format!("/api/v1/users?{bad}")).await,
            400,
            "invalid_query",
        )
        .await;
    }
}

async fn put_and_patch_change_only_the_given_fields(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app
        .create_user(json!({"username": "alice", "name": "Alice", "email": "alice@example.com"}))
        .await;
    let path = format!("/api/v1/users/{}", user["id"]);

    let response = app
        .request(
            reqwest::Method::PUT,
            &path,
            Some(json!({"name": "Alice Updated"})),
        )
        .await;
    assert_eq!(response.status(), 200);
    let updated: serde_json::Value = response.json().await.expect("json");
    assert_eq!(updated["name"], "Alice Updated");
    assert_eq!(updated["username"], "alice", "PUT is partial (seed 004)");
    assert_eq!(updated["email"], "alice@example.com");
    assert_eq!(updated["created_at"], user["created_at"]);
    assert!(updated["updated_at"].as_str() >= user["updated_at"].as_str());

    let response = app
        .request(
            reqwest::Method::PATCH,
            &path,
            Some(json!({"email": "new@example.com"})),
        )
        .await;
    assert_eq!(response.status(), 200);
    let (_, fetched) = app.get_json(&path).await;
    assert_eq!(
        (fetched["name"].as_str(), fetched["email"].as_str()),
        (Some("Alice Updated"), Some("new@example.com"))
    );

    let missing = app
        .request(
            reqwest::Method::PATCH,
            "/api/v1/users/999999",
            Some(json!({"name": "x"})),
        )
        .await;
    assert_problem(missing, 404, "user_not_found").await;
    let empty = app
        .request(reqwest::Method::PATCH, &path, Some(json!({})))
        .await;
    assert_problem(empty, 422, "validation_failed").await;
}

async fn delete_removes_the_user(backend: Backend) {
    let app = spawn_app(backend).await;
    let user = app.create_user(json!({"name": "Bob"})).await;
    let path = format!("/api/v1/users/{}", user["id"]);
    assert_eq!(
        app.get(&path).await.status(),
        200,
        "cached before the delete"
    );
    let response = app.request(reqwest::Method::DELETE, &path, None).await;
    assert_eq!(response.status(), 204);
    assert_problem(app.get(&path).await, 404, "user_not_found").await;
    let again = app.request(reqwest::Method::DELETE, &path, None).await;
    assert_problem(again, 404, "user_not_found").await;
}

async fn duplicate_username_or_email_is_409(backend: Backend) {
    let app = spawn_app(backend).await;
    app.create_user(json!({"username": "alice", "email": "alice@example.com"}))
        .await;
    let other = app
        .create_user(json!({"username": "bob", "email": "bob@example.com"}))
        .await;

    let cases = [
        (
            json!({"username": "alice", "email": "x@example.com"}),
            "username_taken",
            "username",
        ),
        (
            json!({"username": "carol", "email": "ALICE@example.com"}),
            "email_taken",
            "email",
        ),
    ];
    for (body, code, field) in cases {
        let problem =
            assert_problem(app.post("/api/v1/users", body.clone()).await, 409, code).await;
        assert_eq!(problem["errors"][0]["field"], field, "{body}");
        // The same conflict through an update.
        let path = format!("/api/v1/users/{}", other["id"]);
        let response = app
            .request(reqwest::Method::PATCH, &path, Some(body.clone()))
            .await;
        assert_problem(response, 409, code).await;
    }
    let (_, list) = app.get_json("/api/v1/users").await;
    assert_eq!(
        list["total"], 2,
        "nothing was written by the refused requests"
    );
}

async fn invalid_fields_are_422_with_one_entry_each(backend: Backend) {
    let app = spawn_app(backend).await;
    let cases = [
        (json!({}), vec!["name"]),
        (json!({"email": "a@example.com"}), vec!["name"]),
        (json!({"name": "  "}), vec!["name"]),
        (json!({"name": "x".repeat(101)}), vec!["name"]),
        (
            json!({"name": "Al", "email": "not-an-email"}),
            vec!["email"],
        ),
        (
            json!({"username": "a b", "email": "@x.io", "name": ""}),
            vec!["username", "email", "name"],
        ),
        (json!({"name": "Al", "nickname": "x"}), vec!["nickname"]),
        (json!({"name": 5}), vec!["name"]),
    ];
    for (body, fields) in cases {
        let problem = assert_problem(
            app.post("/api/v1/users", body.clone()).await,
            422,
            "validation_failed",
        )
        .await;
        let errors = problem["errors"].as_array().expect("errors");
        let reported: Vec<&str> = errors
            .iter()
            .map(|e| e["field"].as_str().unwrap_or_default())
            .collect();
        if fields == ["nickname"] {
            // serde names the unknown field in the message
            assert!(
                errors[0]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("nickname"),
                "{body}: {problem}"
            );
        } else {
            assert_eq!(reported, fields, "{body}: {problem}");
        }
    }
    let (_, list) = app.get_json("/api/v1/users").await;
    assert_eq!(list["total"], 0);
}

/// Many writers at once: none is refused for a busy database, every id is distinct.
async fn concurrent_creates_all_succeed_with_distinct_ids(backend: Backend) {
    let app = spawn_app(backend).await;
    let creates =
        (0..50).map(|i| app.post("/api/v1/users", json!({"name": format!("Writer {i}")})));
    let responses = futures::future::join_all(creates).await;
    let mut ids = Vec::new();
    for response in responses {
        assert_eq!(response.status(), 201);
        let user: serde_json::Value = response.json().await.expect("json");
        ids.push(user["id"].as_i64().expect("id"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 50);
    let (_, list) = app.get_json("/api/v1/users").await;
    assert_eq!(list["total"], 50);
}

/// Reads by id that miss the cache together share one statement: each still gets its own user,
/// an id asked twice gets it twice, and an id without a user is 404 for that request alone.
async fn concurrent_reads_of_different_users_each_get_their_own(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut users = Vec::new();
    for i in 0..12 {
        users.push(
            app.create_user(json!({"name": format!("Reader {i}")}))
                .await,
        );
    }
    let missing = users
        .iter()
        .filter_map(|u| u["id"].as_i64())
        .max()
        .expect("ids")
        + 100;
    let mut asked: Vec<(i64, Option<&serde_json::Value>)> = users
        .iter()
        .map(|u| (u["id"].as_i64().expect("id"), Some(u)))
        .collect();
    asked.extend(asked.clone());
    asked.push((missing, None));
    asked.push((missing + 1, None));
    let paths: Vec<String> = asked
        .iter()
        .map(|(id, _)| format!("/api/v1/users/{id}"))
        .collect();
    let reads = paths.iter().map(|path| app.get_json(path));
    let answers = futures::future::join_all(reads).await;
    for ((id, expected), (status, body)) in asked.iter().zip(answers) {
        match expected {
            Some(user) => assert_eq!((status, &body), (200, *user), "user {id}"),
            None => {
                assert_eq!(status, 404, "user {id}: {body}");
                assert_eq!(body["code"], "user_not_found");
            }
        }
    }
}

/// Creates that arrive together share one statement: each still gets its own user back, and a
/// taken email fails only the request that sent it.
async fn concurrent_creates_each_get_their_own_user_and_only_a_duplicate_is_409(backend: Backend) {
    let app = spawn_app(backend).await;
    // 40 requests, 30 distinct emails: ten of them are sent twice.
    let bodies: Vec<_> = (0..40)
        .map(
            |i| json!({"name": format!("Writer {i}"), "email": format!("w{}@example.com", i % 30)}),
        )
        .collect();
    let responses =
        futures::future::join_all(bodies.iter().map(|b| app.post("/api/v1/users", b.clone())))
            .await;
    let mut created = std::collections::BTreeMap::new();
    let mut taken = Vec::new();
    for (body, response) in bodies.iter().zip(responses) {
        match response.status().as_u16() {
            201 => {
                let user: serde_json::Value = response.json().await.expect("json");
                assert_eq!(user["name"], body["name"], "its own user");
                assert_eq!(user["email"], body["email"]);
                assert!(created.insert(body["email"].to_string(), user).is_none());
            }
            409 => {
                let problem = assert_problem(response, 409, "email_taken").await;
                assert_eq!(problem["errors"][0]["field"], "email");
                taken.push(body["email"].to_string());
            }
            status => panic!("{body}: {status}"),
        }
    }
    assert_eq!((created.len(), taken.len()), (30, 10), "one of each pair");
    assert!(taken.iter().all(|email| created.contains_key(email)));
    for user in created.values() {
        let (status, read) = app.get_json(&format!("/api/v1/users/{}", user["id"])).await;
        assert_eq!((status, &read), (200, user), "stored as answered");
    }
    let (_, list) = app.get_json("/api/v1/users?limit=100").await;
    assert_eq!(list["total"], 30, "the list saw every create");
}

async fn seeded_ids_are_kept_and_new_ids_follow_them(backend: Backend) {
    let app = spawn_app(backend).await;
    let seed = users::SERVICE.seed.expect("users has seed data");
    let report = seed(app.deps.clone()).await.expect("seed");
    let mut lines = report.lines();
    assert_eq!(lines.next(), Some("users: 4 added, 0 already present"));
    // The admin account (id 5) with its generated password, kept owner-only under data_dir.
    let path = app.env.settings.data_dir.join(users::ADMIN_PASSWORD_FILE);
    let password = std::fs::read_to_string(&path).expect("password file");
    assert!(
        lines
            .next()
            .is_some_and(|l| l.contains("admin@agora.local") && l.contains(&password)),
        "{report}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = seed(app.deps.clone()).await.expect("seed again");
    assert!(
        again.starts_with("users: 0 added, 4 already present\n") && again.contains(&password),
        "seeding twice keeps the existing rows and the admin's password: {again}"
    );
    let response = app
        .post(
            "/api/v1/auth/login",
            json!({"email": users::ADMIN_EMAIL, "password": password}),
        )
        .await;
    assert_eq!(response.status(), 200, "the admin logs in");
    let (_, alice) = app.get_json("/api/v1/users/1").await;
    assert_eq!(alice["username"], "alice");
    let (_, admin) = app.get_json("/api/v1/users/5").await;
    assert_eq!(admin["role"], "admin");
    let created = app.create_user(json!({"name": "Erin"})).await;
    assert_eq!(
        created["id"], 6,
        "new ids continue after the largest seeded one (and the admin)"
    );
}

/// Whoever registered admin@agora.local before the seed ran is not made an admin by it.
async fn seed_never_promotes_an_existing_account(backend: Backend) {
    let app = spawn_app(backend).await;
    let response = app
        .post(
            "/api/v1/auth/register",
            json!({"email": users::ADMIN_EMAIL, "name": "Mallory", "password": "mallory-pw-123"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let mallory: serde_json::Value = response.json().await.expect("json");
    let seed = users::SERVICE.seed.expect("users has seed data");
    let report = seed(app.deps.clone()).await.expect("seed");
    assert!(
        report.contains("is not an admin; left unchanged"),
        "{report}"
    );
    let (_, after) = app
        .get_json(&format!("/api/v1/users/{}", mallory["id"]))
        .await;
    assert_eq!(after["role"], "user");
}

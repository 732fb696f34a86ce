//! Products: create, read, list with filter and pages, update, delete, validation, uniqueness,
//! and reads after writes that never see a stale cached value.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{assert_problem, spawn_app};
use kit::testing::Backend;

kit::on_both_backends!(
    seed_001_body_creates_a_product,
    products_are_read_updated_and_deleted,
    list_filters_by_category_in_pages_of_stable_order,
    invalid_fields_are_422_with_one_entry_each,
    duplicate_sku_is_409,
    categories_are_counted,
    a_read_after_any_write_sees_the_write,
    deleting_a_product_with_reserved_units_is_409,
    seeded_ids_are_kept_and_new_ids_follow_them,
);

async fn seed_001_body_creates_a_product(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = json!({"name": "Laptop", "description": "High-performance laptop",
                      "price": 999.99, "stock": 50, "category": "Electronics"});
    let response = app.post("/api/v1/products", body).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let text = response.text().await.expect("body");
    assert!(
        text.contains(r#""price":999.99"#),
        "price is shown as 999.99: {text}"
    );
    let product: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(location, format!("/api/v1/products/{}", product["id"]));
    assert_eq!(product["name"], "Laptop");
    assert_eq!(product["category"], "Electronics");
    assert_eq!(product["stock"], 50);
    assert_eq!(product["reserved"], 0);
    assert_eq!(product["low_stock_threshold"], 10);
    assert!(
        product["sku"]
            .as_str()
            .is_some_and(|s| s.starts_with("SKU-")),
        "a sku is generated: {product}"
    );
    let (status, fetched) = app.get_json(&location).await;
    assert_eq!(
        (status, &fetched),
        (200, &product),
        "read back what was created"
    );

    // A price sent as a string, and a whole price, keep two decimals.
    let product = app
        .create_product(json!({"name": "Mouse", "price": "29.90", "sku": "m-1"}))
        .await;
    assert_eq!(product["sku"], "M-1", "skus are uppercased");
    let text = app
        .get(&format!("/api/v1/products/{}", product["id"]))
        .await
        .text()
        .await
        .expect("body");
    assert!(text.contains(r#""price":29.90"#), "{text}");
    let product = app.create_product(json!({"name": "Pen", "price": 2})).await;
    assert_eq!(product["price"].as_f64(), Some(2.0));
    assert_eq!(product["stock"], 0, "stock defaults to 0");
}

async fn products_are_read_updated_and_deleted(backend: Backend) {
    let app = spawn_app(backend).await;
    let product = app
        .create_product(json!({"name": "Desk", "price": 100, "stock": 5, "category": "Furniture"}))
        .await;
    let path = format!("/api/v1/products/{}", product["id"]);

    let response = app
        .request(
            Method::PUT,
            &path,
            Some(json!({"name": "Standing Desk", "price": "599.99"})),
        )
        .await;
    assert_eq!(response.status(), 200);
    let updated: Value = response.json().await.expect("json");
    assert_eq!(updated["name"], "Standing Desk");
    assert_eq!(updated["price"].as_f64(), Some(599.99));
    assert_eq!(
        updated["category"], "Furniture",
        "fields not given are kept"
    );
    assert_eq!(updated["stock"], 5);
    assert_eq!(updated["created_at"], product["created_at"]);

    let response = app
        .patch(
            &path,
            json!({"description": "Adjustable", "low_stock_threshold": 2}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let (_, fetched) = app.get_json(&path).await;
    assert_eq!(fetched["description"], "Adjustable");
    assert_eq!(fetched["low_stock_threshold"], 2);
    assert_eq!(fetched["name"], "Standing Desk");

    assert_eq!(app.request(Method::DELETE, &path, None).await.status(), 204);
    assert_problem(app.get(&path).await, 404, "product_not_found").await;
    assert_problem(
        app.request(Method::DELETE, &path, None).await,
        404,
        "product_not_found",
    )
    .await;
    assert_problem(
        app.patch(&path, json!({"name": "x"})).await,
        404,
        "product_not_found",
    )
    .await;
}

async fn list_filters_by_category_in_pages_of_stable_order(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut electronics = Vec::new();
    for i in 0..5 {
        let p = app
            .create_product(json!({"name": format!("E{i}"), "price": 1, "category": "Electronics"}))
            .await;
        electronics.push(p["id"].as_i64().expect("id"));
        app.create_product(json!({"name": format!("S{i}"), "price": 1, "category": "Stationery"}))
            .await;
    }
    app.create_product(json!({"name": "Loose", "price": 1}))
        .await;

    let (status, all) = app.get_json("/api/v1/products").await;
    assert_eq!(status, 200);
    assert_eq!(all["total"], 11);
    assert_eq!(
        (all["page"].as_u64(), all["per_page"].as_u64()),
        (Some(1), Some(20))
    );

    let mut seen = Vec::new();
    for page in 1..=3 {
        let (status, body) = app
            .get_json(&format!(
                "/api/v1/products?category=electronics&per_page=2&page={page}"
            ))
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["total"], 5, "the filter ignores case");
        for item in body["items"].as_array().expect("items") {
            assert_eq!(item["category"], "Electronics");
            seen.push(item["id"].as_i64().expect("id"));
        }
    }
    assert_eq!(seen, electronics, "every product once, in id order");

    let (_, none) = app.get_json("/api/v1/products?category=Garden").await;
    assert_eq!(
        (
            none["total"].as_i64(),
            none["items"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0))
    );

    for bad in ["?page=0", "?page=10001", "?per_page=0", "?per_page=101"] {
        assert_problem(
            app.get(&format!("/api/v1/products{bad}")).await,
            422,
            "validation_failed",
        )
        .await;
    }
    // No category is longer than 100 characters: a longer filter is refused, not cached.
    let long = "c".repeat(101);
    let response = app.get(&format!("/api/v1/products?category={long}")).await;
    assert_problem(response, 422, "validation_failed").await;
    let (status, _) = app
        .get_json(&format!("/api/v1/products?category={}", "c".repeat(100)))
        .await;
    assert_eq!(status, 200);
    for bad in ["?page=x", "?page=99999999999"] {
        assert_problem(
            app.get(&format!("/api/v1/products{bad}")).await,
            400,
            "invalid_query",
        )
        .await;
    }
}

async fn invalid_fields_are_422_with_one_entry_each(backend: Backend) {
    let app = spawn_app(backend).await;
    let cases = [
        (json!({"name": "A", "price": -1}), "price", "negative"),
        (json!({"name": "", "price": 1}), "name", "required"),
        (json!({"name": "   ", "price": 1}), "name", "required"),
        (json!({"price": 1}), "name", "required"),
        (json!({"name": "A"}), "price", "required"),
        (
            json!({"name": "A", "price": 1, "stock": -1}),
            "stock",
            "negative",
        ),
        (
            json!({"name": "A", "price": 1, "sku": "has space"}),
            "sku",
            "invalid_characters",
        ),
        (
            json!({"name": "A", "price": 1, "low_stock_threshold": -2}),
            "low_stock_threshold",
            "negative",
        ),
        (
            json!({"name": "A", "price": 1, "colour": "red"}),
            "body",
            "invalid",
        ),
        (json!({"name": "A", "price": 10.001}), "price", "invalid"),
        (json!({"name": "A", "price": "ten"}), "price", "invalid"),
        (json!({"name": 5, "price": 1}), "name", "invalid"),
    ];
    for (body, field, code) in cases {
        let problem = assert_problem(
            app.post("/api/v1/products", body.clone()).await,
            422,
            "validation_failed",
        )
        .await;
        let errors = problem["errors"].as_array().expect("errors");
        assert_eq!(errors.len(), 1, "{body}: {problem}");
        assert_eq!(errors[0]["code"], code, "{body}: {problem}");
        if field != "body" {
            assert_eq!(errors[0]["field"], field, "{body}: {problem}");
        }
    }
    let (_, list) = app.get_json("/api/v1/products").await;
    assert_eq!(list["total"], 0, "nothing was created");

    let product = app.create_product(json!({"name": "A", "price": 1})).await;
    let path = format!("/api/v1/products/{}", product["id"]);
    let problem = assert_problem(
        app.patch(&path, json!({"stock": 5})).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(problem["errors"][0]["code"], "use_stock_endpoint");
    let problem = assert_problem(app.patch(&path, json!({})).await, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["code"], "empty_update");
    assert_problem(
        app.get("/api/v1/products/abc").await,
        400,
        "invalid_path_parameter",
    )
    .await;
}

async fn duplicate_sku_is_409(backend: Backend) {
    let app = spawn_app(backend).await;
    app.create_product(json!({"name": "A", "price": 1, "sku": "ABC-1"}))
        .await;
    let problem = assert_problem(
        app.post(
            "/api/v1/products",
            json!({"name": "B", "price": 1, "sku": "abc-1"}),
        )
        .await,
        409,
        "sku_taken",
    )
    .await;
    assert_eq!(problem["errors"][0]["field"], "sku");

    let other = app
        .create_product(json!({"name": "C", "price": 1, "sku": "ABC-2"}))
        .await;
    assert_problem(
        app.patch(
            &format!("/api/v1/products/{}", other["id"]),
            json!({"sku": "ABC-1"}),
        )
        .await,
        409,
        "sku_taken",
    )
    .await;
    let (_, list) = app.get_json("/api/v1/products").await;
    assert_eq!(list["total"], 2);
}

async fn categories_are_counted(backend: Backend) {
    let app = spawn_app(backend).await;
    for (name, category) in [
        ("a", "Furniture"),
        ("b", "Electronics"),
        ("c", "electronics"),
    ] {
        app.create_product(json!({"name": name, "price": 1, "category": category}))
            .await;
    }
    let (status, body) = app.get_json("/api/v1/categories").await;
    assert_eq!(status, 200);
    assert_eq!(
        body["items"],
        json!([{"name": "Electronics", "products": 2}, {"name": "Furniture", "products": 1}])
    );
    // Cached, and invalidated by a create.
    app.create_product(json!({"name": "d", "price": 1, "category": "Stationery"}))
        .await;
    let (_, body) = app.get_json("/api/v1/categories").await;
    assert_eq!(body["items"].as_array().map(Vec::len), Some(3), "{body}");
    let (_, stats) = app.get_json("/api/v1/products/stats").await;
    assert_eq!(
        (&stats["products"], &stats["categories"], &stats["database"]),
        (
            &json!(4),
            &json!(3),
            &json!(if backend == Backend::Postgres {
                "postgres"
            } else {
                "sqlite"
            })
        ),
        "{stats}"
    );
}

async fn a_read_after_any_write_sees_the_write(backend: Backend) {
    let app = spawn_app(backend).await;
    let product = app
        .create_product(json!({"name": "Lamp", "price": 10, "stock": 10, "category": "Home"}))
        .await;
    let id = product["id"].as_i64().expect("id");
    let path = format!("/api/v1/products/{id}");
    let list = "/api/v1/products?category=Home";
    let warm = || async {
        for view in [path.as_str(), list] {
            assert_eq!(app.get(view).await.status(), 200, "{view}");
        }
    };
    let read = || async {
        let (_, item) = app.get_json(&path).await;
        let (_, list) = app.get_json(list).await;
        (item, list["items"][0].clone())
    };

    warm().await;
    app.patch(&path, json!({"price": 12.5})).await;
    let (item, listed) = read().await;
    assert_eq!(item["price"].as_f64(), Some(12.5), "item after update");
    assert_eq!(listed["price"].as_f64(), Some(12.5), "list after update");

    warm().await;
    app.patch(&format!("{path}/stock"), json!({"delta": -3}))
        .await;
    let (item, listed) = read().await;
    assert_eq!(
        (item["stock"].as_i64(), listed["stock"].as_i64()),
        (Some(7), Some(7)),
        "after delta"
    );

    warm().await;
    let response = app
        .reserve("order-1", json!([{"product_id": id, "quantity": 2}]))
        .await;
    assert_eq!(response.status(), 201);
    let (item, listed) = read().await;
    assert_eq!(
        (item["stock"].as_i64(), item["reserved"].as_i64()),
        (Some(5), Some(2)),
        "after reserve"
    );
    assert_eq!(listed["stock"], 5, "list after reserve");

    warm().await;
    assert_eq!(app.settle("order-1", "release").await.status(), 200);
    let (item, listed) = read().await;
    assert_eq!(
        (item["stock"].as_i64(), item["reserved"].as_i64()),
        (Some(7), Some(0)),
        "after release"
    );
    assert_eq!(listed["stock"], 7, "list after release");

    warm().await;
    assert_eq!(app.request(Method::DELETE, &path, None).await.status(), 204);
    assert_eq!(app.get(&path).await.status(), 404, "item after delete");
    let (_, listed) = app.get_json(list).await;
    assert_eq!(listed["total"], 0, "list after delete");
}

async fn deleting_a_product_with_reserved_units_is_409(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.product_with_stock(3).await;
    let response = app
        .reserve("o-9", json!([{"product_id": id, "quantity": 1}]))
        .await;
    assert_eq!(response.status(), 201);
    let path = format!("/api/v1/products/{id}");
    assert_problem(
        app.request(Method::DELETE, &path, None).await,
        409,
        "product_reserved",
    )
    .await;
    assert_eq!(app.settle("o-9", "commit").await.status(), 200);
    assert_eq!(app.request(Method::DELETE, &path, None).await.status(), 204);
    let (status, reservation) = app.get_json("/internal/v1/reservations/o-9").await;
    assert_eq!(status, 200, "committed reservations outlive their product");
    assert_eq!(reservation["status"], "committed");
}

async fn seeded_ids_are_kept_and_new_ids_follow_them(backend: Backend) {
    let app = spawn_app(backend).await;
    let seed = catalog::SERVICE.seed.expect("the catalog has a seed");
    let report = seed(app.deps.clone()).await.expect("seed");
    assert_eq!(report, "products: 12 added, 0 already present");
    // A seeded product changed since, and one deleted: seeding again adds the missing one only.
    let renamed = app
        .patch("/api/v1/products/1", json!({"name": "Renamed"}))
        .await;
    assert_eq!(renamed.status(), 200);
    let deleted = app
        .request(Method::DELETE, "/api/v1/products/7", None)
        .await;
    assert_eq!(deleted.status(), 204);
    let again = seed(app.deps.clone()).await.expect("seed again");
    assert_eq!(
        again, "products: 1 added, 11 already present",
        "seeding twice keeps the existing rows"
    );

    let (_, laptop) = app.get_json("/api/v1/products/1").await;
    assert_eq!(laptop["name"], "Renamed", "the existing row is kept");
    assert_eq!(laptop["price"].as_f64(), Some(1299.99));
    assert_eq!(laptop["sku"], "SEED-0001");
    assert_eq!(
        laptop["low_stock_threshold"], 10,
        "the configured threshold"
    );
    let (status, _) = app.get_json("/api/v1/products/7").await;
    assert_eq!(status, 200, "the seeded id is kept");
    // Seed 002's walkthrough orders "Pro Keyboard" by name, seed 003's reads product 123.
    let (_, keyboard) = app.get_json("/api/v1/products/11").await;
    assert_eq!(keyboard["name"], "Pro Keyboard");
    let (status, _) = app.get_json("/api/v1/products/123").await;
    assert_eq!(status, 200);
    let created = app.create_product(json!({"name": "New", "price": 1})).await;
    assert_eq!(
        created["id"], 124,
        "new ids continue after the largest seeded one"
    );
}

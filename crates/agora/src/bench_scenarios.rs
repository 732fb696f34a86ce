//! The scenarios of `agora bench` that need more than one load run: their own system (auth
//! `required`, the uncached users), setup (products, orders), or a workload of several requests.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::bench_context::{Context, seed_users};
use crate::bench_report::{Row, Watch};
use crate::bench_system::{Mode, Spec, System};
use crate::load::{self, Plan, Req, Zipf};

/// The processes an order keeps busy: the services it passes through, the worker, and notify
/// (an order's events are mailed).
const ORDER_PROCESSES: &[&str] = &["gateway", "orders", "users", "catalog", "worker", "notify"];

impl Context {
    pub(crate) fn user_create_plan(&self) -> Plan {
        let stamp = self.stamp;
        Arc::new(move |c, n| {
            Req::post(
                "/api/v1/users",
                format!(
                    r#"{{"name":"Bench {c} {n}","email":"c{c}-{n}-{stamp}@bench.agora.local"}}"#
                ),
            )
        })
    }

    /// A system of its own in auth `required` mode (embedded: a second `agora up`; distributed:
    /// a users and a gateway process on the same data), a logged-in account reading itself.
    pub(crate) async fn cached_get_auth(&mut self) -> anyhow::Result<Row> {
        anyhow::ensure!(
            self.main.is_some(),
            "needs a system the bench starts (not --url)"
        );
        let spec = Spec {
            mode: self.mode,
            base_port: self.base_port + 100,
            auth_required: true,
            uncached: false,
            services: vec!["users", "gateway"],
            redis_prefix: "bench:".to_owned(),
        };
        let system = System::start(&spec, self.distributed_backends()).await?;
        let client = reqwest::Client::new();
        let email = format!("auth-{}@bench.agora.local", self.stamp);
        let password = "bench-password-0123";
        let registered: Value = client
            .post(format!("{}/api/v1/auth/register", system.url("gateway")))
            .json(&json!({"email": email, "name": "Bench Auth", "password": password}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = registered["id"].as_i64().context("the registered id")?;
        let login: Value = client
            .post(format!("{}/api/v1/auth/login", system.url("gateway")))
            .json(&json!({"email": email, "password": password}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let token = login["access_token"]
            .as_str()
            .context("a token")?
            .to_owned();
        let plan: Plan = Arc::new(move |_, _| Req::get(format!("/api/v1/users/{id}")));
        let groups = self.agora_processes(Some(&system), &["gateway", "users"], &["redis"]);
        let load = self.load(
            system.addr("gateway"),
            "cached-get-gateway-auth",
            Some(token),
        );
        let row = self
            .measure("cached-get-gateway-auth", load, plan, groups)
            .await;
        drop(system);
        Ok(row)
    }

    /// A users service with `cache.item_ttl_secs = 0` (embedded: a second `agora up`, seeded;
    /// distributed: one users process on the same data, its own Redis prefix).
    pub(crate) async fn uncached_get(&mut self) -> anyhow::Result<Row> {
        anyhow::ensure!(
            self.main.is_some(),
            "needs a system the bench starts (not --url)"
        );
        let spec = Spec {
            mode: self.mode,
            base_port: self.base_port + 200,
            auth_required: false,
            uncached: true,
            services: vec!["users"],
            redis_prefix: "bench:uncached:".to_owned(),
        };
        let system = System::start(&spec, self.distributed_backends()).await?;
        let ids = match self.mode {
            Mode::Embedded => {
                seed_users(
                    system.addr("users"),
                    self.users,
                    &format!("u{}", self.stamp),
                )
                .await?
            }
            Mode::Distributed => self.seeded.clone(),
        };
        let ids = Arc::new(ids);
        let plan: Plan = Arc::new(move |c, n| {
            let i = (load::unit(load::key(c, n, 3)) * ids.len() as f64) as usize;
            Req::get(format!("/api/v1/users/{}", ids[i.min(ids.len() - 1)]))
        });
        let groups = self.agora_processes(Some(&system), &["users"], &["redis", "postgres"]);
        let load = self.load(system.addr("users"), "uncached-get-direct", None);
        let mut row = self
            .measure("uncached-get-direct", load, plan, groups)
            .await;
        row.note = Some(match self.mode {
            Mode::Embedded => "SQLite; no reference (ref-pg is PostgreSQL)".to_owned(),
            Mode::Distributed => {
                "PostgreSQL; with TTL 0 the cache is not asked (no Redis round trip)".to_owned()
            }
        });
        drop(system);
        Ok(row)
    }

    pub(crate) async fn product_list(&mut self) -> anyhow::Result<Row> {
        let client = reqwest::Client::new();
        let category = format!("Bench{}", self.stamp);
        for n in 0..20 {
            client
                .post(format!("http://{}/api/v1/products", self.gateway))
                .json(
                    &json!({"name": format!("bench {} {n}", self.stamp), "price": "9.99",
                    "stock": 100, "category": category}),
                )
                .send()
                .await?
                .error_for_status()
                .context("creating a product (in auth `required` mode this needs an admin)")?;
        }
        let path = format!("/api/v1/products?category={category}");
        let plan: Plan = Arc::new(move |_, _| Req::get(path.clone()));
        let groups = self.agora_processes(self.main.as_ref(), &["gateway", "catalog"], &["redis"]);
        Ok(self
            .measure(
                "product-list",
                self.load(self.gateway, "product-list", None),
                plan,
                groups,
            )
            .await)
    }

    pub(crate) async fn order_bodies(&mut self) -> anyhow::Result<Arc<Vec<Bytes>>> {
        if let Some(bodies) = &self.orders {
            return Ok(bodies.clone());
        }
        let client = reqwest::Client::new();
        let base = format!("http://{}", self.gateway);
        let (user, products) = crate::bench::setup(&client, &base).await?;
        let bodies: Arc<Vec<Bytes>> = Arc::new(
            products
                .iter()
                .map(|p| {
                    Bytes::from(
                        json!({"user_id": user, "product_id": p, "quantity": 1}).to_string(),
                    )
                })
                .collect(),
        );
        self.orders = Some(bodies.clone());
        Ok(bodies)
    }

    pub(crate) async fn order_create(&mut self) -> anyhow::Result<Row> {
        let bodies = self.order_bodies().await?;
        let plan: Plan = Arc::new(move |c, n| {
            Req::post(
                "/api/v1/orders",
                bodies[(c + n as usize) % bodies.len()].clone(),
            )
        });
        let groups =
            self.agora_processes(self.main.as_ref(), ORDER_PROCESSES, &["postgres", "nats"]);
        let mut row = self
            .measure(
                "order-create",
                self.load(self.gateway, "order-create", None),
                plan,
                groups,
            )
            .await;
        let drained =
            crate::bench::drain(&reqwest::Client::new(), &format!("http://{}", self.gateway))
                .await?;
        row.note = Some(format!(
            "accepted/s; the worker drained the queue {:.1} s after",
            drained.as_secs_f64()
        ));
        Ok(row)
    }

    pub(crate) async fn order_latency(&mut self) -> anyhow::Result<Row> {
        let bodies = self.order_bodies().await?;
        let values: Arc<Vec<Value>> = Arc::new(
            bodies
                .iter()
                .filter_map(|b| serde_json::from_slice(b).ok())
                .collect(),
        );
        let groups =
            self.agora_processes(self.main.as_ref(), ORDER_PROCESSES, &["postgres", "nats"]);
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .timeout(Duration::from_secs(10))
            .build()?;
        let base = format!("http://{}", self.gateway);
        let watch = Watch::start(Self::with_load_generator(groups), self.ticks);
        let fixed =
            crate::bench::fixed_rate(&client, &base, values, self.rate, self.duration()).await?;
        let requests = (fixed.accepted_per_second * self.seconds as f64).round() as u64;
        let mut row = Row::skipped("order-latency", String::new());
        row.connections = 1;
        row.requests = requests;
        row.seconds = self.seconds as f64;
        row.per_second = fixed.accepted_per_second;
        row.p50_ms = fixed.p50_ms;
        row.p99_ms = fixed.p99_ms;
        row.p999_ms = fixed.p999_ms;
        row.errors = fixed.errors + fixed.refused;
        row.processes = watch.finish(requests);
        row.note = Some(format!(
            "{} orders/s sent (reqwest, one task per order); accepted → processed: p50 {} ms, p99 {} ms (last {} processed); drained {:.1} s after",
            self.rate,
            fixed.processed_p50_ms,
            fixed.processed_p99_ms,
            fixed.processed_window,
            fixed.drained.as_secs_f64()
        ));
        Ok(row)
    }

    pub(crate) async fn mixed(&mut self) -> anyhow::Result<Row> {
        let bodies = self.order_bodies().await?;
        let ids = Arc::new(self.seeded.clone());
        anyhow::ensure!(!ids.is_empty(), "no seeded users");
        let zipf = Arc::new(Zipf::new(ids.len(), 1.0));
        let stamp = self.stamp;
        let plan: Plan = Arc::new(move |c, n| {
            let pick = load::unit(load::key(c, n, 4));
            if pick < 0.80 {
                Req::get(format!(
                    "/api/v1/users/{}",
                    ids[zipf.pick(load::key(c, n, 5)) - 1]
                ))
            } else if pick < 0.95 {
                Req::post(
                    "/api/v1/users",
                    format!(
                        r#"{{"name":"Mixed {c} {n}","email":"m{c}-{n}-{stamp}@bench.agora.local"}}"#
                    ),
                )
            } else {
                Req::post(
                    "/api/v1/orders",
                    bodies[(c + n as usize) % bodies.len()].clone(),
                )
            }
        });
        let groups = self.agora_processes(
            self.main.as_ref(),
            &["gateway", "users", "orders", "catalog", "worker"],
            &["redis", "postgres", "nats"],
        );
        let mut row = self
            .measure(
                "mixed",
                self.load(self.gateway, "mixed", None),
                plan,
                groups,
            )
            .await;
        let drained =
            crate::bench::drain(&reqwest::Client::new(), &format!("http://{}", self.gateway))
                .await?;
        row.note = Some(format!(
            "80% reads (Zipf s=1 over {} users), 15% user creates, 5% orders; orders drained {:.1} s after",
            self.seeded.len(),
            drained.as_secs_f64()
        ));
        Ok(row)
    }
}

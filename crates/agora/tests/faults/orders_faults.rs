//! Crash safety of orders (issue 10), as real processes on PostgreSQL, Redis and NATS JetStream
//! of the test's own: users, catalog, orders, the gateway and two workers, each one
//! `agora serve` process. Orders go in through the gateway while one piece is killed and started
//! again; then every acknowledged order must end `processed` or `failed` exactly once, with
//! catalog's stock matching what was sold and every event published.
//!
//! What is checked (each a violation in the row, and the test fails):
//! - lost: an order answered 201 that is not stored, not listed for its user, or does not read
//!   back through the gateway with the status it has in the database (a stale cache counts);
//! - stuck: an acknowledged order not `processed`/`failed` with its stock settled within the
//!   drain bound after the last order was sent;
//! - duplicates: an order with more than one terminal event (`order.processed`,
//!   `order.failed`) in its outbox, i.e. decided twice;
//! - stock: the product's stock is not the initial stock minus the units of processed orders,
//!   or units are still reserved once everything is settled;
//! - events: an order without its `order.created` and terminal event in the outbox, an outbox
//!   row not published (or set aside), or an outbox event missing from the NATS stream;
//! - requests: a 500, or a failure without a problem body.
//!
//! The payment fails for 10% of the orders (decided per order id), so both ends, commit and
//! release, are exercised. The bus is NATS, so the kills also cost in-flight deliveries: what
//! the bus does not redeliver soon enough, the worker's sweep (every 5 s, the default) picks up.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::harness::{Agora, Nats, Postgres, Redis};
use crate::load::{self, Outcome};
use crate::report::Report;

/// Orders each run sends (all of quantity 1, of one product).
const ORDERS: usize = 200;
/// Concurrent clients sending them.
const CLIENTS: usize = 4;
/// Each client waits this long between orders: the 200 take several seconds, so a fault
/// injected after a third of them lands mid-run with orders still coming after it.
const PACE: Duration = Duration::from_millis(100);
/// A client whose order failed waits this long before the next.
const FAILED_PAUSE: Duration = Duration::from_millis(250);
/// Whatever happens, the clients stop sending after this.
const MAX_SENDING: Duration = Duration::from_secs(30);
/// The product's stock at the start (more than the orders, so none is refused for stock).
const STOCK: i64 = 1000;
/// After the last order was sent, every acknowledged one must be decided, settled and its
/// events published within this.
const DRAIN_BOUND: Duration = Duration::from_secs(45);
/// `services.worker.payment_failure_rate` of the runs.
const PAYMENT_FAILURE_RATE: &str = "0.1";
/// `services.worker.payment_latency_ms`: long enough that a worker killed mid-run is killed in
/// the middle of payments (its transaction open, the order's row locked), not only between them.
const PAYMENT_LATENCY_MS: &str = "100";
/// `services.orders.reservation_timeout_secs` (the minimum) for the reserve/insert scenarios.
const RESERVATION_TIMEOUT: Duration = Duration::from_secs(5);
/// The leftovers of a crash between reserve and insert are released within this.
const RELEASE_BOUND: Duration = Duration::from_secs(15);
/// The topology column of these rows.
const TOPOLOGY: &str = "serve, 2 workers";

/// Users, catalog, orders, two workers and the gateway as separate processes, on servers of
/// the test's own, with a user and a product to order.
struct Shop {
    // Field order is drop order: Agora's processes stop before the servers they use.
    agora: Agora,
    nats: Nats,
    _redis: Redis,
    _pg: Postgres,
    orders_db: kit::Db,
    catalog_db: kit::Db,
    client: reqwest::Client,
    gateway: String,
    catalog: String,
    user: i64,
    product: i64,
}

/// `(key, value)` environment pairs.
fn env(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn upstreams(urls: &[&str]) -> String {
    serde_json::to_string(urls).expect("JSON")
}

impl Shop {
    /// Starts everything, with one orders process (`orders`); `orders_env` is added to its
    /// environment.
    async fn start(orders_env: &[(&str, String)]) -> Self {
        Self::with_orders(orders_env, &["orders"]).await
    }

    /// With an orders replica of each name in `replicas`, all behind the gateway.
    async fn with_orders(orders_env: &[(&str, String)], replicas: &[&str]) -> Self {
        let (pg, redis, nats) = tokio::join!(Postgres::start(), Redis::start(), Nats::start());
        let mut agora = Agora::empty();
        let base = env(&[
            ("DATABASE_URL", pg.url()),
            ("REDIS_URL", redis.url()),
            ("NATS_URL", nats.url()),
            // info: state changes (outages, recoveries) are logged; counted in the row.
            ("RUST_LOG", "info".to_owned()),
            ("AGORA_LOG__FORMAT", "json".to_owned()),
            (
                "AGORA_SERVICES__WORKER__PAYMENT_FAILURE_RATE",
                PAYMENT_FAILURE_RATE.to_owned(),
            ),
            (
                "AGORA_SERVICES__WORKER__PAYMENT_LATENCY_MS",
                PAYMENT_LATENCY_MS.to_owned(),
            ),
        ]);
        let users = agora.serve("users", "users", 0, &base).await;
        let catalog = agora.serve("catalog", "catalog", 0, &base).await;
        // orders and the workers call users and catalog.
        let mut neighbours = base.clone();
        neighbours.extend(env(&[
            ("AGORA_SERVICES__USERS__UPSTREAMS", upstreams(&[&users])),
            ("AGORA_SERVICES__CATALOG__UPSTREAMS", upstreams(&[&catalog])),
        ]));
        let mut orders_only = neighbours.clone();
        orders_only.extend(env(orders_env));
        let mut orders = Vec::new();
        for name in replicas {
            orders.push(agora.serve(name, "orders", 0, &orders_only).await);
        }
        let orders: Vec<&str> = orders.iter().map(String::as_str).collect();
        let worker1 = agora.serve("worker-1", "worker", 0, &neighbours).await;
        let worker2 = agora.serve("worker-2", "worker", 0, &neighbours).await;
        let mut edge = base.clone();
        edge.extend(env(&[
            ("AGORA_SERVICES__USERS__UPSTREAMS", upstreams(&[&users])),
            ("AGORA_SERVICES__CATALOG__UPSTREAMS", upstreams(&[&catalog])),
            ("AGORA_SERVICES__ORDERS__UPSTREAMS", upstreams(&orders)),
            (
                "AGORA_SERVICES__WORKER__UPSTREAMS",
                upstreams(&[&worker1, &worker2]),
            ),
        ]));
        let gateway = agora.serve("gateway", "gateway", 0, &edge).await;
        agora.gateway = gateway.clone();
        agora.users = users;

        let mut settings = kit::Settings::defaults();
        settings.database.url = Some(pg.url());
        settings.database.max_connections = 4;
        let orders_db = kit::Db::connect_only(&settings, orders::NAME)
            .await
            .expect("the orders schema");
        let catalog_db = kit::Db::connect_only(&settings, catalog::NAME)
            .await
            .expect("the catalog schema");

        let client = load::client();
        let user = create(
            &client,
            &format!("{gateway}/api/v1/users"),
            json!({"name": "Buyer"}),
        )
        .await;
        let product = create(
            &client,
            &format!("{gateway}/api/v1/products"),
            json!({"name": "Crash-proof widget", "price": "9.99", "stock": STOCK}),
        )
        .await;
        Self {
            agora,
            nats,
            _redis: redis,
            _pg: pg,
            orders_db,
            catalog_db,
            client,
            gateway,
            catalog,
            user,
            product,
        }
    }

    /// `(stock, reserved)` of the product, as catalog stores them.
    async fn stock(&self) -> (i64, i64) {
        kit::db::query("select stock, reserved from products where id = $1")
            .bind(self.product)
            .fetch_one(&self.catalog_db)
            .await
            .expect("the product")
    }

    /// Every stored order of the user: id → (status, stock settled).
    async fn stored(&self) -> BTreeMap<i64, (String, bool)> {
        kit::db::query("select id, status, stock_settled from orders where user_id = $1")
            .bind(self.user)
            .fetch_all::<(i64, String, bool)>(&self.orders_db)
            .await
            .expect("the orders")
            .into_iter()
            .map(|(id, status, settled)| (id, (status, settled)))
            .collect()
    }

    async fn scalar(&self, db: &kit::Db, sql: &str) -> i64 {
        kit::db::query(sql)
            .fetch_scalar(db)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Stored orders not yet decided and settled (work in flight, at a fault).
    async fn undecided(&self) -> usize {
        self.stored()
            .await
            .values()
            .filter(|(status, settled)| !is_terminal(status) || !settled)
            .count()
    }

    /// Whether everything the orders started is over: each stored order decided and settled, no
    /// intent left, no unpublished outbox row, nothing reserved at catalog.
    async fn drained(&self) -> bool {
        let stored = self.stored().await;
        let decided = stored
            .values()
            .all(|(status, settled)| is_terminal(status) && *settled);
        decided
            && self
                .scalar(&self.orders_db, "select count(*) from reservation_intents")
                .await
                == 0
            && self
                .scalar(
                    &self.orders_db,
                    "select count(*) from outbox where published_at is null",
                )
                .await
                == 0
            && self.stock().await.1 == 0
    }

    /// Polls [`Shop::drained`] until it holds or `bound` has passed since `from`; returns how
    /// long after `from` it held.
    async fn drain(&self, from: Instant, bound: Duration) -> Option<Duration> {
        loop {
            if self.drained().await {
                return Some(from.elapsed());
            }
            if from.elapsed() > bound {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every order of the user through the gateway's list, page by page: id → status, and the
    /// list's total.
    async fn listed(&self) -> (BTreeMap<i64, String>, i64) {
        let mut listed = BTreeMap::new();
        let mut total = 0;
        for page in 1.. {
            let url = format!(
                "{}/api/v1/orders?user_id={}&per_page=100&page={page}",
                self.gateway, self.user
            );
            let body = get_json(&self.client, &url).await;
            total = body["total"].as_i64().expect("a total");
            let items = body["items"].as_array().expect("items");
            for item in items {
                let id = item["id"].as_i64().expect("an id");
                let status = item["status"].as_str().unwrap_or_default().to_owned();
                listed.insert(id, status);
            }
            if items.is_empty() || listed.len() as i64 >= total {
                break;
            }
        }
        (listed, total)
    }

    /// `GET /api/v1/orders/{id}` through the gateway for each order: those whose status differs
    /// from `expected` (or that do not read back), with what came back.
    async fn read_back(&self, expected: &BTreeMap<i64, String>) -> Vec<String> {
        let mut tasks = JoinSet::new();
        let ids: Vec<(i64, String)> = expected.iter().map(|(k, v)| (*k, v.clone())).collect();
        for chunk in ids.chunks(ids.len().div_ceil(4).max(1)) {
            let (client, gateway, chunk) =
                (self.client.clone(), self.gateway.clone(), chunk.to_vec());
            tasks.spawn(async move {
                let mut wrong = Vec::new();
                for (id, status) in chunk {
                    let url = format!("{gateway}/api/v1/orders/{id}");
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            let body: Value = r.json().await.unwrap_or_default();
                            if body["status"] != status.as_str() {
                                wrong.push(format!(
                                    "order {id} reads back {} (stored: {status})",
                                    body["status"]
                                ));
                            }
                        }
                        Ok(r) => wrong.push(format!("order {id} reads back {}", r.status())),
                        Err(err) => wrong.push(format!("order {id}: {err:#}")),
                    }
                }
                wrong
            });
        }
        let mut wrong = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            wrong.extend(joined.expect("a read-back task"));
        }
        wrong
    }

    /// The events of `expected` (message id → topic) found on the NATS stream, read by a
    /// durable consumer of the test's own from the start of the stream: id → topic. Reading
    /// stops once every expected one was seen, or after 3 s without a message.
    async fn events_on_bus(
        &self,
        expected: &BTreeMap<String, String>,
    ) -> (BTreeMap<String, String>, String) {
        let mut settings = kit::Settings::defaults();
        settings.bus.url = Some(self.nats.url());
        let bus = kit::bus::Bus::connect(&settings).await.expect("NATS");
        let mut seen = BTreeMap::new();
        let mut found = 0;
        let mut errors = Vec::new();
        let mut ends = Vec::new();
        let started = Instant::now();
        // Up to three subscriptions of the same durable consumer (each resumes after what was
        // acked): a pull that stalls on a loaded machine is the audit's problem, not a lost
        // event, while an event that is not on the stream stays missing in every round.
        for _ in 0..3 {
            let mut subscription = bus
                .subscribe("crash-audit", &["order.*"])
                .await
                .expect("an audit consumer");
            let end = loop {
                if found == expected.len() {
                    break "all found";
                }
                match tokio::time::timeout(Duration::from_secs(3), subscription.next()).await {
                    Ok(Some(Ok(delivery))) => {
                        let (id, topic) = (&delivery.message.id, &delivery.message.topic);
                        found +=
                            usize::from(expected.get(id) == Some(topic) && !seen.contains_key(id));
                        seen.insert(id.clone(), topic.clone());
                        let _ = delivery.ack().await;
                    }
                    // A transient pull error: pull again.
                    Ok(Some(Err(err))) => errors.push(format!("{err:#}")),
                    Ok(None) => break "the subscription ended",
                    Err(_) => break "3 s without a message",
                }
            };
            ends.push(end);
            if found == expected.len() {
                break;
            }
        }
        let how = format!(
            "read {} messages in {:.1} s ({}); pull errors: {errors:?}",
            seen.len(),
            started.elapsed().as_secs_f64(),
            ends.join(", then ")
        );
        (seen, how)
    }
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "processed" | "failed")
}

/// GETs `url`, which must answer 200. A 503 with `Retry-After` (the gateway's circuit for a
/// service that was just restarted, still paused) is retried as a client would, for at most 10 s.
async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = client
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        if response.status() == 503
            && response.headers().contains_key("retry-after")
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert_eq!(response.status(), 200, "GET {url}");
        return response.json().await.expect("a JSON body");
    }
}

/// POSTs `body` to `url`, which must answer 201; returns the new id.
async fn create(client: &reqwest::Client, url: &str, body: Value) -> i64 {
    let response = client
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or_default();
    assert_eq!(status, 201, "POST {url} {body}: {answer}");
    answer["id"].as_i64().expect("an id")
}

// ---------------------------------------------------------------------------------------------
// The load: orders of one unit, sent by a few clients, each answer recorded.

struct OrderLoad {
    acknowledged: Arc<AtomicUsize>,
    tasks: JoinSet<Vec<(Outcome, Option<i64>)>>,
}

/// What the clients got: each answer, and the id of each order answered 201.
struct Sent {
    outcomes: Vec<Outcome>,
    acknowledged: BTreeSet<i64>,
    /// When the last answer came.
    ended: Instant,
}

impl OrderLoad {
    fn start(shop: &Shop, orders: usize, clients: usize, pace: Duration) -> Self {
        let next = Arc::new(AtomicUsize::new(0));
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        let body = json!({"user_id": shop.user, "product_id": shop.product, "quantity": 1});
        for _ in 0..clients {
            let (next, acknowledged, body) = (next.clone(), acknowledged.clone(), body.clone());
            let (client, url) = (
                shop.client.clone(),
                format!("{}/api/v1/orders", shop.gateway),
            );
            tasks.spawn(async move {
                let mut answers = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < orders
                    && started.elapsed() < MAX_SENDING
                {
                    let (outcome, answer) =
                        load::classify(client.post(&url).json(&body).send().await).await;
                    let id = answer.and_then(|a| a["id"].as_i64());
                    if id.is_some() {
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    // A client told to come back later does (not at once: a dead service
                    // would otherwise use up the run's orders in a second).
                    let pause = if id.is_some() { pace } else { FAILED_PAUSE };
                    answers.push((outcome, id));
                    tokio::time::sleep(pause).await;
                }
                answers
            });
        }
        Self {
            acknowledged,
            tasks,
        }
    }

    /// Waits until `n` orders were acknowledged (at most [`MAX_SENDING`]).
    async fn acknowledged(&self, n: usize) {
        let deadline = Instant::now() + MAX_SENDING;
        while self.acknowledged.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(mut self) -> Sent {
        let mut sent = Sent {
            outcomes: Vec::new(),
            acknowledged: BTreeSet::new(),
            ended: Instant::now(),
        };
        while let Some(joined) = self.tasks.join_next().await {
            for (outcome, id) in joined.expect("a load client panicked") {
                sent.outcomes.push(outcome);
                sent.acknowledged.extend(id);
            }
        }
        sent.ended = Instant::now();
        sent
    }
}

// ---------------------------------------------------------------------------------------------
// The checks, shared by the scenarios that send orders.

/// The figures of a run and the violations among them.
struct Verdict {
    row: Value,
    violations: Vec<String>,
}

/// Checks a drained (or not) run. `orders_crashed`: the orders service itself was killed, so an
/// order may be stored although its client got an error (it committed just before the kill).
async fn verdict(
    shop: &mut Shop,
    sent: &Sent,
    drained: Option<Duration>,
    orders_crashed: bool,
    extra: Value,
) -> Verdict {
    let mut violations = Vec::new();
    let ok = sent
        .outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Ok))
        .count();
    let mut failed_problem = 0;
    let mut failed_no_problem = 0;
    let mut http_500 = 0;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    for outcome in &sent.outcomes {
        match outcome {
            Outcome::Ok => {}
            Outcome::Problem { status, code, .. } => {
                failed_problem += 1;
                http_500 += usize::from(*status == 500);
                *failures.entry(format!("{status} {code}")).or_default() += 1;
            }
            Outcome::NoProblem { status, detail } => {
                failed_no_problem += 1;
                http_500 += usize::from(*status == Some(500));
                *failures
                    .entry(format!("{status:?} without a problem: {detail}"))
                    .or_default() += 1;
            }
        }
    }
    if http_500 > 0 || failed_no_problem > 0 {
        violations.push(format!(
            "{http_500} answers were 500 and {failed_no_problem} failures had no problem body: \
             {failures:?}"
        ));
    }

    // Stored, listed and read back.
    let stored = shop.stored().await;
    let statuses: BTreeMap<i64, String> = stored
        .iter()
        .map(|(id, (status, _))| (*id, status.clone()))
        .collect();
    let mut lost: Vec<String> = sent
        .acknowledged
        .iter()
        .filter(|id| !stored.contains_key(id))
        .map(|id| format!("order {id} is not stored"))
        .collect();
    let (listed, total) = shop.listed().await;
    if listed != statuses || total != stored.len() as i64 {
        lost.push(format!(
            "the list shows {total} orders ({} read), the database {}; differing: {:?}",
            listed.len(),
            stored.len(),
            statuses
                .iter()
                .filter(|(id, s)| listed.get(id) != Some(s))
                .take(5)
                .collect::<Vec<_>>()
        ));
    }
    lost.extend(shop.read_back(&statuses).await);
    if !lost.is_empty() {
        violations.push(format!(
            "{} acknowledged orders lost or misread, e.g. {:?}",
            lost.len(),
            lost.iter().take(5).collect::<Vec<_>>()
        ));
    }
    let unacknowledged = stored.len().saturating_sub(sent.acknowledged.len());
    if unacknowledged > 0 && !orders_crashed {
        violations.push(format!(
            "{unacknowledged} orders are stored that no client was told about (the orders \
             service did not crash)"
        ));
    }

    // Decided, exactly once.
    let processed = statuses.values().filter(|s| *s == "processed").count();
    let failed = statuses.values().filter(|s| *s == "failed").count();
    let stuck: Vec<String> = stored
        .iter()
        .filter(|(_, (status, settled))| !is_terminal(status) || !settled)
        .map(|(id, (status, settled))| format!("{id} {status} (settled: {settled})"))
        .collect();
    if !stuck.is_empty() {
        violations.push(format!(
            "{} orders not processed/failed with their stock settled after {} s, e.g. {:?}",
            stuck.len(),
            DRAIN_BOUND.as_secs(),
            stuck.iter().take(5).collect::<Vec<_>>()
        ));
    }
    let duplicates: Vec<(String, i64)> = kit::db::query(
        "select key, count(*) from outbox where topic in ('order.processed', 'order.failed') \
         group by key having count(*) > 1",
    )
    .fetch_all(&shop.orders_db)
    .await
    .expect("outbox");
    if !duplicates.is_empty() {
        violations.push(format!(
            "{} orders were decided more than once (several order.processed/order.failed \
             events), e.g. {:?}",
            duplicates.len(),
            duplicates.iter().take(5).collect::<Vec<_>>()
        ));
    }

    // Stock: every processed order sold one unit; nothing else is held.
    let (stock, reserved) = shop.stock().await;
    let expected = STOCK - processed as i64;
    let stock_mismatch = stock - expected;
    if stock_mismatch != 0 || reserved != 0 {
        violations.push(format!(
            "catalog has stock {stock} and {reserved} reserved; expected {expected} \
             ({STOCK} − {processed} processed) and 0"
        ));
    }

    // Events: created and decided in the outbox, published, and on the stream.
    let rows: Vec<(String, String, String, bool)> = kit::db::query(
        "select id, topic, key, published_at is not null and set_aside_at is null from outbox",
    )
    .fetch_all(&shop.orders_db)
    .await
    .expect("outbox");
    let mut topics_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (_, topic, key, _) in &rows {
        topics_of
            .entry(key.as_str())
            .or_default()
            .insert(topic.as_str());
    }
    let missing_events: Vec<String> = stored
        .iter()
        .filter_map(|(id, (status, _))| {
            let key = format!("order:{id}");
            let topics = topics_of.get(key.as_str());
            let has = |t: &str| topics.is_some_and(|ts| ts.contains(t));
            let terminal = format!("order.{status}");
            (!has("order.created") || !has(&terminal))
                .then(|| format!("{key} ({status}): {topics:?}"))
        })
        .collect();
    let unpublished = rows.iter().filter(|r| !r.3).count();
    let expected: BTreeMap<String, String> = rows
        .iter()
        .map(|(id, topic, _, _)| (id.clone(), topic.clone()))
        .collect();
    let (on_bus, bus_read) = shop.events_on_bus(&expected).await;
    let not_on_bus: Vec<&str> = rows
        .iter()
        .filter(|(id, topic, _, _)| on_bus.get(id) != Some(topic))
        .map(|(id, _, _, _)| id.as_str())
        .collect();
    if !missing_events.is_empty() || unpublished > 0 || !not_on_bus.is_empty() {
        violations.push(format!(
            "events lost: {} orders without order.created and their terminal event in the \
             outbox (e.g. {:?}); {unpublished} outbox rows unpublished or set aside; {} \
             published rows not on the NATS stream (e.g. {:?}; the audit {bus_read})",
            missing_events.len(),
            missing_events.iter().take(3).collect::<Vec<_>>(),
            not_on_bus.len(),
            not_on_bus.iter().take(3).collect::<Vec<_>>()
        ));
    }

    if drained.is_none() {
        violations.push(format!(
            "not drained within {} s of the last order (orders decided and settled, outbox \
             published, nothing reserved)",
            DRAIN_BOUND.as_secs()
        ));
    }
    for exited in shop.agora.exited() {
        violations.push(format!("agora {exited} (not killed by the test)"));
    }
    let (log_lines, warn_lines, log_messages) = shop.agora.log_counts();
    let mut row = json!({
        "sent": sent.outcomes.len(),
        "ok": ok,
        "failed_problem": failed_problem,
        "failed_no_problem": failed_no_problem,
        "failures": failures,
        "lost": lost.len(),
        "http_500": http_500,
        "stored": stored.len(),
        "stored_unacknowledged": unacknowledged,
        "processed": processed,
        "failed": failed,
        "stuck": stuck.len(),
        "duplicates": duplicates.len(),
        "stock_mismatch": stock_mismatch,
        "reserved_left": reserved,
        "events": rows.len(),
        "events_missing": missing_events.len() + unpublished + not_on_bus.len(),
        "bus_audit": bus_read,
        "drain_s": drained.map(|d| (d.as_secs_f64() * 100.0).round() / 100.0),
        "bound_s": DRAIN_BOUND.as_secs_f64(),
        "log_lines": log_lines,
        "warn_lines": warn_lines,
        "log_messages": log_messages,
    });
    if let (Some(row), Value::Object(extra)) = (row.as_object_mut(), extra) {
        row.extend(extra);
    }
    Verdict { row, violations }
}

/// Writes the row and fails the test with every violation and the logs that explain them.
fn conclude(shop: &Shop, mut report: Report, verdict: Verdict, scenario: &str) {
    report.write_figures(verdict.row.clone(), &verdict.violations);
    if verdict.violations.is_empty() {
        return;
    }
    let names = ["orders", "orders-1", "orders-2", "worker-1", "worker-2"];
    let tails: Vec<String> = names
        .iter()
        .chain(&["catalog", "gateway"])
        .map(|name| format!("--- {name} (tail)\n{}", shop.agora.log_tail(name, 8)))
        .collect();
    panic!(
        "{scenario}:\n- {}\nmost frequent warnings and errors:\n{}\n{}",
        verdict.violations.join("\n- "),
        verdict.row["log_messages"],
        tails.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The scenarios

/// A worker is SIGKILLed after a third of the orders (with deliveries in flight to it and
/// orders half-processed) and started again 2 s later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_run() {
    let scenario = "orders-worker-killed";
    let report = Report::named(scenario, TOPOLOGY);
    let mut shop = Shop::start(&[]).await;
    let load = OrderLoad::start(&shop, ORDERS, CLIENTS, PACE);
    load.acknowledged(ORDERS / 3).await;
    shop.agora.kill("worker-1").await;
    let undecided_at_kill = shop.undecided().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    shop.agora.restart("worker-1").await;
    let sent = load.finish().await;
    let drained = shop.drain(sent.ended, DRAIN_BOUND).await;
    let extra = json!({ "undecided_at_kill": undecided_at_kill });
    let verdict = verdict(&mut shop, &sent, drained, false, extra).await;
    conclude(&shop, report, verdict, scenario);
}

/// The NATS server is SIGKILLed after a third of the orders and started again 2 s later on the
/// same port and store: orders keep being accepted (their events wait in the outbox), and
/// those accepted meanwhile complete once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_run() {
    let scenario = "orders-nats-restarted";
    let report = Report::named(scenario, TOPOLOGY);
    let mut shop = Shop::start(&[]).await;
    let load = OrderLoad::start(&shop, ORDERS, CLIENTS, PACE);
    load.acknowledged(ORDERS / 3).await;
    let down = Instant::now();
    shop.nats.kill().await;
    let at_kill = load.acknowledged.load(Ordering::Relaxed);
    let undecided_at_kill = shop.undecided().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    shop.nats.spawn().await;
    let outage = down.elapsed();
    let during = load.acknowledged.load(Ordering::Relaxed) - at_kill;
    let sent = load.finish().await;
    let drained = shop.drain(sent.ended, DRAIN_BOUND).await;
    let extra = json!({
        "outage_s": (outage.as_secs_f64() * 100.0).round() / 100.0,
        "acknowledged_while_down": during,
        "undecided_at_kill": undecided_at_kill,
    });
    let verdict = verdict(&mut shop, &sent, drained, false, extra).await;
    conclude(&shop, report, verdict, scenario);
}

/// What a crash of the orders service between catalog's reservation and the order's insert
/// leaves behind, made by hand (the instant cannot be hit from outside): an intent row and the
/// reservation it names. The orders service's sweep must release it after
/// `reservation_timeout_secs` (5 s here) and forget the intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_killed_between_reserve_and_insert() {
    let scenario = "orders-crash-leftovers";
    let mut report = Report::named(scenario, TOPOLOGY);
    let shop = Shop::start(&[(
        "AGORA_SERVICES__ORDERS__RESERVATION_TIMEOUT_SECS",
        RESERVATION_TIMEOUT.as_secs().to_string(),
    )])
    .await;
    let reservation = format!("ord-crashed-{}", std::process::id());
    kit::db::query(
        "insert into reservation_intents (reservation_id, created_at) values ($1, now())",
    )
    .bind(reservation.as_str())
    .execute(&shop.orders_db)
    .await
    .expect("an intent");
    let held = Instant::now();
    let response = shop
        .client
        .post(format!("{}/internal/v1/reservations", shop.catalog))
        // Internal endpoints answer only callers with the service credential.
        .header("x-agora-service-token", crate::harness::SERVICE_TOKEN)
        .json(&json!({
            "order_id": reservation,
            "items": [{"product_id": shop.product, "quantity": 3}],
        }))
        .send()
        .await
        .expect("catalog answers");
    assert_eq!(response.status(), 201, "the reservation is made");
    assert_eq!(shop.stock().await, (STOCK - 3, 3), "3 units are held");

    let mut released = None;
    let mut state = (0, 0, 0);
    while held.elapsed() < RELEASE_BOUND + Duration::from_secs(1) {
        let (stock, reserved) = shop.stock().await;
        let intents = shop
            .scalar(&shop.orders_db, "select count(*) from reservation_intents")
            .await;
        state = (stock, reserved, intents);
        if state == (STOCK, 0, 0) {
            released = Some(held.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut violations = Vec::new();
    match released {
        Some(took) if took <= RELEASE_BOUND => {}
        Some(took) => violations.push(format!(
            "released after {:.1} s (bound {} s)",
            took.as_secs_f64(),
            RELEASE_BOUND.as_secs()
        )),
        None => violations.push(format!(
            "after {} s: stock {}, reserved {}, intents left {}; expected {STOCK}, 0, 0",
            RELEASE_BOUND.as_secs(),
            state.0,
            state.1,
            state.2
        )),
    }
    if released.is_some_and(|t| t < RESERVATION_TIMEOUT) {
        violations.push(format!(
            "released before the reservation timeout ({} s): a slow order could lose its stock",
            RESERVATION_TIMEOUT.as_secs()
        ));
    }
    let (log_lines, warn_lines, log_messages) = shop.agora.log_counts();
    let row = json!({
        "held_units": 3,
        "stock_mismatch": state.0 - STOCK,
        "reserved_left": state.1,
        "intents_left": state.2,
        "lost": 0,
        "duplicates": 0,
        "drain_s": released.map(|d| (d.as_secs_f64() * 100.0).round() / 100.0),
        "bound_s": RELEASE_BOUND.as_secs_f64(),
        "log_lines": log_lines,
        "warn_lines": warn_lines,
        "log_messages": log_messages,
    });
    report.write_figures(row, &violations);
    assert!(
        violations.is_empty(),
        "{scenario}:\n- {}\norders log (tail):\n{}",
        violations.join("\n- "),
        shop.agora.log_tail("orders", 10)
    );
}

/// The real crash: the orders service is SIGKILLed while orders are in flight (some between
/// reserve and insert, by chance) and started again 1 s later. Once the reservation timeout has
/// passed, nothing may stay reserved beyond what stored orders hold, which is nothing once they
/// are all decided: every stored order is processed or failed exactly once, stock matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_killed_mid_run() {
    let scenario = "orders-service-killed";
    let report = Report::named(scenario, TOPOLOGY);
    let mut shop = Shop::start(&[(
        "AGORA_SERVICES__ORDERS__RESERVATION_TIMEOUT_SECS",
        RESERVATION_TIMEOUT.as_secs().to_string(),
    )])
    .await;
    // More clients, unpaced: as many creates in flight as possible when the kill comes.
    let load = OrderLoad::start(&shop, ORDERS, 8, Duration::from_millis(20));
    load.acknowledged(ORDERS / 3).await;
    shop.agora.kill("orders").await;
    // What the dead process left: intents of orders it never stored (each may hold stock).
    let intents_left = shop
        .scalar(&shop.orders_db, "select count(*) from reservation_intents")
        .await;
    let (_, reserved_at_kill) = shop.stock().await;
    let unsettled_at_kill = shop.undecided().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    shop.agora.restart("orders").await;
    let sent = load.finish().await;
    let drained = shop.drain(sent.ended, DRAIN_BOUND).await;
    let extra = json!({
        "intents_left_by_crash": intents_left,
        "reserved_at_kill": reserved_at_kill,
        "undecided_at_kill": unsettled_at_kill,
    });
    let verdict = verdict(&mut shop, &sent, drained, true, extra).await;
    conclude(&shop, report, verdict, scenario);
}

/// An orders replica freezes (SIGSTOP) for longer than the reservation timeout while creating
/// orders, and then carries on (SIGCONT), as after a long pause of a VM or a process. Meanwhile
/// the other replica's sweep finds the frozen one's intents older than the timeout and releases
/// their stock. A create that then resumes must not store an order whose stock was released
/// (it would be sold without being held: oversold); every stored order is decided exactly once
/// and stock matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_paused_past_the_reservation_timeout() {
    let scenario = "orders-replica-paused";
    let report = Report::named(scenario, "serve, 2 orders, 2 workers");
    let mut shop = Shop::with_orders(
        &[(
            "AGORA_SERVICES__ORDERS__RESERVATION_TIMEOUT_SECS",
            RESERVATION_TIMEOUT.as_secs().to_string(),
        )],
        &["orders-1", "orders-2"],
    )
    .await;
    let load = OrderLoad::start(&shop, ORDERS, 8, Duration::from_millis(20));
    load.acknowledged(ORDERS / 3).await;
    shop.agora.pause("orders-1");
    let paused = Instant::now();
    // Past the timeout and the other replica's next sweep (every timeout / 4 s), and short of
    // the clients' 10 s request timeout, so that what the frozen replica answers is seen.
    tokio::time::sleep(RESERVATION_TIMEOUT + Duration::from_secs(2)).await;
    let intents_while_paused = shop
        .scalar(&shop.orders_db, "select count(*) from reservation_intents")
        .await;
    shop.agora.resume("orders-1");
    let pause = paused.elapsed();
    let sent = load.finish().await;
    let drained = shop.drain(sent.ended, DRAIN_BOUND).await;
    let extra = json!({
        "pause_s": (pause.as_secs_f64() * 100.0).round() / 100.0,
        "intents_at_resume": intents_while_paused,
    });
    let verdict = verdict(&mut shop, &sent, drained, true, extra).await;
    conclude(&shop, report, verdict, scenario);
}

//! The load driver: a few concurrent clients reading a known user and creating new ones through
//! the gateway, bounded in requests and in time, recording every answer; a sampler of the users
//! service's cache counters; and the check that every acknowledged create can be read back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;

/// Concurrent clients.
const CLIENTS: usize = 6;
/// Requests each client sends at most (the run is bounded even if the system is very fast).
const MAX_PER_CLIENT: u64 = 5_000;
/// Each client waits this long between requests: steady traffic that leaves room for two fault
/// tests (each with its own Agora, PostgreSQL and Redis) on two cores.
const PACE: Duration = Duration::from_millis(4);
/// A request without an answer after this counts as failed without a problem.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Whatever the scenario does, the load stops after this.
const MAX_DURATION: Duration = Duration::from_secs(40);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Create,
}

/// How one request ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ok,
    /// 4xx/5xx with an `application/problem+json` body that has a `code`.
    Problem {
        status: u16,
        code: String,
        retry_after: bool,
    },
    /// A connection error, a timeout, or an error status without a problem body.
    NoProblem {
        status: Option<u16>,
        detail: String,
    },
}

#[derive(Debug, Clone)]
pub struct Record {
    pub kind: Kind,
    pub done: Instant,
    pub outcome: Outcome,
}

/// What the clients sent and got, and the users they were told were created (201).
#[derive(Default)]
struct Shared {
    records: std::sync::Mutex<Vec<Record>>,
    created: std::sync::Mutex<Vec<Value>>,
}

/// One sample of the users service's cache counters.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub hits: f64,
    pub errors: f64,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<()>,
    sampler: tokio::task::JoinHandle<Vec<Sample>>,
    shared: Arc<Shared>,
}

/// Everything a load run saw.
pub struct Run {
    pub records: Vec<Record>,
    pub created: Vec<Value>,
    pub samples: Vec<Sample>,
}

/// Unique per request across every test process of the run: pid + a counter.
fn unique() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("an HTTP client")
}

/// Classifies an answer; the body of a 2xx is returned for the caller.
pub async fn classify(response: reqwest::Result<reqwest::Response>) -> (Outcome, Option<Value>) {
    let response = match response {
        Ok(response) => response,
        Err(err) => {
            return (
                Outcome::NoProblem {
                    status: None,
                    detail: format!("{err:#}"),
                },
                None,
            );
        }
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(err) => {
            return (
                Outcome::NoProblem {
                    status: Some(status),
                    detail: format!("body: {err:#}"),
                },
                None,
            );
        }
    };
    if status < 400 {
        return (Outcome::Ok, serde_json::from_slice(&body).ok());
    }
    let is_problem = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    let code = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned));
    match code {
        Some(code) if is_problem => (
            Outcome::Problem {
                status,
                code,
                retry_after: headers.contains_key(reqwest::header::RETRY_AFTER),
            },
            None,
        ),
        _ => (
            Outcome::NoProblem {
                status: Some(status),
                detail: String::from_utf8_lossy(&body).chars().take(200).collect(),
            },
            None,
        ),
    }
}

impl Load {
    /// Starts the clients against `gateway`, reading user `known` (3 reads to 1 create), and
    /// the sampler of the users service's `/metrics` (`users`: its metrics listener).
    pub fn start(gateway: &str, users: &str, known: i64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..CLIENTS {
            let (stop, shared, gateway) = (stop.clone(), shared.clone(), gateway.to_owned());
            tasks.spawn(async move {
                let client = client();
                for i in 0..MAX_PER_CLIENT {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > MAX_DURATION {
                        break;
                    }
                    let kind = if i % 4 == 3 { Kind::Create } else { Kind::Read };
                    let request = match kind {
                        Kind::Read => client.get(format!("{gateway}/api/v1/users/{known}")),
                        Kind::Create => {
                            let tag = unique();
                            client.post(format!("{gateway}/api/v1/users")).json(&json!({
                                "name": format!("Load {tag}"),
                                "email": format!("load-{tag}@example.com"),
                            }))
                        }
                    };
                    let (outcome, body) = classify(request.send().await).await;
                    if kind == Kind::Create
                        && matches!(outcome, Outcome::Ok)
                        && let Some(body) = body
                    {
                        shared
                            .created
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(body);
                    }
                    shared
                        .records
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Record {
                            kind,
                            done: Instant::now(),
                            outcome,
                        });
                    tokio::time::sleep(PACE).await;
                }
            });
        }
        let sampler = tokio::spawn(sample(users.to_owned(), stop.clone(), started));
        Self {
            stop,
            tasks,
            sampler,
            shared,
        }
    }

    /// Stops the clients and the sampler and returns what they saw.
    pub async fn finish(mut self) -> Run {
        self.stop.store(true, Ordering::Relaxed);
        while let Some(joined) = self.tasks.join_next().await {
            joined.expect("a load client panicked");
        }
        let samples = self.sampler.await.expect("the sampler panicked");
        Run {
            records: take(&self.shared.records),
            created: take(&self.shared.created),
            samples,
        }
    }
}

fn take<T>(m: &std::sync::Mutex<Vec<T>>) -> Vec<T> {
    std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Reads `users`'s cache counters every 100 ms until stopped.
async fn sample(users: String, stop: Arc<AtomicBool>, started: Instant) -> Vec<Sample> {
    let client = client();
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_DURATION {
        if let Some((hits, errors)) = cache_counters(&client, &users).await {
            samples.push(Sample {
                at: Instant::now(),
                hits,
                errors,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// `agora_cache_hits_total` and `agora_cache_errors_total` from `/metrics`, summed over labels.
pub async fn cache_counters(client: &reqwest::Client, users: &str) -> Option<(f64, f64)> {
    let text = client
        .get(format!("{users}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Some((
        sum("agora_cache_hits_total"),
        sum("agora_cache_errors_total"),
    ))
}

/// The figures of one run, counted from `fault_end` (the moment the server was back).
pub struct Figures {
    pub sent: usize,
    pub reads: usize,
    pub creates: usize,
    pub ok: usize,
    pub problem: usize,
    pub no_problem: usize,
    pub http_500: usize,
    /// "503 dependency_unavailable" → count, and the like for every 5xx.
    pub server_errors: BTreeMap<String, usize>,
    /// Failures that were not a 503 `dependency_unavailable` with `Retry-After`.
    pub unexpected: BTreeMap<String, usize>,
    /// From the fault's end until the last failure (zero when none came after it); `None` when
    /// no request succeeded after the last failure.
    pub recovered_ok: Option<Duration>,
    /// From the fault's end until the hit counter moved again; `None` if it never did.
    pub recovered_hits: Option<Duration>,
    pub cache_errors: f64,
}

impl Run {
    pub fn figures(&self, fault_end: Instant) -> Figures {
        let mut figures = Figures {
            sent: self.records.len(),
            reads: self.records.iter().filter(|r| r.kind == Kind::Read).count(),
            creates: self
                .records
                .iter()
                .filter(|r| r.kind == Kind::Create)
                .count(),
            ok: 0,
            problem: 0,
            no_problem: 0,
            http_500: 0,
            server_errors: BTreeMap::new(),
            unexpected: BTreeMap::new(),
            recovered_ok: None,
            recovered_hits: None,
            cache_errors: 0.0,
        };
        let mut last_failure: Option<Instant> = None;
        for record in &self.records {
            let failed = match &record.outcome {
                Outcome::Ok => {
                    figures.ok += 1;
                    false
                }
                Outcome::Problem {
                    status,
                    code,
                    retry_after,
                } => {
                    figures.problem += 1;
                    if *status >= 500 {
                        *figures
                            .server_errors
                            .entry(format!("{status} {code}"))
                            .or_default() += 1;
                    }
                    if !(*status == 503 && code == "dependency_unavailable" && *retry_after) {
                        let what = format!(
                            "{status} {code}{}",
                            if *retry_after {
                                ""
                            } else {
                                " (no Retry-After)"
                            }
                        );
                        *figures.unexpected.entry(what).or_default() += 1;
                    }
                    true
                }
                Outcome::NoProblem { status, detail } => {
                    figures.no_problem += 1;
                    let what = match status {
                        Some(status) => format!("{status} without a problem: {detail}"),
                        None => format!("no answer: {detail}"),
                    };
                    if let Some(status) = status.filter(|s| *s >= 500) {
                        *figures
                            .server_errors
                            .entry(format!("{status} (no problem)"))
                            .or_default() += 1;
                    }
                    *figures.unexpected.entry(what).or_default() += 1;
                    true
                }
            };
            let status = match &record.outcome {
                Outcome::Problem { status, .. } => Some(*status),
                Outcome::NoProblem { status, .. } => *status,
                Outcome::Ok => None,
            };
            if status == Some(500) {
                figures.http_500 += 1;
            }
            if failed {
                last_failure = Some(last_failure.map_or(record.done, |l| l.max(record.done)));
            }
        }
        let succeeded_after = |t: Instant| {
            self.records
                .iter()
                .any(|r| matches!(r.outcome, Outcome::Ok) && r.done > t)
        };
        figures.recovered_ok = match last_failure {
            None => Some(Duration::ZERO),
            Some(last) if succeeded_after(last) => Some(last.saturating_duration_since(fault_end)),
            Some(_) => None,
        };
        // The counter as it stood when the server came back, then the first sample above it.
        let before = self
            .samples
            .iter()
            .rev()
            .find(|s| s.at <= fault_end)
            .map_or(0.0, |s| s.hits);
        figures.recovered_hits = self
            .samples
            .iter()
            .find(|s| s.at > fault_end && s.hits > before)
            .map(|s| s.at.saturating_duration_since(fault_end));
        figures.cache_errors = match (self.samples.first(), self.samples.last()) {
            (Some(first), Some(last)) => last.errors - first.errors,
            _ => 0.0,
        };
        figures
    }

    /// Reads back every user whose create was answered 201 and returns those that are missing
    /// or differ (acknowledged but lost), with what came back. A read that fails for another
    /// reason than 404 is retried a few times, since what is checked is the data, not the
    /// availability.
    pub async fn lost(&self, gateway: &str) -> Vec<String> {
        let client = client();
        let chunks: Vec<Vec<Value>> = self
            .created
            .chunks(self.created.len().div_ceil(8).max(1))
            .map(<[Value]>::to_vec)
            .collect();
        let mut tasks = JoinSet::new();
        for chunk in chunks {
            let (client, gateway) = (client.clone(), gateway.to_owned());
            tasks.spawn(async move {
                let mut lost = Vec::new();
                for created in chunk {
                    let url = format!("{gateway}/api/v1/users/{}", created["id"]);
                    let mut last = String::new();
                    let mut found = false;
                    for attempt in 0..4 {
                        if attempt > 0 {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        match client.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {
                                let body: Option<Value> = r.json().await.ok();
                                found = body.as_ref() == Some(&created);
                                last = format!("200 {body:?}");
                                break;
                            }
                            Ok(r) if r.status() == 404 => {
                                last = "404".to_owned();
                                break;
                            }
                            Ok(r) => last = format!("{}", r.status()),
                            Err(err) => last = format!("{err:#}"),
                        }
                    }
                    if !found {
                        lost.push(format!("{created} read back as {last}"));
                    }
                }
                lost
            });
        }
        let mut lost = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            lost.extend(joined.expect("a read-back task panicked"));
        }
        lost
    }
}

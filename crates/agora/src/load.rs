//! The load generator of `agora bench`: lean on purpose, because on a small machine it shares the
//! CPU with what it measures. Each virtual client owns one HTTP/1.1 keep-alive connection (hyper's
//! bare client connection, no pool, no redirects, no per-request allocation beyond the request)
//! and sends back to back until the deadline; a failed connection is counted and reopened.
//! Latencies go to an HDR histogram per client (µs, 3 significant digits), merged at the end.
//!
//! The same generator drives Agora's rows and the reference rows, so their ratio is fair.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::Method;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper_util::rt::TokioIo;

/// One request a virtual client sends.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: Method,
    /// Path and query.
    pub path: String,
    /// A JSON body.
    pub body: Option<Bytes>,
}

impl Req {
    pub fn get(path: impl Into<String>) -> Self {
        Self {
            method: Method::GET,
            path: path.into(),
            body: None,
        }
    }

    pub fn post(path: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self {
            method: Method::POST,
            path: path.into(),
            body: Some(body.into()),
        }
    }
}

/// What the clients send: `request(client, n)` is client `client`'s `n`th request.
pub type Plan = Arc<dyn Fn(usize, u64) -> Req + Send + Sync>;

/// A load run: where, how many clients, how long.
#[derive(Clone)]
pub struct Load {
    pub addr: SocketAddr,
    pub connections: usize,
    pub duration: Duration,
    /// `Authorization: Bearer <token>` on every request.
    pub token: Option<String>,
    /// Shown on the progress line.
    pub label: String,
}

/// What a run measured.
pub struct Outcome {
    /// Latencies of the successful (2xx) requests, in µs.
    pub latencies: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    /// The first failure seen (a status or a transport error), for the report.
    pub first_error: Option<String>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile in ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latencies.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.latencies.max() as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes: more than any bounded run lasts. The bounds are constants, so this
    // cannot fail; a fallback keeps clippy's no-unwrap rule.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
}

/// Runs `plan` with `load.connections` clients until `load.duration` is over.
pub async fn run(load: &Load, plan: Plan) -> Outcome {
    let started = Instant::now();
    let deadline = started + load.duration;
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let progress = (std::io::stdout().is_terminal() && !load.label.is_empty()).then(|| {
        let (sent, failed, label) = (sent.clone(), failed.clone(), load.label.clone());
        tokio::spawn(progress_line(label, started, sent, failed))
    });
    let auth = load
        .token
        .as_ref()
        .and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok());
    let host = HeaderValue::from_str(&load.addr.to_string()).ok();
    let clients: Vec<_> = (0..load.connections)
        .map(|c| {
            let (plan, sent, failed) = (plan.clone(), sent.clone(), failed.clone());
            let (auth, host, addr) = (auth.clone(), host.clone(), load.addr);
            tokio::spawn(
                async move { client(c, addr, deadline, plan, auth, host, sent, failed).await },
            )
        })
        .collect();
    let mut outcome = Outcome {
        latencies: histogram(),
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    for result in futures::future::join_all(clients).await {
        let Ok(one) = result else {
            outcome.errors += 1;
            continue;
        };
        let _ = outcome.latencies.add(&one.latencies);
        outcome.ok += one.ok;
        outcome.errors += one.errors;
        if outcome.first_error.is_none() {
            outcome.first_error = one.first_error;
        }
    }
    outcome.elapsed = started.elapsed();
    if let Some(progress) = progress {
        progress.abort();
        print!("\r{:79}\r", "");
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn client(
    c: usize,
    addr: SocketAddr,
    deadline: Instant,
    plan: Plan,
    auth: Option<HeaderValue>,
    host: Option<HeaderValue>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) -> Outcome {
    let mut outcome = Outcome {
        latencies: histogram(),
        ok: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    let mut n = 0u64;
    while Instant::now() < deadline {
        let sender = match conn.as_mut() {
            Some(sender) => sender,
            None => match connect(addr).await {
                Ok(sender) => conn.insert(sender),
                Err(err) => {
                    fail(&mut outcome, &failed, format!("connecting: {err}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let req = plan(c, n);
        n += 1;
        let mut builder = hyper::Request::builder().method(req.method).uri(req.path);
        if let Some(host) = &host {
            builder = builder.header(HOST, host.clone());
        }
        if let Some(auth) = &auth {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        if req.body.is_some() {
            builder = builder.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let Ok(request) = builder.body(Full::new(req.body.unwrap_or_default())) else {
            fail(&mut outcome, &failed, "an invalid request".to_owned());
            continue;
        };
        let start = Instant::now();
        let result = match sender.ready().await {
            Ok(()) => sender.send_request(request).await,
            Err(err) => Err(err),
        };
        let response = match result {
            Ok(response) => response,
            Err(err) => {
                conn = None;
                fail(&mut outcome, &failed, format!("sending: {err}"));
                continue;
            }
        };
        let status = response.status();
        let body = response.into_body().collect().await;
        let took = start.elapsed();
        sent.fetch_add(1, Ordering::Relaxed);
        match body {
            Ok(_) if status.is_success() => {
                outcome.ok += 1;
                outcome
                    .latencies
                    .saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
            }
            Ok(body) => {
                let text = String::from_utf8_lossy(&body.to_bytes())
                    .chars()
                    .take(200)
                    .collect::<String>();
                fail(&mut outcome, &failed, format!("{status}: {text}"));
            }
            Err(err) => {
                conn = None;
                fail(&mut outcome, &failed, format!("reading: {err}"));
            }
        }
    }
    outcome
}

fn fail(outcome: &mut Outcome, failed: &AtomicU64, what: String) {
    outcome.errors += 1;
    failed.fetch_add(1, Ordering::Relaxed);
    outcome.first_error.get_or_insert(what);
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// `\r<label>: 3.5 s, 41234 requests (11781/s), 0 errors`, twice a second.
async fn progress_line(
    label: String,
    started: Instant,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    use std::io::Write as _;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let elapsed = started.elapsed().as_secs_f64();
        let n = sent.load(Ordering::Relaxed);
        let line = format!(
            "{label}: {elapsed:.1} s, {n} requests ({:.0}/s), {} errors",
            n as f64 / elapsed.max(1e-9),
            failed.load(Ordering::Relaxed)
        );
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\r{line:79}");
        let _ = out.flush();
    }
}

/// Ranks 1..=n drawn with probability ∝ 1/rank^s (Zipf). Stateless: the rank for a key is a
/// function of the key (through [`unit`]), so every client draws its own reproducible sequence and
/// every run has the same hot keys.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let n = n.max(1);
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 1..=n {
            total += 1.0 / (rank as f64).powf(s);
            cdf.push(total);
        }
        for p in &mut cdf {
            *p /= total;
        }
        Self { cdf }
    }

    /// The rank (1..=n) of a uniform number in [0, 1).
    pub fn rank(&self, u: f64) -> usize {
        self.cdf
            .partition_point(|&p| p <= u)
            .min(self.cdf.len() - 1)
            + 1
    }

    /// The rank drawn for `key`.
    pub fn pick(&self, key: u64) -> usize {
        self.rank(unit(key))
    }
}

/// A uniform number in [0, 1) from any key (the splitmix64 finaliser: distinct keys scatter).
pub fn unit(key: u64) -> f64 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// One key from a client and its request number (for [`unit`] and [`Zipf::pick`]).
pub fn key(client: usize, n: u64, stream: u64) -> u64 {
    ((client as u64) << 40) ^ n ^ (stream << 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_ranks_stay_in_bounds_and_favour_the_first() {
        let zipf = Zipf::new(100, 1.0);
        let mut counts = [0u32; 101];
        for n in 0..100_000 {
            let rank = zipf.pick(key(3, n, 1));
            assert!((1..=100).contains(&rank), "rank {rank}");
            counts[rank] += 1;
        }
        // P(1) = 1/H(100) ≈ 0.193; P(2) half of it; the tail is rare but reached.
        let first = f64::from(counts[1]) / 100_000.0;
        assert!((0.17..0.22).contains(&first), "P(1) = {first}");
        assert!(
            counts[1] > counts[2] && counts[2] > counts[10],
            "{counts:?}"
        );
        assert!(counts[100] > 0, "the last rank is drawn too");
    }

    #[test]
    fn zipf_edges() {
        let zipf = Zipf::new(10, 1.1);
        assert_eq!(zipf.rank(0.0), 1);
        assert_eq!(zipf.rank(0.999_999_9), 10);
        assert_eq!(zipf.pick(42), zipf.pick(42), "the same key, the same rank");
        assert_eq!(Zipf::new(1, 1.0).pick(7), 1, "one key: always it");
        assert_eq!(Zipf::new(0, 1.0).pick(7), 1, "no key is taken as one");
    }

    #[test]
    fn uniform_numbers_are_in_the_unit_interval() {
        let mut sum = 0.0;
        for n in 0..10_000 {
            let u = unit(key(1, n, 0));
            assert!((0.0..1.0).contains(&u), "{u}");
            sum += u;
        }
        assert!((4_800.0..5_200.0).contains(&sum), "mean {}", sum / 10_000.0);
    }
}

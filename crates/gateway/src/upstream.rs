//! The replicas of each service behind the gateway: active health checks, a circuit breaker per
//! replica, and round-robin over the replicas that are healthy and whose circuit lets calls
//! through.
//!
//! - Active checks: every `health_check.interval_ms` each replica's `/health` is asked (limit
//!   `health_check.timeout_ms`); `unhealthy_threshold` failures in a row take it out of the
//!   rotation, `healthy_threshold` successes in a row put it back. Replicas start healthy, so a
//!   fresh gateway serves at once.
//! - Passive: every forwarded request feeds the replica's breaker ([`kit::breaker`]): no
//!   connection or no answer in time is a failure; any answer (whatever its status: a 503 of a
//!   service whose database is down says nothing about the replica) is a success.
//!   `circuit_breaker.failures` in a row open it for `circuit_breaker.open_ms`, then one request
//!   probes.
//! - When no replica is both healthy and closed, the ones whose circuit allows a call are tried
//!   anyway (a health check can lag behind a replica that is back); when no circuit does, the
//!   request is 503 at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::Uri;
use axum::http::uri::{Authority, Scheme};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use kit::breaker::{Breaker, BreakerPolicy, Circuit};
use kit::metrics::{FastFamily, SharedLabel};
use kit::outage::Outage;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use url::Url;

/// `[services.gateway.health_check]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthCheckSettings {
    /// false: no active checks (replicas are judged by their answers alone).
    pub enabled: bool,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Successes in a row that put an unhealthy replica back.
    pub healthy_threshold: u32,
    /// Failures in a row that take a replica out.
    pub unhealthy_threshold: u32,
    /// What is asked (a 2xx is healthy).
    pub path: String,
}

impl Default for HealthCheckSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: 2000,
            timeout_ms: 1000,
            healthy_threshold: 2,
            unhealthy_threshold: 2,
            path: "/health".into(),
        }
    }
}

/// `[services.gateway.circuit_breaker]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSettings {
    /// Failed forwards in a row (no connection, no answer in time) that open a replica's circuit.
    pub failures: u32,
    /// How long an open circuit refuses before one request probes.
    pub open_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            open_ms: 5000,
        }
    }
}

impl HealthCheckSettings {
    pub fn validate(&self) -> Result<(), kit::config::ConfigError> {
        let invalid = |key: &str, message: &str| kit::config::ConfigError::Invalid {
            key: format!("services.gateway.health_check.{key}"),
            message: message.into(),
        };
        if self.interval_ms < 10 {
            return Err(invalid("interval_ms", "must be at least 10"));
        }
        if self.timeout_ms == 0 {
            return Err(invalid("timeout_ms", "must be at least 1"));
        }
        if self.healthy_threshold == 0 {
            return Err(invalid("healthy_threshold", "must be at least 1"));
        }
        if self.unhealthy_threshold == 0 {
            return Err(invalid("unhealthy_threshold", "must be at least 1"));
        }
        if !self.path.starts_with('/') {
            return Err(invalid("path", "must start with /"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub service: SharedLabel,
    pub upstream: SharedLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    /// The route table entry (its prefix).
    pub route: SharedLabel,
    pub service: SharedLabel,
    pub upstream: SharedLabel,
    /// The upstream's status code, or `error` (no connection), `timeout`.
    pub status: Outcome,
}

/// How a forward ended, as the `status` label shows it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Status(u16),
    /// No connection, or the connection failed.
    Error,
    /// No answer within the upstream timeout.
    Timeout,
}

impl prometheus_client::encoding::EncodeLabelValue for Outcome {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        match self {
            Outcome::Status(code) => write!(encoder, "{code}"),
            Outcome::Error => encoder.write_str("error"),
            Outcome::Timeout => encoder.write_str("timeout"),
        }
    }
}

/// The gateway's metrics about its upstreams.
#[derive(Clone, Default)]
pub struct UpstreamMetrics {
    /// Counted on every forward: its series found with one foldhash lookup.
    pub forwarded: FastFamily<ForwardLabels, Counter>,
    pub circuit: Family<ReplicaLabels, Gauge>,
    pub circuit_opened: Family<ReplicaLabels, Counter>,
    pub healthy: Family<ReplicaLabels, Gauge>,
    /// Requests answered 503 at once because no replica's circuit allowed a call.
    pub rejected: Family<ReplicaLabels, Counter>,
}

impl UpstreamMetrics {
    pub fn register(&self, metrics: &kit::metrics::Metrics) {
        metrics.register(
            "gateway_upstream_requests",
            "Requests forwarded, by route table entry, service, replica and upstream status",
            self.forwarded.family().clone(),
        );
        metrics.register(
            "gateway_circuit_state",
            "Circuit of each replica: 0 closed, 1 open, 2 half-open",
            self.circuit.clone(),
        );
        metrics.register(
            "gateway_circuit_opened",
            "Times each replica's circuit opened",
            self.circuit_opened.clone(),
        );
        metrics.register(
            "gateway_upstream_healthy",
            "Active health check of each replica: 1 healthy, 0 not",
            self.healthy.clone(),
        );
        metrics.register(
            "gateway_upstream_rejected",
            "Requests answered 503 at once: no replica of the service could take them",
            self.rejected.clone(),
        );
    }
}

/// One replica.
pub struct Replica {
    pub url: Url,
    /// The URL's scheme and authority, parsed once, when it has no path of its own (the usual
    /// case): a forwarded request's URI is then built from them and the request's path.
    origin: Option<(Scheme, Authority)>,
    /// A replica that stops answering is logged once, not per request.
    pub outage: Outage,
    breaker: Breaker,
    healthy: AtomicBool,
    /// Consecutive active-check results against the current verdict.
    streak: AtomicU32,
    labels: ReplicaLabels,
}

impl Replica {
    /// The URI of `path_and_query` (`/api/v1/users/1?x=y`) on this replica.
    pub fn uri(&self, path_and_query: &str) -> anyhow::Result<Uri> {
        Ok(match &self.origin {
            Some((scheme, authority)) => Uri::builder()
                .scheme(scheme.clone())
                .authority(authority.clone())
                .path_and_query(path_and_query)
                .build()?,
            None => format!(
                "{}{path_and_query}",
                self.url.as_str().trim_end_matches('/')
            )
            .parse()?,
        })
    }
}

/// `url`'s scheme and authority, when it has no path (other than `/`), query or fragment.
fn origin_of(url: &Url) -> Option<(Scheme, Authority)> {
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return None;
    }
    let uri: Uri = url.as_str().parse().ok()?;
    let parts = uri.into_parts();
    Some((parts.scheme?, parts.authority?))
}

/// The replicas of one service.
pub struct Upstream {
    pub service: String,
    pub replicas: Vec<Replica>,
    next: AtomicUsize,
    metrics: UpstreamMetrics,
}

impl Upstream {
    pub fn new(
        service: &str,
        urls: Vec<Url>,
        breaker: &BreakerSettings,
        metrics: &UpstreamMetrics,
    ) -> Self {
        let policy = BreakerPolicy {
            failures: breaker.failures.max(1),
            open_for: Duration::from_millis(breaker.open_ms.max(1)),
        };
        let replicas = urls
            .into_iter()
            .map(|url| {
                let labels = ReplicaLabels {
                    service: service.into(),
                    upstream: url.as_str().trim_end_matches('/').into(),
                };
                metrics.healthy.get_or_create(&labels).set(1);
                metrics.circuit.get_or_create(&labels).set(0);
                Replica {
                    outage: Outage::new(format!("upstream {service} at {url}")),
                    origin: origin_of(&url),
                    url,
                    breaker: Breaker::new(policy),
                    healthy: AtomicBool::new(true),
                    streak: AtomicU32::new(0),
                    labels,
                }
            })
            .collect();
        Self {
            service: service.to_owned(),
            replicas,
            next: AtomicUsize::new(0),
            metrics: metrics.clone(),
        }
    }

    /// Round-robin: every replica by index, starting with the next in turn.
    pub fn rotation(&self) -> impl Iterator<Item = usize> + use<> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.replicas.len();
        (0..n).map(move |i| (start + i) % n)
    }

    /// The next replica to try, of `order` (a [`Upstream::rotation`]) less those `tried`:
    /// a healthy one whose circuit lets the call through; failing that, any whose circuit does.
    /// The one returned has been let through by its breaker, so it must be
    /// [`Upstream::record`]ed.
    pub fn pick(&self, order: &[usize], tried: &[usize]) -> Option<usize> {
        for healthy_only in [true, false] {
            for &i in order {
                let replica = &self.replicas[i];
                if tried.contains(&i) || (healthy_only && !replica.healthy.load(Ordering::Relaxed))
                {
                    continue;
                }
                if replica.breaker.allow() {
                    self.publish_circuit(replica);
                    return Some(i);
                }
            }
        }
        None
    }

    /// The outcome of a forward to replica `i` that [`Upstream::pick`] chose.
    pub fn record(&self, i: usize, route: &Arc<str>, status: Outcome, reached: bool) {
        let replica = &self.replicas[i];
        let before = replica.breaker.state();
        let after = replica.breaker.record(reached);
        if after == Circuit::Open && before != Circuit::Open {
            self.metrics
                .circuit_opened
                .get_or_create(&replica.labels)
                .inc();
            tracing::warn!(
                service = %self.service,
                upstream = %replica.url,
                failures = replica.breaker.policy().failures,
                "circuit opened: the replica is skipped until a probe succeeds"
            );
        } else if after == Circuit::Closed && before != Circuit::Closed {
            tracing::info!(service = %self.service, upstream = %replica.url, "circuit closed");
        }
        if after != before {
            self.publish_circuit(replica);
        }
        let labels = ForwardLabels {
            route: SharedLabel(route.clone()),
            service: replica.labels.service.clone(),
            upstream: replica.labels.upstream.clone(),
            status,
        };
        self.metrics.forwarded.with(&labels, Counter::inc);
    }

    /// A request answered 503 because no replica could take it.
    pub fn rejected(&self) {
        if let Some(replica) = self.replicas.first() {
            self.metrics.rejected.get_or_create(&replica.labels).inc();
        }
        for replica in &self.replicas {
            self.publish_circuit(replica);
        }
    }

    fn publish_circuit(&self, replica: &Replica) {
        self.metrics
            .circuit
            .get_or_create(&replica.labels)
            .set(replica.breaker.state().as_gauge());
    }

    /// One active check of replica `i`.
    fn checked(&self, i: usize, up: bool, settings: &HealthCheckSettings) {
        let replica = &self.replicas[i];
        let healthy = replica.healthy.load(Ordering::Relaxed);
        if up == healthy {
            replica.streak.store(0, Ordering::Relaxed);
        } else {
            let streak = replica.streak.fetch_add(1, Ordering::Relaxed) + 1;
            let threshold = if up {
                settings.healthy_threshold
            } else {
                settings.unhealthy_threshold
            };
            if streak >= threshold {
                replica.healthy.store(up, Ordering::Relaxed);
                replica.streak.store(0, Ordering::Relaxed);
                if up {
                    tracing::info!(service = %self.service, upstream = %replica.url, "replica healthy again: back in the rotation");
                } else {
                    tracing::warn!(service = %self.service, upstream = %replica.url, checks = streak, "replica unhealthy: out of the rotation");
                }
                self.metrics
                    .healthy
                    .get_or_create(&replica.labels)
                    .set(i64::from(up));
            }
        }
        // A replica that answers its health check again has its circuit's pause cut short: the
        // next request probes it (half-open) rather than every request failing fast until the
        // pause ends.
        if up && replica.breaker.state() == Circuit::Open {
            replica.breaker.expire_pause();
        }
        // The half-open state arrives with time, not with a call: show it.
        self.publish_circuit(replica);
    }
}

/// GET `base` + `path` within `timeout`: a 2xx is up.
pub async fn probe(
    client: &Client<HttpConnector, Body>,
    base: &Url,
    path: &str,
    timeout: Duration,
) -> bool {
    let Ok(uri) = format!("{}{path}", base.as_str().trim_end_matches('/')).parse::<Uri>() else {
        return false;
    };
    let Ok(request) = Request::get(uri).body(Body::empty()) else {
        return false;
    };
    matches!(
        tokio::time::timeout(timeout, client.request(request)).await,
        Ok(Ok(response)) if response.status().is_success()
    )
}

/// Checks every replica of every upstream each interval until `stop`.
pub async fn run_health_checks(
    upstreams: Arc<Vec<Arc<Upstream>>>,
    client: Client<HttpConnector, Body>,
    settings: HealthCheckSettings,
    stop: tokio_util::sync::CancellationToken,
) {
    let interval = Duration::from_millis(settings.interval_ms);
    let timeout = Duration::from_millis(settings.timeout_ms);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let checks = upstreams.iter().flat_map(|upstream| {
            let client = &client;
            let settings = &settings;
            (0..upstream.replicas.len()).map(move |i| async move {
                let up = probe(client, &upstream.replicas[i].url, &settings.path, timeout).await;
                upstream.checked(i, up, settings);
            })
        });
        tokio::select! {
            _ = futures::future::join_all(checks) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(url: &str) -> Upstream {
        let url = Url::parse(url).expect("url");
        Upstream::new(
            "users",
            vec![url],
            &BreakerSettings::default(),
            &UpstreamMetrics::default(),
        )
    }

    #[test]
    fn a_forwarded_uri_is_the_replica_origin_and_the_request_path() {
        let users = upstream("http://127.0.0.1:8081");
        let uri = users.replicas[0]
            .uri("/api/v1/users/1?page=2")
            .expect("uri");
        assert_eq!(
            uri.to_string(),
            "http://127.0.0.1:8081/api/v1/users/1?page=2"
        );
        // A replica URL with a path of its own keeps it in front of the request's.
        let prefixed = upstream("http://10.0.0.5:9000/users/");
        let uri = prefixed.replicas[0].uri("/api/v1/users/1").expect("uri");
        assert_eq!(uri.to_string(), "http://10.0.0.5:9000/users/api/v1/users/1");
        // A path no URI can hold is an error, not a panic.
        assert!(users.replicas[0].uri("/a b").is_err());
    }
}

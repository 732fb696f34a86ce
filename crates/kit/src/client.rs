//! Calling another service: the one HTTP client every service uses for its neighbours (orders →
//! users, catalog), with the defences such calls need.
//!
//! - A time limit on every call (`connect` and whole-request), so a hung neighbour costs a
//!   bounded wait, never a stuck request.
//! - Replicas taken round-robin; a call that may be repeated (a read, or a write the neighbour
//!   makes idempotent, like a reservation by order id) is tried once more on the next replica
//!   after a failure that says nothing happened or may be repeated (no answer, 502/503/504).
//! - A circuit breaker per neighbour ([`crate::breaker`]): after [`BREAKER_FAILURES`] failures in a row it opens and
//!   calls fail at once for [`BREAKER_OPEN`]; then one call is let through to probe, and a success
//!   closes it. So a dead neighbour costs nothing per request and is found again by itself.
//! - Outages are logged by state change ([`crate::outage`]).
//! - The `traceparent` of the request being served is sent on, as a child span
//!   ([`crate::trace`]), so one trace id follows a request across services.
//!
//! Failures come back as [`CallError`]: `Unavailable` (the neighbour is down or slow: answer 503
//! `dependency_unavailable`), or `Refused` with the neighbour's status and problem body (a 4xx
//! the caller turns into its own error).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::http::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use url::Url;

use crate::breaker::{Breaker, BreakerPolicy};
use crate::error::Problem;
use crate::outage::Outage;

/// Failures in a row that open the breaker.
pub const BREAKER_FAILURES: u32 = 5;
/// How long an open breaker refuses calls before it lets one through to probe.
pub const BREAKER_OPEN: Duration = Duration::from_secs(2);

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The neighbour did not answer usefully: down, slow, 5xx, or its breaker is open.
    #[error("the {service} service is unavailable: {source:#}")]
    Unavailable {
        service: &'static str,
        source: anyhow::Error,
    },
    /// The neighbour answered 4xx: the request was refused, with its problem body when it sent one.
    #[error("the {service} service refused the call with {status}")]
    Refused {
        service: &'static str,
        status: StatusCode,
        problem: Option<Problem>,
    },
}

impl From<CallError> for crate::ApiError {
    fn from(err: CallError) -> Self {
        match err {
            CallError::Unavailable { service, .. } => {
                crate::ApiError::unavailable(&format!("{service} service"), err.into())
            }
            // A refusal the caller did not handle is its own bug, not the client's.
            CallError::Refused { .. } => crate::ApiError::internal(err.into()),
        }
    }
}

/// A neighbour service.
pub struct ServiceClient {
    service: &'static str,
    urls: Vec<Url>,
    next: AtomicUsize,
    http: reqwest::Client,
    breaker: Breaker,
    outage: Outage,
    headers: reqwest::header::HeaderMap,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("service", &self.service)
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

impl ServiceClient {
    /// A client of `service` at `urls` (its replicas), each call limited to `timeout`.
    pub fn new(service: &'static str, urls: Vec<Url>, timeout: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !urls.is_empty(),
            "no address configured for the {service} service"
        );
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(2)))
            .timeout(timeout)
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            service,
            urls,
            next: AtomicUsize::new(0),
            http,
            breaker: Breaker::new(BreakerPolicy {
                failures: BREAKER_FAILURES,
                open_for: BREAKER_OPEN,
            }),
            outage: Outage::new(format!("{service} service (called)")),
            headers: reqwest::header::HeaderMap::new(),
        })
    }

    /// Sends `name: value` with every call (a service credential, say).
    pub fn with_header(
        mut self,
        name: &reqwest::header::HeaderName,
        value: &str,
    ) -> anyhow::Result<Self> {
        self.headers.insert(
            name.clone(),
            reqwest::header::HeaderValue::from_str(value).context("header value")?,
        );
        Ok(self)
    }

    /// `GET path` as JSON; `None` when the neighbour answers 404.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>, CallError> {
        match self
            .call(reqwest::Method::GET, path, None::<&()>, true)
            .await
        {
            Ok(value) => Ok(Some(value)),
            Err(CallError::Refused {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// `POST path` with a JSON body; `repeatable` when the neighbour makes it idempotent, so it
    /// may be tried again after a failure.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        repeatable: bool,
    ) -> Result<T, CallError> {
        self.call(reqwest::Method::POST, path, Some(body), repeatable)
            .await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        repeatable: bool,
    ) -> Result<T, CallError> {
        let attempts = if repeatable { 2 } else { 1 };
        let mut last = None;
        for _ in 0..attempts {
            if !self.breaker.allow() {
                last = Some(anyhow::anyhow!(
                    "circuit open after {BREAKER_FAILURES} failures in a row"
                ));
                break;
            }
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let base = &self.urls[start % self.urls.len()];
            match self.once(&method, base, path, body).await {
                Ok(Answer::Done(value)) => {
                    self.breaker.record(true);
                    self.outage.succeeded();
                    return serde_json::from_slice(&value)
                        .with_context(|| format!("decoding the answer of {method} {path}"))
                        .map_err(|source| CallError::Unavailable {
                            service: self.service,
                            source,
                        });
                }
                Ok(Answer::Refused(status, problem)) => {
                    // The neighbour is up and said no.
                    self.breaker.record(true);
                    self.outage.succeeded();
                    return Err(CallError::Refused {
                        service: self.service,
                        status,
                        problem,
                    });
                }
                Err(err) => {
                    self.breaker.record(false);
                    self.outage
                        .failed(&format_args!("{method} {path}: {err:#}"));
                    last = Some(err);
                }
            }
        }
        Err(CallError::Unavailable {
            service: self.service,
            source: last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")),
        })
    }

    async fn once<B: Serialize>(
        &self,
        method: &reqwest::Method,
        base: &Url,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", base.as_str().trim_end_matches('/'));
        let mut request = self
            .http
            .request(method.clone(), &url)
            .headers(self.headers.clone());
        // The trace of the request being served goes on, with this call as a new span.
        if let Some(ctx) = crate::trace::TraceContext::current() {
            request = request.header(&crate::trace::TRACEPARENT, ctx.child().header_value());
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.context("no answer")?;
        let status = response.status();
        let bytes = response.bytes().await.context("reading the answer")?;
        if status.is_success() {
            return Ok(Answer::Done(bytes));
        }
        if status.is_client_error() {
            let problem = serde_json::from_slice(&bytes).ok();
            return Ok(Answer::Refused(status, problem));
        }
        anyhow::bail!("answered {status}")
    }
}

enum Answer {
    Done(bytes::Bytes),
    Refused(StatusCode, Option<Problem>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::Circuit;
    use std::time::Instant;

    #[tokio::test]
    async fn a_dead_neighbour_is_unavailable_and_then_refused_at_once() {
        let dead = Url::parse("http://127.0.0.1:1").expect("url");
        let client =
            ServiceClient::new("users", vec![dead], Duration::from_millis(500)).expect("client");
        for _ in 0..3 {
            let err = client
                .get_json::<serde_json::Value>("/api/v1/users/1")
                .await
                .expect_err("down");
            assert!(matches!(err, CallError::Unavailable { .. }), "{err}");
        }
        assert!(
            client.breaker.state() == Circuit::Open,
            "3 reads tried twice each opened it"
        );
        let started = Instant::now();
        let err = client
            .get_json::<serde_json::Value>("/api/v1/users/1")
            .await
            .expect_err("open");
        assert!(started.elapsed() < Duration::from_millis(50));
        let api = crate::ApiError::from(err);
        assert_eq!(api.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(api.problem().code, "dependency_unavailable");
    }
}

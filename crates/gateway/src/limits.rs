//! Rate limits per client address and per signed-in user, per route class (`auth`: register and
//! login; `read`: GET, HEAD, OPTIONS; `write`: the rest).
//!
//! - Embedded (no Redis): local limits, a keyed GCRA per class and scope ([`governor`]), so a
//!   client gets `limit` requests per window with the budget refilling smoothly.
//! - With Redis (`redis.url`): one fixed window per key shared by every gateway replica (`INCRBY`
//!   and `PEXPIRE` in one script, keys `<redis.prefix>gateway:rl:<class>:<scope>:<who>`), so N
//!   replicas do not give a client N budgets. A replica draws a key's budget in leases of a
//!   hundredth of the limit (at least 1) and spends each lease locally until it is used up or
//!   its window ends, so a busy client costs one Redis call per lease, not one per request; a
//!   refusal is remembered until the window ends. The shared count never admits more than the
//!   limit; a client spread over N replicas can be refused up to N-1 leases early (what the
//!   other replicas hold unused).
//! - Redis down or slower than `redis.timeout_ms`: the local limits decide, never a 5xx; the
//!   outage is logged when it starts and ends ([`kit::outage`]), and a background task tries
//!   Redis again every `redis.retry_after_ms` while requests skip it.
//!
//! A refused request is 429 `rate_limited` with `Retry-After`, and every limited response carries
//! `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers, structured fields:
//! `"read-ip";q=1000;w=1` and `"read-ip";r=0;t=1`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use governor::clock::{Clock as _, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use kit::metrics::FastFamily;
use kit::outage::Outage;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// `[services.gateway.rate_limit]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// false: no limits at all.
    pub enabled: bool,
    /// Register and login (`/api/v1/auth/...` after rewriting): guessing passwords is slow.
    pub auth: ClassLimits,
    /// GET, HEAD and OPTIONS.
    pub read: ClassLimits,
    /// Every other method.
    pub write: ClassLimits,
}

/// The budget of one route class: requests per window, per client address and per user (0 =
/// no limit of that scope).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassLimits {
    pub per_ip: u32,
    pub per_user: u32,
    pub window_secs: u64,
}

impl Default for RateLimitSettings {
    // Generous: a client of the seeds' walkthroughs, a test suite or `agora bench` from one
    // address never meets them; a flood from one address or one account does.
    fn default() -> Self {
        Self {
            enabled: true,
            auth: ClassLimits {
                per_ip: 300,
                per_user: 300,
                window_secs: 60,
            },
            read: ClassLimits {
                per_ip: 20_000,
                per_user: 20_000,
                window_secs: 1,
            },
            write: ClassLimits {
                per_ip: 10_000,
                per_user: 10_000,
                window_secs: 1,
            },
        }
    }
}

impl RateLimitSettings {
    pub fn validate(&self) -> Result<(), kit::config::ConfigError> {
        for (name, class) in [
            ("auth", &self.auth),
            ("read", &self.read),
            ("write", &self.write),
        ] {
            if class.window_secs == 0 || class.window_secs > 86_400 {
                return Err(kit::config::ConfigError::Invalid {
                    key: format!("services.gateway.rate_limit.{name}.window_secs"),
                    message: "must be 1 to 86400".into(),
                });
            }
        }
        Ok(())
    }
}

/// Which budget a request draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Auth,
    Read,
    Write,
}

impl Class {
    /// By the canonical path (after the route table's rewrite) and the method.
    pub fn of(method: &Method, path: &str) -> Self {
        if path == "/api/v1/auth" || path.starts_with("/api/v1/auth/") {
            Class::Auth
        } else if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            Class::Read
        } else {
            Class::Write
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Class::Auth => "auth",
            Class::Read => "read",
            Class::Write => "write",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Whose budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Ip,
    User,
}

/// What the limits said about one request.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// The policy closest to its limit (the one refused, if any).
    policy: &'static str,
    limit: u32,
    window_secs: u64,
    remaining: u32,
    /// Seconds until the budget is back (refused) or the window resets (allowed).
    reset_secs: u64,
    pub allowed: bool,
    /// "address" or "account", for the problem's detail.
    pub scope: &'static str,
}

impl Verdict {
    pub fn retry_after_secs(&self) -> u64 {
        self.reset_secs.max(1)
    }

    pub fn detail(&self) -> String {
        format!(
            "Too many requests from this {}: {} per {} s; retry in {} s",
            self.scope,
            self.limit,
            self.window_secs,
            self.retry_after_secs()
        )
    }

    /// Adds `RateLimit-Policy` and `RateLimit` (and `Retry-After` when refused).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        // On every request through the gateway: written with `itoa`, not `format!`.
        let policy = structured_item(
            self.policy,
            ("q", self.limit.into()),
            ("w", self.window_secs),
        );
        let state = structured_item(
            self.policy,
            ("r", self.remaining.into()),
            ("t", self.reset_secs),
        );
        if let (Ok(policy), Ok(state)) = (
            HeaderValue::from_maybe_shared(policy),
            HeaderValue::from_maybe_shared(state),
        ) {
            headers.insert(RATELIMIT_POLICY.clone(), policy);
            headers.insert(RATELIMIT.clone(), state);
        }
        if !self.allowed {
            headers.insert(
                axum::http::header::RETRY_AFTER,
                HeaderValue::from(self.retry_after_secs()),
            );
        }
    }
}

/// `"<name>";<a>=<n>;<b>=<m>`: one item of the RateLimit headers (RFC 9651 structured fields).
fn structured_item(name: &str, (a, n): (&str, u64), (b, m): (&str, u64)) -> bytes::Bytes {
    let mut out = Vec::with_capacity(name.len() + 32);
    let mut digits = itoa::Buffer::new();
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\";");
    out.extend_from_slice(a.as_bytes());
    out.push(b'=');
    out.extend_from_slice(digits.format(n).as_bytes());
    out.push(b';');
    out.extend_from_slice(b.as_bytes());
    out.push(b'=');
    out.extend_from_slice(digits.format(m).as_bytes());
    out.into()
}

type Local<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// The local limiters of one class.
struct LocalClass {
    limits: ClassLimits,
    ip: Option<Local<IpAddr>>,
    user: Option<Local<i64>>,
}

fn quota(limit: u32, window: Duration) -> Option<Quota> {
    let burst = NonZeroU32::new(limit)?;
    // `limit` requests per window, refilled one by one: one every window / limit.
    let period = (window / limit).max(Duration::from_nanos(1));
    Some(Quota::with_period(period)?.allow_burst(burst))
}

impl LocalClass {
    fn new(limits: ClassLimits) -> Self {
        let window = Duration::from_secs(limits.window_secs);
        Self {
            limits,
            ip: quota(limits.per_ip, window)
                .map(|q| RateLimiter::keyed(q).with_middleware::<StateInformationMiddleware>()),
            user: quota(limits.per_user, window)
                .map(|q| RateLimiter::keyed(q).with_middleware::<StateInformationMiddleware>()),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitedLabels {
    class: String,
    scope: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    backend: &'static str,
}

/// The gateway's rate limits.
pub struct Limits {
    enabled: bool,
    local: [LocalClass; 3],
    redis: Option<Arc<SharedLimits>>,
    limited: Family<LimitedLabels, Counter>,
    /// Counted on every limited request: its series found with one foldhash lookup.
    decisions: FastFamily<DecisionLabels, Counter>,
}

impl Limits {
    pub fn new(settings: &RateLimitSettings, kit: &kit::Settings) -> anyhow::Result<Self> {
        let redis = match &kit.redis.url {
            Some(url) if settings.enabled => Some(Arc::new(SharedLimits::new(url, kit)?)),
            _ => None,
        };
        Ok(Self {
            enabled: settings.enabled,
            local: [
                LocalClass::new(settings.auth),
                LocalClass::new(settings.read),
                LocalClass::new(settings.write),
            ],
            redis,
            limited: Family::default(),
            decisions: FastFamily::default(),
        })
    }

    pub fn register_metrics(&self, metrics: &kit::metrics::Metrics) {
        metrics.register(
            "gateway_rate_limited",
            "Requests refused with 429, by route class and scope (ip or user)",
            self.limited.clone(),
        );
        metrics.register(
            "gateway_rate_limit_decisions",
            "Rate-limit decisions by where they were made (redis: a round trip to the shared \
             window; lease: budget this replica drew from it earlier; local: this process alone)",
            self.decisions.family().clone(),
        );
    }

    /// Forgets the local state of clients idle for a window (bounded memory under many
    /// addresses); run periodically.
    pub fn shrink(&self) {
        if let Some(redis) = &self.redis {
            redis.forget_expired_leases();
        }
        for class in &self.local {
            if let Some(ip) = &class.ip {
                ip.retain_recent();
            }
            if let Some(user) = &class.user {
                user.retain_recent();
            }
        }
    }

    /// Draws one request of `class` from `ip`'s and `user`'s budgets; `None` when no limit
    /// applies.
    pub async fn check(
        &self,
        class: Class,
        ip: Option<IpAddr>,
        user: Option<i64>,
    ) -> Option<Verdict> {
        if !self.enabled {
            return None;
        }
        let local = &self.local[class.index()];
        let ip = ip.filter(|_| local.ip.is_some());
        let user = user.filter(|_| local.user.is_some());
        if ip.is_none() && user.is_none() {
            return None;
        }
        if let Some(redis) = &self.redis
            && let Some((verdict, backend)) = redis.check(class, local.limits, ip, user).await
        {
            self.count(&verdict, class, backend);
            return Some(verdict);
        }
        let verdict = self.check_local(class, ip, user);
        if let Some(verdict) = &verdict {
            self.count(verdict, class, "local");
        }
        verdict
    }

    fn count(&self, verdict: &Verdict, class: Class, backend: &'static str) {
        self.decisions
            .with(&DecisionLabels { backend }, Counter::inc);
        if !verdict.allowed {
            let scope = if verdict.scope == "account" {
                "user"
            } else {
                "ip"
            };
            self.limited
                .get_or_create(&LimitedLabels {
                    class: class.as_str().to_owned(),
                    scope: scope.to_owned(),
                })
                .inc();
        }
    }

    fn check_local(&self, class: Class, ip: Option<IpAddr>, user: Option<i64>) -> Option<Verdict> {
        let local = &self.local[class.index()];
        let mut verdicts = Vec::with_capacity(2);
        if let (Some(limiter), Some(ip)) = (&local.ip, ip) {
            verdicts.push(local_verdict(limiter, &ip, class, Scope::Ip, local.limits));
        }
        if let (Some(limiter), Some(user)) = (&local.user, user) {
            verdicts.push(local_verdict(
                limiter,
                &user,
                class,
                Scope::User,
                local.limits,
            ));
        }
        tightest(verdicts)
    }
}

fn limit_of(limits: ClassLimits, scope: Scope) -> u32 {
    match scope {
        Scope::Ip => limits.per_ip,
        Scope::User => limits.per_user,
    }
}

/// `<class>-<scope>`, as the RateLimit headers name a policy (static: no allocation per request).
fn policy_name(class: Class, scope: Scope) -> &'static str {
    match (class, scope) {
        (Class::Auth, Scope::Ip) => "auth-ip",
        (Class::Auth, Scope::User) => "auth-user",
        (Class::Read, Scope::Ip) => "read-ip",
        (Class::Read, Scope::User) => "read-user",
        (Class::Write, Scope::Ip) => "write-ip",
        (Class::Write, Scope::User) => "write-user",
    }
}

fn scope_word(scope: Scope) -> &'static str {
    match scope {
        Scope::Ip => "address",
        Scope::User => "account",
    }
}

fn local_verdict<K: Clone + std::hash::Hash + Eq>(
    limiter: &Local<K>,
    key: &K,
    class: Class,
    scope: Scope,
    limits: ClassLimits,
) -> Verdict {
    let limit = limit_of(limits, scope);
    let window = Duration::from_secs(limits.window_secs);
    let per_request = (window / limit.max(1)).max(Duration::from_nanos(1));
    let (allowed, remaining, reset) = match limiter.check_key(key) {
        Ok(snapshot) => {
            let remaining = snapshot.remaining_burst_capacity();
            // Until the budget is full again.
            (
                true,
                remaining,
                per_request * (limit - remaining.min(limit)),
            )
        }
        Err(not_until) => (false, 0, not_until.wait_time_from(limiter.clock().now())),
    };
    Verdict {
        policy: policy_name(class, scope),
        limit,
        window_secs: limits.window_secs,
        remaining,
        reset_secs: reset.as_secs_f64().ceil() as u64,
        allowed,
        scope: scope_word(scope),
    }
}

/// A refusal wins; otherwise the policy with the least left.
fn tightest(verdicts: Vec<Verdict>) -> Option<Verdict> {
    verdicts
        .into_iter()
        .min_by_key(|v| (v.allowed, v.remaining))
}

/// Fixed windows in Redis: adds each key's lease (`ARGV[2i-1]`) to its count and returns the
/// count and how long its window has left (`ARGV[2i]` ms for a new window), in one round trip.
const WINDOW_SCRIPT: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local want = tonumber(ARGV[2 * i - 1])
  local n = redis.call('INCRBY', key, want)
  local ttl = redis.call('PTTL', key)
  if n == want or ttl < 0 then
    redis.call('PEXPIRE', key, ARGV[2 * i])
    ttl = tonumber(ARGV[2 * i])
  end
  out[#out + 1] = n
  out[#out + 1] = ttl
end
return out
";

/// A lease is this fraction of the limit (at least one request).
const LEASE_DIVISOR: u32 = 100;

fn lease_size(limit: u32) -> u32 {
    (limit / LEASE_DIVISOR).max(1)
}

/// Whose budget, in one class: the key of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    Ip(IpAddr),
    User(i64),
}

impl Who {
    fn scope(self) -> Scope {
        match self {
            Who::Ip(_) => Scope::Ip,
            Who::User(_) => Scope::User,
        }
    }
}

/// Budget this replica drew from a shared window and has not spent yet.
#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Requests it may still admit without asking Redis.
    left: u32,
    /// The shared count when it was drawn (what every replica had claimed).
    count: u64,
    /// When the shared window ends.
    expires: Instant,
    /// The shared budget was spent: refuse until the window ends.
    refused: bool,
}

impl Lease {
    /// Spends one request of the lease, if it can decide.
    fn spend(&mut self, now: Instant) -> Option<bool> {
        if now >= self.expires {
            return None;
        }
        if self.refused {
            return Some(false);
        }
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(true)
    }

    fn verdict(&self, class: Class, scope: Scope, limits: ClassLimits, now: Instant) -> Verdict {
        let limit = limit_of(limits, scope);
        let unclaimed = u64::from(limit).saturating_sub(self.count);
        let remaining = if self.refused {
            0
        } else {
            u32::try_from(unclaimed + u64::from(self.left)).unwrap_or(u32::MAX)
        };
        Verdict {
            policy: policy_name(class, scope),
            limit,
            window_secs: limits.window_secs,
            remaining,
            reset_secs: self
                .expires
                .saturating_duration_since(now)
                .as_secs_f64()
                .ceil() as u64,
            allowed: !self.refused,
            scope: scope_word(scope),
        }
    }
}

/// Limits shared by the gateway replicas through Redis.
struct SharedLimits {
    client: redis::Client,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    retry_after: Duration,
    live: RwLock<Option<MultiplexedConnection>>,
    leases: Mutex<HashMap<(Class, Who), Lease>>,
    first: tokio::sync::OnceCell<()>,
    recovering: AtomicBool,
    outage: Outage,
}

impl SharedLimits {
    fn new(url: &str, settings: &kit::Settings) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        Ok(Self {
            client: redis::Client::open(url).context("parsing redis.url")?,
            script: redis::Script::new(WINDOW_SCRIPT),
            prefix: format!("{}gateway:rl:", settings.redis.prefix),
            timeout: Duration::from_millis(settings.redis.timeout_ms.max(1)),
            retry_after: Duration::from_millis(settings.redis.retry_after_ms.max(1)),
            live: RwLock::new(None),
            leases: Mutex::new(HashMap::new()),
            first: tokio::sync::OnceCell::new(),
            recovering: AtomicBool::new(false),
            outage: Outage::new("rate limits (redis; local limits meanwhile)"),
        })
    }

    fn live(&self) -> Option<MultiplexedConnection> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn connect(&self) -> anyhow::Result<MultiplexedConnection> {
        kit::cache::connect_redis(&self.client, self.timeout).await
    }

    /// Out of service after `err`: requests use the local limits while one task reconnects.
    fn went_down(self: &Arc<Self>, err: &dyn std::fmt::Display) {
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.outage.failed(err);
        if self.recovering.swap(true, Ordering::SeqCst) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(this.retry_after).await;
                match this.connect().await {
                    Ok(conn) => {
                        *this.live.write().unwrap_or_else(|p| p.into_inner()) = Some(conn);
                        this.recovering.store(false, Ordering::SeqCst);
                        this.outage.succeeded();
                        return;
                    }
                    Err(err) => {
                        this.outage.failed(&format_args!("{err:#}"));
                    }
                }
            }
        });
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<(Class, Who), Lease>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the leases of windows that have ended.
    fn forget_expired_leases(&self) {
        let now = Instant::now();
        self.leases().retain(|_, lease| lease.expires > now);
    }

    /// Draws one request from each budget: from this replica's leases where they can decide,
    /// from Redis (one round trip for every budget needing a new lease) otherwise; with where it
    /// was decided (`lease` or `redis`). `None`: Redis is unreachable and no lease decides (the
    /// local limits decide).
    async fn check(
        self: &Arc<Self>,
        class: Class,
        limits: ClassLimits,
        ip: Option<IpAddr>,
        user: Option<i64>,
    ) -> Option<(Verdict, &'static str)> {
        let whos = [ip.map(Who::Ip), user.map(Who::User)];
        let mut verdicts = Vec::with_capacity(2);
        let mut wanted = Vec::with_capacity(2);
        let now = Instant::now();
        {
            let mut leases = self.leases();
            for who in whos.into_iter().flatten() {
                let decided = leases.get_mut(&(class, who)).and_then(|lease| {
                    lease
                        .spend(now)
                        .map(|_| lease.verdict(class, who.scope(), limits, now))
                });
                match decided {
                    Some(verdict) => verdicts.push(verdict),
                    None => wanted.push(who),
                }
            }
        }
        if wanted.is_empty() {
            return tightest(verdicts).map(|v| (v, "lease"));
        }
        let drawn = self.draw(class, limits, &wanted).await?;
        let now = Instant::now();
        let mut leases = self.leases();
        for (who, (count, ttl_ms)) in wanted.into_iter().zip(drawn) {
            let limit = u64::from(limit_of(limits, who.scope()));
            let want = u64::from(lease_size(limit_of(limits, who.scope())));
            // What this lease could take before the count passed the limit.
            let granted = limit.saturating_sub(count.saturating_sub(want)).min(want);
            let expires = now + Duration::from_millis(ttl_ms);
            let lease = leases.entry((class, who)).or_insert(Lease {
                left: 0,
                count,
                expires,
                refused: false,
            });
            if lease.expires <= now || lease.refused {
                // A lease of an ended window, or a refusal the new count contradicts.
                lease.left = 0;
            }
            lease.expires = expires;
            lease.count = lease.count.max(count);
            // One of the granted requests is this one.
            lease.left = lease
                .left
                .saturating_add(u32::try_from(granted.saturating_sub(1)).unwrap_or(u32::MAX));
            lease.refused = granted == 0;
            verdicts.push(lease.verdict(class, who.scope(), limits, now));
        }
        tightest(verdicts).map(|v| (v, "redis"))
    }

    /// Claims a lease of each of `wanted`'s budgets from its shared window: the window's count
    /// after the claim and the ms it has left, per budget. `None` when Redis is out of service.
    async fn draw(
        self: &Arc<Self>,
        class: Class,
        limits: ClassLimits,
        wanted: &[Who],
    ) -> Option<Vec<(u64, u64)>> {
        if self.live().is_none() && !self.recovering.load(Ordering::SeqCst) {
            // The first request waits for the first connection (one attempt, shared).
            self.first
                .get_or_init(|| async {
                    match self.connect().await {
                        Ok(conn) => {
                            *self.live.write().unwrap_or_else(|p| p.into_inner()) = Some(conn);
                        }
                        Err(err) => self.went_down(&format_args!("{err:#}")),
                    }
                })
                .await;
        }
        let mut conn = self.live()?;
        let window_ms = limits.window_secs * 1000;
        let mut invocation = self.script.prepare_invoke();
        for who in wanted {
            let key = match who {
                Who::Ip(ip) => format!("{}{}:ip:{ip}", self.prefix, class.as_str()),
                Who::User(user) => format!("{}{}:user:{user}", self.prefix, class.as_str()),
            };
            invocation
                .key(key)
                .arg(lease_size(limit_of(limits, who.scope())))
                .arg(window_ms);
        }
        let result =
            tokio::time::timeout(self.timeout, invocation.invoke_async::<Vec<i64>>(&mut conn))
                .await;
        let counts = match result {
            Ok(Ok(counts)) if counts.len() == wanted.len() * 2 => counts,
            Ok(Ok(counts)) => {
                self.went_down(&format_args!("unexpected answer {counts:?}"));
                return None;
            }
            Ok(Err(err)) => {
                self.went_down(&err);
                return None;
            }
            Err(_) => {
                self.went_down(&format_args!("no answer within {:?}", self.timeout));
                return None;
            }
        };
        self.outage.succeeded();
        Some(
            counts
                .chunks(2)
                .map(|pair| {
                    (
                        u64::try_from(pair[0]).unwrap_or(u64::MAX),
                        u64::try_from(pair[1]).unwrap_or(window_ms).min(window_ms),
                    )
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_ip: u32) -> RateLimitSettings {
        let class = ClassLimits {
            per_ip,
            per_user: per_ip,
            window_secs: 60,
        };
        RateLimitSettings {
            enabled: true,
            auth: class,
            read: class,
            write: class,
        }
    }

    #[test]
    fn a_refusal_writes_both_ratelimit_headers_and_retry_after() {
        let verdict = Verdict {
            policy: "write-user",
            limit: 100,
            window_secs: 60,
            remaining: 0,
            reset_secs: 17,
            allowed: false,
            scope: "account",
        };
        let mut headers = HeaderMap::new();
        verdict.write_headers(&mut headers);
        assert_eq!(headers["ratelimit-policy"], "\"write-user\";q=100;w=60");
        assert_eq!(headers["ratelimit"], "\"write-user\";r=0;t=17");
        assert_eq!(headers["retry-after"], "17");
    }

    #[tokio::test]
    async fn local_limits_refuse_the_request_past_the_budget_with_a_retry_time() {
        let limits = Limits::new(&settings(3), &kit::Settings::defaults()).expect("limits");
        let ip = Some("192.0.2.1".parse().expect("ip"));
        for i in 0..3 {
            let verdict = limits.check(Class::Read, ip, None).await.expect("limited");
            assert!(verdict.allowed, "request {i}");
            assert_eq!(verdict.remaining, 2 - i);
        }
        let refused = limits.check(Class::Read, ip, None).await.expect("limited");
        assert!(!refused.allowed);
        assert!(
            (1..=20).contains(&refused.retry_after_secs()),
            "{refused:?}"
        );
        let other = Some("192.0.2.2".parse().expect("ip"));
        assert!(
            limits
                .check(Class::Read, other, None)
                .await
                .expect("v")
                .allowed,
            "per address"
        );
        assert!(
            limits
                .check(Class::Write, ip, None)
                .await
                .expect("v")
                .allowed,
            "per class"
        );
        let mut headers = HeaderMap::new();
        refused.write_headers(&mut headers);
        assert_eq!(headers["ratelimit-policy"], "\"read-ip\";q=3;w=60");
        assert!(
            headers["ratelimit"]
                .to_str()
                .expect("text")
                .starts_with("\"read-ip\";r=0;t=")
        );
        assert!(headers.contains_key("retry-after"));
    }

    #[tokio::test]
    async fn disabled_or_zero_limits_never_refuse() {
        let mut off = settings(1);
        off.enabled = false;
        let limits = Limits::new(&off, &kit::Settings::defaults()).expect("limits");
        let ip = Some("192.0.2.1".parse().expect("ip"));
        assert!(limits.check(Class::Read, ip, Some(1)).await.is_none());
        let limits = Limits::new(&settings(0), &kit::Settings::defaults()).expect("limits");
        for _ in 0..10 {
            assert!(limits.check(Class::Read, ip, Some(1)).await.is_none());
        }
    }

    #[test]
    fn classes_follow_the_canonical_path_and_method() {
        assert_eq!(Class::of(&Method::POST, "/api/v1/auth/login"), Class::Auth);
        assert_eq!(Class::of(&Method::GET, "/api/v1/users/1"), Class::Read);
        assert_eq!(Class::of(&Method::DELETE, "/api/v1/users/1"), Class::Write);
        assert_eq!(Class::of(&Method::POST, "/api/v1/authx"), Class::Write);
    }
}

//! Cache-aside for service reads, on Redis or in process (moka), chosen by `redis.url`.
//!
//! - Values are stored as the JSON bytes the API returns, so a hit is served without re-encoding.
//! - Items live `cache.item_ttl_secs`, lists `cache.list_ttl_secs`. Lists of a resource form a
//!   *group* (all pages, all filters) that one write invalidates at once.
//! - One loader per key on a miss (single-flight), so an expired hot key costs one query.
//! - A load never stores a value older than the last invalidation: every key (and group) has a
//!   version that invalidation bumps; a load captures it before reading the database and stores
//!   only if it is unchanged. So a read racing a write cannot put the pre-write value back after
//!   the write's invalidation (which would otherwise be served for a whole TTL).
//! - On Redis a hit costs one round trip and a miss two: the read returns the slot's version along
//!   with its value (that is the version the load stores under), and the store is one atomic
//!   check-and-set. A hot key costs none: each process keeps a near copy of what it read, which
//!   Redis's client tracking keeps fresh (`near.rs`).
//! - A cache fault never fails a request: the value is loaded from the database instead. After a
//!   failure Redis is skipped while one background task reconnects (every
//!   `redis.retry_after_ms`) and replays the invalidations the outage kept back before Redis is
//!   used again, so no write made during the outage is shadowed by a stale entry (`redis.rs`).
//!
//! One file per backend: `memory.rs` (moka) and `redis.rs` (with `near.rs`, its near copy); both
//! keep the contract of the private `Backend` trait below.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::config::Settings;

mod memory;
mod near;
mod redis;
#[cfg(test)]
mod tests;

use self::redis::RedisBackend;
pub use self::redis::connect as connect_redis;
use memory::MemoryBackend;

/// `value` as the JSON bytes the cache stores and the API returns.
pub fn json_bytes<T: Serialize>(value: &T) -> anyhow::Result<Bytes> {
    Ok(Bytes::from(serde_json::to_vec(value)?))
}

/// Counters of one service's cache, as served by its stats endpoint.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CacheStats {
    pub backend: &'static str,
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that went to the database (one per key per miss, thanks to single-flight).
    pub misses: u64,
    /// Reads that waited for another request's load of the same key instead of querying.
    pub coalesced: u64,
    /// Cache operations that failed or timed out (the request was served from the database).
    pub errors: u64,
    /// Cache operations skipped because the cache is out of service after a failure (the
    /// request was served from the database without trying it).
    pub bypassed: u64,
}

/// A load's error as seen by each request that waited for it (single-flight shares one error).
/// Its source is the load's own error, so callers can still find what it was (a database that is
/// down is a 503, not a 500: [`crate::db::unavailable_cause`]).
#[derive(Debug)]
struct SharedLoadError(Arc<anyhow::Error>);

impl std::fmt::Display for SharedLoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("loading the value failed")
    }
}

impl std::error::Error for SharedLoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref().as_ref())
    }
}

/// The error of a cache call that was not made: the backend is out of service after a failure
/// and recovers in the background.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the cache is out of service after a failure; recovering in the background")]
pub(crate) struct Bypassed;

/// A service's cache handle; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Box<dyn Backend>,
    /// `<redis.prefix><service>:`
    namespace: String,
    item_ttl: Duration,
    list_ttl: Duration,
    flights: Mutex<HashMap<String, Flight>>,
    /// Completion stamps: a flight that stored (or tried to store) a value bumps the stamp its key
    /// hashes to. See [`Cache::load_through`] for why.
    stamps: Box<[AtomicU64]>,
    stamp_hasher: std::hash::RandomState,
    hits: Counter,
    misses: Counter,
    coalesced: Counter,
    errors: Counter,
    bypassed: Counter,
}

type Flight = Shared<BoxFuture<'static, Result<Option<Bytes>, Arc<anyhow::Error>>>>;

/// How many completion stamps there are; keys share them by hash. A collision only costs a
/// needless re-read of the cache, never a wrong result.
const STAMPS: usize = 1024;

/// How long an entry lives.
#[derive(Debug, Clone, Copy)]
pub enum Ttl {
    Item,
    List,
}

/// What a request saw when it missed, handed to the flight it starts.
struct Miss {
    /// The slot's version, read before the database is (`None`: the read failed, so whatever is
    /// loaded is not stored).
    version: Option<Version>,
    /// Which completion stamp guards the key, and its value before the read.
    stamp: usize,
    stamp_before: u64,
}

impl Cache {
    /// The cache of `service`: Redis when `redis.url` is set, otherwise in process. Never fails:
    /// an unreachable Redis is retried lazily.
    pub fn new(settings: &Settings, service: &str) -> anyhow::Result<Self> {
        let backend: Box<dyn Backend> = match &settings.redis.url {
            Some(url) => Box::new(RedisBackend::new(
                url,
                Duration::from_millis(settings.redis.timeout_ms),
                Duration::from_millis(settings.redis.retry_after_ms),
                format!("{}{service}:", settings.redis.prefix),
                settings.cache.max_group_members,
                near::Near::new(
                    Duration::from_millis(settings.cache.near_ttl_ms),
                    usize::try_from(settings.cache.max_memory_mb * 1024 * 1024)
                        .unwrap_or(usize::MAX),
                ),
            )?),
            None => Box::new(MemoryBackend::new(
                settings.cache.max_memory_mb * 1024 * 1024,
                settings.cache.max_group_members,
            )),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                backend,
                namespace: format!("{}{service}:", settings.redis.prefix),
                item_ttl: Duration::from_secs(settings.cache.item_ttl_secs),
                list_ttl: Duration::from_secs(settings.cache.list_ttl_secs),
                flights: Mutex::new(HashMap::new()),
                stamps: (0..STAMPS).map(|_| AtomicU64::new(0)).collect(),
                stamp_hasher: std::hash::RandomState::new(),
                hits: Counter::default(),
                misses: Counter::default(),
                coalesced: Counter::default(),
                errors: Counter::default(),
                bypassed: Counter::default(),
            }),
        })
    }

    /// The cached bytes of `key`, or what `load` returns (cached for `ttl` when `Some`). `None`
    /// (not found) is never cached.
    pub async fn get_or_load<F, Fut>(
        &self,
        key: &str,
        ttl: Ttl,
        load: F,
    ) -> anyhow::Result<Option<Bytes>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<Option<Bytes>>> + Send + 'static,
    {
        self.load_through(Slot::Key(self.key(key)), ttl, load).await
    }

    /// Like [`Cache::get_or_load`] for one member (`field`, e.g. a page) of a list `group`;
    /// [`Cache::invalidate_group`] drops every member at once.
    pub async fn get_or_load_in<F, Fut>(
        &self,
        group: &str,
        field: &str,
        ttl: Ttl,
        load: F,
    ) -> anyhow::Result<Option<Bytes>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<Option<Bytes>>> + Send + 'static,
    {
        let slot = Slot::Field(self.key(group), field.to_owned());
        self.load_through(slot, ttl, load).await
    }

    /// A list page (or any collection view) as JSON: member `field` of `group`, cached for the
    /// list TTL, built by `load` on a miss. Unlike items, a list always has a value.
    pub async fn list_json<T, F, Fut>(
        &self,
        group: &str,
        field: &str,
        load: F,
    ) -> anyhow::Result<Bytes>
    where
        T: Serialize,
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    {
        let load = load();
        self.get_or_load_in(group, field, Ttl::List, move || async move {
            json_bytes(&load.await?).map(Some)
        })
        .await?
        .ok_or_else(|| anyhow::anyhow!("the list loader of `{group}` returned nothing"))
    }

    /// Removes `keys`, which may mix item keys and list group names; call once after every write,
    /// with everything it changed (on Redis that is one atomic round trip).
    pub async fn invalidate(&self, keys: &[String]) {
        let keys: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        if let Err(err) = self.inner.backend.delete(&keys).await {
            self.fault("invalidate", &err);
        }
    }

    /// Removes every member of list `group`.
    pub async fn invalidate_group(&self, group: &str) {
        self.invalidate(&[group.to_owned()]).await;
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        let i = &self.inner;
        CacheStats {
            backend: i.backend.name(),
            hits: i.hits.get(),
            misses: i.misses.get(),
            coalesced: i.coalesced.get(),
            errors: i.errors.get(),
            bypassed: i.bypassed.get(),
        }
    }

    /// Exposes the counters as `agora_cache_{hits,misses,coalesced,errors,bypassed}_total`.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        let i = &self.inner;
        metrics.register_counter(
            "cache_hits",
            "Reads answered from the cache",
            i.hits.clone(),
        );
        metrics.register_counter(
            "cache_misses",
            "Reads loaded from the database",
            i.misses.clone(),
        );
        metrics.register_counter(
            "cache_coalesced",
            "Reads that joined another read's load",
            i.coalesced.clone(),
        );
        metrics.register_counter(
            "cache_errors",
            "Cache operations that failed",
            i.errors.clone(),
        );
        metrics.register_counter(
            "cache_bypassed",
            "Cache operations skipped while the cache recovers from a failure",
            i.bypassed.clone(),
        );
    }

    /// `memory` or `redis`.
    pub fn backend(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// A round trip to the cache, for readiness.
    pub async fn ping(&self) -> anyhow::Result<()> {
        self.inner.backend.ping().await
    }

    /// Round trips made to the backend so far (always 0 in memory).
    #[cfg(test)]
    fn round_trips(&self) -> u64 {
        self.inner.backend.round_trips()
    }

    fn key(&self, key: &str) -> String {
        concat(&[&self.inner.namespace, key])
    }

    fn ttl(&self, ttl: Ttl) -> Duration {
        match ttl {
            Ttl::Item => self.inner.item_ttl,
            Ttl::List => self.inner.list_ttl,
        }
    }

    /// A cache call that did not happen or failed: the request goes on with the database. Only
    /// the per-request detail is logged here, at debug; the backend logs the outage itself once
    /// per state change ([`crate::outage`]).
    fn fault(&self, op: &str, err: &anyhow::Error) {
        if err.is::<Bypassed>() {
            self.inner.bypassed.inc();
            return;
        }
        self.inner.errors.inc();
        tracing::debug!(cache.op = op, error.message = %format!("{err:#}"), "cache call failed, using the database");
    }

    /// Which completion stamp `slot` uses (hashed from its parts: a hit builds no flight key).
    fn stamp_of(&self, slot: &Slot) -> usize {
        let hash = match slot {
            Slot::Key(key) => self.inner.stamp_hasher.hash_one(key.as_str()),
            Slot::Field(group, field) => self
                .inner
                .stamp_hasher
                .hash_one((group.as_str(), field.as_str())),
        };
        usize::try_from(hash % STAMPS as u64).unwrap_or(0)
    }

    /// A hit, a coalesced wait, or a new flight.
    ///
    /// The one read (value + version) leaves a window: this request misses, then another flight
    /// of the same key stores the value and leaves the flight table, and this request would start
    /// a second load. A flight closes it without a round trip on the common path: every flight
    /// that stores bumps its key's completion stamp *before* leaving the table, and a request reads
    /// the stamp *before* its read. So a leader that finds its stamp unchanged knows no flight
    /// stored since its read; only when it changed does the leader read the cache again.
    async fn load_through<F, Fut>(
        &self,
        slot: Slot,
        ttl: Ttl,
        load: F,
    ) -> anyhow::Result<Option<Bytes>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<Option<Bytes>>> + Send + 'static,
    {
        // A TTL of 0 turns this kind of entry off: nothing would be kept, so the cache is not
        // asked at all (no round trip to Redis on every read).
        if self.ttl(ttl).is_zero() {
            self.inner.misses.inc();
            return load().await;
        }
        let stamp = self.stamp_of(&slot);
        let stamp_before = self.inner.stamps[stamp].load(Ordering::Acquire);
        let version = match self.inner.backend.get(&slot).await {
            Ok((Some(bytes), _)) => {
                self.inner.hits.inc();
                return Ok(Some(bytes));
            }
            Ok((None, version)) => Some(version),
            Err(err) => {
                self.fault("get", &err);
                None
            }
        };

        let flight_key = slot.flight_key();
        let (flight, leader) = {
            let mut flights = self.inner.flights.lock().unwrap_or_else(|p| p.into_inner());
            match flights.get(&flight_key) {
                Some(flight) => (flight.clone(), false),
                None => {
                    let miss = Miss {
                        version,
                        stamp,
                        stamp_before,
                    };
                    let flight = self.flight(slot, ttl, flight_key.clone(), miss, load());
                    flights.insert(flight_key, flight.clone());
                    (flight, true)
                }
            }
        };
        if !leader {
            self.inner.coalesced.inc();
        }
        flight.await.map_err(|err| SharedLoadError(err).into())
    }

    /// The shared load of one key: query, store, and leave the flight table — even when the
    /// request that started it is cancelled, because it runs as its own task.
    fn flight<Fut>(&self, slot: Slot, ttl: Ttl, flight_key: String, miss: Miss, load: Fut) -> Flight
    where
        Fut: Future<Output = anyhow::Result<Option<Bytes>>> + Send + 'static,
    {
        let cache = self.clone();
        let ttl = self.ttl(ttl);
        let task = tokio::spawn(async move {
            // Leaves the flight table however the task ends: a loader that panics must not leave
            // its finished flight behind, or every later miss on the key would fail.
            let mut guard = FlightGuard {
                cache: cache.clone(),
                flight_key,
                stored: None,
            };
            // The version was read before anything else: a write that commits and invalidates
            // while we load bumps it, and our (possibly older) value is then not stored.
            let mut version = miss.version;
            if cache.inner.stamps[miss.stamp].load(Ordering::Acquire) != miss.stamp_before {
                // Another flight (of this key, or one sharing its stamp) stored since our read:
                // look once more before going to the database. The fresher version is as safe.
                match cache.inner.backend.get(&slot).await {
                    Ok((Some(bytes), _)) => {
                        cache.inner.hits.inc();
                        return Ok(Some(bytes));
                    }
                    Ok((None, fresher)) => version = Some(fresher),
                    Err(err) => {
                        cache.fault("get", &err);
                        version = None;
                    }
                }
            }
            cache.inner.misses.inc();
            let loaded = load.await;
            if let (Ok(Some(bytes)), Some(version)) = (&loaded, version) {
                if let Err(err) = cache
                    .inner
                    .backend
                    .set(&slot, bytes.clone(), ttl, version)
                    .await
                {
                    cache.fault("set", &err);
                }
                guard.stored = Some(miss.stamp);
            }
            loaded.map_err(Arc::new)
        });
        async move {
            task.await.unwrap_or_else(|join| {
                Err(Arc::new(anyhow::anyhow!("cache loader failed: {join}")))
            })
        }
        .boxed()
        .shared()
    }

    /// Leaves the flight table; a flight that stored (or tried to: a timed-out store may have
    /// landed) first bumps its completion stamp, so a request that missed before the store and
    /// finds no flight afterwards knows to look again.
    fn end_flight(&self, flight_key: &str, stored: Option<usize>) {
        if let Some(stamp) = stored {
            self.inner.stamps[stamp].fetch_add(1, Ordering::AcqRel);
        }
        self.inner
            .flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(flight_key);
    }
}

/// Ends a flight when dropped: on return, and on a loader's panic.
struct FlightGuard {
    cache: Cache,
    flight_key: String,
    /// The stamp to bump when the flight stored a value.
    stored: Option<usize>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.cache.end_flight(&self.flight_key, self.stored);
    }
}

/// Where a value lives: a plain key, or a field of a group (a Redis hash / a generation-tagged
/// key in memory).
#[derive(Debug, Clone)]
enum Slot {
    Key(String),
    Field(String, String),
}

impl Slot {
    /// The key or group whose version guards this slot.
    fn base(&self) -> &str {
        match self {
            Slot::Key(key) | Slot::Field(key, _) => key,
        }
    }

    /// The member of a group this slot is, or "" for a plain key.
    fn field(&self) -> &str {
        match self {
            Slot::Key(_) => "",
            Slot::Field(_, field) => field,
        }
    }

    fn flight_key(&self) -> String {
        match self {
            Slot::Key(key) => key.clone(),
            Slot::Field(group, field) => format!("{group}\u{1f}{field}"),
        }
    }
}

/// `<kind>:<id>`, the cache key of one item (`user:1`).
pub fn item_key(kind: &str, id: i64) -> String {
    concat(&[kind, ":", itoa::Buffer::new().format(id)])
}

/// The parts joined, in one allocation of the right size: keys are built on every request, and
/// `format!` costs several times as much.
pub(crate) fn concat(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    out
}

/// How many times a key or group has been invalidated (`None`: never, or too long ago to matter).
type Version = Option<u64>;

#[async_trait]
trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// The slot's value, and the current version of its key or group (bumped by every
    /// [`Backend::delete`]), in one round trip.
    async fn get(&self, slot: &Slot) -> anyhow::Result<(Option<Bytes>, Version)>;
    /// Stores `value` unless the slot's version is no longer `version`.
    async fn set(
        &self,
        slot: &Slot,
        value: Bytes,
        ttl: Duration,
        version: Version,
    ) -> anyhow::Result<()>;
    /// Deletes keys and groups alike, bumping their versions.
    async fn delete(&self, keys: &[String]) -> anyhow::Result<()>;
    async fn ping(&self) -> anyhow::Result<()>;
    /// Round trips made so far, for tests that count them.
    #[cfg(test)]
    fn round_trips(&self) -> u64 {
        0
    }
    /// Entries in the near copy of a Redis backend (`None`: it has none).
    #[cfg(test)]
    fn near_len(&self) -> Option<usize> {
        None
    }
}

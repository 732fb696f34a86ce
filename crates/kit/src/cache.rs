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
//! - A cache fault never fails a request: the value is loaded from the database instead, Redis is
//!   skipped for `redis.retry_after_ms`, and when it comes back after a failed invalidation the
//!   service's keyspace is flushed first, so no write made during the outage is shadowed by a
//!   stale entry.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::config::Settings;

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
}

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
    hits: Counter,
    misses: Counter,
    coalesced: Counter,
    errors: Counter,
}

type Flight = Shared<BoxFuture<'static, Result<Option<Bytes>, Arc<anyhow::Error>>>>;

/// How long an entry lives.
#[derive(Debug, Clone, Copy)]
pub enum Ttl {
    Item,
    List,
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
            )?),
            None => Box::new(MemoryBackend::new(
                settings.cache.max_memory_mb * 1024 * 1024,
            )),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                backend,
                namespace: format!("{}{service}:", settings.redis.prefix),
                item_ttl: Duration::from_secs(settings.cache.item_ttl_secs),
                list_ttl: Duration::from_secs(settings.cache.list_ttl_secs),
                flights: Mutex::new(HashMap::new()),
                hits: Counter::default(),
                misses: Counter::default(),
                coalesced: Counter::default(),
                errors: Counter::default(),
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
        }
    }

    /// Exposes the counters as `agora_cache_{hits,misses,coalesced,errors}_total`.
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
    }

    /// `memory` or `redis`.
    pub fn backend(&self) -> &'static str {
        self.inner.backend.name()
    }

    /// A round trip to the cache, for readiness.
    pub async fn ping(&self) -> anyhow::Result<()> {
        self.inner.backend.ping().await
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.namespace)
    }

    fn ttl(&self, ttl: Ttl) -> Duration {
        match ttl {
            Ttl::Item => self.inner.item_ttl,
            Ttl::List => self.inner.list_ttl,
        }
    }

    fn fault(&self, op: &str, err: &anyhow::Error) {
        self.inner.errors.inc();
        tracing::warn!(cache.op = op, error.message = %format!("{err:#}"), "cache unavailable, using the database");
    }

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
        match self.inner.backend.get(&slot).await {
            Ok(Some(bytes)) => {
                self.inner.hits.inc();
                return Ok(Some(bytes));
            }
            Ok(None) => {}
            Err(err) => self.fault("get", &err),
        }

        let flight_key = slot.flight_key();
        let (flight, leader) = {
            let mut flights = self.inner.flights.lock().unwrap_or_else(|p| p.into_inner());
            match flights.get(&flight_key) {
                Some(flight) => (flight.clone(), false),
                None => {
                    let flight = self.flight(slot, ttl, flight_key.clone(), load());
                    flights.insert(flight_key, flight.clone());
                    (flight, true)
                }
            }
        };
        if !leader {
            self.inner.coalesced.inc();
        }
        flight.await.map_err(|err| anyhow::anyhow!("{err:#}"))
    }

    /// The shared load of one key: query, store, and leave the flight table — even when the
    /// request that started it is cancelled, because it runs as its own task.
    fn flight<Fut>(&self, slot: Slot, ttl: Ttl, flight_key: String, load: Fut) -> Flight
    where
        Fut: Future<Output = anyhow::Result<Option<Bytes>>> + Send + 'static,
    {
        let cache = self.clone();
        let ttl = self.ttl(ttl);
        let task = tokio::spawn(async move {
            // The version before anything is read: a write that commits and invalidates while we
            // load bumps it, and our (possibly older) value is then not stored.
            let version = cache.inner.backend.version(&slot).await;
            // Another flight may have stored the value between our read and this flight's start:
            // look once more before going to the database.
            if let Ok(Some(bytes)) = cache.inner.backend.get(&slot).await {
                cache.inner.hits.inc();
                cache.end_flight(&flight_key);
                return Ok(Some(bytes));
            }
            cache.inner.misses.inc();
            let loaded = load.await;
            match (&loaded, version) {
                (Ok(Some(bytes)), Ok(version)) => {
                    if let Err(err) = cache
                        .inner
                        .backend
                        .set(&slot, bytes.clone(), ttl, version)
                        .await
                    {
                        cache.fault("set", &err);
                    }
                }
                (_, Err(err)) => cache.fault("version", &err),
                _ => {}
            }
            cache.end_flight(&flight_key);
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
}

impl Cache {
    fn end_flight(&self, flight_key: &str) {
        self.inner
            .flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(flight_key);
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

    fn flight_key(&self) -> String {
        match self {
            Slot::Key(key) => key.clone(),
            Slot::Field(group, field) => format!("{group}\u{1f}{field}"),
        }
    }
}

/// How many times a key or group has been invalidated (`None`: never, or too long ago to matter).
type Version = Option<u64>;

#[async_trait]
trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    async fn get(&self, slot: &Slot) -> anyhow::Result<Option<Bytes>>;
    /// The current version of the slot's key or group (bumped by every [`Backend::delete`]).
    async fn version(&self, slot: &Slot) -> anyhow::Result<Version>;
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
}

/// The in-process backend: moka with per-entry TTL and a byte budget (`cache.max_memory_mb`).
///
/// Entries live under `<key>#<version>` (`<group>#<version>\x1f<field>` for group members), so
/// bumping a version orphans every entry stored under the old one at once, and a load that
/// captured an old version can only store where nobody looks any more (it ages out or is evicted
/// by the budget).
struct MemoryBackend {
    entries: moka::future::Cache<String, (Bytes, Duration)>,
    /// Versions of the keys and groups invalidated so far.
    versions: Mutex<HashMap<String, u64>>,
}

struct PerEntryTtl;

impl moka::Expiry<String, (Bytes, Duration)> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _: &String,
        value: &(Bytes, Duration),
        _: Instant,
    ) -> Option<Duration> {
        Some(value.1)
    }
}

impl MemoryBackend {
    fn new(budget_bytes: u64) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(budget_bytes)
            .weigher(|key: &String, value: &(Bytes, Duration)| {
                u32::try_from(key.len() + value.0.len() + 64).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build();
        Self {
            entries,
            versions: Mutex::new(HashMap::new()),
        }
    }

    fn current(&self, base: &str) -> u64 {
        self.versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(base)
            .copied()
            .unwrap_or(0)
    }

    fn entry_key(slot: &Slot, version: u64) -> String {
        match slot {
            Slot::Key(key) => format!("{key}#{version}"),
            Slot::Field(group, field) => format!("{group}#{version}\u{1f}{field}"),
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, slot: &Slot) -> anyhow::Result<Option<Bytes>> {
        let key = Self::entry_key(slot, self.current(slot.base()));
        Ok(self.entries.get(&key).await.map(|(bytes, _)| bytes))
    }

    async fn version(&self, slot: &Slot) -> anyhow::Result<Version> {
        Ok(Some(self.current(slot.base())))
    }

    async fn set(
        &self,
        slot: &Slot,
        value: Bytes,
        ttl: Duration,
        version: Version,
    ) -> anyhow::Result<()> {
        let version = version.unwrap_or(0);
        if version == self.current(slot.base()) {
            self.entries
                .insert(Self::entry_key(slot, version), (value, ttl))
                .await;
        }
        Ok(())
    }

    async fn delete(&self, keys: &[String]) -> anyhow::Result<()> {
        for key in keys {
            let old = {
                let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
                let version = versions.entry(key.clone()).or_insert(0);
                *version += 1;
                *version - 1
            };
            // Free a plain key's memory now; group members age out.
            self.entries
                .invalidate(&Self::entry_key(&Slot::Key(key.clone()), old))
                .await;
        }
        Ok(())
    }

    async fn ping(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// The Redis backend: lazy connection, a time limit on every call, and a pause after failures.
struct RedisBackend {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    timeout: Duration,
    retry_after: Duration,
    /// Keys of this service start with it; used to flush after an outage.
    namespace: String,
    /// Skip Redis until this instant after a failure.
    down_until: Mutex<Option<Instant>>,
    /// An invalidation was lost: flush the namespace before trusting Redis again.
    dirty: AtomicBool,
    store_script: redis::Script,
}

impl RedisBackend {
    fn new(
        url: &str,
        timeout: Duration,
        retry_after: Duration,
        namespace: String,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: redis::Client::open(url).context("parsing redis.url")?,
            connection: tokio::sync::Mutex::new(None),
            timeout,
            retry_after,
            namespace,
            down_until: Mutex::new(None),
            dirty: AtomicBool::new(false),
            store_script: redis::Script::new(STORE_SCRIPT),
        })
    }

    /// A live connection, or an error at once while Redis is known to be down.
    async fn connection(&self) -> anyhow::Result<redis::aio::ConnectionManager> {
        if let Some(until) = *self.down_until.lock().unwrap_or_else(|p| p.into_inner())
            && Instant::now() < until
        {
            anyhow::bail!("redis marked down after a recent failure");
        }
        let mut guard = self.connection.lock().await;
        if let Some(conn) = guard.as_ref() {
            return Ok(conn.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let mut conn = tokio::time::timeout(
            self.timeout * 2,
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .context("connecting to redis timed out")?
        .context("connecting to redis")?;
        if self.dirty.load(Ordering::Acquire) {
            self.flush_namespace(&mut conn).await?;
            self.dirty.store(false, Ordering::Release);
        }
        *guard = Some(conn.clone());
        Ok(conn)
    }

    async fn flush_namespace(
        &self,
        conn: &mut redis::aio::ConnectionManager,
    ) -> anyhow::Result<()> {
        let pattern = format!("{}*", self.namespace);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(conn)
                .await?;
            if !keys.is_empty() {
                let _: () = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        tracing::info!(namespace = %self.namespace, "flushed cache namespace after a redis outage");
        Ok(())
    }

    /// Runs one command set with the time limit; a failure marks Redis down for a while.
    async fn run<T, F>(&self, op: F) -> anyhow::Result<T>
    where
        F: AsyncFnOnce(&mut redis::aio::ConnectionManager) -> redis::RedisResult<T>,
    {
        let result = async {
            let mut conn = self.connection().await?;
            tokio::time::timeout(self.timeout, op(&mut conn))
                .await
                .context("redis timed out")?
                .context("redis command failed")
        }
        .await;
        if result.is_err() {
            *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + self.retry_after);
            // Reconnect (and flush if needed) once Redis answers again.
            if let Ok(mut guard) = self.connection.try_lock() {
                *guard = None;
            }
        }
        result
    }
}

/// Where the version of a key or group lives.
fn version_key(base: &str) -> String {
    format!("{base}:ver")
}

/// Versions outlive every entry they guard (the longest TTL is far shorter); after a day without
/// invalidation a key's version may lapse, which only means "never invalidated" again.
const VERSION_TTL_MS: u64 = 24 * 3600 * 1000;

/// Stores a value only if the version is still the one the load started with, atomically.
/// KEYS: the key (or group), its version key. ARGV: expected version ("" = none), value, TTL in
/// ms, field ("" = a plain key). A group expires TTL after its first member was stored, so no
/// member is ever older than the list TTL.
const STORE_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[1] then return 0 end
if ARGV[4] == '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('HSET', KEYS[1], ARGV[4], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3], 'NX')
end
return 1
";

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, slot: &Slot) -> anyhow::Result<Option<Bytes>> {
        let value: Option<Vec<u8>> = match slot {
            Slot::Key(key) => {
                self.run(async |c| redis::cmd("GET").arg(key).query_async(c).await)
                    .await?
            }
            Slot::Field(group, field) => {
                self.run(async |c| {
                    redis::cmd("HGET")
                        .arg(group)
                        .arg(field)
                        .query_async(c)
                        .await
                })
                .await?
            }
        };
        Ok(value.map(Bytes::from))
    }

    async fn version(&self, slot: &Slot) -> anyhow::Result<Version> {
        let key = version_key(slot.base());
        self.run(async |c| redis::cmd("GET").arg(&key).query_async(c).await)
            .await
    }

    async fn set(
        &self,
        slot: &Slot,
        value: Bytes,
        ttl: Duration,
        version: Version,
    ) -> anyhow::Result<()> {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let expected = version.map(|v| v.to_string()).unwrap_or_default();
        let field = match slot {
            Slot::Key(_) => "",
            Slot::Field(_, field) => field.as_str(),
        };
        let script = &self.store_script;
        self.run(async |c| {
            script
                .key(slot.base())
                .key(version_key(slot.base()))
                .arg(&expected)
                .arg(value.as_ref())
                .arg(ms)
                .arg(field)
                .invoke_async::<()>(c)
                .await
        })
        .await
    }

    async fn delete(&self, keys: &[String]) -> anyhow::Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in keys {
            let version = version_key(key);
            pipe.cmd("INCR").arg(&version).ignore();
            pipe.cmd("PEXPIRE")
                .arg(&version)
                .arg(VERSION_TTL_MS)
                .ignore();
            pipe.cmd("DEL").arg(key).ignore();
        }
        let result = self.run(async |c| pipe.query_async::<()>(c).await).await;
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        result
    }

    async fn ping(&self) -> anyhow::Result<()> {
        self.run(async |c| redis::cmd("PING").query_async::<()>(c).await)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    fn memory_cache() -> Cache {
        Cache::new(&Settings::defaults(), "t").expect("memory cache")
    }

    #[tokio::test]
    async fn second_read_is_a_hit() {
        let cache = memory_cache();
        for _ in 0..2 {
            let v = cache
                .get_or_load("k", Ttl::Item, || async {
                    Ok(Some(Bytes::from_static(b"1")))
                })
                .await
                .expect("loads");
            assert_eq!(v.as_deref(), Some(&b"1"[..]));
        }
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (1, 1));
    }

    #[tokio::test]
    async fn concurrent_misses_load_once() {
        let cache = memory_cache();
        let loads = Arc::new(AtomicU64::new(0));
        let reads = (0..32).map(|_| {
            let loads = loads.clone();
            let cache = cache.clone();
            async move {
                cache
                    .get_or_load("hot", Ttl::Item, move || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(Some(Bytes::from_static(b"v")))
                    })
                    .await
            }
        });
        let results = futures::future::join_all(reads).await;
        assert!(results.iter().all(|r| matches!(r, Ok(Some(b)) if b == "v")));
        assert_eq!(
            loads.load(Ordering::SeqCst),
            1,
            "one loader for 32 concurrent misses"
        );
        let stats = cache.stats();
        assert_eq!(stats.misses + stats.coalesced + stats.hits, 32);
        assert_eq!(stats.misses, 1);
    }

    #[tokio::test]
    async fn invalidating_a_group_drops_every_member() {
        let cache = memory_cache();
        for page in ["1", "2"] {
            cache
                .get_or_load_in("list", page, Ttl::List, || async {
                    Ok(Some(Bytes::from_static(b"old")))
                })
                .await
                .expect("loads");
        }
        cache.invalidate_group("list").await;
        for page in ["1", "2"] {
            let v = cache
                .get_or_load_in("list", page, Ttl::List, || async {
                    Ok(Some(Bytes::from_static(b"new")))
                })
                .await
                .expect("loads");
            assert_eq!(v.as_deref(), Some(&b"new"[..]), "page {page}");
        }
    }

    /// A read loads the old value; a write commits and invalidates while that load is in flight;
    /// the load finishes. The next read must see the new value, not the old one put back.
    async fn a_load_racing_an_invalidation_does_not_store_its_old_value(cache: Cache) {
        for group in [None, Some("list")] {
            let (started_tx, started_rx) = tokio::sync::oneshot::channel();
            let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
            let load = move || async move {
                let _ = started_tx.send(());
                let _ = release_rx.await;
                Ok(Some(Bytes::from_static(b"old")))
            };
            let racing = {
                let cache = cache.clone();
                tokio::spawn(async move {
                    match group {
                        None => cache.get_or_load("k", Ttl::Item, load).await,
                        Some(group) => cache.get_or_load_in(group, "p1", Ttl::List, load).await,
                    }
                })
            };
            started_rx.await.expect("the load started");
            match group {
                None => cache.invalidate(&["k".to_owned()]).await,
                Some(group) => cache.invalidate_group(group).await,
            }
            release_tx.send(()).expect("release the load");
            let raced = racing.await.expect("join").expect("load");
            assert_eq!(
                raced.as_deref(),
                Some(&b"old"[..]),
                "{group:?}: it read before"
            );

            let new = || async { Ok(Some(Bytes::from_static(b"new"))) };
            let next = match group {
                None => cache.get_or_load("k", Ttl::Item, new).await,
                Some(group) => cache.get_or_load_in(group, "p1", Ttl::List, new).await,
            };
            assert_eq!(
                next.expect("load").as_deref(),
                Some(&b"new"[..]),
                "{group:?}: the old value was not stored after the invalidation"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_loads_never_store_across_an_invalidation() {
        a_load_racing_an_invalidation_does_not_store_its_old_value(memory_cache()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_loads_never_store_across_an_invalidation() {
        let env = crate::testing::TestEnv::new(crate::testing::Backend::Postgres).await;
        let cache = Cache::new(&env.settings, "t").expect("redis cache");
        a_load_racing_an_invalidation_does_not_store_its_old_value(cache.clone()).await;
        assert_eq!(cache.stats().errors, 0, "Redis answered every call");
    }

    #[tokio::test]
    async fn not_found_is_not_cached() {
        let cache = memory_cache();
        let v = cache
            .get_or_load("gone", Ttl::Item, || async { Ok(None) })
            .await
            .expect("ok");
        assert!(v.is_none());
        let v = cache
            .get_or_load("gone", Ttl::Item, || async {
                Ok(Some(Bytes::from_static(b"here")))
            })
            .await
            .expect("ok");
        assert_eq!(v.as_deref(), Some(&b"here"[..]));
    }
}

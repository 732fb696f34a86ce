//! The Redis store. Everything it writes starts with `<redis.prefix>cache:` (the service's
//! namespace, as every Agora service has one): values at `…k:<key>`, and its bookkeeping at
//! `…m:*`: a hash of each value's counted size, a sorted set of expiry times, the used total,
//! the peak and the flush count. Writes and deletes update the bookkeeping in the same Lua script
//! as the value, so the total is exact; values that expired are taken off it (in batches) before
//! the total is read.
//!
//! A flush removes this namespace's values only: `SCAN MATCH <ns>k:*` and `UNLINK` a batch at a
//! time (never `FLUSHDB`, never `KEYS`), so other services' cache entries, rate-limit counters
//! and anything else sharing the Redis survive. One replica flushes at a time (a `SET NX` lock);
//! the others re-read the total once it is done, so a crowd of writers at the threshold causes
//! one flush, not one each.
//!
//! With `memory_source = "redis"`, the guard reads Redis's own `used_memory` instead (the seed's
//! rule, for a Redis that holds nothing else: a flush of the namespace cannot lower a figure that
//! other data makes up).

use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::store::{Found, Store, Usage, entry_size};

/// Keys per SCAN step and per UNLINK.
const BATCH: usize = 500;
/// Expired entries taken off the total per read.
const PRUNE: usize = 1000;
/// How long a replica may hold the flush lock (a flush that takes longer is taken over).
const FLUSH_LOCK_MS: u64 = 30_000;

const SET_SCRIPT: &str = r"
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[4]) or '0')
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  redis.call('ZADD', KEYS[3], tonumber(ARGV[5]) + ttl, ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[4])
end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[3])
local used = redis.call('INCRBY', KEYS[4], tonumber(ARGV[3]) - old)
local peak = tonumber(redis.call('GET', KEYS[5]) or '0')
if used > peak then redis.call('SET', KEYS[5], used) end
return used
";

const DELETE_SCRIPT: &str = r"
local size = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local n = redis.call('UNLINK', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if size > 0 then redis.call('DECRBY', KEYS[4], size) end
return n
";

const PRUNE_SCRIPT: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local freed = 0
for _, k in ipairs(expired) do
  freed = freed + tonumber(redis.call('HGET', KEYS[1], k) or '0')
  redis.call('HDEL', KEYS[1], k)
  redis.call('ZREM', KEYS[2], k)
end
if freed > 0 then redis.call('DECRBY', KEYS[3], freed) end
return tonumber(redis.call('GET', KEYS[3]) or '0')
";

/// What the guard reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Keyspace,
    Redis,
}

pub struct RedisStore {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    timeout: Duration,
    namespace: String,
    source: Source,
    set_script: redis::Script,
    delete_script: redis::Script,
    prune_script: redis::Script,
}

impl RedisStore {
    /// Connects lazily (the service starts with Redis down, and answers 503 until it is up).
    pub fn new(
        url: &str,
        namespace: String,
        timeout: Duration,
        source: Source,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: redis::Client::open(url).context("parsing redis.url")?,
            conn: OnceCell::new(),
            timeout,
            namespace,
            source,
            set_script: redis::Script::new(SET_SCRIPT),
            delete_script: redis::Script::new(DELETE_SCRIPT),
            prune_script: redis::Script::new(PRUNE_SCRIPT),
        })
    }

    fn value_key(&self, key: &str) -> String {
        format!("{}k:{key}", self.namespace)
    }

    fn meta(&self, name: &str) -> String {
        format!("{}m:{name}", self.namespace)
    }

    async fn conn(&self) -> anyhow::Result<ConnectionManager> {
        let conn = tokio::time::timeout(
            self.timeout.max(Duration::from_secs(1)),
            self.conn
                .get_or_try_init(|| ConnectionManager::new(self.client.clone())),
        )
        .await
        .context("connecting to Redis timed out")?
        .context("connecting to Redis")?;
        Ok(conn.clone())
    }

    /// Runs `f` on a connection, within the time limit.
    async fn run<T, F, Fut>(&self, what: &str, f: F) -> anyhow::Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn().await?;
        tokio::time::timeout(self.timeout, f(conn))
            .await
            .with_context(|| format!("Redis {what} timed out"))?
            .with_context(|| format!("Redis {what}"))
    }

    fn now_ms() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or_default()
    }

    /// The namespace's counted total, after taking expired values off it.
    async fn keyspace_used(&self) -> anyhow::Result<u64> {
        let script = &self.prune_script;
        let keys = [self.meta("sizes"), self.meta("expiry"), self.meta("used")];
        let used: i64 = self
            .run("prune", |mut conn| async move {
                script
                    .key(&keys[0])
                    .key(&keys[1])
                    .key(&keys[2])
                    .arg(Self::now_ms())
                    .arg(PRUNE)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(used.max(0) as u64)
    }

    async fn info_memory(&self) -> anyhow::Result<(u64, u64)> {
        let info: String = self
            .run("INFO memory", |mut conn| async move {
                redis::cmd("INFO")
                    .arg("memory")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((field("used_memory"), field("used_memory_peak")))
    }

    /// `*`, `?`, `[`, `]` and `\` in the namespace match themselves in a SCAN pattern.
    fn glob_escape(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    async fn flush(&self) -> anyhow::Result<()> {
        let pattern = format!("{}*", Self::glob_escape(&self.value_key("")));
        let mut cursor: u64 = 0;
        loop {
            let pattern = pattern.clone();
            let (next, keys): (u64, Vec<String>) = self
                .run("SCAN", |mut conn| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(BATCH)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            if !keys.is_empty() {
                let () = self
                    .run("UNLINK", |mut conn| async move {
                        redis::cmd("UNLINK")
                            .arg(&keys)
                            .query_async::<i64>(&mut conn)
                            .await
                            .map(|_| ())
                    })
                    .await?;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let meta = [self.meta("sizes"), self.meta("expiry"), self.meta("used")];
        let flushes = self.meta("flushes");
        self.run("reset", |mut conn| async move {
            redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(&meta)
                .ignore()
                .cmd("INCR")
                .arg(&flushes)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }
}

#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, key: &str) -> anyhow::Result<Option<Found>> {
        let k = self.value_key(key);
        let (value, pttl): (Option<Vec<u8>>, i64) = self
            .run("GET", |mut conn| async move {
                redis::pipe()
                    .cmd("GET")
                    .arg(&k)
                    .cmd("PTTL")
                    .arg(&k)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(value.map(|value| Found {
            value: Bytes::from(value),
            ttl: (pttl >= 0).then(|| Duration::from_millis(pttl as u64)),
        }))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> anyhow::Result<()> {
        let size = entry_size(key, &value);
        let ttl_ms = ttl.map_or(0, |t| t.as_millis().max(1) as u64);
        let keys = [
            self.value_key(key),
            self.meta("sizes"),
            self.meta("expiry"),
            self.meta("used"),
            self.meta("peak"),
        ];
        let script = &self.set_script;
        let _: i64 = self
            .run("SET", |mut conn| async move {
                let mut invocation = script.prepare_invoke();
                for k in &keys {
                    invocation.key(k);
                }
                invocation
                    .arg(value.as_ref())
                    .arg(ttl_ms)
                    .arg(size)
                    .arg(key)
                    .arg(Self::now_ms())
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> anyhow::Result<bool> {
        let keys = [
            self.value_key(key),
            self.meta("sizes"),
            self.meta("expiry"),
            self.meta("used"),
        ];
        let script = &self.delete_script;
        let removed: i64 = self
            .run("DELETE", |mut conn| async move {
                let mut invocation = script.prepare_invoke();
                for k in &keys {
                    invocation.key(k);
                }
                invocation.arg(key).invoke_async(&mut conn).await
            })
            .await?;
        Ok(removed > 0)
    }

    async fn used(&self) -> anyhow::Result<u64> {
        match self.source {
            Source::Keyspace => self.keyspace_used().await,
            Source::Redis => Ok(self.info_memory().await?.0),
        }
    }

    async fn usage(&self) -> anyhow::Result<Usage> {
        let used = self.keyspace_used().await?;
        let meta = [self.meta("sizes"), self.meta("peak"), self.meta("flushes")];
        let (keys, peak, flushes): (u64, Option<u64>, Option<u64>) = self
            .run("usage", |mut conn| async move {
                redis::pipe()
                    .cmd("HLEN")
                    .arg(&meta[0])
                    .cmd("GET")
                    .arg(&meta[1])
                    .cmd("GET")
                    .arg(&meta[2])
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let (used, peak) = match self.source {
            Source::Keyspace => (used, peak.unwrap_or(used)),
            Source::Redis => self.info_memory().await?,
        };
        Ok(Usage {
            used_bytes: used,
            peak_bytes: peak,
            keys,
            flushes: flushes.unwrap_or(0),
        })
    }

    async fn flush_if(&self, threshold: u64) -> anyhow::Result<bool> {
        let lock = self.meta("flush_lock");
        let token = uuid::Uuid::new_v4().to_string();
        // Wait for a flush another replica is making, then decide on the figure after it.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(FLUSH_LOCK_MS);
        loop {
            let (lock, token) = (lock.clone(), token.clone());
            let got: Option<String> = self
                .run("lock", |mut conn| async move {
                    redis::cmd("SET")
                        .arg(&lock)
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(FLUSH_LOCK_MS)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            if got.is_some() {
                break;
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "another replica's flush is taking too long"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let result = async {
            if self.used().await? < threshold {
                return Ok(false);
            }
            self.flush().await?;
            Ok(true)
        }
        .await;
        let unlock = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        );
        let _: anyhow::Result<i64> = self
            .run("unlock", |mut conn| async move {
                unlock.key(&lock).arg(&token).invoke_async(&mut conn).await
            })
            .await;
        result
    }
}

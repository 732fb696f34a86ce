//! The Redis backend: lazy connection, a time limit on every call, and a pause after failures.
//!
//! A plain key is a string with a `PX` TTL; a group is a hash whose fields are its members. The
//! version of a key or group lives at `<key>:ver` (bumped by `INCR` on invalidation). A read is
//! one round trip that also returns that version; a store is one atomic script that writes only
//! while the version is still the one read.

use std::sync::Mutex;
#[cfg(test)]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;

use super::{Backend, Slot, Version};

pub(super) struct RedisBackend {
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
    max_group_members: u64,
    /// Commands (or pipelines, or scripts) sent, for tests that count round trips.
    #[cfg(test)]
    round_trips: AtomicU64,
}

impl RedisBackend {
    pub(super) fn new(
        url: &str,
        timeout: Duration,
        retry_after: Duration,
        namespace: String,
        max_group_members: u64,
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
            max_group_members,
            #[cfg(test)]
            round_trips: AtomicU64::new(0),
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
            #[cfg(test)]
            self.round_trips.fetch_add(1, Ordering::Relaxed);
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
/// ms, field ("" = a plain key), the most members a group may have. A group expires TTL after
/// its first member was stored (later stores do not extend it), so no member is ever older than
/// the list TTL; a new member beyond the limit is not stored.
const STORE_SCRIPT: &str = r"
local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[1] then return 0 end
if ARGV[4] == '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[5]) and redis.call('HEXISTS', KEYS[1], ARGV[4]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3], 'NX')
return 1
";

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, slot: &Slot) -> anyhow::Result<(Option<Bytes>, Version)> {
        let version = version_key(slot.base());
        let (value, version): (Option<Vec<u8>>, Version) = match slot {
            Slot::Key(key) => {
                self.run(async |c| {
                    redis::cmd("MGET")
                        .arg(key)
                        .arg(&version)
                        .query_async(c)
                        .await
                })
                .await?
            }
            // Not atomic, and need not be: the version only has to be read before the database.
            Slot::Field(group, field) => {
                let mut pipe = redis::pipe();
                pipe.cmd("HGET").arg(group).arg(field);
                pipe.cmd("GET").arg(&version);
                self.run(async |c| pipe.query_async(c).await).await?
            }
        };
        Ok((value.map(Bytes::from), version))
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
                .arg(self.max_group_members)
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
            // UNLINK frees a large group in the background instead of blocking Redis.
            pipe.cmd("UNLINK").arg(key).ignore();
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

    #[cfg(test)]
    fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }
}

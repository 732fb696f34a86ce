//! The Redis backend: a time limit on every call, and outages handled off the request path.
//!
//! A plain key is a string with a `PX` TTL; a group is a hash whose fields are its members. The
//! version of a key or group lives at `<key>:ver` (bumped by `INCR` on invalidation). A read is
//! one round trip that also returns that version; a store is one atomic script that writes only
//! while the version is still the one read.
//!
//! Outages. The first failure of a call (a timeout, a dropped or refused connection) takes the
//! connection out of service: from then on requests skip Redis at once (counted as bypassed, not
//! as errors) and one background task, never a request, tries a new connection every
//! `redis.retry_after_ms`. An invalidation that does not reach Redis meanwhile is remembered
//! (its keys, up to [`MAX_LOST`]); when Redis answers again the task first replays those
//! invalidations (a few pipelined round trips, whatever the size of the keyspace), and only then
//! puts the connection back in service. So the cache is back within `retry_after_ms` plus a
//! few round trips under any load, and no entry a write made stale during the outage is ever
//! served. Only when more than [`MAX_LOST`] keys were lost does the task flush the service's
//! keyspace instead (SCAN + UNLINK, each step time-limited, requests still bypassing).
//! State changes are logged once each ([`crate::outage`]).

use std::collections::HashSet;
#[cfg(test)]
use std::sync::atomic::AtomicU64;
#[cfg(test)]
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;

use super::near::Near;
use super::{Backend, Bypassed, Slot, Version};
use crate::outage::Outage;

/// Lost invalidations remembered for replay; beyond this the keyspace is flushed instead.
pub(super) const MAX_LOST: usize = 50_000;

/// A new multiplexed connection to `client` that has answered a PING: connecting may take
/// `2 × timeout`, and every later command on it, and the PING, `timeout`. For every holder of a
/// Redis connection that handles outages itself (the cache backend, the gateway's shared limits).
pub async fn connect(
    client: &redis::Client,
    timeout: Duration,
) -> anyhow::Result<MultiplexedConnection> {
    open(client, timeout, None, redis::cmd("PING"), "PING").await
}

/// A new connection to `client` (with `push` receiving what the server pushes: RESP3) that
/// has answered `first`, within the limits of [`connect`].
async fn open(
    client: &redis::Client,
    timeout: Duration,
    push: Option<Arc<Near>>,
    first: redis::Cmd,
    what: &str,
) -> anyhow::Result<MultiplexedConnection> {
    let mut config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    if let Some(near) = push {
        config = config.set_push_sender(move |push: redis::PushInfo| {
            apply_push(&near, &push);
            Ok::<(), std::convert::Infallible>(())
        });
    }
    let mut conn = tokio::time::timeout(
        timeout * 2,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .context("connecting to redis timed out")?
    .context("connecting to redis")?;
    tokio::time::timeout(timeout, first.query_async::<()>(&mut conn))
        .await
        .with_context(|| format!("redis did not answer {what} in time"))?
        .with_context(|| format!("redis refused {what}"))?;
    Ok(conn)
}

/// Keys invalidated per pipelined round trip when replaying, and keys per SCAN step.
const BATCH: usize = 500;

pub(super) struct RedisBackend {
    shared: Arc<Shared>,
    /// The near copy of what this process read (`None`: off), see `near.rs`.
    near: Option<Arc<Near>>,
    store_script: redis::Script,
    max_group_members: u64,
    /// Commands (or pipelines, or scripts) sent by requests, for tests that count round trips.
    #[cfg(test)]
    round_trips: AtomicU64,
}

/// What the requests and the recovery task share.
struct Shared {
    client: redis::Client,
    /// The near copy, emptied whenever the connection changes or goes out of service.
    near: Option<Arc<Near>>,
    timeout: Duration,
    retry_after: Duration,
    /// Keys of this service start with it; flushed after an outage that lost too much.
    namespace: String,
    /// The connection requests use; `None` while Redis is down or being recovered. Changed only
    /// with `lost` held.
    live: RwLock<Option<MultiplexedConnection>>,
    lost: Mutex<Lost>,
    /// The first connection attempt, awaited by the requests that arrive before it ends.
    first: tokio::sync::OnceCell<()>,
    outage: Outage,
}

#[derive(Default)]
struct Lost {
    keys: HashSet<String>,
    /// More than [`MAX_LOST`] keys were lost: flush the namespace.
    overflowed: bool,
    /// The recovery task is running.
    recovering: bool,
}

impl Lost {
    fn add(&mut self, keys: impl IntoIterator<Item = String>) {
        if self.overflowed {
            return;
        }
        self.keys.extend(keys);
        if self.keys.len() > MAX_LOST {
            self.keys = HashSet::new();
            self.overflowed = true;
        }
    }
}

/// A failure that means Redis (or the way to it) is gone, rather than a refused command.
fn is_outage(err: &redis::RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
}

impl RedisBackend {
    pub(super) fn new(
        url: &str,
        timeout: Duration,
        retry_after: Duration,
        namespace: String,
        max_group_members: u64,
        near: Option<Near>,
    ) -> anyhow::Result<Self> {
        let outage = Outage::new(format!("cache (redis, {namespace}*)"));
        let mut client = redis::Client::open(url).context("parsing redis.url")?;
        if near.is_some() {
            // Client tracking pushes its invalidations on the connection itself: RESP3.
            let info = client.get_connection_info().clone();
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            client = redis::Client::open(info.set_redis_settings(settings))
                .context("parsing redis.url")?;
        }
        let near = near.map(Arc::new);
        Ok(Self {
            near: near.clone(),
            shared: Arc::new(Shared {
                client,
                near,
                timeout,
                retry_after,
                namespace,
                live: RwLock::new(None),
                lost: Mutex::new(Lost::default()),
                first: tokio::sync::OnceCell::new(),
                outage,
            }),
            store_script: redis::Script::new(STORE_SCRIPT),
            max_group_members,
            #[cfg(test)]
            round_trips: AtomicU64::new(0),
        })
    }

    /// The connection in service, if any. Before the first attempt to connect has ended, waits
    /// for it (one attempt, shared), so a new process uses Redis from its first request.
    async fn connection(&self) -> Option<MultiplexedConnection> {
        if let Some(conn) = self.shared.live() {
            return Some(conn);
        }
        let shared = &self.shared;
        shared
            .first
            .get_or_init(|| async {
                match shared.connect().await {
                    Ok(conn) => shared.put_in_service(conn),
                    Err(err) => Shared::went_down(shared, &err, []),
                }
            })
            .await;
        shared.live()
    }

    /// Runs one command set with the time limit. While Redis is out of service the call is not
    /// made ([`Bypassed`]); a failure that means an outage takes the connection out of service.
    async fn run<T, F>(&self, op: F) -> anyhow::Result<T>
    where
        F: AsyncFnOnce(&mut MultiplexedConnection) -> redis::RedisResult<T>,
    {
        let Some(mut conn) = self.connection().await else {
            return Err(Bypassed.into());
        };
        #[cfg(test)]
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.shared.timeout, op(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                if is_outage(&err) {
                    Shared::went_down(&self.shared, &err, []);
                }
                Err(anyhow::Error::new(err).context("redis command failed"))
            }
            Err(_) => {
                let err = anyhow::anyhow!("redis timed out after {:?}", self.shared.timeout);
                Shared::went_down(&self.shared, &err, []);
                Err(err)
            }
        }
    }
}

impl Shared {
    fn live(&self) -> Option<MultiplexedConnection> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lock_lost(&self) -> std::sync::MutexGuard<'_, Lost> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection that has answered a PING, within the time limits; with the near cache
    /// on, one that Redis tracks (its invalidations applied to the near copy as they arrive).
    async fn connect(&self) -> anyhow::Result<MultiplexedConnection> {
        let Some(near) = &self.near else {
            return connect(&self.client, self.timeout).await;
        };
        let mut tracking = redis::cmd("CLIENT");
        tracking.arg("TRACKING").arg("ON");
        let what = "CLIENT TRACKING ON (the near cache needs Redis 6 or later, over RESP3)";
        open(
            &self.client,
            self.timeout,
            Some(near.clone()),
            tracking,
            what,
        )
        .await
    }

    fn put_in_service(&self, conn: MultiplexedConnection) {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        // A new connection tracks nothing yet: nothing read before it can be trusted.
        if let Some(near) = &self.near {
            near.clear(true);
        }
        *live = Some(conn);
        drop(live);
        self.outage.succeeded();
    }

    /// Takes Redis out of service after `err` (remembering `lost` invalidations) and starts the
    /// recovery task unless it runs already.
    fn went_down(
        this: &Arc<Self>,
        err: &dyn std::fmt::Display,
        lost: impl IntoIterator<Item = String>,
    ) {
        let mut state = this.lock_lost();
        *this.live.write().unwrap_or_else(|p| p.into_inner()) = None;
        // Invalidations may be lost from now on: no near copy is served until a new connection.
        if let Some(near) = &this.near {
            near.clear(false);
        }
        state.add(lost);
        this.outage.failed(err);
        if !state.recovering {
            state.recovering = true;
            tokio::spawn(Self::recover(Arc::downgrade(this)));
        }
    }

    /// Remembers an invalidation made while Redis is out of service; false if it is back in
    /// service meanwhile (then send it).
    fn defer(&self, keys: &[String]) -> bool {
        let mut state = self.lock_lost();
        if self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return false;
        }
        state.add(keys.iter().cloned());
        true
    }

    /// The recovery task: every `retry_after`, a new connection; once one answers, the lost
    /// invalidations are replayed (or the keyspace flushed) and the connection is put in
    /// service. Ends when that is done, or when the cache is dropped.
    async fn recover(this: Weak<Self>) {
        loop {
            let Some(retry_after) = this.upgrade().map(|s| s.retry_after) else {
                return;
            };
            tokio::time::sleep(retry_after).await;
            let Some(shared) = this.upgrade() else {
                return;
            };
            let mut conn = match shared.connect().await {
                Ok(conn) => conn,
                Err(err) => {
                    shared.outage.failed(&format_args!("{err:#}"));
                    continue;
                }
            };
            loop {
                let (keys, overflowed) = {
                    let mut state = shared.lock_lost();
                    if state.keys.is_empty() && !state.overflowed {
                        // Everything lost has reached Redis: trust it again.
                        state.recovering = false;
                        shared.put_in_service(conn);
                        return;
                    }
                    (
                        std::mem::take(&mut state.keys),
                        std::mem::take(&mut state.overflowed),
                    )
                };
                let result = if overflowed {
                    shared.flush_namespace(&mut conn).await
                } else {
                    shared.replay(&mut conn, &keys).await
                };
                if let Err(err) = result {
                    let mut state = shared.lock_lost();
                    state.overflowed |= overflowed;
                    state.add(keys);
                    drop(state);
                    shared.outage.failed(&format_args!("{err:#}"));
                    break;
                }
            }
        }
    }

    /// Sends the invalidations that an outage kept from Redis, a batch per round trip.
    async fn replay(
        &self,
        conn: &mut MultiplexedConnection,
        keys: &HashSet<String>,
    ) -> anyhow::Result<()> {
        let keys: Vec<&String> = keys.iter().collect();
        for batch in keys.chunks(BATCH) {
            let pipe = delete_pipeline(batch.iter().copied());
            tokio::time::timeout(self.timeout * 4, pipe.query_async::<()>(conn))
                .await
                .context("replaying invalidations timed out")?
                .context("replaying invalidations")?;
        }
        tracing::info!(
            namespace = %self.namespace,
            keys = keys.len(),
            "replayed the cache invalidations a redis outage had kept back"
        );
        Ok(())
    }

    /// Removes every key of the namespace, one time-limited SCAN step at a time.
    async fn flush_namespace(&self, conn: &mut MultiplexedConnection) -> anyhow::Result<()> {
        let pattern = format!("{}*", self.namespace);
        let mut cursor: u64 = 0;
        let mut removed = 0usize;
        loop {
            let step = async {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(BATCH)
                    .query_async(conn)
                    .await?;
                if !keys.is_empty() {
                    // Versions go too: a load in flight then finds no version and stores
                    // nothing it read before the flush.
                    let _: () = redis::cmd("UNLINK").arg(&keys).query_async(conn).await?;
                }
                redis::RedisResult::Ok((next, keys.len()))
            };
            let (next, count) = tokio::time::timeout(self.timeout * 4, step)
                .await
                .context("flushing the cache namespace timed out")?
                .context("flushing the cache namespace")?;
            removed += count;
            if next == 0 {
                break;
            }
            cursor = next;
        }
        tracing::info!(
            namespace = %self.namespace,
            keys = removed,
            "flushed the cache namespace: a redis outage kept back more invalidations than \
             are remembered"
        );
        Ok(())
    }
}

/// Invalidates `keys`: bumps each version (kept [`VERSION_TTL_MS`]) and unlinks the entry (UNLINK
/// frees a large group in the background instead of blocking Redis).
fn delete_pipeline<'a>(keys: impl IntoIterator<Item = &'a String>) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for key in keys {
        let version = version_key(key);
        pipe.cmd("INCR").arg(&version).ignore();
        pipe.cmd("PEXPIRE")
            .arg(&version)
            .arg(VERSION_TTL_MS)
            .ignore();
        pipe.cmd("UNLINK").arg(key).ignore();
    }
    pipe
}

/// Where the version of a key or group lives: `<key>` + this.
pub(super) const VERSION_SUFFIX: &str = ":ver";

fn version_key(base: &str) -> String {
    super::concat(&[base, VERSION_SUFFIX])
}

/// What Redis (or the library) pushed on the tracked connection, applied to the near copy: the
/// keys an `invalidate` names are forgotten; a flush (`invalidate` with no keys) or a
/// disconnection forgets everything.
pub(super) fn apply_push(near: &Near, push: &redis::PushInfo) {
    match push.kind {
        redis::PushKind::Invalidate => {
            let keys: Option<Vec<&str>> = match push.data.first() {
                Some(redis::Value::Array(keys)) => keys
                    .iter()
                    .map(|key| match key {
                        redis::Value::BulkString(key) => std::str::from_utf8(key).ok(),
                        redis::Value::SimpleString(key) => Some(key.as_str()),
                        _ => None,
                    })
                    .collect(),
                _ => None,
            };
            match keys {
                Some(keys) => near.forget(keys),
                None => near.flush(),
            }
        }
        redis::PushKind::Disconnection => near.flush(),
        _ => {}
    }
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
        let field = slot.field();
        let ticket = match &self.near {
            Some(near) => {
                if let Some(value) = near.get(slot.base(), field) {
                    // A hit needs no version: only a miss stores.
                    return Ok((Some(value), None));
                }
                Some(near.ticket(slot.base()))
            }
            None => None,
        };
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
        let value = value.map(Bytes::from);
        if let (Some(near), Some(ticket), Some(value)) = (&self.near, ticket, &value) {
            near.put(ticket, slot.base(), field, value.clone());
        }
        Ok((value, version))
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
        let field = slot.field();
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
        let mut conn = loop {
            if let Some(conn) = self.connection().await {
                break conn;
            }
            if self.shared.defer(keys) {
                // Kept for the recovery task to replay before Redis is trusted again.
                return Err(Bypassed.into());
            }
        };
        let pipe = delete_pipeline(keys);
        let forget = || {
            if let Some(near) = &self.near {
                near.forget(keys.iter().map(String::as_str));
            }
        };
        // Before: no read from now on keeps an older copy. After: a read that Redis answered
        // before the invalidation and that stored its copy meanwhile is dropped too (Redis pushes
        // this connection's own invalidation only after its reply).
        forget();
        #[cfg(test)]
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(self.shared.timeout, pipe.query_async::<()>(&mut conn))
            .await
            .map_err(|_| anyhow::anyhow!("redis timed out after {:?}", self.shared.timeout))
            .and_then(|sent| sent.context("redis invalidation failed"));
        forget();
        if let Err(err) = &result {
            // Whatever the failure, the entries may still be there: replay before trusting Redis.
            Shared::went_down(&self.shared, &format_args!("{err:#}"), keys.iter().cloned());
        }
        result
    }

    async fn ping(&self) -> anyhow::Result<()> {
        if self.connection().await.is_none() {
            anyhow::bail!(
                "redis is out of service; reconnecting every {:?} in the background",
                self.shared.retry_after
            );
        }
        self.run(async |c| redis::cmd("PING").query_async::<()>(c).await)
            .await
    }

    #[cfg(test)]
    fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    fn near_len(&self) -> Option<usize> {
        self.near.as_ref().map(|near| near.len())
    }
}

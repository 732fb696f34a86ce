//! The stores behind the cache API: one trait, and the in-process one here (Redis in
//! `redis_store`). Both account their own keyspace's size the same way ([`entry_size`]), so the
//! memory guard means the same on both.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

/// Bytes an entry is counted for: its key and value plus a fixed overhead (the bookkeeping a
/// store keeps per entry: Redis's object headers, the map slot and expiry index here).
pub fn entry_size(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64 + ENTRY_OVERHEAD
}

/// See [`entry_size`].
pub const ENTRY_OVERHEAD: u64 = 64;

/// A value read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub value: Bytes,
    /// Time left; `None`: no expiry.
    pub ttl: Option<Duration>,
}

/// What the store says about its memory.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// Bytes counted now (by the configured memory source).
    pub used_bytes: u64,
    /// The most counted at once since the start (or as Redis reports it).
    pub peak_bytes: u64,
    /// Entries in this service's keyspace.
    pub keys: u64,
    /// Flushes of the keyspace so far.
    pub flushes: u64,
}

/// A keyspace of this service's own.
#[async_trait]
pub trait Store: Send + Sync {
    /// `memory` or `redis`.
    fn backend(&self) -> &'static str;
    async fn get(&self, key: &str) -> anyhow::Result<Option<Found>>;
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> anyhow::Result<()>;
    /// Whether there was such a key.
    async fn delete(&self, key: &str) -> anyhow::Result<bool>;
    /// The memory figure the guard compares with its threshold.
    async fn used(&self) -> anyhow::Result<u64>;
    async fn usage(&self) -> anyhow::Result<Usage>;
    /// Empties this service's keyspace (nothing else) if its used memory, read again once any
    /// other flush has finished, is still at or over `threshold`; returns whether it flushed.
    async fn flush_if(&self, threshold: u64) -> anyhow::Result<bool>;
}

struct Entry {
    value: Bytes,
    expires: Option<Instant>,
    size: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<String, Entry>,
    /// Expiry order, to drop expired entries (and their bytes) without scanning the map.
    expiry: BTreeSet<(Instant, String)>,
    used: u64,
    peak: u64,
}

impl State {
    fn prune(&mut self, now: Instant) {
        while let Some(first) = self.expiry.first() {
            if first.0 > now {
                break;
            }
            let Some((_, key)) = self.expiry.pop_first() else {
                break;
            };
            self.remove(&key);
        }
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.entries.remove(key) {
            Some(entry) => {
                self.used -= entry.size;
                if let Some(at) = entry.expires {
                    self.expiry.remove(&(at, key.to_owned()));
                }
                true
            }
            None => false,
        }
    }
}

/// The in-process store (no `redis.url`).
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    flushes: AtomicU64,
}

impl MemoryStore {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.prune(Instant::now());
        state
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, key: &str) -> anyhow::Result<Option<Found>> {
        let state = self.state();
        let now = Instant::now();
        Ok(state.entries.get(key).map(|entry| Found {
            value: entry.value.clone(),
            ttl: entry.expires.map(|at| at.saturating_duration_since(now)),
        }))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> anyhow::Result<()> {
        let mut state = self.state();
        state.remove(key);
        let expires = ttl.map(|ttl| Instant::now() + ttl);
        let size = entry_size(key, &value);
        if let Some(at) = expires {
            state.expiry.insert((at, key.to_owned()));
        }
        state.entries.insert(
            key.to_owned(),
            Entry {
                value,
                expires,
                size,
            },
        );
        state.used += size;
        state.peak = state.peak.max(state.used);
        Ok(())
    }

    async fn delete(&self, key: &str) -> anyhow::Result<bool> {
        Ok(self.state().remove(key))
    }

    async fn used(&self) -> anyhow::Result<u64> {
        Ok(self.state().used)
    }

    async fn usage(&self) -> anyhow::Result<Usage> {
        let state = self.state();
        Ok(Usage {
            used_bytes: state.used,
            peak_bytes: state.peak,
            keys: state.entries.len() as u64,
            flushes: self.flushes.load(Ordering::Relaxed),
        })
    }

    async fn flush_if(&self, threshold: u64) -> anyhow::Result<bool> {
        let mut state = self.state();
        if state.used < threshold {
            return Ok(false);
        }
        state.entries.clear();
        state.expiry.clear();
        state.used = 0;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sizes_are_accounted_through_replace_delete_and_expiry() {
        let store = MemoryStore::default();
        store
            .set("a", Bytes::from_static(b"12345"), None)
            .await
            .expect("set");
        assert_eq!(store.used().await.expect("used"), entry_size("a", b"12345"));
        store
            .set("a", Bytes::from_static(b"1"), None)
            .await
            .expect("replace");
        assert_eq!(store.used().await.expect("used"), entry_size("a", b"1"));
        store
            .set(
                "b",
                Bytes::from_static(b"x"),
                Some(Duration::from_millis(1)),
            )
            .await
            .expect("set");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(store.get("b").await.expect("get"), None, "expired");
        assert_eq!(store.used().await.expect("used"), entry_size("a", b"1"));
        assert!(store.delete("a").await.expect("delete"));
        assert!(!store.delete("a").await.expect("delete"));
        let usage = store.usage().await.expect("usage");
        assert_eq!((usage.used_bytes, usage.keys), (0, 0));
        assert_eq!(
            usage.peak_bytes,
            entry_size("a", b"1") + entry_size("b", b"x")
        );
    }

    #[tokio::test]
    async fn flush_only_when_still_over() {
        let store = MemoryStore::default();
        store
            .set("a", Bytes::from_static(b"1"), None)
            .await
            .expect("set");
        assert!(!store.flush_if(10_000).await.expect("flush"));
        assert!(store.flush_if(1).await.expect("flush"));
        let usage = store.usage().await.expect("usage");
        assert_eq!((usage.used_bytes, usage.keys, usage.flushes), (0, 0, 1));
    }
}

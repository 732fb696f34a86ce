//! The in-process backend: moka with per-entry TTL and a byte budget (`cache.max_memory_mb`).
//!
//! Entries live under `<key>#<version>` (`<group>#<version>\x1f<field>` for group members), so
//! bumping a version orphans every entry stored under the old one at once, and a load that
//! captured an old version can only store where nobody looks any more (it ages out or is evicted
//! by the budget). Versions are a local map, so reading one with the value costs nothing.
//!
//! A group behaves as in Redis: its members expire together, TTL after the first one was stored
//! (later stores do not extend that), and it holds at most `cache.max_group_members` of them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Backend, Slot, Version};

/// foldhash rather than SipHash for the keys looked up on every cached read: they are built by
/// the services (a kind and an id), and foldhash's seed is random per process.
type Hasher = foldhash::fast::RandomState;

pub(super) struct MemoryBackend {
    entries: moka::future::Cache<String, (Bytes, Duration), Hasher>,
    /// Versions of the keys and groups invalidated so far.
    versions: Mutex<HashMap<String, u64, Hasher>>,
    /// The current lifetime of each group (one entry per group name, which code chooses).
    groups: Mutex<HashMap<String, GroupWindow>>,
    max_group_members: u64,
}

/// One lifetime of a group: from its first stored member until `expires`.
struct GroupWindow {
    version: u64,
    expires: Instant,
    members: u64,
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
    pub(super) fn new(budget_bytes: u64, max_group_members: u64) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(budget_bytes)
            .weigher(|key: &String, value: &(Bytes, Duration)| {
                u32::try_from(key.len() + value.0.len() + 64).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .build_with_hasher(Hasher::default());
        Self {
            entries,
            versions: Mutex::default(),
            groups: Mutex::new(HashMap::new()),
            max_group_members,
        }
    }

    /// How long a new member of `group` may live, or `None` when the group is full.
    fn member_ttl(
        &self,
        group: &str,
        entry_key: &str,
        version: u64,
        ttl: Duration,
    ) -> Option<Duration> {
        let now = Instant::now();
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let window = groups.entry(group.to_owned()).or_insert(GroupWindow {
            version,
            expires: now + ttl,
            members: 0,
        });
        if window.version != version || now >= window.expires {
            *window = GroupWindow {
                version,
                expires: now + ttl,
                members: 0,
            };
        }
        if !self.entries.contains_key(entry_key) {
            if window.members >= self.max_group_members {
                return None;
            }
            window.members += 1;
        }
        Some(window.expires - now)
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
        let mut digits = itoa::Buffer::new();
        let version = digits.format(version);
        match slot {
            Slot::Key(key) => super::concat(&[key, "#", version]),
            Slot::Field(group, field) => super::concat(&[group, "#", version, "\u{1f}", field]),
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, slot: &Slot) -> anyhow::Result<(Option<Bytes>, Version)> {
        let version = self.current(slot.base());
        let key = Self::entry_key(slot, version);
        let value = self.entries.get(&key).await.map(|(bytes, _)| bytes);
        Ok((value, Some(version)))
    }

    async fn set(
        &self,
        slot: &Slot,
        value: Bytes,
        ttl: Duration,
        version: Version,
    ) -> anyhow::Result<()> {
        let version = version.unwrap_or(0);
        if version != self.current(slot.base()) {
            return Ok(());
        }
        let key = Self::entry_key(slot, version);
        let ttl = match slot {
            Slot::Key(_) => ttl,
            Slot::Field(group, _) => match self.member_ttl(group, &key, version, ttl) {
                Some(ttl) => ttl,
                None => return Ok(()),
            },
        };
        self.entries.insert(key, (value, ttl)).await;
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

//! The near cache: a copy, in the process's memory, of the Redis entries it read lately, so a hot
//! key is served without a round trip.
//!
//! It is only as fresh as Redis tells it to be. The cache's connection runs RESP3 with client
//! tracking (`CLIENT TRACKING ON`): Redis remembers every key the connection read and pushes an
//! `invalidate` message on that connection when one changes, whoever changed it (another replica,
//! an expiry, a flush). The push is applied in the connection's own read task, before any reply
//! that followed it on the wire, and Redis sends it to the other replicas before it answers the
//! writer, so a write through any replica reaches every near copy within a few microseconds on a
//! healthy connection.
//!
//! What could still make a copy stale is covered on each side:
//! - A read that raced an invalidation: a read stores its value only if no invalidation of its
//!   key (nor a disconnection) happened since before it was sent ([`Near::ticket`]).
//! - This process's own writes: [`Near::forget`] runs before the invalidation is sent to Redis
//!   and again after Redis answered it (Redis sends its push about a key to the client that
//!   changed it only after its reply), so a read after the write never sees the old value.
//! - A connection that dropped: everything is forgotten on the library's disconnection notice and
//!   whenever the backend takes Redis out of service; the copy is used again only once a new
//!   tracked connection is in service.
//! - A connection that went silent without dropping (a partition): no entry is served longer than
//!   `cache.near_ttl_ms` after it was read from Redis, so the next read goes to Redis, which then
//!   times out and takes Redis out of service as any failure does.
//!
//! The copy holds at most `cache.max_memory_mb`; past that, expired entries go first, then all.

use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How many invalidation stamps there are; keys share them by hash. A collision only costs a
/// copy not kept, never a stale one.
const STAMPS: usize = 256;

/// Bytes counted for an entry beyond its key, field and value (the map's own bookkeeping).
const ENTRY_OVERHEAD: usize = 96;

pub(super) struct Near {
    /// How long a copy is served after it was read from Redis.
    ttl: Duration,
    max_bytes: usize,
    state: Mutex<State>,
    /// Bumped by every invalidation of the keys hashing to it.
    stamps: Box<[AtomicU64]>,
    /// Bumped by every disconnection and every change of connection: voids every ticket.
    epoch: AtomicU64,
    hasher: std::hash::RandomState,
}

#[derive(Default)]
struct State {
    /// A tracked connection is in service: copies may be stored and served.
    on: bool,
    /// Keyed by the Redis key (a plain key, or a group's hash); a plain key's field is "".
    entries: HashMap<String, Vec<Member>>,
    bytes: usize,
}

struct Member {
    field: String,
    value: Bytes,
    expires: Instant,
}

impl Member {
    /// What the members of `key` count against `max_bytes`.
    fn sizes(key: &str, members: &[Member]) -> usize {
        members
            .iter()
            .map(|m| entry_size(key, &m.field, &m.value))
            .sum()
    }
}

/// What one copy counts against `max_bytes`: its key, field and value, and the bookkeeping
/// around them.
fn entry_size(key: &str, field: &str, value: &[u8]) -> usize {
    key.len() + field.len() + value.len() + ENTRY_OVERHEAD
}

/// Taken before a read is sent to Redis; its value is stored only if the ticket is still good.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ticket {
    stamp: usize,
    stamp_before: u64,
    epoch_before: u64,
}

impl Near {
    /// `None` when `ttl` is zero: the near cache is off and every read goes to Redis.
    pub(super) fn new(ttl: Duration, max_bytes: usize) -> Option<Self> {
        (!ttl.is_zero()).then(|| Self {
            ttl,
            max_bytes,
            state: Mutex::new(State::default()),
            stamps: (0..STAMPS).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
            hasher: std::hash::RandomState::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stamp_of(&self, key: &str) -> usize {
        usize::try_from(self.hasher.hash_one(key) % STAMPS as u64).unwrap_or(0)
    }

    /// The copy of `field` of `key` ("" for a plain key), if there is a fresh one.
    pub(super) fn get(&self, key: &str, field: &str) -> Option<Bytes> {
        let state = self.lock();
        if !state.on {
            return None;
        }
        let member = state.entries.get(key)?.iter().find(|m| m.field == field)?;
        (member.expires > Instant::now()).then(|| member.value.clone())
    }

    /// Taken before reading `key` from Redis, for [`Near::put`].
    pub(super) fn ticket(&self, key: &str) -> Ticket {
        let stamp = self.stamp_of(key);
        // The epoch first: a disconnection between the two loads then voids the ticket too.
        let epoch_before = self.epoch.load(Ordering::Acquire);
        Ticket {
            stamp,
            stamp_before: self.stamps[stamp].load(Ordering::Acquire),
            epoch_before,
        }
    }

    /// Keeps what a read found, unless something was invalidated or the connection changed since
    /// its ticket was taken. Checked under the lock that [`Near::forget`] and [`Near::clear`] hold
    /// while they bump, so a value is never stored after the invalidation that voided it.
    pub(super) fn put(&self, ticket: Ticket, key: &str, field: &str, value: Bytes) {
        let mut state = self.lock();
        if !state.on
            || self.stamps[ticket.stamp].load(Ordering::Acquire) != ticket.stamp_before
            || self.epoch.load(Ordering::Acquire) != ticket.epoch_before
        {
            return;
        }
        let size = entry_size(key, field, &value);
        if size > self.max_bytes {
            return;
        }
        if state.bytes + size > self.max_bytes {
            state.make_room(size, self.max_bytes);
        }
        let expires = Instant::now() + self.ttl;
        let state = &mut *state;
        let members = state.entries.entry(key.to_owned()).or_default();
        match members.iter_mut().find(|m| m.field == field) {
            Some(member) => {
                state.bytes = state.bytes - member.value.len() + value.len();
                member.value = value;
                member.expires = expires;
            }
            None => {
                state.bytes += size;
                members.push(Member {
                    field: field.to_owned(),
                    value,
                    expires,
                });
            }
        }
    }

    /// Drops the copies of `keys` (plain keys, groups or their version keys) and voids the
    /// tickets of reads still on their way.
    pub(super) fn forget<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let mut state = self.lock();
        for key in keys {
            // A change of `<key>:ver` (an invalidation) voids `<key>` as well.
            let base = key.strip_suffix(super::redis::VERSION_SUFFIX);
            for key in std::iter::once(key).chain(base) {
                self.stamps[self.stamp_of(key)].fetch_add(1, Ordering::AcqRel);
                state.remove(key);
            }
        }
    }

    /// Forgets everything; `on` says whether copies may be kept from now on (a tracked
    /// connection is in service) or not (Redis is out of service, or a connection dropped).
    pub(super) fn clear(&self, on: bool) {
        let mut state = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        state.entries = HashMap::new();
        state.bytes = 0;
        state.on = on;
    }

    /// Forgets everything, leaving the near cache on or off as it is (a `FLUSHDB`, or a
    /// connection that dropped while another one may already be in service).
    pub(super) fn flush(&self) {
        let on = self.lock().on;
        self.clear(on);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().entries.values().map(Vec::len).sum()
    }
}

impl State {
    fn remove(&mut self, key: &str) {
        if let Some(members) = self.entries.remove(key) {
            self.bytes -= Member::sizes(key, &members);
        }
    }

    /// Expired entries first; if that is not enough, everything.
    fn make_room(&mut self, size: usize, max_bytes: usize) {
        let now = Instant::now();
        let mut bytes = 0;
        self.entries.retain(|key, members| {
            members.retain(|m| m.expires > now);
            bytes += Member::sizes(key, members);
            !members.is_empty()
        });
        self.bytes = bytes;
        if self.bytes + size > max_bytes {
            self.entries = HashMap::new();
            self.bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(ttl_ms: u64, max_bytes: usize) -> Near {
        let near = Near::new(Duration::from_millis(ttl_ms), max_bytes).expect("on");
        near.clear(true);
        near
    }

    fn bytes(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn a_read_that_raced_an_invalidation_is_not_kept() {
        let near = near(60_000, 1 << 20);
        let ticket = near.ticket("k");
        near.forget(["k"]);
        near.put(ticket, "k", "", bytes("old"));
        assert_eq!(near.get("k", ""), None, "voided by the key's invalidation");

        let ticket = near.ticket("g");
        near.forget(["g:ver"]);
        near.put(ticket, "g", "p1", bytes("old"));
        assert_eq!(near.get("g", "p1"), None, "voided by its version's change");

        let ticket = near.ticket("k");
        near.flush();
        near.put(ticket, "k", "", bytes("old"));
        assert_eq!(
            near.get("k", ""),
            None,
            "voided by a flush or a disconnection"
        );

        let ticket = near.ticket("k");
        near.put(ticket, "k", "", bytes("new"));
        assert_eq!(near.get("k", "").as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn nothing_is_kept_or_served_while_off() {
        let near = near(60_000, 1 << 20);
        near.put(near.ticket("k"), "k", "", bytes("v"));
        near.clear(false);
        assert_eq!(near.get("k", ""), None);
        near.put(near.ticket("k"), "k", "", bytes("v"));
        assert_eq!(near.len(), 0, "not stored while Redis is out of service");
        near.clear(true);
        near.put(near.ticket("k"), "k", "", bytes("v"));
        assert_eq!(near.get("k", "").as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn a_copy_lives_near_ttl_and_a_group_goes_as_a_whole() {
        let near = near(30, 1 << 20);
        near.put(near.ticket("g"), "g", "p1", bytes("1"));
        near.put(near.ticket("g"), "g", "p2", bytes("2"));
        assert_eq!(near.len(), 2);
        near.forget(["g"]);
        assert_eq!(near.len(), 0, "every member of the group");
        near.put(near.ticket("k"), "k", "", bytes("v"));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(near.get("k", ""), None, "expired");
    }

    #[test]
    fn the_copy_stays_within_its_budget() {
        let max = 10 * (ENTRY_OVERHEAD + 16);
        let near = near(60_000, max);
        for i in 0..1000 {
            let key = format!("key:{i:04}");
            near.put(near.ticket(&key), &key, "", bytes("value"));
            assert!(near.lock().bytes <= max, "{} > {max}", near.lock().bytes);
        }
        let key = "key:0999";
        assert!(near.get(key, "").is_some(), "the latest is kept");
        near.put(near.ticket("big"), "big", "", Bytes::from(vec![0; max]));
        assert_eq!(
            near.get("big", ""),
            None,
            "larger than the budget: not kept"
        );
    }
}

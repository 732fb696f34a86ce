//! Tests of the cache front end on both backends (Redis through `crate::testing`).

use super::*;
use std::time::Instant;

fn memory_cache() -> Cache {
    Cache::new(&Settings::defaults(), "t").expect("memory cache")
}

#[test]
fn item_keys_are_kind_colon_id() {
    assert_eq!(item_key("user", 1), "user:1");
    assert_eq!(item_key("order", -42), "order:-42");
    assert_eq!(
        item_key("product", i64::MAX),
        format!("product:{}", i64::MAX)
    );
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

/// A miss is one read (value + version) and one store; a hit is one read; an invalidation is one
/// atomic pipeline. For a plain key and a group member alike. (With the near copy off: with it,
/// most hits make none, below.)
#[tokio::test]
async fn redis_round_trips_per_miss_and_hit() {
    let mut env = crate::testing::TestEnv::new(crate::testing::Backend::Postgres).await;
    env.settings.cache.near_ttl_ms = 0;
    let cache = Cache::new(&env.settings, "t").expect("redis cache");
    cache.ping().await.expect("redis answers");
    let load = || async { Ok(Some(Bytes::from_static(b"v"))) };
    for group in [None, Some("list")] {
        let read = async || match group {
            None => cache.get_or_load("k", Ttl::Item, load).await,
            Some(group) => cache.get_or_load_in(group, "p1", Ttl::List, load).await,
        };
        let before = cache.round_trips();
        assert_eq!(read().await.expect("miss").as_deref(), Some(&b"v"[..]));
        let miss = cache.round_trips() - before;
        let before = cache.round_trips();
        assert_eq!(read().await.expect("hit").as_deref(), Some(&b"v"[..]));
        let hit = cache.round_trips() - before;
        assert_eq!(
            (miss, hit),
            (2, 1),
            "{group:?}: round trips of a miss, a hit"
        );

        let before = cache.round_trips();
        match group {
            None => cache.invalidate(&["k".to_owned()]).await,
            Some(group) => cache.invalidate_group(group).await,
        }
        assert_eq!(cache.round_trips() - before, 1, "{group:?}: invalidation");
        let before = cache.round_trips();
        read().await.expect("miss after invalidation");
        assert_eq!(
            cache.round_trips() - before,
            2,
            "{group:?}: a miss after an invalidation"
        );
    }
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses, stats.errors), (2, 4, 0));
}

/// A request that misses while another flight of its key stores and leaves the flight table
/// reads the cache once more (its completion stamp moved) instead of loading a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_overtaken_by_a_finished_flight_does_not_load_again() {
    let env = crate::testing::TestEnv::new(crate::testing::Backend::Postgres).await;
    let redis = Cache::new(&env.settings, "t").expect("redis cache");
    for cache in [memory_cache(), redis] {
        // The moment between a request's read and its flight, replayed by hand: the stamp and
        // version as seen by a request that missed, then another flight stores.
        let slot = Slot::Key(cache.key("k"));
        let stamp = cache.stamp_of(&slot);
        let stamp_before = cache.inner.stamps[stamp].load(Ordering::Acquire);
        let (value, version) = cache.inner.backend.get(&slot).await.expect("read");
        assert!(value.is_none());
        cache
            .get_or_load("k", Ttl::Item, || async {
                Ok(Some(Bytes::from_static(b"first")))
            })
            .await
            .expect("the other flight loads");

        let miss = Miss {
            version: Some(version),
            stamp,
            stamp_before,
        };
        let second = cache.flight(slot.clone(), Ttl::Item, slot.flight_key(), miss, async {
            Ok(Some(Bytes::from_static(b"second")))
        });
        assert_eq!(
            second.await.expect("flight").as_deref(),
            Some(&b"first"[..]),
            "{}: the stored value, not a second load",
            cache.backend()
        );
        let stats = cache.stats();
        assert_eq!((stats.misses, stats.hits), (1, 1), "{}", cache.backend());
    }
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

/// A loader that panics fails its own read, and the next miss on the key loads again instead of
/// finding the dead flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_loader_does_not_poison_its_key() {
    let cache = memory_cache();
    let failed = cache
        .get_or_load("k", Ttl::Item, || async {
            if true {
                panic!("loader bug");
            }
            Ok(None)
        })
        .await;
    assert!(failed.is_err(), "the panicking read fails");
    let next = cache
        .get_or_load("k", Ttl::Item, || async {
            Ok(Some(Bytes::from_static(b"v")))
        })
        .await
        .expect("the next read loads again");
    assert_eq!(next.as_deref(), Some(&b"v"[..]));
}

/// 10,000 made-up list members (a filter value per request, as a hostile client sends them):
/// the first `max_group_members` are cached, the rest are served from the loader and take no
/// room; and a group's lifetime starts at its first member, not extended by later ones.
async fn a_group_stays_bounded_in_members_and_lifetime(mut settings: Settings) -> Cache {
    settings.cache.max_group_members = 50;
    settings.cache.list_ttl_secs = 120;
    let cache = Cache::new(&settings, "t").expect("cache");
    let loads = Arc::new(AtomicU64::new(0));
    let read = async |cache: &Cache, field: String| {
        let (counter, value) = (loads.clone(), Bytes::from(field.clone()));
        cache
            .get_or_load_in("list", &field, Ttl::List, move || async move {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(Some(value))
            })
            .await
            .expect("served")
            .expect("found")
    };
    for i in 0..10_000 {
        assert_eq!(
            read(&cache, format!("category={i}")).await,
            format!("category={i}")
        );
    }
    assert_eq!(loads.load(Ordering::Relaxed), 10_000);
    let before = loads.load(Ordering::Relaxed);
    for i in 0..50 {
        read(&cache, format!("category={i}")).await;
    }
    assert_eq!(
        loads.load(Ordering::Relaxed),
        before,
        "the first 50 were cached"
    );
    for i in 50..100 {
        read(&cache, format!("category={i}")).await;
    }
    assert_eq!(
        loads.load(Ordering::Relaxed),
        before + 50,
        "members beyond the limit were not"
    );

    // Storing members does not extend the group's life: list_ttl after its first member.
    settings.cache.list_ttl_secs = 1;
    let short = Cache::new(&settings, "short").expect("cache");
    read(&short, "first".into()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    read(&short, "second".into()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = loads.load(Ordering::Relaxed);
    read(&short, "second".into()).await;
    assert_eq!(
        loads.load(Ordering::Relaxed),
        before + 1,
        "the later member expired with its group, 1 s after the first"
    );
    cache
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_groups_stay_bounded() {
    a_group_stays_bounded_in_members_and_lifetime(Settings::defaults()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_groups_stay_bounded_in_keys_members_and_lifetime() {
    let env = crate::testing::TestEnv::new(crate::testing::Backend::Postgres).await;
    let cache = a_group_stays_bounded_in_members_and_lifetime(env.settings.clone()).await;
    assert_eq!(cache.stats().errors, 0, "Redis answered every call");

    // Fill the group again and count what is in Redis under this service's prefix.
    cache.invalidate_group("list").await;
    for i in 0..10_000 {
        cache
            .get_or_load_in("list", &format!("category={i}"), Ttl::List, || async {
                Ok(Some(Bytes::from_static(b"page")))
            })
            .await
            .expect("served");
    }
    let client = ::redis::Client::open(crate::testing::test_redis_url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{}*", env.settings.redis.prefix))
        .query_async(&mut conn)
        .await
        .expect("keys");
    // `t:list` and its version; `short:list`'s version (its group has expired).
    assert!(keys.len() <= 3, "the groups and their versions: {keys:?}");
    let group = format!("{}t:list", env.settings.redis.prefix);
    let members: u64 = ::redis::cmd("HLEN")
        .arg(&group)
        .query_async(&mut conn)
        .await
        .expect("hlen");
    assert_eq!(members, 50);
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(&group)
        .query_async(&mut conn)
        .await
        .expect("pttl");
    assert!((1..=120_000).contains(&ttl), "the group expires: {ttl} ms");
}

/// Redis goes away and comes back while four clients keep reading one key: the cache is back in
/// service within `retry_after` plus a small bound *while the load goes on* (it once stayed out
/// until the load stopped), the invalidation made during the outage is replayed before anything
/// is served from Redis again, and the outage is logged by state change, not per request.
#[tokio::test]
async fn redis_comes_back_under_load_with_the_lost_invalidations_replayed() {
    let proxy = crate::testing::CuttableProxy::start().await;
    let port = proxy.port;
    let mut env = crate::testing::TestEnv::new(crate::testing::Backend::Postgres).await;
    env.settings.redis.url = Some(format!("redis://127.0.0.1:{port}"));
    let retry_after = Duration::from_millis(300);
    env.settings.redis.retry_after_ms = 300;
    let cache = Cache::new(&env.settings, "t").expect("redis cache");
    let logs = crate::testing::CapturedLogs::start();

    // The "database": the value a load returns.
    let db = Arc::new(AtomicU64::new(1));
    let read = {
        let (cache, db) = (cache.clone(), db.clone());
        move || {
            let (cache, db) = (cache.clone(), db.clone());
            async move {
                let bytes = cache
                    .get_or_load("user:1", Ttl::Item, move || async move {
                        Ok(Some(Bytes::from(db.load(Ordering::SeqCst).to_string())))
                    })
                    .await
                    .expect("a read never fails");
                bytes.map(|b| String::from_utf8_lossy(&b).into_owned())
            }
        }
    };
    assert_eq!(read().await.as_deref(), Some("1"));
    assert_eq!(read().await.as_deref(), Some("1"));
    assert_eq!(cache.stats().hits, 1, "cached in Redis");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (read, stop) = (read.clone(), stop.clone());
            tokio::spawn(async move {
                let mut reads = 0u64;
                // Bounded: at most 200,000 reads or until told to stop.
                while !stop.load(Ordering::Relaxed) && reads < 200_000 {
                    read().await;
                    reads += 1;
                    tokio::task::yield_now().await;
                }
                reads
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A write during the outage: its invalidation cannot reach Redis.
    db.store(2, Ordering::SeqCst);
    cache.invalidate(&["user:1".to_owned()]).await;
    assert_eq!(read().await.as_deref(), Some("2"), "from the database");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let hits_before = cache.stats().hits;
    proxy.restore();
    let back = Instant::now();
    let bound = retry_after + Duration::from_secs(2);
    while cache.stats().hits == hits_before {
        assert!(
            back.elapsed() < bound,
            "hits did not resume within {bound:?} of Redis returning, under load: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        assert_eq!(
            read().await.as_deref(),
            Some("2"),
            "the entry the outage made stale is never served"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut reads = 0;
    for client in clients {
        reads += client.await.expect("client");
    }
    let stats = cache.stats();
    assert!(
        stats.bypassed > 100 && stats.errors < 20,
        "the outage is skipped, not retried per request ({reads} reads): {stats:?}"
    );

    let lines = logs.lines();
    let warnings = lines.iter().filter(|l| l.contains("WARN")).count();
    let back_lines = lines
        .iter()
        .filter(|l| l.contains("dependency is back"))
        .count();
    assert!(
        warnings <= 3 && back_lines == 1,
        "{reads} reads during an outage log its changes, not each request:\n{}",
        lines.join("\n")
    );
    assert!(
        lines.iter().any(|l| l.contains("replayed")),
        "the replay is logged:\n{}",
        lines.join("\n")
    );
}

/// `item_ttl_secs = 0` turns item caching off: every read loads, and none asks Redis.
#[tokio::test]
async fn a_ttl_of_zero_skips_the_cache_and_loads_every_time() {
    let env = crate::testing::TestEnv::new(crate::testing::Backend::Postgres).await;
    let mut settings = env.settings.clone();
    settings.cache.item_ttl_secs = 0;
    let redis = Cache::new(&settings, "t").expect("redis cache");
    redis.ping().await.expect("redis answers");
    let before = redis.round_trips();
    let loads = Arc::new(AtomicU64::new(0));
    for _ in 0..3 {
        let loads = loads.clone();
        let value = redis
            .get_or_load("k", Ttl::Item, move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(Some(Bytes::from_static(b"v")))
            })
            .await
            .expect("loaded");
        assert_eq!(value.as_deref(), Some(&b"v"[..]));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 3, "every read loads");
    assert_eq!(redis.round_trips() - before, 0, "no read reached Redis");
    assert_eq!(redis.stats().misses, 3);
}

/// Reads `key` through `cache`, loading `db`'s current value on a miss.
async fn read_through(cache: &Cache, key: &str, db: &Arc<AtomicU64>) -> String {
    let db = db.clone();
    let bytes = cache
        .get_or_load(key, Ttl::Item, move || async move {
            Ok(Some(Bytes::from(db.load(Ordering::SeqCst).to_string())))
        })
        .await
        .expect("a read never fails")
        .expect("found");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Two replicas of one service on one Redis, with a near copy that would outlive the test: only
/// Redis's pushes (and the replica's own invalidations) can keep them fresh.
async fn replicas() -> (crate::testing::TestEnv, Cache, Cache) {
    let mut env = crate::testing::TestEnv::new(crate::testing::Backend::Postgres).await;
    env.settings.cache.near_ttl_ms = 60_000;
    let a = Cache::new(&env.settings, "t").expect("redis cache");
    let b = Cache::new(&env.settings, "t").expect("redis cache");
    a.ping().await.expect("redis answers");
    b.ping().await.expect("redis answers");
    (env, a, b)
}

/// Reads of a hot key stop reaching Redis once the near copy holds it, and each replica's own
/// write is seen by its next read, with no wait.
#[tokio::test]
async fn redis_near_copy_serves_hits_without_a_round_trip_and_sees_its_own_writes() {
    let (_env, cache, _) = replicas().await;
    let db = Arc::new(AtomicU64::new(1));
    assert_eq!(read_through(&cache, "user:1", &db).await, "1");
    // The first hit may come just before Redis's push about the store: bounded, a few reads.
    let mut reads = 0;
    loop {
        let before = cache.round_trips();
        assert_eq!(read_through(&cache, "user:1", &db).await, "1");
        if cache.round_trips() == before {
            break;
        }
        reads += 1;
        assert!(reads < 5, "the near copy never kept the hot key");
    }
    let before = cache.round_trips();
    for _ in 0..100 {
        assert_eq!(read_through(&cache, "user:1", &db).await, "1");
    }
    assert_eq!(cache.round_trips() - before, 0, "100 hits, no round trip");

    for value in 2..12 {
        db.store(value, Ordering::SeqCst);
        cache.invalidate(&["user:1".to_owned()]).await;
        assert_eq!(
            read_through(&cache, "user:1", &db).await,
            value.to_string(),
            "a read right after this replica's write"
        );
        assert_eq!(read_through(&cache, "user:1", &db).await, value.to_string());
    }
    assert_eq!(cache.stats().errors, 0);
}

/// A write through another replica reaches this one's near copy through Redis's push: long
/// before the copy's own lifetime (a minute here) would end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_near_copy_drops_what_another_replica_changed() {
    let (_env, a, b) = replicas().await;
    let db = Arc::new(AtomicU64::new(1));
    for (key, group) in [("user:7", None), ("users", Some("page=1"))] {
        let read = async |cache: &Cache| match group {
            None => read_through(cache, key, &db).await,
            Some(field) => {
                let db = db.clone();
                let bytes = cache
                    .get_or_load_in(key, field, Ttl::List, move || async move {
                        Ok(Some(Bytes::from(db.load(Ordering::SeqCst).to_string())))
                    })
                    .await
                    .expect("read")
                    .expect("found");
                String::from_utf8_lossy(&bytes).into_owned()
            }
        };
        db.store(1, Ordering::SeqCst);
        // Until `a` serves the value from its near copy.
        let mut reads = 0;
        loop {
            let before = a.round_trips();
            assert_eq!(read(&a).await, "1");
            if a.round_trips() == before {
                break;
            }
            reads += 1;
            assert!(reads < 5, "{key}: the near copy never kept it");
        }
        for value in 2..7 {
            db.store(value, Ordering::SeqCst);
            b.invalidate(&[key.to_owned()]).await;
            let written = Instant::now();
            while read(&a).await != value.to_string() {
                assert!(
                    written.elapsed() < Duration::from_secs(2),
                    "{key}: replica a still serves the value replica b replaced"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(
                written.elapsed() < Duration::from_millis(500),
                "{key}: seen {:?} after the write",
                written.elapsed()
            );
        }
    }
    assert_eq!(a.stats().errors + b.stats().errors, 0);
}

/// Redis going away empties the near copy: nothing is served from it while invalidations could be
/// lost, and it fills again from the new connection.
#[tokio::test]
async fn redis_near_copy_is_emptied_when_the_connection_drops() {
    let proxy = crate::testing::CuttableProxy::start().await;
    let mut env = crate::testing::TestEnv::new(crate::testing::Backend::Postgres).await;
    env.settings.redis.url = Some(format!("redis://127.0.0.1:{}", proxy.port));
    env.settings.redis.retry_after_ms = 200;
    env.settings.cache.near_ttl_ms = 60_000;
    let cache = Cache::new(&env.settings, "t").expect("redis cache");
    let db = Arc::new(AtomicU64::new(1));
    for _ in 0..3 {
        read_through(&cache, "user:1", &db).await;
    }
    let near = cache.inner.backend.near_len().expect("the near copy is on");
    assert_eq!(near, 1, "the hot key is copied");

    proxy.cut();
    // The library's disconnection notice, or the first failed call, empties it.
    let cut = Instant::now();
    while cache.inner.backend.near_len() != Some(0) {
        assert!(cut.elapsed() < Duration::from_secs(2), "still copied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    db.store(2, Ordering::SeqCst);
    assert_eq!(
        read_through(&cache, "user:1", &db).await,
        "2",
        "from the database"
    );

    proxy.restore();
    let back = Instant::now();
    while cache.inner.backend.near_len() != Some(1) {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "the near copy never filled again: {:?}",
            cache.stats()
        );
        read_through(&cache, "user:1", &db).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What Redis pushes on the tracked connection: an `invalidate` naming keys forgets those (and
/// the entry a version key guards); one with no keys (a flush), or the library's disconnection
/// notice, forgets everything.
#[test]
fn pushes_forget_what_they_name_and_a_flush_forgets_everything() {
    use ::redis::{PushInfo, PushKind, Value};
    let near = near::Near::new(Duration::from_secs(60), 1 << 20).expect("on");
    let fill = || {
        near.clear(true);
        for key in ["a", "b", "c"] {
            near.put(near.ticket(key), key, "", Bytes::from_static(b"v"));
        }
    };
    let push = |kind, data| PushInfo { kind, data };
    let names = |keys: &[&str]| {
        Value::Array(
            keys.iter()
                .map(|k| Value::BulkString(k.as_bytes().to_vec()))
                .collect(),
        )
    };

    fill();
    redis::apply_push(
        &near,
        &push(PushKind::Invalidate, vec![names(&["a", "b:ver"])]),
    );
    assert_eq!(near.len(), 1, "a and b forgotten, c kept");
    assert!(near.get("c", "").is_some());

    fill();
    redis::apply_push(&near, &push(PushKind::Invalidate, vec![Value::Nil]));
    assert_eq!(near.len(), 0, "a flush");

    fill();
    redis::apply_push(&near, &push(PushKind::Disconnection, vec![]));
    assert_eq!(near.len(), 0, "a disconnection");

    fill();
    redis::apply_push(&near, &push(PushKind::Message, vec![names(&["a"])]));
    assert_eq!(near.len(), 3, "other pushes change nothing");
}

//! Shared memory against a real server: revision-checked writes, merge on conflict
//! with no lost updates, isolation by type, timed locks with fencing, and the
//! `create_with_ttl` defect worked around.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_bus::memory::{MemorySchema, ValueKind};
use flotilla_bus::{Bus, BusConfig, Counters, MemKey, MemoryConfig, MemoryError};
use flotilla_protocol::SessionId;
use flotilla_testkit::NatsServer;

async fn bus(server: &NatsServer, memory: MemoryConfig) -> Bus {
    let config = BusConfig {
        url: server.url(),
        memory,
        ..BusConfig::default()
    };
    Bus::connect(&config, "memory-test", Arc::new(Counters::default()))
        .await
        .unwrap()
}

fn key(k: &str) -> MemKey {
    MemKey::parse(k).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_checked_reads_and_writes() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server, MemoryConfig::default()).await;
    let mem = bus.memory().session(&SessionId::generate());
    // A clone made before any use shares the handle's counts (they are made lazily);
    // another session's handle has its own.
    let early = mem.clone();
    let other = bus.memory().session(&SessionId::generate());
    let k = key("plan");
    assert!(mem.get::<Vec<String>>(&k).await.unwrap().is_none());
    let r1 = mem.create(&k, &vec!["a".to_owned()]).await.unwrap();
    assert!(matches!(
        mem.create(&k, &vec!["b".to_owned()]).await,
        Err(MemoryError::Exists(_))
    ));
    let got = mem.get::<Vec<String>>(&k).await.unwrap().unwrap();
    assert_eq!(
        (got.value.clone(), got.revision),
        (vec!["a".to_owned()], r1)
    );
    let r2 = mem
        .compare_and_set(&k, r1, &vec!["a".to_owned(), "b".to_owned()])
        .await
        .unwrap();
    assert!(r2 > r1);
    // A stale revision conflicts and changes nothing.
    assert!(matches!(
        mem.compare_and_set(&k, r1, &vec!["lost".to_owned()]).await,
        Err(MemoryError::Conflict(_))
    ));
    assert_eq!(
        mem.get::<Vec<String>>(&k).await.unwrap().unwrap().value,
        vec!["a", "b"]
    );
    // Reading as the wrong type is a typed error, not a panic.
    assert!(matches!(
        mem.get::<u64>(&k).await,
        Err(MemoryError::Decode { .. })
    ));
    // Delete with an expected revision.
    assert!(matches!(
        mem.delete(&k, r1).await,
        Err(MemoryError::Conflict(_))
    ));
    mem.delete(&k, r2).await.unwrap();
    assert!(mem.get::<Vec<String>>(&k).await.unwrap().is_none());
    let stats = bus.memory().stats();
    assert!(stats.cas_attempts >= 4 && stats.conflicts >= 3, "{stats:?}");
    let own = mem.stats();
    assert!(own.cas_attempts >= 4 && own.conflicts >= 3, "{own:?}");
    assert_eq!(early.stats(), own);
    assert_eq!(other.stats(), flotilla_protocol::MemoryStats::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_template_refuses_undeclared_keys_and_wrong_types() {
    let server = NatsServer::start().unwrap();
    let schema = MemorySchema(BTreeMap::from([
        ("findings".to_owned(), ValueKind::List),
        ("budget".to_owned(), ValueKind::Number),
    ]));
    let bus = bus(
        &server,
        MemoryConfig {
            schema,
            ..MemoryConfig::default()
        },
    )
    .await;
    let mem = bus.memory().session(&SessionId::generate());
    mem.create(&key("findings"), &vec![1, 2]).await.unwrap();
    mem.create(&key("budget"), &42).await.unwrap();
    assert!(
        matches!(mem.create(&key("notes"), &"x").await, Err(MemoryError::UndeclaredKey(k)) if k == "notes")
    );
    assert!(matches!(
        mem.create(&key("budget"), &"forty-two").await,
        Err(MemoryError::WrongType {
            expected: ValueKind::Number,
            ..
        })
    ));
    let fresh = bus.memory().session(&SessionId::generate());
    let err = fresh
        .update_with(&key("findings"), |_: Option<String>| {
            "not a list".to_owned()
        })
        .await;
    assert!(
        matches!(
            err,
            Err(MemoryError::WrongType {
                expected: ValueKind::List,
                ..
            })
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_reaches_its_own_session_only() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server, MemoryConfig::default()).await;
    let (a, b) = (SessionId::generate(), SessionId::generate());
    let (ma, mb) = (bus.memory().session(&a), bus.memory().session(&b));
    ma.create(&key("x"), &"from a").await.unwrap();
    mb.create(&key("x"), &"from b").await.unwrap();
    assert_eq!(
        ma.get::<String>(&key("x")).await.unwrap().unwrap().value,
        "from a"
    );
    assert_eq!(
        mb.get::<String>(&key("x")).await.unwrap().unwrap().value,
        "from b"
    );
    // Every way to spell another session's key, or a wildcard, is refused before any
    // request is made: a key is one token.
    for bad in [
        "",
        &format!("{b}.x"),
        "../x",
        "x.y",
        "*",
        ">",
        "x*",
        "a b",
        "ключ",
        &"k".repeat(65),
    ] {
        assert!(
            matches!(MemKey::parse(bad), Err(MemoryError::InvalidKey(_))),
            "{bad:?} accepted"
        );
    }
    // Session ids are validated too: no handle for a session id with a dot or wildcard.
    assert!(SessionId::parse(format!("{a}.x")).is_err());
    assert!(SessionId::parse("*").is_err());
    // The raw bucket shows the two sessions' keys apart.
    let raw = bus.raw_js().get_key_value("flotilla-memory").await.unwrap();
    assert_eq!(
        &raw.get(format!("{a}.x")).await.unwrap().unwrap()[..],
        b"\"from a\""
    );
    assert_eq!(
        &raw.get(format!("{b}.x")).await.unwrap().unwrap()[..],
        b"\"from b\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_lose_nothing() {
    let server = NatsServer::start().unwrap();
    let session = SessionId::generate();
    // Writers on separate connections, as separate agents would be.
    let (writers, appends) = (8, 40);
    let mut set = tokio::task::JoinSet::new();
    for w in 0..writers {
        let bus = bus(&server, MemoryConfig::default()).await;
        let mem = bus.memory().session(&session);
        set.spawn(async move {
            for i in 0..appends {
                let item = format!("w{w}-{i}");
                mem.update_with(&key("list"), |l: Option<Vec<String>>| {
                    let mut l = l.unwrap_or_default();
                    l.push(item.clone());
                    l
                })
                .await
                .unwrap();
            }
            bus.memory().stats()
        });
    }
    let mut conflicts = 0;
    while let Some(stats) = set.join_next().await {
        conflicts += stats.unwrap().conflicts;
    }
    let reader = bus(&server, MemoryConfig::default()).await;
    let list: Vec<String> = reader
        .memory()
        .session(&session)
        .get(&key("list"))
        .await
        .unwrap()
        .unwrap()
        .value;
    let unique: HashSet<_> = list.iter().collect();
    assert_eq!(list.len(), writers * appends, "no lost updates");
    assert_eq!(unique.len(), list.len(), "no duplicates");
    assert!(conflicts > 0, "the writers really contended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_lock_fences_late_writes_and_expires_on_its_own() {
    let server = NatsServer::start().unwrap();
    let bus = bus(&server, MemoryConfig::default()).await;
    let mem = bus.memory().session(&SessionId::generate());
    let (lock, k) = (key("editor"), key("draft"));

    // Held: a second caller waits, then is told it is held.
    let guard = mem
        .lock(&lock, Duration::from_secs(2), Duration::ZERO)
        .await
        .unwrap();
    let other = bus.memory().session(mem.session());
    assert!(matches!(
        other
            .lock(&lock, Duration::from_secs(1), Duration::from_millis(300))
            .await,
        Err(MemoryError::LockHeld(_))
    ));
    mem.set_guarded(&guard, &k, &"v1").await.unwrap();
    // Past its expiry the guarded write is refused, and the old value stands.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(matches!(
        mem.set_guarded(&guard, &k, &"late").await,
        Err(MemoryError::LockExpired(_))
    ));
    assert_eq!(mem.get::<String>(&k).await.unwrap().unwrap().value, "v1");
    // A holder that took the lock after expiry gets a new fencing token; the old guard
    // stays fenced off even within its own nominal lifetime.
    let fresh = other
        .lock(&lock, Duration::from_secs(3), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(fresh.token > guard.token);
    other.set_guarded(&fresh, &k, &"v2").await.unwrap();
    other.unlock(fresh).await.unwrap();
    assert!(bus.memory().stats().lock_expiries >= 1);
    assert!(bus.memory().stats().lock_waits >= 1);

    // The create_with_ttl defect: after a delete marker, a TTL given to create is
    // dropped. Our lock publishes with the TTL itself, so a lock taken right after an
    // unlock (delete marker) still expires when its holder crashes.
    let released = mem
        .lock(&lock, Duration::from_secs(1), Duration::ZERO)
        .await
        .unwrap();
    mem.unlock(released).await.unwrap(); // leaves a delete marker
    let crashed = mem
        .lock(&lock, Duration::from_secs(1), Duration::ZERO)
        .await
        .unwrap();
    drop(crashed); // the holder "crashes": never unlocks
    let started = tokio::time::Instant::now();
    let next = other
        .lock(&lock, Duration::from_secs(1), Duration::from_secs(10))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "the crashed holder's lock expired by itself ({waited:?})"
    );
    other.unlock(next).await.unwrap();
}

//! How a Flotilla process proves who it is and talks privately: a token, an nkey, a
//! `.creds` file on an operator-mode server (JWTs signed here), TLS
//! with a CA made here, and mutual TLS. Wrong credentials and a wrong CA are clear
//! errors that name what to check. Every case opens a real `Bus` (topology, buckets)
//! against a real nats-server and round-trips a record.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failures should panic

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_bus::{Bus, BusConfig, ConnectError, Counters, NatsAuth, NatsTls};
use flotilla_testkit::NatsServer;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};

async fn connect(config: &BusConfig) -> Result<Bus, ConnectError> {
    Bus::connect(config, "connect-test", Arc::new(Counters::default())).await
}

/// Opens a bus and writes and reads a record: the connection really works.
async fn works(config: &BusConfig) {
    let bus = connect(config).await.unwrap_or_else(|e| panic!("{e}"));
    let rev = bus
        .slots()
        .create("probe.1", &serde_json::json!({"ok": true}))
        .await
        .unwrap();
    let (v, r) = bus
        .slots()
        .get::<serde_json::Value>("probe.1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((v, r), (serde_json::json!({"ok": true}), rev));
}

fn at(url: &str) -> BusConfig {
    BusConfig {
        url: url.to_owned(),
        ..BusConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_or_an_nkey_authenticates_and_a_wrong_one_is_named() {
    let server = NatsServer::builder()
        .arg("--auth")
        .arg("s3cret-token")
        .start()
        .unwrap();
    let mut c = at(&server.url());
    c.auth.token = Some("s3cret-token".into());
    works(&c).await;
    // The secret never reaches a log line.
    assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
    c.auth.token = Some("guess".into());
    let err = connect(&c).await.unwrap_err();
    assert!(matches!(err, ConnectError::Auth { .. }), "{err}");
    assert!(err.to_string().contains("nats.auth"), "{err}");
    // Two methods at once is a configuration error, before any connection.
    c.auth.user = Some("u".into());
    c.auth.password = Some("p".into());
    let err = connect(&c).await.unwrap_err();
    assert!(err.to_string().contains("one of"), "{err}");

    let user = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nkey.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let server = NatsServer::builder()
        .arg("-c")
        .arg(conf.to_string_lossy())
        .start()
        .unwrap();
    let mut c = at(&server.url());
    c.auth = NatsAuth {
        nkey_seed: Some(user.seed().unwrap()),
        ..NatsAuth::default()
    };
    works(&c).await;
    c.auth.nkey_seed = Some(nkeys::KeyPair::new_user().seed().unwrap());
    let err = connect(&c).await.unwrap_err();
    assert!(matches!(err, ConnectError::Auth { .. }), "{err}");
}

/// A CA, and a server and a client certificate it signed, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (p.self_signed(&key).unwrap(), key)
}

fn pki(dir: &Path) -> Pki {
    let (ca_cert, ca_key) = ca("flotilla test CA");
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let server_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(Vec::<String>::new()).unwrap();
    sp.subject_alt_names = vec![
        SanType::IpAddress("127.0.0.1".parse().unwrap()),
        SanType::DnsName("localhost".try_into().unwrap()),
    ];
    sp.distinguished_name
        .push(DnType::CommonName, "nats-server");
    let server_cert = sp.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name
        .push(DnType::CommonName, "flotilla-agent");
    let client_cert = cp.signed_by(&client_key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        server_cert: write("server.pem", server_cert.pem()),
        server_key: write("server-key.pem", server_key.serialize_pem()),
        client_cert: write("client.pem", client_cert.pem()),
        client_key: write("client-key.pem", client_key.serialize_pem()),
    }
}

fn tls_server(pki: &Pki, verify_clients: bool) -> NatsServer {
    let mut b = NatsServer::builder()
        .arg("--tls")
        .arg("--tlscert")
        .arg(pki.server_cert.to_string_lossy())
        .arg("--tlskey")
        .arg(pki.server_key.to_string_lossy());
    if verify_clients {
        b = b
            .arg("--tlsverify")
            .arg("--tlscacert")
            .arg(pki.ca.to_string_lossy());
    }
    b.start().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_our_ca_works_and_a_wrong_ca_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = tls_server(&pki, false);
    let url = format!("tls://127.0.0.1:{}", server.port());
    let mut c = at(&url);
    c.tls = NatsTls {
        ca_file: Some(pki.ca.clone()),
        ..NatsTls::default()
    };
    works(&c).await;

    // A CA that did not sign the server's certificate.
    let other = tempfile::tempdir().unwrap();
    let (wrong, _) = ca("some other CA");
    let wrong_ca = other.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, wrong.pem()).unwrap();
    c.tls.ca_file = Some(wrong_ca);
    let err = connect(&c).await.unwrap_err();
    assert!(matches!(err, ConnectError::Tls { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("nats.tls.ca_file"), "{msg}");
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");

    // No CA configured on a tls:// URL: the system roots do not know ours either.
    let err = connect(&at(&url)).await.unwrap_err();
    assert!(matches!(err, ConnectError::Tls { .. }), "{err}");

    // A missing file is named before any connection.
    c.tls.ca_file = Some(dir.path().join("nope.pem"));
    let err = connect(&c).await.unwrap_err();
    assert!(err.to_string().contains("nope.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let server = tls_server(&pki, true);
    let url = format!("tls://127.0.0.1:{}", server.port());
    let mut c = at(&url);
    c.tls = NatsTls {
        ca_file: Some(pki.ca.clone()),
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(pki.client_key.clone()),
    };
    works(&c).await;

    // Without a client certificate the server refuses the connection.
    c.tls.cert_file = None;
    c.tls.key_file = None;
    assert!(connect(&c).await.is_err());
    // Half a client identity is a configuration error.
    c.tls.cert_file = Some(pki.client_cert.clone());
    let err = connect(&c).await.unwrap_err();
    assert!(err.to_string().contains("key_file"), "{err}");
}

/// Base64url without padding (JWT segments).
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A NATS JWT with `claims`, signed by `signer`.
fn jwt(mut claims: serde_json::Value, signer: &nkeys::KeyPair) -> String {
    claims["iss"] = signer.public_key().into();
    claims["iat"] = 1_700_000_000u64.into();
    claims["jti"] = b64url(claims["sub"].as_str().unwrap().as_bytes()).into();
    let header = b64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = b64url(&serde_json::to_vec(&claims).unwrap());
    let sig = signer.sign(format!("{header}.{body}").as_bytes()).unwrap();
    format!("{header}.{body}.{}", b64url(&sig))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_authenticates_against_an_operator_mode_server() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let op_jwt = jwt(
        serde_json::json!({"sub": operator.public_key(), "name": "test-operator",
            "nats": {"type": "operator", "version": 2}}),
        &operator,
    );
    let limits = serde_json::json!({"subs": -1, "data": -1, "payload": -1, "imports": -1,
        "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1});
    let acc_jwt = jwt(
        serde_json::json!({"sub": account.public_key(), "name": "flotilla",
            "nats": {"type": "account", "version": 2, "limits": limits}}),
        &operator,
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let sys_jwt = jwt(
        serde_json::json!({"sub": system.public_key(), "name": "SYS",
            "nats": {"type": "account", "version": 2}}),
        &operator,
    );
    let user_jwt = jwt(
        serde_json::json!({"sub": user.public_key(), "name": "agent",
            "nats": {"type": "user", "version": 2, "pub": {}, "sub": {},
                "subs": -1, "data": -1, "payload": -1}}),
        &account,
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("operator.conf");
    std::fs::write(
        &conf,
        format!(
            "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {acc_jwt}\n  {sys}: {sys_jwt}\n}}\n",
            account.public_key(),
            sys = system.public_key()
        ),
    )
    .unwrap();
    let creds = dir.path().join("agent.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let server = NatsServer::builder()
        .arg("-c")
        .arg(conf.to_string_lossy())
        .start()
        .unwrap();
    let mut c = at(&server.url());
    c.auth.creds_file = Some(creds);
    works(&c).await;
    // Without credentials the server refuses.
    let err = connect(&at(&server.url())).await.unwrap_err();
    assert!(matches!(err, ConnectError::Auth { .. }), "{err}");
    // A missing creds file is named.
    c.auth.creds_file = Some(dir.path().join("nope.creds"));
    let err = connect(&c).await.unwrap_err();
    assert!(err.to_string().contains("nope.creds"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_list_fails_over_and_a_lost_connection_comes_back_and_is_counted() {
    // A list whose first server is not there: the client uses the one that is.
    let mut server = NatsServer::start().unwrap();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let list = format!("nats://127.0.0.1:{dead},{}", server.url());
    works(&at(&list)).await;
    assert!(matches!(
        connect(&at("nats://127.0.0.1:4222,not a url")).await,
        Err(ConnectError::BadUrl { .. })
    ));

    // The server dies and comes back on the same port: the bus reconnects (with
    // backoff) and counts the loss.
    let port = server.port();
    let counters = Arc::new(Counters::default());
    let bus = Bus::connect(&at(&server.url()), "reconnects", counters.clone())
        .await
        .unwrap();
    server.kill();
    let lost = flotilla_tests::eventually(std::time::Duration::from_secs(20), || async {
        (counters.snapshot().disconnects >= 1).then_some(())
    })
    .await;
    assert!(lost.is_some(), "the loss was not counted");
    let _again = NatsServer::builder()
        .arg("-p")
        .arg(port.to_string())
        .start()
        .unwrap();
    let back = flotilla_tests::eventually(std::time::Duration::from_secs(30), || async {
        (bus.raw_client().connection_state() == async_nats::connection::State::Connected)
            .then_some(())
    })
    .await;
    assert!(back.is_some(), "no reconnection");
    bus.raw_client().flush().await.unwrap();
}

/// On a 3-node cluster with `replicas = 3`: the fleet creates every stream and bucket
/// with three replicas, a session completes with the fleet spread over the nodes'
/// URLs, and a process configured for one replica is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_completes_on_a_three_node_cluster_with_three_replicas() {
    use flotilla_control::Fleet;
    let cluster = flotilla_testkit::NatsCluster::start().unwrap();
    let mut spec = flotilla_tests::spec(&cluster.url_list());
    spec.bus.replicas = 3;
    let fleet = Fleet::start(spec.clone(), flotilla_tests::sim(20))
        .await
        .unwrap();
    let bus = connect(&spec.bus).await.unwrap();
    let client = flotilla_control::Client::new(bus.shared_connection(), bus.names().clone())
        .await
        .unwrap();
    let (done, _) = client
        .run(
            "on three nodes: compare two caches",
            std::time::Duration::from_secs(120),
        )
        .await
        .unwrap();
    assert!(done.completed(), "{:?}", done.event.body);
    for stream in [
        bus.names()
            .stream_inbox(&flotilla_protocol::Role::orchestrator()),
        bus.names().stream_events(),
        format!("KV_{}", bus.names().bucket_sessions()),
    ] {
        let mut s = bus.raw_js().get_stream(&stream).await.unwrap();
        let info = s.info().await.unwrap();
        assert_eq!(info.config.num_replicas, 3, "{stream}");
        let cl = info.cluster.as_ref().expect("clustered");
        assert_eq!(cl.replicas.len(), 2, "{stream}: a leader and two replicas");
    }
    // A process set up for one replica is told which stream disagrees.
    let Err(err) = connect(&BusConfig {
        replicas: 1,
        ..spec.bus.clone()
    })
    .await
    else {
        panic!("a replica mismatch is refused");
    };
    assert!(err.to_string().contains("num_replicas"), "{err}");
    fleet.stop().await;
}

/// On a replicated bucket the server refuses a lost compare-and-set with error 10164
/// (10071 on one server), which the client library reports as an unknown error. Every
/// such refusal must still read as a conflict (or "exists"), not as an outage: records,
/// shared memory and the memory lock, on a 3-node cluster with three replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_races_on_a_cluster_are_conflicts_not_outages() {
    use flotilla_bus::{KvError, MemKey, MemoryError};
    use flotilla_protocol::SessionId;
    use std::time::Duration;
    let cluster = flotilla_testkit::NatsCluster::start().unwrap();
    let mut config = flotilla_tests::spec(&cluster.url_list()).bus;
    config.replicas = 3;
    // (Patiently: a just-formed cluster may not place replicas for a moment.)
    let bus = Bus::connect_patiently(
        &config,
        "connect-test",
        Arc::new(Counters::default()),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap()
    .unwrap();

    let records = bus.sessions();
    let key = format!("race-{}", SessionId::generate());
    let r1 = records.create(&key, &1u32).await.unwrap();
    assert!(
        matches!(
            records.create(&key, &2u32).await,
            Err(KvError::Exists { .. })
        ),
        "a second create is told the key exists"
    );
    let r2 = records.update(&key, &3u32, r1).await.unwrap();
    assert!(matches!(
        records.update(&key, &4u32, r1).await,
        Err(KvError::Conflict { .. })
    ));
    assert!(matches!(
        records.delete(&key, Some(r1)).await,
        Err(KvError::Conflict { .. })
    ));
    assert_eq!(
        records.get_latest::<u32>(&key).await.unwrap(),
        Some((3, r2))
    );
    // A read whose answer is not current enough is asked of the leader.
    assert_eq!(
        records.get_current::<u32>(&key, |v| *v > 3).await.unwrap(),
        Some((3, r2))
    );
    assert_eq!(
        records
            .get_current::<u32>(&format!("{key}-none"), |_| true)
            .await
            .unwrap(),
        None
    );

    // Races in flight at once: the leader refuses a compare-and-set while another on
    // the same key is still being replicated, and that refusal is the one (10164) the
    // client library does not name. One writer wins each race; every other is told it
    // lost, none that the store is down.
    for round in 0..5u32 {
        let race = format!("race-{round}-{}", SessionId::generate());
        let creates = futures::future::join_all((0..24u32).map(|i| {
            let records = records.clone();
            let race = race.clone();
            async move { records.create(&race, &i).await }
        }))
        .await;
        let won: Vec<u64> = creates
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        assert_eq!(won.len(), 1, "one create wins: {creates:?}");
        let won = won[0];
        assert!(
            creates
                .iter()
                .all(|r| r.is_ok() || matches!(r, Err(KvError::Exists { .. }))),
            "every lost create is told the key exists: {creates:?}"
        );
        let updates = futures::future::join_all((0..24u32).map(|i| {
            let records = records.clone();
            let race = race.clone();
            async move { records.update(&race, &(100 + i), won).await }
        }))
        .await;
        assert_eq!(
            updates.iter().filter(|r| r.is_ok()).count(),
            1,
            "{updates:?}"
        );
        assert!(
            updates
                .iter()
                .all(|r| r.is_ok() || matches!(r, Err(KvError::Conflict { .. }))),
            "every lost update is a conflict: {updates:?}"
        );
    }

    let mem = bus.memory().session(&SessionId::generate());
    let k = MemKey::parse("plan").unwrap();
    let m1 = mem.create(&k, &"a").await.unwrap();
    assert!(matches!(
        mem.create(&k, &"b").await,
        Err(MemoryError::Exists(_))
    ));
    let mem_rev = mem.compare_and_set(&k, m1, &"c").await.unwrap();
    assert!(matches!(
        mem.compare_and_set(&k, m1, &"lost").await,
        Err(MemoryError::Conflict(_))
    ));
    assert!(matches!(
        mem.delete(&k, m1).await,
        Err(MemoryError::Conflict(_))
    ));
    let raced = futures::future::join_all((0..24u32).map(|i| {
        let mem = mem.clone();
        let k = k.clone();
        async move { mem.compare_and_set(&k, mem_rev, &i).await }
    }))
    .await;
    assert_eq!(raced.iter().filter(|r| r.is_ok()).count(), 1, "{raced:?}");
    assert!(
        raced
            .iter()
            .all(|r| r.is_ok() || matches!(r, Err(MemoryError::Conflict(_)))),
        "every lost compare-and-set is a conflict: {raced:?}"
    );
    // A held lock makes the next taker wait and be told it is held.
    let lock = MemKey::parse("editor").unwrap();
    let guard = mem
        .lock(&lock, Duration::from_secs(5), Duration::ZERO)
        .await
        .unwrap();
    assert!(matches!(
        mem.lock(&lock, Duration::from_secs(1), Duration::from_millis(300))
            .await,
        Err(MemoryError::LockHeld(_))
    ));
    mem.unlock(guard).await.unwrap();
}

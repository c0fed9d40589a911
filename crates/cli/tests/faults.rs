//! Real faults against real processes: `flotilla serve` and `flotilla agent` run as
//! separate OS processes and are killed with SIGKILL mid-task. Every session still
//! completes, and exactly one result per task is accepted.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers: failures should panic

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use flotilla_bus::{Bus, BusConfig, Counters};
use flotilla_control::{Client, Finished};
use flotilla_protocol::{
    EventBody, SessionRecord, SessionStatus, TaskRecord, TaskRunState, TaskState, subject::keys,
};
use flotilla_testkit::NatsServer;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// Child processes, SIGKILLed on drop.
struct Procs(HashMap<u32, Child>);

impl Procs {
    fn spawn(&mut self, args: &[&str], url: &str, env: &[(&str, &str)]) -> u32 {
        let child = Command::new(BIN)
            .args(args)
            .args(["--nats-url", url])
            // FAULTS_DEBUG=1 shows the processes' warnings; any other value is their
            // log filter (FAULTS_DEBUG=info,flotilla_agent=debug).
            .env(
                "RUST_LOG",
                std::env::var("FAULTS_DEBUG")
                    .ok()
                    .filter(|f| f != "1")
                    .unwrap_or_else(|| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("FAULTS_DEBUG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("flotilla runs");
        let pid = child.id();
        self.0.insert(pid, child);
        pid
    }

    /// SIGKILL, as a crash would.
    fn kill9(&mut self, pid: u32) {
        let mut c = self.0.remove(&pid).expect("a child of ours");
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Procs {
    /// One `serve`, two research agents (returned) and one agent of every other role.
    fn fleet(&mut self, url: &str, env: &[(&str, &str)]) -> [u32; 2] {
        self.spawn(&["serve"], url, env);
        let research = [
            self.spawn(&["agent", "--role", "research"], url, env),
            self.spawn(&["agent", "--role", "research"], url, env),
        ];
        for role in ["analysis", "writing", "review"] {
            self.spawn(&["agent", "--role", role], url, env);
        }
        research
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const ENV: &[(&str, &str)] = &[
    ("FLOTILLA_LLM__SIMULATED__LATENCY_MS", "1500"),
    ("FLOTILLA_LLM__SIMULATED__JITTER", "0.2"),
    ("FLOTILLA_WORKER__ACK_WAIT", "2s"),
    ("FLOTILLA_ORCHESTRATOR__ACK_WAIT", "2s"),
];

/// A bus and a client for the test, once `serve` is up: the processes create the
/// topology with their settings, and the inspector asks for nothing stricter.
async fn inspector(url: &str) -> (Bus, Client) {
    inspector_with(BusConfig {
        url: url.to_owned(),
        duplicate_window: Duration::from_secs(1),
        ..BusConfig::default()
    })
    .await
}

/// [`inspector`] with the given settings (`config.url` may list a cluster's nodes).
async fn inspector_with(config: BusConfig) -> (Bus, Client) {
    let urls: Vec<String> = config.url.split(',').map(str::to_owned).collect();
    let raw = async_nats::connect(urls).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while raw
        .request("$SRV.PING.flotilla-admission", bytes::Bytes::new())
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bus = Bus::connect(&config, "fault-inspector", Arc::new(Counters::default()))
        .await
        .unwrap();
    let client = Client::new(bus.shared_connection(), bus.names().clone())
        .await
        .unwrap();
    (bus, client)
}

fn start_sessions(client: &Client, n: usize, label: &str) -> tokio::task::JoinSet<Finished> {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let c = client.clone();
        let task = format!("{label} {i}");
        set.spawn(async move { c.run(&task, Duration::from_secs(120)).await.unwrap().0 });
    }
    set
}

/// Every session completed, each task has exactly one accepted result, and nothing is
/// left in any inbox.
async fn check_all_completed(
    bus: &Bus,
    mut set: tokio::task::JoinSet<Finished>,
    n: usize,
) -> Vec<SessionRecord> {
    let mut records = Vec::new();
    while let Some(done) = set.join_next().await {
        let done = done.unwrap();
        assert!(done.completed(), "{:?}", done.event.body);
        let EventBody::Done {
            answer: Some(answer),
            ..
        } = &done.event.body
        else {
            panic!()
        };
        assert_eq!(answer.sections.len(), 4);
        // (Patient: on a cluster that just lost a node the read may go unanswered.)
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let (rec, _) = loop {
            match bus
                .sessions()
                .get::<SessionRecord>(&keys::session(&done.session_id))
                .await
            {
                Ok(found) => break found.unwrap(),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("reading the record again: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(rec.status, SessionStatus::Completed);
        assert_eq!(
            rec.counters.accepted, 4,
            "exactly one accepted result per task"
        );
        assert!(rec.tasks.iter().all(|t| t.state == TaskState::Done));
        records.push(rec);
    }
    assert_eq!(records.len(), n);
    let mut backlog = u64::MAX;
    for _ in 0..100 {
        backlog = bus.inbox_backlog().await.unwrap_or(u64::MAX);
        if backlog == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(backlog, 0, "lost: every inbox message was acked");
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_process_task_completes_on_a_backup() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let mut procs = Procs(HashMap::new());
    let research = procs.fleet(&url, ENV);
    let (bus, client) = inspector(&url).await;
    let n = 6;
    let set = start_sessions(&client, n, "survive a crashed worker");

    // Find a research task being run right now, and kill the process running it.
    let (victim, held) = running_holder(&bus, &research).await;
    procs.kill9(victim);
    let survivor = research.iter().find(|p| **p != victim).unwrap();

    check_all_completed(&bus, set, n).await;
    // The tasks the dead process held were finished by the other research process.
    for key in held {
        let (rec, _) = bus
            .sessions()
            .get::<TaskRecord>(&commit_of(&key))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.state, TaskRunState::Done, "{key}");
        assert_eq!(
            rec.holder.unwrap().to_string(),
            format!("research-{survivor}"),
            "{key}"
        );
    }
}

/// Waits until one of `pids` holds a research task, and returns it with the claim keys
/// it holds (watching the claims and commits, one consumer for the whole wait: a
/// commit ends its attempt's claim).
async fn running_holder(bus: &Bus, pids: &[u32]) -> (u32, Vec<String>) {
    use flotilla_protocol::subject::keys::{ALL_CLAIMS, ALL_TASKS, claim_of_commit};
    use futures::StreamExt;
    let mut watch = bus
        .sessions()
        .store()
        .watch_many_with_history([ALL_CLAIMS, ALL_TASKS])
        .await
        .unwrap();
    let mut holders: HashMap<String, HashMap<String, bool>> = HashMap::new();
    while let Some(Ok(entry)) = watch.next().await {
        let Ok(rec) = serde_json::from_slice::<TaskRecord>(&entry.value) else {
            continue;
        };
        let claim_key = claim_of_commit(&entry.key).unwrap_or_else(|| entry.key.clone());
        for held in holders.values_mut() {
            held.remove(&claim_key);
        }
        if rec.state == TaskRunState::Running
            && let Some(h) = rec.holder
        {
            holders
                .entry(h.to_string())
                .or_default()
                .insert(entry.key.clone(), true);
        }
        if let Some((pid, held)) = pids.iter().find_map(|pid| {
            holders
                .get(&format!("research-{pid}"))
                .filter(|h| !h.is_empty())
                .map(|h| (*pid, h))
        }) {
            return (pid, held.keys().cloned().collect());
        }
    }
    panic!("the watch ended");
}

/// The commit key of a claim key (`<sid>.c.<role>.<task>` -> `<sid>.t.<role>.<task>`).
fn commit_of(claim_key: &str) -> String {
    claim_key.replacen(".c.", ".t.", 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_serve_process_sessions_continue_on_the_other() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let mut procs = Procs(HashMap::new());
    // The serves plan with a 4 s model call, so the first is still planning when it is
    // killed (with the default 1.5 s, the second's start could outlast the plans).
    let serve_env: Vec<(&str, &str)> = ENV
        .iter()
        .copied()
        .filter(|(k, _)| *k != "FLOTILLA_LLM__SIMULATED__LATENCY_MS")
        .chain([("FLOTILLA_LLM__SIMULATED__LATENCY_MS", "4000")])
        .collect();
    let first = procs.spawn(&["serve"], &url, &serve_env);
    for role in ["research", "analysis", "writing", "review"] {
        procs.spawn(&["agent", "--role", role], &url, ENV);
    }
    let (bus, client) = inspector(&url).await;
    let n = 8;
    let set = start_sessions(&client, n, "survive a crashed control plane");
    // Wait until every session is admitted and being planned. A session record's key
    // is one token; task claims and commits, conversations and the serve's signer
    // registration (`signer.<key>`) have more.
    loop {
        let mut planning = 0;
        let mut keys_list = bus.sessions().store().keys().await.unwrap();
        use futures::StreamExt;
        while let Some(Ok(key)) = keys_list.next().await {
            if !key.contains('.') {
                planning += 1;
            }
        }
        if planning >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Only now the other serve starts, so every start is held by the first, which is
    // in the middle of planning them. Once the other is up (its presence is written),
    // kill the first. (With both serves up from the start, one of them could pull all
    // eight starts, and the one killed might hold none.)
    procs.spawn(&["serve"], &url, &serve_env);
    loop {
        let mut serves = 0;
        let mut keys_list = bus.agents().store().keys().await.unwrap();
        use futures::StreamExt;
        while let Some(Ok(key)) = keys_list.next().await {
            if let Ok(Some((p, _))) = bus.agents().get::<flotilla_protocol::Presence>(&key).await
                && p.role.is_orchestrator()
            {
                serves += 1;
            }
        }
        if serves >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    procs.kill9(first);

    check_all_completed(&bus, set, n).await;
    // The killed instance's unfinished orchestrator messages were redelivered to the
    // other: the consumer delivered more times than there are messages.
    let stream = bus
        .raw_js()
        .get_stream(
            bus.names()
                .stream_inbox(&flotilla_protocol::Role::orchestrator()),
        )
        .await
        .unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("role-orchestrator").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert!(
        info.delivered.consumer_sequence > info.delivered.stream_sequence,
        "redeliveries happened: {:?}",
        info.delivered
    );
}

/// Compressed liveness, and an ack wait long enough that only the watchdog can explain a
/// quick reassignment.
const FAST_LIVENESS: &[(&str, &str)] = &[
    ("FLOTILLA_LLM__SIMULATED__LATENCY_MS", "3000"),
    ("FLOTILLA_LLM__SIMULATED__JITTER", "0.1"),
    ("FLOTILLA_WORKER__ACK_WAIT", "40s"),
    ("FLOTILLA_NATS__DUPLICATE_WINDOW", "10m"),
    ("FLOTILLA_LIVENESS__PROBE_EVERY", "200ms"),
    ("FLOTILLA_LIVENESS__DISCONNECT_CONFIRM", "600ms"),
    ("FLOTILLA_LIVENESS__HEARTBEAT_EVERY", "300ms"),
    ("FLOTILLA_LIVENESS__PRESENCE_TTL", "2s"),
];

/// Waits until every task in `held` is no longer held by `victim`; returns how long.
async fn time_to_reassign(bus: &Bus, held: &[String], victim: &str) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let mut all = true;
        for key in held {
            let (rec, _) = bus
                .sessions()
                .get::<TaskRecord>(key)
                .await
                .unwrap()
                .unwrap();
            if rec.holder.as_ref().map(|h| h.as_str()) == Some(victim) {
                all = false;
            }
        }
        if all {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not reassigned within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn reassigned_events(bus: &Bus, records: &[SessionRecord]) -> Vec<EventBody> {
    let mut stream = bus
        .raw_js()
        .get_stream(bus.names().stream_events())
        .await
        .unwrap();
    let mut out = Vec::new();
    for rec in records {
        let subject = bus.names().event(
            &rec.session_id,
            flotilla_protocol::EventKindName::Reassigned,
        );
        if let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await {
            let e: flotilla_protocol::Event = serde_json::from_slice(&m.payload).unwrap();
            out.push(e.body);
        }
    }
    let _ = stream.info().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_task_is_reassigned_long_before_its_ack_wait() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let mut procs = Procs(HashMap::new());
    let research = procs.fleet(&url, FAST_LIVENESS);
    let (bus, client) = inspector(&url).await;
    let n = 4;
    let set = start_sessions(&client, n, "reassign fast");
    let (victim, held) = running_holder(&bus, &research).await;
    // No pause: a worker's presence lists a task before its agent starts on it.
    procs.kill9(victim);
    let took = time_to_reassign(&bus, &held, &format!("research-{victim}")).await;
    eprintln!("reassigned {} task(s) {took:?} after kill -9", held.len());
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}; the ack wait is 40 s"
    );
    let records = check_all_completed(&bus, set, n).await;
    let events = reassigned_events(&bus, &records).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, EventBody::Reassigned { reason, from, .. }
            if reason == "disconnected" && *from == format!("research-{victim}"))),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_task_is_finished_elsewhere() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let mut procs = Procs(HashMap::new());
    let research = procs.fleet(&url, FAST_LIVENESS);
    let (bus, client) = inspector(&url).await;
    let n = 4;
    let set = start_sessions(&client, n, "survive a frozen worker");
    let (victim, held) = running_holder(&bus, &research).await;
    // SIGSTOP: the process is alive (its connection stays up) but does nothing.
    assert!(
        Command::new("kill")
            .args(["-STOP", &victim.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let took = time_to_reassign(&bus, &held, &format!("research-{victim}")).await;
    eprintln!(
        "frozen holder's {} task(s) released after {took:?}",
        held.len()
    );
    assert!(
        took < Duration::from_secs(25),
        "took {took:?}; presence TTL 2 s, ack wait 40 s"
    );
    let records = check_all_completed(&bus, set, n).await;
    // Thawed, the old holder cannot commit over the new result: every task has exactly
    // one accepted result (checked above) and its record holds the new holder's output.
    assert!(
        Command::new("kill")
            .args(["-CONT", &victim.to_string()])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    for key in &held {
        let (rec, _) = bus
            .sessions()
            .get::<TaskRecord>(&commit_of(key))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.state, TaskRunState::Done);
        assert_ne!(
            rec.holder.unwrap().to_string(),
            format!("research-{victim}")
        );
    }
    let events = reassigned_events(&bus, &records).await;
    assert!(
        events.iter().any(
            |e| matches!(e, EventBody::Reassigned { reason, .. } if reason == "presence expired")
        ),
        "{events:?}"
    );
}

/// The rate limiter's leader is one of two `serve` processes. SIGKILL it while callers
/// are over the provider's limits: the other takes the lease within its TTL, and the
/// provider (a fake that answers 429 above its RPM and TPM) never refuses a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_limiter_leader_hands_over_within_the_lease_ttl_and_limits_hold() {
    use flotilla_agent::{LimitedLlm, LimiterClient, LimitsConfig, ModelLimits};
    use flotilla_llm::{ChatMessage, CompletionRequest, LlmClient, OpenAiClient, OpenAiConfig};
    use flotilla_protocol::LimiterLease;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let server = NatsServer::start().unwrap();
    let url = server.url();
    let (rpm, tpm, window, ttl) = (40, 2_000, Duration::from_secs(2), Duration::from_secs(2));
    let env = [
        ("FLOTILLA_LIMITS__LEASE_TTL", "2s"),
        ("FLOTILLA_LIMITS__WINDOW", "2s"),
        ("FLOTILLA_LIMITS__MODELS__FAKE__RPM", "40"),
        ("FLOTILLA_LIMITS__MODELS__FAKE__TPM", "2000"),
    ];
    let mut procs = Procs(HashMap::new());
    let serves = [
        procs.spawn(&["serve"], &url, &env),
        procs.spawn(&["serve"], &url, &env),
    ];
    let (bus, _client) = inspector(&url).await;
    let leader = |bus: Bus| async move {
        bus.limits()
            .get::<LimiterLease>("leader")
            .await
            .ok()
            .flatten()
            .map(|(l, _)| l)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(l) = leader(bus.clone()).await {
            break l;
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        serves.contains(&first.pid),
        "{first:?} is one of {serves:?}"
    );

    let fake = flotilla_testkit::FakeOpenAi::start(flotilla_testkit::FakeConfig {
        rpm: Some(rpm),
        tpm: Some(tpm),
        window,
        latency: Duration::from_millis(20),
        ..flotilla_testkit::FakeConfig::default()
    })
    .await
    .unwrap();
    let config = LimitsConfig {
        window,
        lease_ttl: ttl,
        acquire_timeout: Duration::from_secs(60),
        models: std::collections::BTreeMap::from([("fake".to_owned(), ModelLimits { rpm, tpm })]),
        ..LimitsConfig::default()
    };
    let openai: Arc<dyn LlmClient> = Arc::new(
        OpenAiClient::new(OpenAiConfig {
            base_url: fake.base_url(),
            ..OpenAiConfig::default()
        })
        .unwrap(),
    );
    let llm = Arc::new(LimitedLlm::new(
        openai,
        LimiterClient::new(bus.clone(), config),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for c in 0..12 {
        let (llm, stop, ok) = (llm.clone(), stop.clone(), ok.clone());
        callers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let req = CompletionRequest {
                    model: "fake".into(),
                    messages: vec![ChatMessage::user(format!("caller {c} call {i}"))],
                    response_format: None,
                    max_tokens: Some(50),
                };
                llm.complete(&req).await.expect("every call succeeds");
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    procs.kill9(first.pid);
    let killed = tokio::time::Instant::now();
    let second = loop {
        if let Some(l) = leader(bus.clone()).await
            && l.pid != first.pid
        {
            break l;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no new leader after the kill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let handover = killed.elapsed();
    eprintln!("limiter leadership handed over {handover:?} after the kill");
    assert!(serves.contains(&second.pid) && second.pid != first.pid);
    assert!(
        handover <= ttl + Duration::from_secs(2),
        "handover took {handover:?}, lease TTL {ttl:?}"
    );
    let before = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    let s = fake.stats();
    assert!(
        ok.load(Ordering::Relaxed) > before,
        "calls went on under the new leader"
    );
    assert_eq!(s.http_429, 0, "limits held through the failover: {s:?}");
    assert!(
        s.max_requests_in_window <= rpm && s.max_tokens_in_window <= tpm,
        "{s:?}"
    );
}

/// An agent's conversation lives in KV: kill the process between two turns of one task,
/// and the backup process continues it, its model seeing the first turn, without
/// repeating it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_survives_its_process_between_two_turns() {
    use flotilla_protocol::AgentHistory;
    use futures::StreamExt;
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let mut env = ENV.to_vec();
    env.push(("FLOTILLA_LLM__SIMULATED__BEHAVIOUR", "two_turns"));
    let mut procs = Procs(HashMap::new());
    let research = procs.fleet(&url, &env);
    let (bus, client) = inspector(&url).await;
    let set = start_sessions(&client, 1, "two turns, one crash");

    // Wait for the research task's first turn to be saved, then kill its holder while
    // the second turn is in flight (each call takes ~1.5 s).
    let mut watch = bus.sessions().store().watch("*.h.>").await.unwrap();
    let (victim, task_key) = loop {
        let entry = tokio::time::timeout(Duration::from_secs(60), watch.next())
            .await
            .expect("a first turn saved")
            .unwrap()
            .unwrap();
        let Ok(h) = serde_json::from_slice::<AgentHistory>(&entry.value) else {
            continue;
        };
        let claim_key = entry.key.replace(".h.", ".c.");
        let task_key = entry.key.replace(".h.", ".t.");
        let (rec, _) = bus
            .sessions()
            .get::<TaskRecord>(&claim_key)
            .await
            .unwrap()
            .unwrap();
        if rec.role.as_str() != "research" || h.turns_taken != 1 {
            continue;
        }
        let holder = rec.holder.expect("a holder").to_string();
        let pid: u32 = holder.trim_start_matches("research-").parse().unwrap();
        assert!(research.contains(&pid), "{holder}");
        eprintln!("killing {holder} after the first turn of {task_key}");
        break (pid, task_key);
    };
    procs.kill9(victim);
    let records = check_all_completed(&bus, set, 1).await;
    let (rec, _) = bus
        .sessions()
        .get::<TaskRecord>(&task_key)
        .await
        .unwrap()
        .unwrap();
    let survivor = research.iter().find(|p| **p != victim).unwrap();
    assert_eq!(
        rec.holder.unwrap().to_string(),
        format!("research-{survivor}")
    );
    let summary = rec.output.expect("committed output").summary;
    assert!(
        summary.contains("after 1 earlier turn(s)"),
        "the second turn saw the first: {summary}"
    );
    // Two calls for each of the three other tasks; the backup made one (the second turn)
    // for research: it did not start the conversation over.
    assert_eq!(
        records[0].counters.spend.calls, 7,
        "{:?}",
        records[0].counters.spend
    );
}

/// Export settings for a process: its spans go to `endpoint` over `protocol`, in
/// batches flushed every 200 ms.
fn otel_env<'a>(endpoint: &'a str, protocol: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ]
}

/// The spans of one trace, by span id, and the ancestry of each.
struct Trace(HashMap<String, flotilla_testkit::ReceivedSpan>);

impl Trace {
    fn new(spans: &[flotilla_testkit::ReceivedSpan], trace_id: &str) -> Self {
        Self(
            spans
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .map(|s| (s.span_id.clone(), s.clone()))
                .collect(),
        )
    }

    /// Spans called `name`, or `name <detail>` (`chat gpt-4o`), oldest first.
    fn named(&self, name: &str) -> Vec<&flotilla_testkit::ReceivedSpan> {
        let prefix = format!("{name} ");
        let mut v: Vec<_> = self
            .0
            .values()
            .filter(|s| s.name == name || s.name.starts_with(&prefix))
            .collect();
        v.sort_by_key(|s| s.start_unix_nanos);
        v
    }

    /// Whether `ancestor` is `span`'s parent, grandparent, ... within this trace.
    fn descends(&self, span: &flotilla_testkit::ReceivedSpan, ancestor: &str) -> bool {
        let mut cur = span.parent_span_id.clone();
        for _ in 0..64 {
            if cur == ancestor {
                return true;
            }
            match self.0.get(&cur) {
                Some(p) => cur = p.parent_span_id.clone(),
                None => return false,
            }
        }
        false
    }

    /// The nearest ancestor of `span` called one of `names`.
    fn nearest(&self, span: &flotilla_testkit::ReceivedSpan, names: &[&str]) -> Option<String> {
        let mut cur = self.0.get(&span.parent_span_id);
        for _ in 0..64 {
            let p = cur?;
            if names.contains(&p.name.as_str()) {
                return Some(p.span_id.clone());
            }
            cur = self.0.get(&p.parent_span_id);
        }
        None
    }

    /// Every span's parent is in the trace, except the one root.
    fn roots(&self) -> Vec<&flotilla_testkit::ReceivedSpan> {
        self.0
            .values()
            .filter(|s| !self.0.contains_key(&s.parent_span_id))
            .collect()
    }
}

async fn trace_id_of(bus: &Bus, sid: &flotilla_protocol::SessionId) -> String {
    let (rec, _) = bus
        .sessions()
        .get::<SessionRecord>(&keys::session(sid))
        .await
        .unwrap()
        .unwrap();
    flotilla_protocol::TraceParent::parse(&rec.traceparent)
        .unwrap()
        .trace_id_hex()
}

/// One session run as separate OS processes (`serve` exporting over http/protobuf, the
/// agents over gRPC) is one OpenTelemetry trace: admission, planning, each task, each
/// LLM call and the synthesis, with every parent link pointing at the span that sent
/// the message or made the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_is_one_trace_across_processes() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let otlp = flotilla_testkit::OtlpReceiver::start().await.unwrap();
    let (http, grpc) = (otlp.http_endpoint(), otlp.grpc_endpoint());
    let base = [("FLOTILLA_LLM__SIMULATED__LATENCY_MS", "50")];
    let serve_env: Vec<_> = base
        .iter()
        .copied()
        .chain(otel_env(&http, "http/protobuf"))
        .collect();
    let agent_env: Vec<_> = base
        .iter()
        .copied()
        .chain(otel_env(&grpc, "grpc"))
        .collect();
    let mut procs = Procs(HashMap::new());
    procs.spawn(&["serve"], &url, &serve_env);
    let roles = ["research", "analysis", "writing", "review"];
    for role in roles {
        procs.spawn(&["agent", "--role", role], &url, &agent_env);
    }
    let (bus, client) = inspector(&url).await;
    let (done, _) = client
        .run("trace a launch plan", Duration::from_secs(120))
        .await
        .unwrap();
    assert!(done.completed(), "{:?}", done.event.body);
    let tid = trace_id_of(&bus, &done.session_id).await;

    // Admission, start, plan, 4 tasks, 4 results, synthesis, 6 LLM calls.
    let spans = otlp
        .wait_for(Duration::from_secs(30), |s| {
            let t = Trace::new(s, &tid);
            t.named("chat").len() >= 6
                && t.named("orchestrate").len() >= 5
                && t.named("task").len() >= 4
        })
        .await;
    let t = Trace::new(&spans, &tid);
    let names: Vec<_> =
        t.0.values()
            .map(|s| (s.service.as_str(), s.name.as_str()))
            .collect();
    let roots = t.roots();
    assert_eq!(roots.len(), 1, "one root: {names:?}");
    let admit = t.named("admit");
    assert_eq!(admit.len(), 1, "{names:?}");
    assert_eq!(admit[0].span_id, roots[0].span_id, "admission is the root");
    assert_eq!(admit[0].service, "flotilla-serve");
    assert_eq!(admit[0].attr("session"), Some(done.session_id.as_str()));

    let orchestrate = t.named("orchestrate");
    let start: Vec<_> = orchestrate
        .iter()
        .filter(|s| s.attr("input") == Some("start"))
        .collect();
    assert_eq!(start.len(), 1, "{names:?}");
    assert_eq!(
        start[0].parent_span_id, admit[0].span_id,
        "start is admission's child"
    );
    let plan = t.named("plan");
    assert_eq!(plan.len(), 1, "{names:?}");
    assert_eq!(plan[0].parent_span_id, start[0].span_id);

    let tasks = t.named("task");
    assert_eq!(tasks.len(), 4, "{names:?}");
    let mut seen_roles: Vec<_> = tasks
        .iter()
        .map(|s| s.attr("role").unwrap().to_owned())
        .collect();
    seen_roles.sort();
    let mut want: Vec<_> = roles.iter().map(|r| r.to_string()).collect();
    want.sort();
    assert_eq!(seen_roles, want);
    for task in &tasks {
        let role = task.attr("role").unwrap();
        assert_eq!(
            task.service,
            format!("flotilla-agent-{role}"),
            "exported by the agent process"
        );
        // Dispatched by the handler that made it ready: the start, or the result of a
        // task it depends on.
        let parent = t.0.get(&task.parent_span_id).map(|p| p.name.as_str());
        assert_eq!(parent, Some("orchestrate"), "{task:?}");
        assert!(t.descends(task, &start[0].span_id), "{task:?}");
        // The task's result is handled in a span that the task's span parents.
        let handled = orchestrate.iter().filter(|o| {
            o.attr("input") == Some("result")
                && o.attr("task") == task.attr("task")
                && t.descends(o, &task.span_id)
        });
        assert_eq!(handled.count(), 1, "result of {role}: {names:?}");
    }

    assert!(
        tasks.iter().any(|x| x.parent_span_id == start[0].span_id),
        "the first wave is dispatched by the start handler"
    );
    let synth = t.named("synthesize");
    assert_eq!(synth.len(), 1, "{names:?}");
    let chats = t.named("chat");
    assert_eq!(chats.len(), 6, "plan, 4 tasks, synthesis: {names:?}");
    for chat in &chats {
        assert_eq!(chat.attr("gen_ai.operation.name"), Some("chat"));
        assert!(
            chat.attr("gen_ai.request.model")
                .is_some_and(|m| !m.is_empty())
        );
        for k in ["gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"] {
            let n: u64 = chat.attr(k).unwrap_or_default().parse().unwrap_or(0);
            assert!(n > 0, "{k} on {chat:?}");
        }
    }
    // Each call belongs to the step that made it.
    let owner =
        |c: &&&flotilla_testkit::ReceivedSpan| t.nearest(c, &["plan", "task", "synthesize"]);
    for step in plan.iter().chain(&tasks).chain(&synth) {
        let calls = chats
            .iter()
            .filter(|c| owner(c).as_deref() == Some(step.span_id.as_str()));
        assert_eq!(calls.count(), 1, "one call by {step:?}");
    }
}

/// A worker killed mid-task: the watchdog's reassignment and the new holder's task
/// span are in the session's trace, the new holder's span marked `reassigned`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reassignment_shows_in_the_sessions_trace() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let otlp = flotilla_testkit::OtlpReceiver::start().await.unwrap();
    let http = otlp.http_endpoint();
    let env: Vec<_> = FAST_LIVENESS
        .iter()
        .copied()
        .chain(otel_env(&http, "http/protobuf"))
        .collect();
    let mut procs = Procs(HashMap::new());
    let research = procs.fleet(&url, &env);
    let (bus, client) = inspector(&url).await;
    let set = start_sessions(&client, 2, "trace a reassignment");
    let (victim, held) = running_holder(&bus, &research).await;
    procs.kill9(victim);
    let records = check_all_completed(&bus, set, 2).await;
    let from = format!("research-{victim}");
    for key in &held {
        let (rec, _) = bus
            .sessions()
            .get::<TaskRecord>(&commit_of(key))
            .await
            .unwrap()
            .unwrap();
        let sid = rec.session_id.clone();
        assert!(records.iter().any(|r| r.session_id == sid));
        let tid = trace_id_of(&bus, &sid).await;
        let task_id = rec.task_id.to_string();
        let spans = otlp
            .wait_for(Duration::from_secs(30), |s| {
                let t = Trace::new(s, &tid);
                // Spans arrive as each process's exporter sends them: a child (say
                // `synthesize`) can come in a batch before its parent's, so wait for the
                // trace to be whole (one root) too; one that never is fails below.
                !t.named("reassign").is_empty()
                    && t.named("task")
                        .iter()
                        .any(|x| x.attr("task") == Some(task_id.as_str()))
                    && !t.named("synthesize").is_empty()
                    && t.roots().len() == 1
            })
            .await;
        let t = Trace::new(&spans, &tid);
        let names: Vec<_> =
            t.0.values()
                .map(|s| (s.service.as_str(), s.name.as_str()))
                .collect();
        let reassign: Vec<_> = t
            .named("reassign")
            .into_iter()
            .filter(|s| s.attr("task") == Some(task_id.as_str()))
            .collect();
        assert_eq!(reassign.len(), 1, "{names:?}");
        assert_eq!(reassign[0].attr("from"), Some(from.as_str()));
        assert_eq!(reassign[0].service, "flotilla-serve");
        assert!(
            t.descends(reassign[0], &t.named("admit")[0].span_id),
            "in the session's trace"
        );
        // The dead holder never ended its span; the new holder's is the one exported.
        let runs: Vec<_> = t
            .named("task")
            .into_iter()
            .filter(|s| s.attr("task") == Some(task_id.as_str()))
            .collect();
        assert_eq!(runs.len(), 1, "{names:?}");
        assert_ne!(runs[0].attr("agent"), Some(from.as_str()));
        assert!(
            runs[0].events.iter().any(|e| e == "reassigned"),
            "{:?}",
            runs[0]
        );
        assert!(runs[0].start_unix_nanos > reassign[0].start_unix_nanos);
        let roots: Vec<_> = t.roots().iter().map(|s| (&s.service, &s.name)).collect();
        assert_eq!(t.roots().len(), 1, "roots {roots:?} of {names:?}");
    }
}

// ---- session control ----------------------------------------------------------------

/// A fake OpenAI-compatible server answering as the simulator would, each call taking
/// `latency`: the fleet's processes call it over HTTP, and its log shows every call.
async fn fake_provider(latency: Duration) -> flotilla_testkit::FakeOpenAi {
    use flotilla_llm::CompletionRequest;
    use flotilla_llm::{SimConfig, SimulatedProvider};
    let sim = SimulatedProvider::new(SimConfig {
        latency_ms: 0,
        ..SimConfig::default()
    });
    let responder: flotilla_testkit::Responder = Arc::new(move |body: &serde_json::Value| {
        sim.respond(&CompletionRequest::from_openai_body(body))
            .map(|(_, c)| c.content)
            .unwrap_or_default()
    });
    flotilla_testkit::FakeOpenAi::start(flotilla_testkit::FakeConfig {
        latency,
        responder: Some(responder),
        ..flotilla_testkit::FakeConfig::default()
    })
    .await
    .unwrap()
}

/// Calls the provider received whose prompt mentions `marker`.
fn calls_mentioning(fake: &flotilla_testkit::FakeOpenAi, marker: &str) -> usize {
    fake.requests_log()
        .iter()
        .filter(|r| r.to_string().contains(marker))
        .count()
}

/// The requests the provider received more than once (same messages), with their
/// counts: what a failed "no repeated call" assertion prints.
fn repeated_calls(fake: &flotilla_testkit::FakeOpenAi) -> Vec<(usize, String)> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in fake.requests_log() {
        *seen.entry(r["messages"].to_string()).or_default() += 1;
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(m, n)| (n, m.chars().take(600).collect()))
        .collect()
}

/// Cancel a session while its tasks run on agent processes: the reply comes once every
/// process has stopped its work; from then on no model call of that session starts,
/// its token spend stays where it was, its slot is free and `done` says `cancelled`.
/// Another session on the same fleet completes. A second cancel, one of an unknown
/// session, and `flotilla cancel` on the binary are typed answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_sessions_work_in_flight_across_processes() {
    use flotilla_protocol::{
        CancelReply, ErrorCode, OpenReply, OpenSession, SessionId, SessionOutcome,
    };
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let fake = fake_provider(Duration::from_millis(2500)).await;
    let base = fake.base_url();
    let env = [
        ("FLOTILLA_LLM__PROVIDER", "openai"),
        ("FLOTILLA_LLM__OPENAI__BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "sk-test"),
        // Every process answers at once; a generous bound keeps a busy machine from
        // turning a slow answer into a missing one.
        ("FLOTILLA_SESSION__STOP_WAIT", "15s"),
    ];
    let mut procs = Procs(HashMap::new());
    procs.fleet(&url, &env);
    let (bus, client) = inspector(&url).await;

    let open = |task: &str| {
        let mut req = OpenSession::new(task);
        req.session_id = Some(SessionId::generate());
        req
    };
    let doomed = open("cancel-marker-41: compare three queues");
    let other = open("keep-marker-42: compare three caches");
    let doomed_id = doomed.session_id.clone().unwrap();
    let other_id = other.session_id.clone().unwrap();
    let doomed_done = client.watch(&doomed_id);
    let other_done = client.watch(&other_id);
    for req in [&doomed, &other] {
        let reply = client.open(req, Duration::from_secs(60)).await.unwrap();
        assert!(matches!(reply, OpenReply::Accepted { .. }), "{reply:?}");
    }

    // Wait until workers are in the middle of the doomed session's tasks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let running = bus
            .sessions()
            .get_matching::<TaskRecord>(&keys::claim_pattern(&doomed_id))
            .await
            .unwrap()
            .iter()
            .filter(|(_, r, _)| r.state == TaskRunState::Running)
            .count();
        // (A claimed task sends its model request a moment later: wait for it too.)
        if running > 0 && calls_mentioning(&fake, "cancel-marker-41") >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no task ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let reply = client
        .cancel(
            &doomed_id,
            Some("the user gave up".into()),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let calls_at_ack = calls_mentioning(&fake, "cancel-marker-41");
    let running_at_ack: Vec<String> = bus
        .sessions()
        .get_matching::<TaskRecord>(&keys::claim_pattern(&doomed_id))
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, r, _)| r.state == TaskRunState::Running)
        .map(|(k, _, _)| k)
        .collect();
    let (rec, _) = bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&doomed_id))
        .await
        .unwrap()
        .unwrap();
    let CancelReply::Cancelled {
        confirmed,
        expected,
        ..
    } = reply
    else {
        panic!("{reply:?}");
    };
    // serve and five agents, each confirmed it stopped the session's work.
    assert_eq!((confirmed, expected), (6, 6));
    assert_eq!(rec.status, SessionStatus::Cancelled);
    assert!(
        calls_at_ack >= 2,
        "a plan and at least one task call were made"
    );
    let tokens_at_ack = rec.counters.spend.tokens;

    let done = tokio::time::timeout(Duration::from_secs(10), doomed_done)
        .await
        .unwrap()
        .unwrap();
    let EventBody::Done {
        outcome, failure, ..
    } = &done.body
    else {
        panic!("{done:?}");
    };
    assert_eq!(*outcome, SessionOutcome::Cancelled);
    assert_eq!(failure.as_deref(), Some("the user gave up"));

    // The slot is free: nobody holds the session's slot for it.
    let slot: Option<(serde_json::Value, u64)> =
        bus.slots().get(&keys::slot(rec.slot)).await.unwrap();
    assert!(
        slot.is_none_or(|(v, _)| v["session_id"] != doomed_id.as_str()),
        "slot {} still held",
        rec.slot
    );

    // Twice the provider's latency later: not one more call for the cancelled
    // session, its spend unchanged, while the other session completes.
    let other = tokio::time::timeout(Duration::from_secs(90), other_done)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            &other.body,
            EventBody::Done {
                outcome: SessionOutcome::Completed,
                ..
            }
        ),
        "{other:?}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(calls_mentioning(&fake, "cancel-marker-41"), calls_at_ack);
    let (after, _) = bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&doomed_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.counters.spend.tokens, tokens_at_ack);
    assert_eq!(after.status, SessionStatus::Cancelled);
    // The tasks running at the cancel were aborted, not finished: their calls (2.5 s
    // each) would have ended and been committed by now.
    assert!(!running_at_ack.is_empty());
    for key in &running_at_ack {
        let (t, _) = bus
            .sessions()
            .get::<TaskRecord>(key)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t.state, TaskRunState::Running, "{key} was not aborted");
        let committed = bus
            .sessions()
            .get::<TaskRecord>(&commit_of(key))
            .await
            .unwrap();
        assert!(
            committed.is_none_or(|(c, _)| c.attempt < t.attempt),
            "{key} was committed, not aborted"
        );
    }
    assert!(calls_mentioning(&fake, "keep-marker-42") >= 6);

    // Again: already ended, idempotent; an unknown session: a typed error.
    let again = client
        .cancel(&doomed_id, None, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        matches!(
            again,
            CancelReply::AlreadyEnded {
                outcome: SessionOutcome::Cancelled,
                ..
            }
        ),
        "{again:?}"
    );
    let unknown = client
        .cancel(&SessionId::generate(), None, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        matches!(
            unknown,
            CancelReply::Rejected {
                code: ErrorCode::UnknownSession,
                ..
            }
        ),
        "{unknown:?}"
    );
    let out = Command::new(BIN)
        .args(["cancel", other_id.as_str(), "--json", "--nats-url", &url])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "already_ended");
    assert_eq!(v["outcome"], "completed");
}

/// A research question waits for a person; the research agent that asked is killed
/// with SIGKILL meanwhile. The answer still reaches the task: it runs again on the
/// other research process with the answer in its input, and the session completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_after_the_asking_worker_died_resumes_the_task_elsewhere() {
    use flotilla_protocol::{AnswerReply, OpenReply, OpenSession, SessionId, SessionOutcome};
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let env = [
        ("FLOTILLA_LLM__SIMULATED__LATENCY_MS", "20"),
        ("FLOTILLA_LLM__SIMULATED__BEHAVIOUR", "clarify_once"),
        ("FLOTILLA_SESSION__HUMAN_ROLES", "[\"research\"]"),
    ];
    let mut procs = Procs(HashMap::new());
    let research = procs.fleet(&url, &env);
    let (bus, client) = inspector(&url).await;
    let sid = SessionId::generate();
    let mut req = OpenSession::new("a question for a person, then a crash");
    req.session_id = Some(sid.clone());
    let done = client.watch(&sid);
    let reply = client.open(&req, Duration::from_secs(60)).await.unwrap();
    assert!(matches!(reply, OpenReply::Accepted { .. }), "{reply:?}");

    // The research task waits for a person; its record names the agent that asked.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (task_key, asker) = loop {
        let (rec, _) = bus
            .sessions()
            .get::<SessionRecord>(&keys::session(&sid))
            .await
            .unwrap()
            .unwrap();
        if let Some(t) = rec
            .tasks
            .iter()
            .find(|t| t.state == TaskState::AwaitingInput && t.role.as_str() == "research")
        {
            let key = keys::task(&sid, &t.role, &t.task_id);
            let (tr, _) = bus
                .sessions()
                .get::<TaskRecord>(&key)
                .await
                .unwrap()
                .unwrap();
            break (key, tr.holder.unwrap().to_string());
        }
        assert!(tokio::time::Instant::now() < deadline, "no question came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let victim = *research
        .iter()
        .find(|p| asker == format!("research-{p}"))
        .expect("one of the research processes asked");
    procs.kill9(victim);

    let reply = client
        .answer(
            &sid,
            None,
            "the one with the best docs",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(matches!(reply, AnswerReply::Accepted { .. }), "{reply:?}");
    let event = tokio::time::timeout(Duration::from_secs(90), done)
        .await
        .unwrap()
        .unwrap();
    let EventBody::Done {
        outcome, answer, ..
    } = &event.body
    else {
        panic!("{event:?}")
    };
    assert_eq!(*outcome, SessionOutcome::Completed, "{event:?}");
    let research_section = answer
        .as_ref()
        .unwrap()
        .sections
        .iter()
        .find(|s| s.role.as_str() == "research")
        .unwrap();
    assert!(
        research_section
            .output
            .summary
            .contains("(told: the one with the best docs)"),
        "{}",
        research_section.output.summary
    );
    let (tr, _) = bus
        .sessions()
        .get::<TaskRecord>(&task_key)
        .await
        .unwrap()
        .unwrap();
    let survivor = research.iter().find(|p| **p != victim).unwrap();
    assert_eq!(
        tr.holder.unwrap().to_string(),
        format!("research-{survivor}")
    );
    assert_eq!(tr.attempt, 2, "the answer is the task's next attempt");
}

/// Every `serve` and every agent is killed with SIGKILL while sessions are in every
/// phase, one waiting for a person and one in the middle of its synthesis among them.
/// New processes take over: every session completes from where it was, and the person's
/// answers (given after the crash) reach their tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_after_every_process_is_killed() {
    use flotilla_protocol::{AnswerReply, OpenReply, OpenSession, SessionId, SessionOutcome};
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let env = [
        ("FLOTILLA_LLM__SIMULATED__LATENCY_MS", "1200"),
        ("FLOTILLA_LLM__SIMULATED__JITTER", "0.3"),
        ("FLOTILLA_LLM__SIMULATED__BEHAVIOUR", "clarify_once"),
        ("FLOTILLA_LIVENESS__PROBE_EVERY", "200ms"),
        ("FLOTILLA_LIVENESS__DISCONNECT_CONFIRM", "600ms"),
        ("FLOTILLA_LIVENESS__HEARTBEAT_EVERY", "300ms"),
        ("FLOTILLA_LIVENESS__PRESENCE_TTL", "2s"),
    ];
    let mut procs = Procs(HashMap::new());
    procs.fleet(&url, &env);
    let (bus, client) = inspector(&url).await;

    let mut ids = Vec::new();
    let mut waits = Vec::new();
    for i in 0..6 {
        let sid = SessionId::generate();
        let mut req = OpenSession::new(format!("resume {i}: plan a data migration"));
        req.session_id = Some(sid.clone());
        req.human_input = i == 0;
        waits.push(client.watch(&sid));
        let reply = client.open(&req, Duration::from_secs(60)).await.unwrap();
        assert!(matches!(reply, OpenReply::Accepted { .. }), "{reply:?}");
        ids.push(sid);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let status = |sid: SessionId| {
        let bus = bus.clone();
        async move {
            bus.sessions()
                .get::<SessionRecord>(&keys::session(&sid))
                .await
                .unwrap()
                .unwrap()
                .0
                .status
        }
    };
    // Mid-synthesis: every task record committed, the session not ended (the last
    // result and the answer are one write, made after the synthesis call).
    let synthesizing = |sid: SessionId| {
        let bus = bus.clone();
        async move {
            let tasks = bus
                .sessions()
                .get_matching::<TaskRecord>(&keys::task_pattern(&sid))
                .await
                .unwrap();
            let (rec, _) = bus
                .sessions()
                .get::<SessionRecord>(&keys::session(&sid))
                .await
                .unwrap()
                .unwrap();
            tasks.len() == 4
                && tasks.iter().all(|(_, t, _)| t.state == TaskRunState::Done)
                && !rec.status.is_terminal()
        }
    };
    // Kill everything once one session waits for a person and another synthesizes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut mid_synthesis = None;
    loop {
        for (i, sid) in ids.iter().enumerate().skip(1) {
            if synthesizing(sid.clone()).await {
                mid_synthesis = Some(i);
            }
        }
        if mid_synthesis.is_some() && status(ids[0].clone()).await == SessionStatus::AwaitingInput {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never caught a synthesis"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let pids: Vec<u32> = procs.0.keys().copied().collect();
    for pid in pids {
        procs.kill9(pid);
    }
    let mut before = Vec::new();
    for sid in &ids {
        before.push(status(sid.clone()).await);
    }
    let mid_synthesis = mid_synthesis.unwrap();
    assert!(
        synthesizing(ids[mid_synthesis].clone()).await,
        "session {mid_synthesis} was mid-synthesis at the kill"
    );
    assert_eq!(before[0], SessionStatus::AwaitingInput);
    assert!(before.iter().all(|s| !s.is_terminal()), "{before:?}");

    // A new fleet; the person answers after the crash.
    procs.fleet(&url, &env);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while status(ids[0].clone()).await != SessionStatus::Completed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the waiting session never ended"
        );
        let (rec, _) = bus
            .sessions()
            .get::<SessionRecord>(&keys::session(&ids[0]))
            .await
            .unwrap()
            .unwrap();
        for t in rec
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::AwaitingInput)
        {
            // Refused while no serve answers yet, or when answered already.
            let reply = client
                .answer(
                    &ids[0],
                    Some(t.task_id.clone()),
                    "keep the old schema",
                    Duration::from_secs(10),
                )
                .await;
            if !matches!(reply, Ok(AnswerReply::Accepted { .. })) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, done) in waits.into_iter().enumerate() {
        let event = tokio::time::timeout(Duration::from_secs(120), done)
            .await
            .unwrap()
            .unwrap();
        let EventBody::Done {
            outcome, answer, ..
        } = &event.body
        else {
            panic!("{event:?}")
        };
        assert_eq!(
            *outcome,
            SessionOutcome::Completed,
            "session {i} was {:?}",
            before[i]
        );
        let (rec, _) = bus
            .sessions()
            .get::<SessionRecord>(&keys::session(&ids[i]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.counters.accepted, 4, "one accepted result per task");
        let sections = &answer.as_ref().unwrap().sections;
        assert_eq!(sections.len(), 4);
        if i == 0 {
            assert!(
                sections
                    .iter()
                    .all(|s| s.output.summary.contains("(told: keep the old schema)")),
                "{sections:?}"
            );
        }
    }
}

// ---- a 3-node cluster ----------------------------------------------------------------

/// The node leading the stream `stream` (0-based), as the cluster reports it.
async fn leader_of(bus: &Bus, cluster: &flotilla_testkit::NatsCluster, stream: &str) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut s) = bus.raw_js().get_stream(stream).await
            && let Ok(info) = s.info().await
            && let Some(name) = info.cluster.as_ref().and_then(|c| c.leader.clone())
            && let Some(i) = (0..3).find(|i| cluster.name(*i) == name)
        {
            return i;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{stream} has no leader"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An inspector on the whole cluster (three replicas).
async fn cluster_inspector(
    cluster: &flotilla_testkit::NatsCluster,
    ping_interval: Duration,
) -> (Bus, Client) {
    inspector_with(BusConfig {
        url: cluster.url_list(),
        replicas: 3,
        ping_interval,
        ..BusConfig::default()
    })
    .await
}

/// Every reassignment event in the log (per-subject counts of the events stream).
async fn reassigned_total(bus: &Bus) -> usize {
    use futures::StreamExt;
    let stream = bus
        .raw_js()
        .get_stream(bus.names().stream_events())
        .await
        .unwrap();
    let filter = format!("{}.s.*.ev.reassigned", bus.names().prefix());
    let mut counts = stream.info_with_subjects(filter).await.unwrap();
    let mut total = 0;
    while let Some(entry) = counts.next().await {
        total += entry.unwrap().1;
    }
    total
}

/// Node loss on three replicas, with the fleet as OS processes and the model behind a
/// fake OpenAI-compatible server that logs every call. In the middle of a run, with
/// tasks running, the node that leads the session records is killed with SIGKILL:
/// every session completes with exactly one accepted result per task, and the model
/// is called exactly as often as the sessions plan, plus at most one call per
/// reassignment the watchdog reports. The node is restarted and catches up (every node
/// healthy), then the next run loses the node leading the inboxes by then, and nothing
/// is lost either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_leading_node_twice_loses_nothing_and_repeats_no_model_call() {
    let mut cluster = flotilla_testkit::NatsCluster::start().unwrap();
    let urls = cluster.url_list();
    let fake = fake_provider(Duration::from_millis(1500)).await;
    let base = fake.base_url();
    let env = [
        ("FLOTILLA_NATS__REPLICAS", "3"),
        ("FLOTILLA_LLM__PROVIDER", "openai"),
        ("FLOTILLA_LLM__OPENAI__BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "sk-test"),
    ];
    let mut procs = Procs(HashMap::new());
    let research = procs.fleet(&urls, &env);
    let (bus, client) = cluster_inspector(&cluster, Duration::from_secs(10)).await;
    let sessions_stream = format!("KV_{}", bus.names().bucket_sessions());
    let research_inbox = bus
        .names()
        .stream_inbox(&flotilla_protocol::Role::parse("research").unwrap());
    let n = 6;
    let mut records = Vec::new();
    let mut killed = Vec::new();
    for (run, stream) in [sessions_stream.as_str(), research_inbox.as_str()]
        .into_iter()
        .enumerate()
    {
        let set = start_sessions(&client, n, &format!("node-loss-{run}"));
        // Tasks are running: the victim leads records and inboxes in flight.
        let _ = running_holder(&bus, &research).await;
        let mut victim = leader_of(&bus, &cluster, stream).await;
        if killed.contains(&victim) {
            // The second kill is of another node: the restarted one may lead by now.
            victim = leader_of(&bus, &cluster, &sessions_stream).await;
            if killed.contains(&victim) {
                victim = (victim + 1) % 3;
            }
        }
        eprintln!("run {run}: killing node {victim} (leader of {stream}?)");
        cluster.kill9(victim);
        killed.push(victim);
        records.extend(check_all_completed(&bus, set, n).await);
        cluster.restart(victim).unwrap();
        cluster.wait_healthy(Duration::from_secs(120)).unwrap();
    }
    eprintln!("killed nodes {killed:?}");
    assert_ne!(killed[0], killed[1], "two different nodes were lost");
    let reassigned = reassigned_total(&bus).await;
    assert_eq!(records.len(), 2 * n);
    // A plan, four tasks and a synthesis per session.
    let calls: usize = (0..2)
        .map(|run| calls_mentioning(&fake, &format!("node-loss-{run}")))
        .sum();
    eprintln!(
        "{calls} model calls for {} sessions, {reassigned} reassigned",
        2 * n
    );
    assert!(calls >= 6 * 2 * n, "{calls} calls");
    assert!(
        calls <= 6 * 2 * n + reassigned,
        "{calls} model calls: more than the sessions' {} plus {reassigned} reassignments; repeated: {:#?}",
        6 * 2 * n,
        repeated_calls(&fake)
    );
}

/// A partition: the node leading the session records is frozen (SIGSTOP: its
/// connections stay open, it answers nothing, the other two are the majority). The
/// processes connected to it notice within a few pings and reconnect to the others;
/// every session of the run completes while it is frozen, with one accepted result per
/// task. Thawed, it rejoins and catches up, and the next run completes too. The model
/// is called as the sessions plan, plus at most one call per reported reassignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_is_outvoted_and_rejoins_with_nothing_lost() {
    let cluster = flotilla_testkit::NatsCluster::start().unwrap();
    let urls = cluster.url_list();
    let fake = fake_provider(Duration::from_millis(1500)).await;
    let base = fake.base_url();
    let env = [
        ("FLOTILLA_NATS__REPLICAS", "3"),
        ("FLOTILLA_NATS__PING_INTERVAL", "1s"),
        ("FLOTILLA_LLM__PROVIDER", "openai"),
        ("FLOTILLA_LLM__OPENAI__BASE_URL", base.as_str()),
        ("OPENAI_API_KEY", "sk-test"),
    ];
    let mut procs = Procs(HashMap::new());
    let research = procs.fleet(&urls, &env);
    let (bus, client) = cluster_inspector(&cluster, Duration::from_secs(1)).await;
    let sessions_stream = format!("KV_{}", bus.names().bucket_sessions());
    let n = 6;
    let set = start_sessions(&client, n, "partition-0");
    let _ = running_holder(&bus, &research).await;
    let frozen = leader_of(&bus, &cluster, &sessions_stream).await;
    eprintln!("freezing node {frozen}, leader of {sessions_stream}");
    cluster.freeze(frozen).unwrap();
    let mut records = check_all_completed(&bus, set, n).await;
    let moved = leader_of(&bus, &cluster, &sessions_stream).await;
    assert_ne!(moved, frozen, "the majority elected another leader");
    cluster.thaw(frozen).unwrap();
    cluster.wait_healthy(Duration::from_secs(120)).unwrap();
    let set = start_sessions(&client, n, "partition-1");
    records.extend(check_all_completed(&bus, set, n).await);
    assert_eq!(records.len(), 2 * n);
    let reassigned = reassigned_total(&bus).await;
    let calls: usize = (0..2)
        .map(|run| calls_mentioning(&fake, &format!("partition-{run}")))
        .sum();
    eprintln!(
        "{calls} model calls for {} sessions, {reassigned} reassigned",
        2 * n
    );
    assert!(calls >= 6 * 2 * n, "{calls} calls");
    assert!(
        calls <= 6 * 2 * n + reassigned,
        "{calls} model calls: more than the sessions' {} plus {reassigned} reassignments; repeated: {:#?}",
        6 * 2 * n,
        repeated_calls(&fake)
    );
}

//! The `flotilla` binary as separate OS processes: `serve`, one `agent` per role,
//! `submit --wait`, and `demo --json` on its embedded server.

#![allow(clippy::expect_used, clippy::unwrap_used)] // helpers of a test binary: failures should panic

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use flotilla_testkit::NatsServer;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

/// Kills the child processes (SIGKILL) when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(args: &[&str], url: &str) -> Child {
    spawn_cmd(args, url).spawn().expect("flotilla runs")
}

/// The command [`spawn`] runs, to add to before spawning.
fn spawn_cmd(args: &[&str], url: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .args(["--nats-url", url])
        .env("RUST_LOG", "warn")
        .env("FLOTILLA_LLM__SIMULATED__LATENCY_MS", "20")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flotilla runs");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!(
                "flotilla {:?} did not finish within {timeout:?}",
                cmd.get_args().collect::<Vec<_>>()
            );
        }
    }
}

/// Runs `flotilla <args>` (with `env`), asserts it succeeded, and returns its stdout and
/// the JSON object on its last line.
fn run_json(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> (String, serde_json::Value) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    let out = run_with_timeout(cmd, timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "flotilla {args:?} failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.trim().lines().last().unwrap_or_default().to_owned();
    let v = serde_json::from_str(&last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}"));
    (stdout, v)
}

/// `flotilla [global] submit --wait <task>`, asked again while no `serve` is up yet: it
/// fails fast with a clear error when nobody serves, so wait for the service first.
fn submit_wait(global: &[&str], url: &str, task: &str) -> std::process::Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut cmd = Command::new(BIN);
        cmd.args(global)
            .args([
                "submit",
                "--wait",
                "--timeout-s",
                "60",
                "--nats-url",
                url,
                task,
            ])
            .env("RUST_LOG", "warn");
        let out = run_with_timeout(cmd, Duration::from_secs(90));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success()
            || std::time::Instant::now() > deadline
            || !stderr.contains("flotilla serve")
        {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn serve_agents_and_submit_as_separate_processes() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let mut procs = Procs(vec![spawn(&["serve"], &url)]);
    for role in ["research", "analysis", "writing", "review"] {
        procs.0.push(spawn(&["agent", "--role", role], &url));
    }
    let out = submit_wait(&[], &url, "draft a launch plan for a bakery");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "submit failed\nstdout: {stdout}\nstderr: {stderr}"
    );
    let sid = stdout.lines().next().unwrap_or_default();
    assert!(
        flotilla_protocol::SessionId::parse(sid).is_ok(),
        "first line is the session id: {stdout}"
    );
    for role in ["research", "analysis", "writing", "review"] {
        assert!(
            stdout.contains(&format!("## {role} (")),
            "answer has the {role} section: {stdout}"
        );
    }
    assert!(stdout.contains("bakery"));

    // The same through the durable queue, and an unknown role is refused clearly.
    let mut cmd = Command::new(BIN);
    cmd.args([
        "submit",
        "--queue",
        "--wait",
        "--timeout-s",
        "60",
        "--nats-url",
        &url,
        "queued bakery plan",
    ]);
    let out = run_with_timeout(cmd, Duration::from_secs(90));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = Command::new(BIN);
    cmd.args([
        "submit",
        "--roles",
        "research,analysis,astrology",
        "--nats-url",
        &url,
        "x",
    ]);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_role"));

    // A durable submission that can never be admitted lands in the dead-letter queue,
    // where `flotilla dlq` lists, shows and replays it.
    let mut cmd = Command::new(BIN);
    cmd.args([
        "submit",
        "--queue",
        "--roles",
        "research,analysis,astrology",
        "--nats-url",
        &url,
        "never admitted",
    ]);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "the queue accepts it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let entry = loop {
        let mut cmd = Command::new(BIN);
        cmd.args(["dlq", "ls", "--json", "--nats-url", &url]);
        let out = run_with_timeout(cmd, Duration::from_secs(30));
        assert!(out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if let Some(line) = stdout.lines().find(|l| l.contains("unknown_role")) {
            break serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter: {stdout}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(entry["subject"], "flotilla.submit");
    assert!(
        entry["payload"]
            .as_str()
            .unwrap()
            .contains("never admitted")
    );
    let seq = entry["seq"].as_u64().unwrap().to_string();
    let mut cmd = Command::new(BIN);
    cmd.args(["dlq", "show", &seq, "--nats-url", &url]);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(String::from_utf8_lossy(&out.stdout).contains("astrology"));
    let mut cmd = Command::new(BIN);
    cmd.args(["dlq", "replay", &seq, "--nats-url", &url]);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replayed dead letter"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(procs);
}

/// `flotilla <args> --nats-url <url>`: its stdout, after asserting it succeeded.
fn cli(args: &[&str], url: &str) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(args).args(["--nats-url", url]);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "flotilla {args:?}\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn live_views_list_sessions_replay_a_timeline_and_show_agents_and_memory() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let mut procs = Procs(vec![spawn(&["serve"], &url)]);
    // The agents share their findings in the session's memory (off by default).
    for role in ["research", "analysis", "writing", "review"] {
        let mut agent = spawn_cmd(&["agent", "--role", role], &url);
        agent.env(
            format!("FLOTILLA_ROLES__{}__SHARE_FINDINGS", role.to_uppercase()),
            "true",
        );
        procs.0.push(agent.spawn().expect("flotilla runs"));
    }
    let mut sids = Vec::new();
    for task in [
        "first: plan a bakery launch",
        "second: compare vector databases",
    ] {
        let out = submit_wait(&[], &url, task);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        sids.push(stdout.lines().next().unwrap().to_owned());
    }
    let wide = |s: &str| {
        s.lines()
            .filter(|l| l.chars().count() > 80)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    // sessions: newest first, with status, tokens and roles; filters; JSON.
    let table = cli(&["sessions"], &url);
    assert!(wide(&table).is_empty(), "{table}");
    let first = table.find(&sids[0]).expect("first session listed");
    let second = table.find(&sids[1]).expect("second session listed");
    assert!(second < first, "newest first:\n{table}");
    let rows: serde_json::Value =
        serde_json::from_str(&cli(&["sessions", "--json"], &url)).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2, "{rows}");
    assert_eq!(rows[0]["session_id"], sids[1].as_str());
    for r in rows.as_array().unwrap() {
        assert_eq!(r["status"], "completed");
        assert!(r["tokens"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["roles"].as_array().unwrap().len(), 4, "{r}");
    }
    let failed: serde_json::Value =
        serde_json::from_str(&cli(&["sessions", "--status", "failed", "--json"], &url)).unwrap();
    assert_eq!(failed, serde_json::json!([]));
    let recent: serde_json::Value =
        serde_json::from_str(&cli(&["sessions", "--since", "10m", "--json"], &url)).unwrap();
    assert_eq!(recent.as_array().unwrap().len(), 2);

    // watch: an ended session replays to done, plan, tasks with holders, durations.
    let timeline = cli(&["watch", &sids[0]], &url);
    assert!(wide(&timeline).is_empty(), "{timeline}");
    for want in [
        "opened",
        "planned",
        "dispatched",
        "ok in",
        " tok",
        " by research-",
        "done       completed",
    ] {
        assert!(timeline.contains(want), "{want} in:\n{timeline}");
    }
    assert!(
        timeline.trim_end().lines().last().unwrap().contains("done"),
        "{timeline}"
    );
    let events: Vec<serde_json::Value> = cli(&["watch", &sids[0], "--json"], &url)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.last().unwrap()["body"]["type"], "done");

    // agents: serve and one process per role, alive.
    let agents: serde_json::Value =
        serde_json::from_str(&cli(&["agents", "--json"], &url)).unwrap();
    let roles: std::collections::BTreeSet<String> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["role"].as_str().unwrap().to_owned())
        .collect();
    for role in ["orchestrator", "research", "analysis", "writing", "review"] {
        assert!(roles.contains(role), "{agents}");
    }
    assert!(
        agents
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["ghost"] == false),
        "{agents}"
    );
    assert!(wide(&cli(&["agents"], &url)).is_empty());

    // memory: the findings the agents shared (one key per task), with revisions; one
    // key in full.
    let mem: serde_json::Value =
        serde_json::from_str(&cli(&["memory", &sids[0], "--json"], &url)).unwrap();
    let findings: Vec<_> = mem
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["key"].as_str().unwrap_or("").starts_with("finding-"))
        .collect();
    assert_eq!(findings.len(), 4, "{mem}");
    for f in &findings {
        assert!(f["revision"].as_u64().unwrap() > 0, "{f}");
        assert_eq!(
            f["key"].as_str().unwrap(),
            format!("finding-{}", f["value"]["task_id"].as_str().unwrap()),
            "{f}"
        );
    }
    let research = findings
        .iter()
        .find(|f| f["value"]["role"] == "research")
        .unwrap_or_else(|| panic!("{mem}"));
    let one = cli(
        &["memory", &sids[0], research["key"].as_str().unwrap()],
        &url,
    );
    assert!(
        one.contains("revision") && one.contains("research"),
        "{one}"
    );

    // A process killed with SIGKILL leaves its presence behind (until its TTL, or
    // until a watchdog buries it): a ghost. Serve, whose watchdog would bury it within
    // a probe, goes first.
    let mut serve = procs.0.remove(0);
    serve.kill().unwrap();
    serve.wait().unwrap();
    let mut victim = procs.0.pop().unwrap();
    victim.kill().unwrap();
    victim.wait().unwrap();
    let agents: serde_json::Value =
        serde_json::from_str(&cli(&["agents", "--json"], &url)).unwrap();
    assert!(
        agents
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["ghost"] == true)
            .filter(|a| a["role"] == "review" || a["role"] == "orchestrator")
            .count()
            == 2,
        "{agents}"
    );
    drop(procs);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of `GET http://127.0.0.1:<port>/metrics`, once it answers.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            if body.starts_with("HTTP/1.1 200") {
                return body;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no metrics on port {port}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The sum of every sample of `name` whose labels contain all of `labels`.
fn sample(body: &str, name: &str, labels: &[&str]) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn serve_and_agents_export_prometheus_metrics_that_match_what_happened() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let (serve_port, research_port) = (free_port(), free_port());
    let serve_addr = format!("127.0.0.1:{serve_port}");
    let research_addr = format!("127.0.0.1:{research_port}");
    let mut procs = Procs(vec![spawn(&["serve", "--metrics-addr", &serve_addr], &url)]);
    procs.0.push(spawn(
        &[
            "agent",
            "--role",
            "research",
            "--metrics-addr",
            &research_addr,
        ],
        &url,
    ));
    for role in ["analysis", "writing", "review"] {
        procs.0.push(spawn(&["agent", "--role", role], &url));
    }
    for task in [
        "metrics one: plan a bakery launch",
        "metrics two: explain JetStream",
    ] {
        let out = submit_wait(&[], &url, task);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A submission naming an unknown role: one dead letter, by reason.
    let mut cmd = Command::new(BIN);
    cmd.args([
        "submit",
        "--queue",
        "--roles",
        "research,analysis,astrology",
        "--nats-url",
        &url,
        "x",
    ]);
    assert!(
        run_with_timeout(cmd, Duration::from_secs(30))
            .status
            .success()
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let body = scrape(serve_port);
        // The gauges refresh every 5 s.
        if sample(
            &body,
            "flotilla_dead_letters_total",
            &["reason=\"unknown_role\""],
        ) == 1.0
            && sample(&body, "flotilla_dead_letter_queue_depth", &[]) == 1.0
        {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        sample(&body, "flotilla_sessions_total", &["outcome=\"completed\""]),
        2.0,
        "{body}"
    );
    assert_eq!(
        sample(&body, "flotilla_sessions_total", &["outcome=\"failed\""]),
        0.0,
        "{body}"
    );
    assert_eq!(
        sample(&body, "flotilla_session_duration_seconds_count", &[]),
        2.0,
        "{body}"
    );
    assert_eq!(
        sample(&body, "flotilla_tasks_total", &["outcome=\"completed\""]),
        8.0,
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "flotilla_tasks_total",
            &["role=\"research\"", "outcome=\"completed\""]
        ),
        2.0,
        "{body}"
    );
    assert_eq!(
        sample(&body, "flotilla_sessions_in_use", &[]),
        0.0,
        "{body}"
    );
    assert!(
        sample(&body, "flotilla_session_slots", &[]) >= 1.0,
        "{body}"
    );
    assert_eq!(
        sample(&body, "flotilla_inbox_depth", &["role=\"research\""]),
        0.0,
        "{body}"
    );
    // The orchestrator's own calls: a plan and a synthesis per session.
    assert_eq!(
        sample(&body, "flotilla_llm_calls_total", &[]),
        4.0,
        "{body}"
    );
    assert!(
        sample(
            &body,
            "flotilla_llm_tokens_total",
            &["direction=\"output\""]
        ) > 0.0
    );
    assert_eq!(
        sample(&body, "flotilla_forged_results_total", &[]),
        0.0,
        "{body}"
    );

    // The message counters the bench summaries read are these metrics: 8 tasks
    // dispatched, none redelivered or de-duplicated.
    assert_eq!(
        sample(&body, "flotilla_tasks_dispatched_total", &[]),
        8.0,
        "{body}"
    );
    assert_eq!(
        sample(&body, "flotilla_redeliveries_total", &[]),
        0.0,
        "{body}"
    );
    assert_eq!(
        sample(&body, "flotilla_publish_duplicates_total", &[]),
        0.0,
        "{body}"
    );
    // start and 4 results per session, and the queued submission.
    assert!(sample(&body, "flotilla_acks_total", &[]) >= 10.0, "{body}");
    let serve_body = body;

    // The research agent: one call per research task, tokens both ways.
    let body = scrape(research_port);
    assert_eq!(
        sample(&body, "flotilla_llm_calls_total", &[]),
        2.0,
        "{body}"
    );
    for dir in ["input", "output"] {
        let d = format!("direction=\"{dir}\"");
        assert!(
            sample(&body, "flotilla_llm_tokens_total", &[d.as_str()]) > 0.0,
            "{body}"
        );
    }
    assert_eq!(
        sample(&body, "flotilla_acks_total", &[]),
        2.0,
        "one per task: {body}"
    );
    assert_eq!(
        sample(&body, "flotilla_nats_connects_total", &[]),
        1.0,
        "{body}"
    );

    // Every metric the shipped Grafana dashboard queries is exported by these
    // processes, and is in the catalogue.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/grafana/dashboards/flotilla.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("flotilla_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 20, "{queried:?}");
    let exported = |name: &str| {
        [&serve_body, &body].iter().any(|b| {
            b.lines().any(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
        })
    };
    for name in &queried {
        assert!(
            exported(name),
            "the dashboard queries {name}, which nobody exports"
        );
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            flotilla_bus::metrics::CATALOG
                .iter()
                .any(|(n, _, _)| *n == base),
            "{base} is not in flotilla_bus::metrics::CATALOG"
        );
    }
    drop(procs);
}

#[test]
fn demo_runs_on_its_own_embedded_server() {
    let (stdout, v) = run_json(
        &[
            "demo",
            "--sessions",
            "12",
            "--llm-latency-ms",
            "20",
            "--json",
        ],
        &[],
        Duration::from_secs(180),
    );
    let last = v.to_string();
    for key in [
        "sessions",
        "completed",
        "failed",
        "lost",
        "p50_ms",
        "p99_ms",
        "sessions_per_s",
    ] {
        assert!(v.get(key).is_some(), "summary has {key}: {last}");
    }
    assert_eq!(v["sessions"], 12);
    assert_eq!(v["completed"], 12);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["lost_messages"], 0);
    assert_eq!(v["dispatched"], 48);
    assert!(v["p99_ms"].as_u64().unwrap() >= v["p50_ms"].as_u64().unwrap());
    assert!(stdout.contains("embedded"));
}

#[test]
fn chaos_bench_kills_processes_and_loses_nothing() {
    let (_, v) = run_json(
        &[
            "bench",
            "sessions",
            "--sessions",
            "16",
            "--concurrency",
            "8",
            "--llm-latency-ms",
            "300",
            "--chaos",
            "kill-agents",
            "--chaos",
            "kill-serve",
            "--chaos-every-ms",
            "800",
            "--json",
        ],
        &[
            ("FLOTILLA_WORKER__ACK_WAIT", "2s"),
            ("FLOTILLA_ORCHESTRATOR__ACK_WAIT", "2s"),
        ],
        Duration::from_secs(240),
    );
    assert_eq!(v["completed"], 16, "{v}");
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["duplicates"], 0, "{v}");
    assert!(v["killed"].as_u64().unwrap() >= 1, "{v}");
    for key in ["reassigned", "reassign_p50_ms", "reassign_p99_ms"] {
        assert!(v.get(key).is_some(), "{key} in {v}");
    }
    assert_eq!(v["dispatched"], 64, "{v}");
}

#[test]
fn a_flood_of_opens_is_answered_pool_full_and_running_sessions_complete() {
    let (_, v) = run_json(
        &[
            "bench",
            "flood",
            "--pool-size",
            "6",
            "--sessions",
            "3",
            "--llm-latency-ms",
            "100",
            "--flood-s",
            "3",
            "--json",
        ],
        &[],
        Duration::from_secs(240),
    );
    // Every open got an answer: accepted while slots were free, then pool_full with
    // a retry-after; never a timeout, never anything else.
    let f = &v["flood"];
    assert!(f["requests"].as_u64().unwrap() >= 10, "{v}");
    assert_eq!(f["unanswered"], 0, "{v}");
    assert_eq!(f["other_rejections"], 0, "{v}");
    assert!(f["pool_full"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(f["pool_full"], f["pool_full_with_retry_after"], "{v}");
    assert_eq!(
        f["requests"].as_u64().unwrap(),
        f["accepted"].as_u64().unwrap() + f["pool_full"].as_u64().unwrap(),
        "{v}"
    );
    // The sessions that were running completed, in both phases.
    assert_eq!(v["alone"]["completed"], 3, "{v}");
    assert_eq!(v["flooded"]["completed"], 3, "{v}");
    assert!(v["serve_rss_peak_kb"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn memory_bench_across_processes_loses_no_update() {
    let (_, v) = run_json(
        &[
            "bench",
            "memory",
            "--writers",
            "6",
            "--appends",
            "25",
            "--processes",
            "3",
            "--json",
        ],
        &[],
        Duration::from_secs(180),
    );
    for key in [
        "appends",
        "final_len",
        "lost_updates",
        "duplicates",
        "conflict_rate",
        "ops_per_s",
        "raw_ops_per_s",
    ] {
        assert!(v.get(key).is_some(), "{key} in {v}");
    }
    assert_eq!(v["appends"], 150);
    assert_eq!(v["final_len"], 150);
    assert_eq!(v["lost_updates"], 0);
    assert_eq!(v["duplicates"], 0);
    assert_eq!(v["processes"], 3);
}

/// A new kind of agent with no code: a role defined only in a configuration file
/// (prompt, model, turns, inbox bound, ack wait), run with `flotilla agent --role`.
#[test]
fn a_role_defined_only_in_config_runs_with_no_code() {
    let server = NatsServer::start().unwrap();
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotilla.toml");
    std::fs::write(
        &path,
        r#"
[session]
roles = ["research", "analysis", "legal"]

[roles.legal]
system_prompt = "You are the legal specialist. Check the plan for legal risks and answer with JSON."
model = "legal-model"
max_turns = 2
call_timeout = "30s"
history_turns = 2
inbox_bound = 4
ack_wait = "20s"
"#,
    )
    .unwrap();
    let cfg = path.to_str().unwrap();
    let mut procs = Procs(vec![spawn(&["--config", cfg, "serve"], &url)]);
    for role in ["research", "analysis", "legal"] {
        procs
            .0
            .push(spawn(&["--config", cfg, "agent", "--role", role], &url));
    }
    let out = submit_wait(&["--config", cfg], &url, "open a bakery in another country");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "submit failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("## legal ("),
        "the config-defined role did its task: {stdout}"
    );
    // A role that is not configured is refused with a clear message.
    let mut cmd = Command::new(BIN);
    cmd.args([
        "--config",
        cfg,
        "agent",
        "--role",
        "astrology",
        "--nats-url",
        &url,
    ]);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in session.roles"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn limits_bench_drives_processes_through_the_limiter_without_429s() {
    let (_, v) = run_json(
        &[
            "bench",
            "limits",
            "--rpm",
            "60",
            "--tpm",
            "3000",
            "--processes",
            "2",
            "--concurrency",
            "8",
            "--duration-s",
            "6",
            "--window-s",
            "2",
            "--latency-ms",
            "20",
            "--json",
        ],
        &[],
        Duration::from_secs(120),
    );
    for key in [
        "requests",
        "http_429",
        "quota_used_pct",
        "permits_per_s",
        "added_p50_ms",
        "added_p99_ms",
    ] {
        assert!(v.get(key).is_some(), "{key} in {v}");
    }
    assert_eq!(v["http_429"], 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert!(v["requests"].as_u64().unwrap() > 0, "{v}");
    assert!(
        v["offered_per_s"].as_f64().unwrap() >= 2.0 * v["quota_requests_per_s"].as_f64().unwrap(),
        "{v}"
    );
}

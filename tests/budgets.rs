//! Budgets against adversarial simulated models: each runaway behaviour ends its
//! session with an outcome that names the budget, token spend overshoots a budget by
//! at most one call, and a session never has more agent calls in flight than its cap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_llm::{
    Behaviour, CompletionRequest, LlmClient, LlmFuture, SimConfig, SimulatedProvider, schema,
};
use flotilla_protocol::{
    BudgetKind, EventBody, Ledger, SessionOutcome, SessionRecord, subject::keys,
};
use flotilla_tests::{TestFleet, spec};

fn sim(behaviour: Behaviour) -> Arc<dyn LlmClient> {
    Arc::new(SimulatedProvider::new(SimConfig {
        latency_ms: 5,
        behaviour,
        ..SimConfig::default()
    }))
}

/// Runs one session to its end; returns the `done` body and the session record.
async fn run(fleet: &TestFleet, task: &str) -> (EventBody, SessionRecord) {
    let (finished, _) = fleet
        .client
        .run(task, Duration::from_secs(120))
        .await
        .expect("the session ends");
    let (rec, _) = fleet
        .bus
        .sessions()
        .get::<SessionRecord>(&keys::session(&finished.session_id))
        .await
        .unwrap()
        .unwrap();
    (finished.event.body, rec)
}

fn assert_completed(done: &EventBody) {
    assert!(
        matches!(
            done,
            EventBody::Done {
                outcome: SessionOutcome::Completed,
                ..
            }
        ),
        "{done:?}"
    );
}

fn stopped_by(done: &EventBody) -> Option<BudgetKind> {
    match done {
        EventBody::Done {
            outcome: SessionOutcome::Failed,
            budget,
            failure,
            ..
        } => {
            assert!(
                failure.as_deref().unwrap_or("").contains("budget"),
                "{failure:?}"
            );
            *budget
        }
        other => panic!("expected a failed session, got {other:?}"),
    }
}

/// The events of a session, in order.
async fn events(fleet: &TestFleet, rec: &SessionRecord) -> Vec<EventBody> {
    flotilla_tests::events(fleet, &rec.session_id)
        .await
        .into_iter()
        .map(|e| e.body)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_never_says_done_is_stopped_by_max_turns() {
    let mut s = spec("");
    s.control.budgets.max_turns = 5;
    let fleet = TestFleet::start(s, sim(Behaviour::NeverDone)).await;
    let (done, rec) = run(&fleet, "never finish").await;
    assert_eq!(stopped_by(&done), Some(BudgetKind::Turns));
    assert_eq!(rec.stopped_by, Some(BudgetKind::Turns));
    let evs = events(&fleet, &rec).await;
    assert!(evs.iter().any(|e| matches!(e, EventBody::BudgetExhausted { budget: BudgetKind::Turns, reason, .. } if reason.contains("5 turns"))), "{evs:?}");
    // The stopping task made exactly max_turns calls.
    assert!(rec.counters.spend.calls >= 5, "{:?}", rec.counters.spend);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn improve_until_perfect_is_stopped_by_the_task_token_budget_within_one_call() {
    let mut s = spec("");
    s.control.budgets.max_turns = 1_000;
    s.control.budgets.task_tokens = 6_000;
    let fleet = TestFleet::start(s, sim(Behaviour::ImproveForever)).await;
    let (done, rec) = run(&fleet, "improve this until it is perfect").await;
    assert_eq!(stopped_by(&done), Some(BudgetKind::TaskTokens));
    let evs = events(&fleet, &rec).await;
    let reason = evs
        .iter()
        .find_map(|e| match e {
            EventBody::BudgetExhausted {
                budget: BudgetKind::TaskTokens,
                reason,
                ..
            } => Some(reason.clone()),
            _ => None,
        })
        .expect("a budget_exhausted event");
    // "task spent <n> of 6000 tokens"
    let spent: u64 = reason
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected reason {reason}"));
    let largest = rec.counters.spend.largest_call;
    assert!(spent >= 6_000, "{reason}");
    assert!(
        spent - 6_000 <= largest,
        "overshoot {} exceeds the largest call {largest}",
        spent - 6_000
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_token_budget_is_shared_by_every_agent_and_overshoots_by_at_most_one_call() {
    let mut s = spec("");
    s.control.budgets.max_turns = 1_000;
    s.control.budgets.session_tokens = 15_000;
    let fleet = TestFleet::start(s, sim(Behaviour::ImproveForever)).await;
    let (done, rec) = run(&fleet, "three agents improving at once").await;
    assert_eq!(stopped_by(&done), Some(BudgetKind::SessionTokens));
    // Let calls still in flight settle, then read the session's ledger.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ledger = flotilla_agent::SessionLedger::new(fleet.bus.clone())
        .read(&rec.session_id)
        .await
        .unwrap();
    assert!(ledger.tokens >= 15_000, "{ledger:?}");
    assert!(
        ledger.tokens - 15_000 <= ledger.largest_call,
        "overshoot {} exceeds one call ({}): {ledger:?}",
        ledger.tokens - 15_000,
        ledger.largest_call
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clarification_ping_pong_is_cut_off_after_the_budget() {
    let fleet = TestFleet::start(spec(""), sim(Behaviour::ClarifyForever)).await;
    let (done, rec) = run(&fleet, "an ambiguous task").await;
    assert_eq!(stopped_by(&done), Some(BudgetKind::Clarifications));
    assert_eq!(rec.counters.clarifications, 6, "the default budget");
    let evs = events(&fleet, &rec).await;
    let answered: Vec<(u32, bool)> = evs
        .iter()
        .filter_map(|e| match e {
            EventBody::Clarification { n, closed, .. } => Some((*n, *closed)),
            _ => None,
        })
        .collect();
    assert_eq!(
        answered.iter().filter(|(_, closed)| !closed).count(),
        6,
        "{answered:?}"
    );
    assert!(
        answered.iter().any(|(_, closed)| *closed),
        "the orchestrator committed"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_clarification_budget_the_orchestrator_commits_and_the_session_completes() {
    let fleet = TestFleet::start(spec(""), sim(Behaviour::ClarifyUntilClosed)).await;
    let (done, rec) = run(&fleet, "an ambiguous task, then an answer").await;
    assert_completed(&done);
    assert_eq!(rec.counters.clarifications, 6);
    assert!(
        rec.tasks.iter().all(|t| t.questions_closed),
        "{:?}",
        rec.tasks
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_tool_call_forever_opens_the_circuit() {
    let fleet = TestFleet::start(spec(""), sim(Behaviour::SameToolForever)).await;
    let (done, rec) = run(&fleet, "search forever").await;
    assert_eq!(stopped_by(&done), Some(BudgetKind::CircuitBreaker));
    let evs = events(&fleet, &rec).await;
    assert!(
        evs.iter().any(
            |e| matches!(e, EventBody::CircuitOpen { reason, .. } if reason.contains("3 times"))
        ),
        "{evs:?}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_token_budget_stops_sessions_fleet_wide() {
    let mut s = spec("");
    s.control.limits.global_token_budget = 6_000;
    let fleet = TestFleet::start(s, sim(Behaviour::Cooperative)).await;
    let mut stopped = None;
    for i in 0..10 {
        let (done, _) = run(&fleet, &format!("session {i}")).await;
        if let EventBody::Done {
            outcome: SessionOutcome::Failed,
            ..
        } = &done
        {
            stopped = Some((i, stopped_by(&done)));
            break;
        }
    }
    let (i, budget) = stopped.expect("the global budget ran out");
    assert!(i >= 1, "the first session fits the budget");
    assert_eq!(budget, Some(BudgetKind::GlobalTokens));
    // The leader's fleet-wide ledger: past the budget by at most one call.
    let ledger = flotilla_tests::eventually(Duration::from_secs(10), || async {
        fleet
            .bus
            .limits()
            .get::<Ledger>(flotilla_control::limiter::GLOBAL_KEY)
            .await
            .unwrap()
            .map(|(l, _)| l)
            .filter(|l| l.tokens >= 6_000)
    })
    .await
    .expect("the global ledger is written");
    assert!(
        ledger.tokens - 6_000 <= ledger.largest_call,
        "overshoot {} exceeds one call: {ledger:?}",
        ledger.tokens - 6_000
    );
    fleet.stop().await;
}

/// Counts calls in flight per session.
struct Concurrency {
    inner: SimulatedProvider,
    now: Mutex<HashMap<String, usize>>,
    max: Mutex<HashMap<String, usize>>,
}

impl LlmClient for Concurrency {
    fn complete<'a>(&'a self, request: &'a CompletionRequest) -> LlmFuture<'a> {
        Box::pin(async move {
            let worker =
                request.response_format.as_ref().map(|f| &*f.name) == Some(schema::TASK_OUTPUT);
            let input: serde_json::Value = request
                .messages
                .iter()
                .find(|m| m.role == flotilla_llm::ChatRole::User)
                .and_then(|m| serde_json::from_str(&m.content).ok())
                .unwrap_or_default();
            let sid = input["session_id"].as_str().unwrap_or("").to_owned();
            if worker {
                let mut now = self.now.lock().unwrap();
                let n = now.entry(sid.clone()).or_default();
                *n += 1;
                let mut max = self.max.lock().unwrap();
                let m = max.entry(sid.clone()).or_default();
                *m = (*m).max(*n);
            }
            let out = self.inner.complete(request).await;
            if worker {
                *self.now.lock().unwrap().get_mut(&sid).unwrap() -= 1;
            }
            out
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_never_has_more_agent_calls_in_flight_than_its_cap() {
    let mut s = spec("");
    s.control.session.max_roles = 5;
    s.control
        .session
        .roles
        .push(flotilla_protocol::Role::parse("qa").unwrap());
    let probe = Arc::new(Concurrency {
        inner: SimulatedProvider::new(SimConfig {
            // Long calls, so the third dispatch overlaps the first two even on a
            // loaded machine: the cap must be reached, not only respected.
            latency_ms: 2_000,
            jitter: 0.0,
            subtasks_per_role: 2,
            ..SimConfig::default()
        }),
        now: Mutex::default(),
        max: Mutex::default(),
    });
    s.control.session.max_tasks = 10;
    s.workers_per_role = 2;
    let fleet = TestFleet::start(s, probe.clone()).await;
    let mut runs = Vec::new();
    for i in 0..4 {
        let client = fleet.client.clone();
        runs.push(tokio::spawn(async move {
            client
                .run(&format!("ten tasks {i}"), Duration::from_secs(120))
                .await
        }));
    }
    for r in runs {
        let (finished, _) = r.await.unwrap().expect("session ends");
        assert!(finished.completed(), "{:?}", finished.event.body);
    }
    let max = probe.max.lock().unwrap().clone();
    assert_eq!(max.len(), 4, "{max:?}");
    assert!(max.values().all(|m| *m <= 3), "over the cap: {max:?}");
    assert!(
        max.values().any(|m| *m == 3),
        "the cap was reached: {max:?}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_counts_every_call_of_every_task() {
    let fleet = TestFleet::start(spec(""), sim(Behaviour::TwoTurns)).await;
    let (done, rec) = run(&fleet, "two turns each").await;
    assert_completed(&done);
    assert_eq!(rec.counters.spend.calls, 8, "{:?}", rec.counters.spend);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_outgrowing_the_call_budget_is_stopped_by_it() {
    let mut s = spec("");
    s.control.budgets.max_turns = 1_000;
    s.control.budgets.call_tokens = 3_000;
    let fleet = TestFleet::start(s, sim(Behaviour::ImproveForever)).await;
    let (done, rec) = run(&fleet, "ever longer drafts").await;
    assert_eq!(stopped_by(&done), Some(BudgetKind::CallTokens));
    let evs = events(&fleet, &rec).await;
    assert!(
        evs.iter().any(|e| matches!(e, EventBody::BudgetExhausted { budget: BudgetKind::CallTokens, reason, .. } if reason.contains("call budget 3000"))),
        "{evs:?}"
    );
    // No call was allowed past the budget: each used at most 3000 tokens.
    assert!(
        rec.counters.spend.largest_call <= 3_000,
        "{:?}",
        rec.counters.spend
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_keeps_its_last_turns_and_a_summary_of_the_rest() {
    let mut s = spec("");
    s.control.budgets.max_turns = 5;
    for role in s.control.session.roles.clone() {
        s.roles.insert(
            role,
            flotilla_agent::RoleSpec {
                history_turns: Some(2),
                ..Default::default()
            },
        );
    }
    let fleet = TestFleet::start(s, sim(Behaviour::NeverDone)).await;
    let (done, rec) = run(&fleet, "keep going").await;
    assert_eq!(stopped_by(&done), Some(BudgetKind::Turns));
    let stopped = rec
        .tasks
        .iter()
        .find(|t| t.last_error.as_deref().is_some_and(|e| e.contains("turns")))
        .expect("the task that ran out of turns");
    let (h, _) = fleet
        .bus
        .sessions()
        .get::<flotilla_protocol::AgentHistory>(&keys::history(
            &rec.session_id,
            &stopped.role,
            &stopped.task_id,
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(h.turns_taken, 5);
    assert_eq!(h.recent.len(), 2, "the window");
    assert!(h.recent[1].assistant.contains("step 5"), "{:?}", h.recent);
    for n in 1..=3 {
        assert!(h.summary.contains(&format!("[turn {n}]")), "{}", h.summary);
    }
    assert!(h.summary.contains("step 1"), "{}", h.summary);
    assert!(h.tokens > 0);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_global_budget_also_stops_the_orchestrator_at_planning() {
    let mut s = spec("");
    // One token: the first call (a plan) is admitted, every later one refused.
    s.control.limits.global_token_budget = 1;
    let fleet = TestFleet::start(s, sim(Behaviour::Cooperative)).await;
    let (first, _) = run(&fleet, "the only call that fits").await;
    assert_eq!(stopped_by(&first), Some(BudgetKind::GlobalTokens));
    // The next session's first call is the orchestrator's plan: refused, and the
    // session ends at once instead of retrying the plan forever.
    let (second, rec) = run(&fleet, "no budget left to plan").await;
    assert_eq!(stopped_by(&second), Some(BudgetKind::GlobalTokens));
    assert!(rec.tasks.is_empty(), "it never planned: {:?}", rec.tasks);
    fleet.stop().await;
}

/// The session's ledger counter: `None` when nothing was ever charged to it.
async fn ledger_messages(fleet: &TestFleet, rec: &SessionRecord) -> Option<u64> {
    let names = fleet.bus.names();
    let stream = fleet
        .bus
        .raw_js()
        .get_stream(names.stream_spend())
        .await
        .unwrap();
    stream
        .get_last_raw_message_by_subject(&names.spend(&rec.session_id))
        .await
        .ok()
        .map(|m| m.sequence)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_within_its_budget_runs_on_allowances_without_ledger_round_trips() {
    let s = spec("");
    let b = s.control.budgets.clone();
    let fleet = TestFleet::start(s, sim(Behaviour::Cooperative)).await;
    let (done, rec) = run(&fleet, "a plain task").await;
    assert_completed(&done);
    assert_eq!(
        ledger_messages(&fleet, &rec).await,
        None,
        "no ledger traffic"
    );
    let a = &rec.tokens;
    assert_eq!(a.budget, b.session_tokens);
    assert_eq!(a.allowance, b.task_tokens + b.call_tokens);
    assert!(!a.metered);
    assert!(rec.tasks.iter().all(|t| t.allowance == 0), "all given back");
    // What was charged: the agents' reported tokens plus the orchestrator's calls.
    let agents = rec.counters.spend.tokens;
    assert!(agents > 0);
    assert!(
        a.granted > agents && a.granted < a.allowance,
        "granted {} for agents' {agents}",
        a.granted
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowances_that_do_not_all_fit_take_turns_and_the_session_completes_off_the_ledger() {
    let mut s = spec("");
    // Room for two attempts' worst case at a time, not four.
    let allowance = s.control.budgets.task_tokens + s.control.budgets.call_tokens;
    s.control.budgets.session_tokens = 2 * allowance + allowance / 2;
    let fleet = TestFleet::start(s, sim(Behaviour::Cooperative)).await;
    let (done, rec) = run(&fleet, "four roles, two allowances").await;
    assert_completed(&done);
    assert_eq!(ledger_messages(&fleet, &rec).await, None);
    assert!(!rec.tokens.metered);
    assert_eq!(rec.counters.accepted, 4);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_smaller_than_one_allowance_meters_every_call_on_the_ledger() {
    let mut s = spec("");
    let allowance = s.control.budgets.task_tokens + s.control.budgets.call_tokens;
    s.control.budgets.session_tokens = allowance - 1;
    let fleet = TestFleet::start(s, sim(Behaviour::Cooperative)).await;
    let (done, rec) = run(&fleet, "a tight budget").await;
    assert_completed(&done);
    assert!(rec.tokens.metered);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ledger = flotilla_agent::SessionLedger::new(fleet.bus.clone())
        .read(&rec.session_id)
        .await
        .unwrap();
    // The seed (the plan's tokens) and every agent's and the synthesis's call.
    assert_eq!(ledger.reserved, 0, "{ledger:?}");
    assert!(
        ledger.tokens > rec.counters.spend.tokens && ledger.tokens >= rec.tokens.granted,
        "{ledger:?} {:?}",
        rec.tokens
    );
    assert_eq!(
        ledger.calls,
        rec.counters.spend.calls + 1,
        "agents' calls and the synthesis"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_message_with_a_made_up_allowance_is_dead_lettered() {
    use flotilla_protocol::{SessionStatus, TaskState, headers};
    let fleet = TestFleet::start(spec(""), sim(Behaviour::Cooperative)).await;
    let (done, rec) = run(&fleet, "a real session").await;
    assert_completed(&done);
    // Make the session's first task look dispatched with an allowance of 58,192, as the
    // orchestrator would have it, and publish a task message that claims far more.
    let key = keys::session(&rec.session_id);
    let (mut rec, rev) = fleet
        .bus
        .sessions()
        .get::<SessionRecord>(&key)
        .await
        .unwrap()
        .unwrap();
    rec.status = SessionStatus::Running;
    rec.tasks[0].state = TaskState::Dispatched;
    rec.tasks[0].attempt = 2;
    rec.tasks[0].allowance = 58_192;
    fleet.bus.sessions().update(&key, &rec, rev).await.unwrap();
    let t = &rec.tasks[0];
    let forged = serde_json::json!({
        "kind": "task", "v": 1, "session_id": rec.session_id, "task_id": t.task_id,
        "role": t.role, "attempt": 2, "instruction": t.instruction, "context": rec.task,
        "allowance": 10_000_000u64,
    });
    let names = fleet.bus.names().clone();
    let mut dlq = fleet
        .bus
        .raw_js()
        .get_stream(names.stream_dlq())
        .await
        .unwrap();
    let before = dlq.info().await.unwrap().state.last_sequence;
    fleet
        .bus
        .raw_js()
        .publish(
            names.inbox(&rec.session_id, &t.role),
            serde_json::to_vec(&forged).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let entry = flotilla_tests::dead_letter_after(&fleet.bus, before)
        .await
        .expect("the forged task is dead-lettered");
    assert_eq!(
        entry.headers.get(headers::REASON).map(|v| v.as_str()),
        Some("invalid")
    );
    // No worker ran it: the task record is still the first attempt's.
    let (task_rec, _) = fleet
        .bus
        .sessions()
        .get::<flotilla_protocol::TaskRecord>(&keys::task(&rec.session_id, &t.role, &t.task_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(task_rec.attempt, 1);
    fleet.stop().await;
}

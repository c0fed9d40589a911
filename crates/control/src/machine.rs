//! The session state machine: pure functions from (record, input) to the next record,
//! with the effects to perform written into the record's outbox. No I/O, no clock:
//! `now` is an input.
//!
//! ```text
//! planning --plan--> running --all tasks done--> synthesizing --answer--> completed
//!     \                 \--a task failed for good-----------------------> failed
//!      \--plan invalid too often------------------------------------------> failed
//! any state but an ended one --cancel--> cancelled, --deadline--> deadline_exceeded
//! ```

use flotilla_protocol::{
    Answer, BudgetKind, Effect, EventBody, Plan, PlannedTask, ResultMessage, SessionOutcome,
    SessionRecord, SessionStatus, TaskEntry, TaskId, TaskOutcome, TaskState,
};

/// What became of a result message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultVerdict {
    /// Accepted as the task's result.
    Accepted,
    /// The attempt failed; the task will be retried.
    Retrying,
    /// The attempt failed and the task has no attempts left.
    Failed,
    /// A duplicate of an already handled result: nothing changed.
    Duplicate,
    /// For an attempt that is no longer current: fenced off.
    Stale,
    /// Names a task or role the session does not have: a forged or misrouted message.
    Foreign(String),
}

fn emit(rec: &mut SessionRecord, id: String, body: EventBody) {
    rec.outbox.push(Effect::Emit { id, body });
}

/// Applies an accepted plan: the task table, the `planned` event, and the first
/// dispatches.
pub fn on_planned(rec: &mut SessionRecord, plan: &Plan, max_in_flight: usize, now: u64) {
    rec.tasks = plan
        .subtasks
        .iter()
        .enumerate()
        .map(|(i, s)| TaskEntry {
            task_id: TaskId::nth(i + 1),
            role: s.role.clone(),
            instruction: s.instruction.clone(),
            state: TaskState::Pending,
            attempt: 0,
            last_error: None,
            clarification: None,
            questions_closed: false,
            allowance: 0,
            tokens: 0,
            question: None,
            input_deadline_ms: None,
        })
        .collect();
    rec.status = SessionStatus::Running;
    rec.updated_ms = now;
    let planned = planned_event(rec);
    emit(rec, "planned".into(), planned);
    fill(rec, max_in_flight);
}

/// The `planned` event of `rec`'s task table.
fn planned_event(rec: &SessionRecord) -> EventBody {
    let tasks = rec
        .tasks
        .iter()
        .map(|t| PlannedTask {
            task_id: t.task_id.clone(),
            role: t.role.clone(),
            instruction: t.instruction.clone(),
        })
        .collect();
    EventBody::Planned { tasks }
}

/// Ends the session as failed.
pub fn fail(rec: &mut SessionRecord, failure: String, now: u64) {
    fail_with(rec, failure, None, now);
}

/// Ends the session because `budget` ran out: a `budget_exhausted` (or, for the
/// circuit breaker, `circuit_open`) event, then `done` naming the budget.
pub fn stop(
    rec: &mut SessionRecord,
    budget: BudgetKind,
    task: Option<&TaskEntry>,
    reason: String,
    now: u64,
) {
    let body = match (budget, task) {
        (BudgetKind::CircuitBreaker, Some(t)) => EventBody::CircuitOpen {
            task_id: t.task_id.clone(),
            role: t.role.clone(),
            reason: reason.clone(),
        },
        _ => EventBody::BudgetExhausted {
            budget,
            task_id: task.map(|t| t.task_id.clone()),
            reason: reason.clone(),
        },
    };
    emit(rec, format!("budget.{budget}"), body);
    fail_with(
        rec,
        format!("budget {budget} exhausted: {reason}"),
        Some(budget),
        now,
    );
}

fn fail_with(rec: &mut SessionRecord, failure: String, budget: Option<BudgetKind>, now: u64) {
    rec.status = SessionStatus::Failed;
    rec.failure = Some(failure.clone());
    rec.stopped_by = budget;
    rec.updated_ms = now;
    emit(
        rec,
        "done".into(),
        EventBody::Done {
            outcome: SessionOutcome::Failed,
            answer: None,
            failure: Some(failure),
            duration_ms: now.saturating_sub(rec.opened_ms),
            budget,
        },
    );
    rec.outbox.push(Effect::ReleaseSlot);
}

/// The outcome a terminal status reports in `done`.
pub fn outcome_of(status: SessionStatus) -> SessionOutcome {
    match status {
        SessionStatus::Completed => SessionOutcome::Completed,
        SessionStatus::Cancelled => SessionOutcome::Cancelled,
        SessionStatus::DeadlineExceeded => SessionOutcome::DeadlineExceeded,
        _ => SessionOutcome::Failed,
    }
}

/// Ends a session from outside its own course: cancelled on request, or past its
/// deadline. `partial`: the sections of the tasks that finished (kept for a deadline).
/// Returns false, changing nothing, when the session has ended already.
pub fn end(
    rec: &mut SessionRecord,
    status: SessionStatus,
    reason: String,
    partial: Option<Answer>,
    now: u64,
) -> bool {
    if rec.status.is_terminal() || !status.is_terminal() {
        return false;
    }
    rec.status = status;
    rec.failure = Some(reason.clone());
    rec.answer = partial.clone().map(Box::new);
    rec.updated_ms = now;
    emit(
        rec,
        "done".into(),
        EventBody::Done {
            outcome: outcome_of(status),
            answer: partial,
            failure: Some(reason),
            duration_ms: now.saturating_sub(rec.opened_ms),
            budget: None,
        },
    );
    rec.outbox.push(Effect::ReleaseSlot);
    true
}

/// Dispatches pending tasks while fewer than `max_in_flight` are dispatched.
pub fn fill(rec: &mut SessionRecord, max_in_flight: usize) {
    let mut in_flight = rec
        .tasks
        .iter()
        .filter(|t| t.state == TaskState::Dispatched)
        .count();
    for i in 0..rec.tasks.len() {
        if in_flight >= max_in_flight {
            break;
        }
        if rec.tasks[i].state == TaskState::Pending {
            let Some(allowance) = grant(rec) else {
                // The budget cannot set aside another attempt's worst case until those
                // in flight report what they used.
                break;
            };
            let t = &mut rec.tasks[i];
            t.allowance = allowance;
            t.state = TaskState::Dispatched;
            t.attempt += 1;
            let (task_id, attempt) = (t.task_id.clone(), t.attempt);
            rec.counters.dispatched += 1;
            rec.outbox.push(Effect::Dispatch { task_id, attempt });
            in_flight += 1;
        }
    }
}

/// Sets an attempt's allowance aside from the session's token budget: `Some(tokens)`
/// (0: the attempt is metered on the ledger), or `None` to wait until attempts in flight
/// give back what they did not use. When the worst case no longer fits and nothing is
/// in flight, the session switches to its ledger for good: the `seed` effect charges
/// everything granted so far to the session's counter.
fn grant(rec: &mut SessionRecord) -> Option<u64> {
    let a = &rec.tokens;
    if a.budget == 0 || a.allowance == 0 || a.metered {
        return Some(0);
    }
    if a.granted.saturating_add(a.allowance) <= a.budget {
        rec.tokens.granted += a.allowance;
        return Some(rec.tokens.allowance);
    }
    if rec.tasks.iter().any(|t| t.allowance > 0) {
        return None;
    }
    meter(rec);
    Some(0)
}

/// Switches the session's token account to its ledger: `granted` is frozen and
/// charged to the counter as used.
pub fn meter(rec: &mut SessionRecord) {
    if rec.tokens.metered {
        return;
    }
    rec.tokens.metered = true;
    rec.outbox.push(Effect::Seed {
        tokens: rec.tokens.granted,
    });
}

/// The attempt of task `idx` ended: what its holders say it used replaces its
/// allowance in the account (all of it when they do not say). After the switch to the
/// ledger the account is frozen: the seed already charged the allowance.
pub fn give_back(rec: &mut SessionRecord, idx: usize, attempt_tokens: Option<u64>) {
    if !rec.tokens.metered {
        rec.tokens.granted = granted_after(rec, idx, attempt_tokens);
    }
    rec.tasks[idx].allowance = 0;
}

/// What the account's `granted` would be once task `idx`'s attempt gives its
/// allowance back, having used `attempt_tokens` (all of it when unknown).
pub fn granted_after(rec: &SessionRecord, idx: usize, attempt_tokens: Option<u64>) -> u64 {
    let held = rec.tasks[idx].allowance;
    if held == 0 {
        // Not on an allowance: nothing of it is in the account.
        return rec.tokens.granted;
    }
    let used = attempt_tokens.unwrap_or(held);
    rec.tokens.granted.saturating_sub(held).saturating_add(used)
}

/// Checks a result against the task table: `Ok(index)` of a result for the current,
/// dispatched attempt; otherwise the verdict (forged, duplicate or stale).
pub fn check(rec: &mut SessionRecord, r: &ResultMessage) -> Result<usize, ResultVerdict> {
    match check_inner(rec, r) {
        ResultVerdict::Accepted => rec
            .tasks
            .iter()
            .position(|t| t.task_id == r.task_id)
            .ok_or_else(|| ResultVerdict::Foreign(format!("session has no task {}", r.task_id))),
        v => Err(v),
    }
}

/// What an attempt that ended reported spending: added to the session's and the
/// task's counts, and its allowance given back.
fn account_attempt(rec: &mut SessionRecord, idx: usize, r: &ResultMessage) {
    if let Some(s) = &r.spend {
        rec.counters.spend.add(s);
        rec.tasks[idx].tokens = rec.tasks[idx].tokens.saturating_add(s.tokens);
    }
    give_back(rec, idx, r.attempt_tokens);
}

/// A clarification question from the current attempt: its task's index and the
/// question, with the attempt's spend accounted; otherwise the verdict.
fn asked(rec: &mut SessionRecord, r: &ResultMessage) -> Result<(usize, String), ResultVerdict> {
    let idx = check(rec, r)?;
    let flotilla_protocol::TaskOutcome::Clarify { question } = &r.outcome else {
        return Err(ResultVerdict::Foreign("not a clarification".into()));
    };
    let question = question.clone();
    account_attempt(rec, idx, r);
    Ok((idx, question))
}

/// A clarification question from the current attempt of a task: records the
/// orchestrator's `answer` and dispatches the task again with it. `closed` when the
/// session's clarification budget is spent (the answer then commits to an
/// interpretation and the agent may not ask again). Does not count as a failed attempt.
pub fn on_clarify(
    rec: &mut SessionRecord,
    r: &ResultMessage,
    answer: String,
    closed: bool,
    max_in_flight: usize,
    now: u64,
) -> ResultVerdict {
    let (idx, question) = match asked(rec, r) {
        Ok(found) => found,
        Err(v) => return v,
    };
    if !closed {
        rec.counters.clarifications += 1;
    }
    answered(rec, idx, question, answer, closed, None, now);
    fill(rec, max_in_flight);
    ResultVerdict::Retrying
}

/// Task `idx` goes on with `answer` to `question` in its next attempt (`closed`: it
/// may not ask again), and the `clarification` event says so (`by`: who answered, when
/// not the orchestrator's model).
fn answered(
    rec: &mut SessionRecord,
    idx: usize,
    question: String,
    answer: String,
    closed: bool,
    by: Option<&str>,
    now: u64,
) {
    rec.updated_ms = now;
    let t = &mut rec.tasks[idx];
    t.state = TaskState::Pending;
    t.clarification = Some(answer.as_str().into());
    t.questions_closed = closed;
    t.question = None;
    t.input_deadline_ms = None;
    let (task_id, role, attempt) = (t.task_id.clone(), t.role.clone(), t.attempt);
    let n = rec.counters.clarifications;
    emit(
        rec,
        format!("clarification.{task_id}.{attempt}"),
        EventBody::Clarification {
            task_id,
            role,
            n,
            question,
            answer,
            closed,
            by: by.map(str::to_owned),
        },
    );
}

/// A clarification question that goes to a person: the task waits (`awaiting_input`)
/// until `deadline_ms`, and so does the session unless other tasks run. Emits
/// `input_requested`.
pub fn on_input_requested(
    rec: &mut SessionRecord,
    r: &ResultMessage,
    deadline_ms: u64,
    max_in_flight: usize,
    now: u64,
) -> ResultVerdict {
    let (idx, question) = match asked(rec, r) {
        Ok(found) => found,
        Err(v) => return v,
    };
    rec.updated_ms = now;
    let t = &mut rec.tasks[idx];
    t.state = TaskState::AwaitingInput;
    t.question = Some(question.into());
    t.input_deadline_ms = Some(deadline_ms);
    let body = input_requested_event(t);
    let id = format!("input.{}.{}", t.task_id, t.attempt);
    emit(rec, id, body);
    // A waiting task holds no place in flight: the next one may go.
    fill(rec, max_in_flight);
    settle_status(rec);
    ResultVerdict::Retrying
}

fn input_requested_event(t: &TaskEntry) -> EventBody {
    EventBody::InputRequested {
        task_id: t.task_id.clone(),
        role: t.role.clone(),
        attempt: t.attempt,
        question: t.question.as_deref().unwrap_or_default().to_owned(),
        deadline_ms: t.input_deadline_ms.unwrap_or_default(),
    }
}

/// `awaiting_input` while every task still to finish waits for a person; `running`
/// otherwise (a session not yet ended).
fn settle_status(rec: &mut SessionRecord) {
    if rec.status.is_terminal() || rec.status == SessionStatus::Synthesizing {
        return;
    }
    let open: Vec<_> = rec
        .tasks
        .iter()
        .filter(|t| {
            matches!(
                t.state,
                TaskState::Pending | TaskState::Dispatched | TaskState::AwaitingInput
            )
        })
        .collect();
    rec.status = if !open.is_empty() && open.iter().all(|t| t.state == TaskState::AwaitingInput) {
        SessionStatus::AwaitingInput
    } else {
        SessionStatus::Running
    };
}

/// What became of an answer from a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputVerdict {
    /// Taken: the task goes on with it.
    Taken,
    /// Nothing waits for it (answered already, timed out, another attempt).
    NotAwaiting,
}

/// A person's `answer` to task `task_id`'s question asked by `attempt` (`None`: the
/// wait timed out, and the task is told to commit to its best interpretation). The
/// task is dispatched again with the answer, on whichever process holds its role.
pub fn on_input(
    rec: &mut SessionRecord,
    task_id: &TaskId,
    attempt: u32,
    answer: Option<String>,
    max_in_flight: usize,
    now: u64,
) -> InputVerdict {
    let Some(idx) = rec.tasks.iter().position(|t| {
        &t.task_id == task_id && t.attempt == attempt && t.state == TaskState::AwaitingInput
    }) else {
        return InputVerdict::NotAwaiting;
    };
    if rec.status.is_terminal() {
        return InputVerdict::NotAwaiting;
    }
    let (text, by, closed) = match answer {
        Some(a) => (a, "human", false),
        None => (
            "Nobody answered your question in time. Commit to your best interpretation of \
             the instruction as written, and say what you assumed."
                .to_owned(),
            "deadline",
            true,
        ),
    };
    rec.counters.clarifications += 1;
    let question = rec.tasks[idx]
        .question
        .as_deref()
        .unwrap_or_default()
        .to_owned();
    answered(rec, idx, question, text, closed, Some(by), now);
    rec.status = SessionStatus::Running;
    fill(rec, max_in_flight);
    InputVerdict::Taken
}

/// Applies a worker's result.
pub fn on_result(
    rec: &mut SessionRecord,
    r: &ResultMessage,
    max_in_flight: usize,
    max_attempts: u32,
    now: u64,
) -> ResultVerdict {
    match check_inner(rec, r) {
        ResultVerdict::Accepted => {}
        v => return v,
    }
    let Some(idx) = rec.tasks.iter().position(|t| t.task_id == r.task_id) else {
        return ResultVerdict::Foreign(format!("session has no task {}", r.task_id));
    };
    apply_result(rec, idx, r, max_in_flight, max_attempts, now)
}

/// The forgery, duplicate and staleness checks; `Accepted` means "current attempt".
fn check_inner(rec: &mut SessionRecord, r: &ResultMessage) -> ResultVerdict {
    // Forgery checks first: they hold whatever state the session is in.
    let Some(idx) = rec.tasks.iter().position(|t| t.task_id == r.task_id) else {
        return ResultVerdict::Foreign(format!("session has no task {}", r.task_id));
    };
    let task = &rec.tasks[idx];
    if task.role != r.role {
        return ResultVerdict::Foreign(format!(
            "task {} belongs to role {}, not {}",
            r.task_id, task.role, r.role
        ));
    }
    if r.attempt > task.attempt {
        return ResultVerdict::Foreign(format!(
            "task {} has not reached attempt {}",
            r.task_id, r.attempt
        ));
    }
    if rec.status != SessionStatus::Running {
        return ResultVerdict::Duplicate;
    }
    if r.attempt != task.attempt || task.state != TaskState::Dispatched {
        if task.state == TaskState::Done && r.attempt == task.attempt {
            return ResultVerdict::Duplicate;
        }
        let (tid, role) = (task.task_id.clone(), task.role.clone());
        if r.attempt < task.attempt {
            rec.counters.rejected += 1;
            emit(
                rec,
                format!("result.{}.{}", tid, r.attempt),
                EventBody::Result {
                    task_id: tid,
                    role,
                    attempt: r.attempt,
                    accepted: false,
                    reason: Some("stale attempt fenced off".into()),
                    tokens: None,
                },
            );
            return ResultVerdict::Stale;
        }
        return ResultVerdict::Duplicate;
    }
    ResultVerdict::Accepted
}

fn apply_result(
    rec: &mut SessionRecord,
    idx: usize,
    r: &ResultMessage,
    max_in_flight: usize,
    max_attempts: u32,
    now: u64,
) -> ResultVerdict {
    let task = &rec.tasks[idx];
    let (tid, role, attempt) = (task.task_id.clone(), task.role.clone(), task.attempt);
    rec.updated_ms = now;
    if let Some(m) = &r.memory {
        rec.counters.memory.add(m);
    }
    account_attempt(rec, idx, r);
    let tokens = Some(rec.tasks[idx].tokens);
    let verdict = match &r.outcome {
        TaskOutcome::Completed => {
            rec.tasks[idx].state = TaskState::Done;
            rec.counters.accepted += 1;
            emit(
                rec,
                format!("result.{tid}.{attempt}"),
                EventBody::Result {
                    task_id: tid,
                    role,
                    attempt,
                    accepted: true,
                    reason: None,
                    tokens,
                },
            );
            ResultVerdict::Accepted
        }
        TaskOutcome::Stopped { budget, reason } => {
            rec.counters.rejected += 1;
            rec.tasks[idx].state = TaskState::Failed;
            rec.tasks[idx].last_error = Some(reason.as_str().into());
            let entry = rec.tasks[idx].clone();
            stop(rec, *budget, Some(&entry), reason.clone(), now);
            return ResultVerdict::Failed;
        }
        TaskOutcome::Failed { .. } | TaskOutcome::Clarify { .. } => {
            let reason = match &r.outcome {
                // Answered by `on_clarify`; a clarification that reaches here had no
                // answer to give, which counts as a failed attempt.
                TaskOutcome::Clarify { question } => {
                    format!("unanswered clarification: {question}")
                }
                TaskOutcome::Failed { reason } => reason.clone(),
                _ => String::new(),
            };
            rec.counters.rejected += 1;
            emit(
                rec,
                format!("result.{tid}.{attempt}"),
                EventBody::Result {
                    task_id: tid.clone(),
                    role: role.clone(),
                    attempt,
                    accepted: false,
                    reason: Some(reason.clone()),
                    tokens,
                },
            );
            rec.tasks[idx].last_error = Some(reason.as_str().into());
            if attempt < max_attempts {
                rec.tasks[idx].state = TaskState::Pending;
                ResultVerdict::Retrying
            } else {
                rec.tasks[idx].state = TaskState::Failed;
                ResultVerdict::Failed
            }
        }
    };
    if let Some(failed) = rec.tasks.iter().find(|t| t.state == TaskState::Failed) {
        let why = format!(
            "task {} ({}) failed after {} attempts: {}",
            failed.task_id,
            failed.role,
            failed.attempt,
            match &r.outcome {
                TaskOutcome::Failed { reason } => reason.as_str(),
                _ => failed.last_error.as_deref().unwrap_or("failed"),
            }
        );
        fail(rec, why, now);
        return verdict;
    }
    fill(rec, max_in_flight);
    if rec.tasks.iter().all(|t| t.state == TaskState::Done) {
        rec.status = SessionStatus::Synthesizing;
    }
    verdict
}

/// Every effect the record's state implies, with the ids its transitions used: what a
/// redelivered message performs again, in case the handler that wrote the state died
/// before performing its effects (the record keeps no outbox: the writer performs its
/// effects, then acks; a crash in between redelivers the message, whose handler
/// re-performs these, de-duplicated by the server).
pub fn derived_effects(rec: &SessionRecord) -> Vec<Effect> {
    let mut out = Vec::new();
    if rec.status == SessionStatus::Planning {
        return out;
    }
    // First: metered attempts reserve against the seeded counter.
    if rec.tokens.metered {
        out.push(Effect::Seed {
            tokens: rec.tokens.granted,
        });
    }
    if !rec.tasks.is_empty() {
        out.push(Effect::Emit {
            id: "planned".into(),
            body: planned_event(rec),
        });
    }
    for t in &rec.tasks {
        match t.state {
            TaskState::Dispatched if !rec.status.is_terminal() => out.push(Effect::Dispatch {
                task_id: t.task_id.clone(),
                attempt: t.attempt,
            }),
            TaskState::AwaitingInput if !rec.status.is_terminal() => out.push(Effect::Emit {
                id: format!("input.{}.{}", t.task_id, t.attempt),
                body: input_requested_event(t),
            }),
            TaskState::Done => out.push(Effect::Emit {
                id: format!("result.{}.{}", t.task_id, t.attempt),
                body: EventBody::Result {
                    task_id: t.task_id.clone(),
                    role: t.role.clone(),
                    attempt: t.attempt,
                    accepted: true,
                    reason: None,
                    tokens: Some(t.tokens),
                },
            }),
            _ => {}
        }
    }
    if rec.status.is_terminal() {
        out.push(Effect::Emit {
            id: "done".into(),
            body: EventBody::Done {
                outcome: outcome_of(rec.status),
                answer: rec.answer.as_deref().cloned(),
                failure: rec.failure.clone(),
                duration_ms: rec.updated_ms.saturating_sub(rec.opened_ms),
                budget: rec.stopped_by,
            },
        });
        out.push(Effect::ReleaseSlot);
    }
    out
}

/// Completes the session with its answer.
pub fn on_synthesized(rec: &mut SessionRecord, answer: Answer, now: u64) {
    rec.status = SessionStatus::Completed;
    rec.updated_ms = now;
    rec.answer = Some(Box::new(answer.clone()));
    emit(
        rec,
        "done".into(),
        EventBody::Done {
            outcome: SessionOutcome::Completed,
            answer: Some(answer),
            failure: None,
            duration_ms: now.saturating_sub(rec.opened_ms),
            budget: None,
        },
    );
    rec.outbox.push(Effect::ReleaseSlot);
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_protocol::{Role, SessionId, Subtask, V1};

    fn record(roles: &[&str]) -> SessionRecord {
        SessionRecord::planning(
            SessionId::parse("s1").unwrap(),
            "T".into(),
            roles.iter().map(|r| Role::parse(*r).unwrap()).collect(),
            0,
            0,
            String::new(),
            1000,
        )
    }

    fn plan(rec: &SessionRecord) -> Plan {
        Plan {
            subtasks: rec
                .roles
                .iter()
                .map(|r| Subtask {
                    role: r.clone(),
                    instruction: format!("do {r}"),
                })
                .collect(),
        }
    }

    fn result(rec: &SessionRecord, i: usize, attempt: u32, outcome: TaskOutcome) -> ResultMessage {
        ResultMessage {
            v: V1,
            session_id: rec.session_id.clone(),
            task_id: rec.tasks[i].task_id.clone(),
            role: rec.tasks[i].role.clone(),
            attempt,
            outcome,
            memory: None,
            spend: None,
            attempt_tokens: None,
        }
    }

    #[test]
    fn a_task_counts_the_tokens_of_all_its_attempts_and_its_result_events_say_so() {
        let mut rec = record(&["research", "analysis", "writing"]);
        let plan = plan(&rec);
        on_planned(&mut rec, &plan, 3, 1000);
        let spent = |mut r: ResultMessage, tokens| {
            r.spend = Some(flotilla_protocol::Spend {
                tokens,
                ..Default::default()
            });
            r
        };
        let failed = TaskOutcome::Failed {
            reason: "no".into(),
        };
        let r = spent(result(&rec, 0, 1, failed), 120);
        assert_eq!(on_result(&mut rec, &r, 3, 3, 1100), ResultVerdict::Retrying);
        fill(&mut rec, 3);
        let r = spent(result(&rec, 0, 2, TaskOutcome::Completed), 80);
        assert_eq!(on_result(&mut rec, &r, 3, 3, 1200), ResultVerdict::Accepted);
        assert_eq!(rec.tasks[0].tokens, 200);
        let said: Vec<Option<u64>> = rec
            .outbox
            .iter()
            .filter_map(|e| match e {
                Effect::Emit {
                    body: EventBody::Result { tokens, .. },
                    ..
                } => Some(*tokens),
                _ => None,
            })
            .collect();
        assert_eq!(said, vec![Some(120), Some(200)]);
    }

    fn dispatches(rec: &SessionRecord) -> usize {
        rec.outbox
            .iter()
            .filter(|e| matches!(e, Effect::Dispatch { .. }))
            .count()
    }

    #[test]
    fn respects_in_flight_cap_and_completes() {
        let mut rec = record(&["a", "b", "c", "d"]);
        let p = plan(&rec);
        on_planned(&mut rec, &p, 3, 1100);
        assert_eq!(dispatches(&rec), 3);
        assert_eq!(rec.tasks[3].state, TaskState::Pending);
        rec.outbox.clear();
        let r = result(&rec, 0, 1, TaskOutcome::Completed);
        assert_eq!(on_result(&mut rec, &r, 3, 3, 1200), ResultVerdict::Accepted);
        assert_eq!(
            dispatches(&rec),
            1,
            "the fourth task goes out when the first ends"
        );
        assert_eq!(
            on_result(&mut rec, &r, 3, 3, 1200),
            ResultVerdict::Duplicate
        );
        for i in 1..4 {
            let r = result(&rec, i, 1, TaskOutcome::Completed);
            assert_eq!(on_result(&mut rec, &r, 3, 3, 1300), ResultVerdict::Accepted);
        }
        assert_eq!(rec.status, SessionStatus::Synthesizing);
        on_synthesized(
            &mut rec,
            Answer {
                summary: "s".into(),
                sections: vec![],
            },
            2000,
        );
        assert_eq!(rec.status, SessionStatus::Completed);
        assert!(rec.outbox.contains(&Effect::ReleaseSlot));
    }

    #[test]
    fn failed_attempts_retry_then_fail_visibly() {
        let mut rec = record(&["a", "b", "c"]);
        let p = plan(&rec);
        on_planned(&mut rec, &p, 3, 1100);
        for attempt in 1..=2 {
            let r = result(
                &rec,
                1,
                attempt,
                TaskOutcome::Failed {
                    reason: "no artifacts".into(),
                },
            );
            assert_eq!(on_result(&mut rec, &r, 3, 3, 1200), ResultVerdict::Retrying);
            assert_eq!(rec.tasks[1].attempt, attempt + 1);
        }
        let stale = result(&rec, 1, 1, TaskOutcome::Completed);
        assert_eq!(
            on_result(&mut rec, &stale, 3, 3, 1200),
            ResultVerdict::Stale
        );
        let r = result(
            &rec,
            1,
            3,
            TaskOutcome::Failed {
                reason: "no artifacts".into(),
            },
        );
        assert_eq!(on_result(&mut rec, &r, 3, 3, 1300), ResultVerdict::Failed);
        assert_eq!(rec.status, SessionStatus::Failed);
        let failure = rec.failure.clone().unwrap();
        assert!(
            failure.contains("t2") && failure.contains("no artifacts"),
            "{failure}"
        );
    }

    fn with_account(roles: &[&str], budget: u64, allowance: u64, granted: u64) -> SessionRecord {
        let mut rec = record(roles);
        rec.tokens = flotilla_protocol::TokenAccount {
            budget,
            allowance,
            granted,
            metered: false,
        };
        rec
    }

    fn spent(mut r: ResultMessage, tokens: Option<u64>) -> ResultMessage {
        r.attempt_tokens = tokens;
        r
    }

    #[test]
    fn attempts_run_on_allowances_while_their_worst_case_fits() {
        // Plan spent 1,000; three allowances of 10,000 fit a budget of 40,000.
        let mut rec = with_account(&["a", "b", "c"], 40_000, 10_000, 1_000);
        let p = plan(&rec);
        on_planned(&mut rec, &p, 3, 1100);
        assert_eq!(dispatches(&rec), 3);
        assert!(rec.tasks.iter().all(|t| t.allowance == 10_000));
        assert_eq!(rec.tokens.granted, 31_000);
        assert!(!rec.tokens.metered);
        assert!(!rec.outbox.iter().any(|e| matches!(e, Effect::Seed { .. })));
        // A result gives back what its attempt did not use.
        let r = spent(result(&rec, 0, 1, TaskOutcome::Completed), Some(700));
        on_result(&mut rec, &r, 3, 3, 1200);
        assert_eq!(rec.tokens.granted, 21_700);
        assert_eq!(rec.tasks[0].allowance, 0);
        // A holder that does not say what it used keeps its whole allowance spent.
        let r = result(&rec, 1, 1, TaskOutcome::Completed);
        on_result(&mut rec, &r, 3, 3, 1200);
        assert_eq!(rec.tokens.granted, 21_700);
        // A duplicate result gives nothing back twice.
        let dup = spent(result(&rec, 0, 1, TaskOutcome::Completed), Some(0));
        on_result(&mut rec, &dup, 3, 3, 1300);
        assert_eq!(rec.tokens.granted, 21_700);
    }

    #[test]
    fn an_allowance_that_does_not_fit_waits_for_those_in_flight() {
        // Room for two allowances, not three.
        let mut rec = with_account(&["a", "b", "c"], 25_000, 10_000, 1_000);
        let p = plan(&rec);
        on_planned(&mut rec, &p, 3, 1100);
        assert_eq!(dispatches(&rec), 2, "the third waits");
        assert_eq!(rec.tasks[2].state, TaskState::Pending);
        assert_eq!(rec.tokens.granted, 21_000);
        rec.outbox.clear();
        // The first attempt used 500: its allowance comes back and the third fits.
        let r = spent(result(&rec, 0, 1, TaskOutcome::Completed), Some(500));
        on_result(&mut rec, &r, 3, 3, 1200);
        assert_eq!(dispatches(&rec), 1);
        assert_eq!(rec.tasks[2].allowance, 10_000);
        assert_eq!(rec.tokens.granted, 21_500);
        assert!(!rec.tokens.metered);
    }

    #[test]
    fn with_nothing_in_flight_and_no_room_the_session_moves_to_its_ledger_for_good() {
        // Plan spent 3,000; an allowance of 10,000 never fits a budget of 12,000.
        let mut rec = with_account(&["a", "b"], 12_000, 10_000, 3_000);
        let p = plan(&rec);
        on_planned(&mut rec, &p, 3, 1100);
        assert!(rec.tokens.metered);
        // The seed comes before the dispatches it is for.
        assert_eq!(
            rec.outbox
                .iter()
                .position(|e| matches!(e, Effect::Seed { .. })),
            Some(1)
        );
        assert!(rec.outbox.contains(&Effect::Seed { tokens: 3_000 }));
        assert_eq!(dispatches(&rec), 2);
        assert!(
            rec.tasks.iter().all(|t| t.allowance == 0),
            "metered attempts"
        );
        // Frozen: results no longer move the account, and a redelivery seeds again with
        // the same tokens (the same message id de-duplicates it).
        let r = spent(result(&rec, 0, 1, TaskOutcome::Completed), Some(900));
        on_result(&mut rec, &r, 3, 3, 1200);
        assert_eq!(rec.tokens.granted, 3_000);
        let derived = derived_effects(&rec);
        assert_eq!(derived.first(), Some(&Effect::Seed { tokens: 3_000 }));
    }

    #[test]
    fn a_session_without_a_budget_grants_nothing() {
        let mut rec = record(&["a", "b"]);
        let p = plan(&rec);
        on_planned(&mut rec, &p, 3, 1100);
        assert_eq!(dispatches(&rec), 2);
        assert!(rec.tasks.iter().all(|t| t.allowance == 0));
        assert!(rec.tokens.is_empty());
    }

    #[test]
    fn derived_effects_repeat_what_the_transitions_emitted() {
        let mut rec = record(&["a", "b", "c", "d"]);
        let p = plan(&rec);
        on_planned(&mut rec, &p, 3, 1100);
        let emitted = std::mem::take(&mut rec.outbox);
        let derived = derived_effects(&rec);
        for e in &emitted {
            if let Effect::Emit { id, .. } = e {
                assert!(
                    derived
                        .iter()
                        .any(|d| matches!(d, Effect::Emit { id: i, .. } if i == id)),
                    "{id} not derived"
                );
            } else {
                assert!(derived.contains(e), "{e:?}");
            }
        }
        for i in 0..4 {
            let attempt = rec.tasks[i].attempt.max(1);
            if rec.tasks[i].state != TaskState::Dispatched {
                continue;
            }
            let r = result(&rec, i, attempt, TaskOutcome::Completed);
            on_result(&mut rec, &r, 3, 3, 1200);
        }
        let r = result(&rec, 3, 1, TaskOutcome::Completed);
        on_result(&mut rec, &r, 3, 3, 1300);
        // Every accepted result's event is derived too.
        for e in std::mem::take(&mut rec.outbox) {
            if let Effect::Emit { id, .. } = &e {
                assert!(
                    derived_effects(&rec)
                        .iter()
                        .any(|d| matches!(d, Effect::Emit { id: i, .. } if i == id))
                        || id.starts_with("dispatched"),
                    "{id}"
                );
            }
        }
        on_synthesized(
            &mut rec,
            Answer {
                summary: "s".into(),
                sections: vec![],
            },
            2000,
        );
        let emitted = std::mem::take(&mut rec.outbox);
        let derived = derived_effects(&rec);
        for e in emitted {
            assert!(derived.contains(&e), "{e:?} not derived from {derived:?}");
        }
    }

    #[test]
    fn foreign_results_change_nothing() {
        let mut rec = record(&["a", "b", "c"]);
        let p = plan(&rec);
        on_planned(&mut rec, &p, 3, 1100);
        let before = rec.clone();
        let mut r = result(&rec, 0, 1, TaskOutcome::Completed);
        r.role = Role::parse("b").unwrap();
        assert!(matches!(
            on_result(&mut rec, &r, 3, 3, 1200),
            ResultVerdict::Foreign(_)
        ));
        r.task_id = TaskId::parse("t9").unwrap();
        assert!(matches!(
            on_result(&mut rec, &r, 3, 3, 1200),
            ResultVerdict::Foreign(_)
        ));
        assert_eq!(rec, before);
    }

    #[test]
    fn a_question_for_a_person_waits_then_the_answer_or_the_timeout_sends_it_on() {
        let mut rec = record(&["a", "b", "c", "d"]);
        let p = plan(&rec);
        on_planned(&mut rec, &p, 3, 1100);
        rec.outbox.clear();
        let ask = |rec: &SessionRecord, i: usize| {
            result(
                rec,
                i,
                rec.tasks[i].attempt,
                TaskOutcome::Clarify {
                    question: "which one?".into(),
                },
            )
        };
        // The first three ask; a waiting task frees its place, so the fourth goes.
        for i in 0..3 {
            let r = ask(&rec, i);
            assert_eq!(
                on_input_requested(&mut rec, &r, 9000, 3, 1200),
                ResultVerdict::Retrying
            );
        }
        assert_eq!(rec.tasks[3].state, TaskState::Dispatched);
        assert_eq!(rec.status, SessionStatus::Running, "one task still runs");
        let r = ask(&rec, 3);
        on_input_requested(&mut rec, &r, 9000, 3, 1250);
        assert_eq!(rec.status, SessionStatus::AwaitingInput);
        let asked: Vec<_> = std::mem::take(&mut rec.outbox);
        let derived = derived_effects(&rec);
        for e in &asked {
            if let Effect::Emit { id, .. } = e {
                assert!(
                    derived
                        .iter()
                        .any(|d| matches!(d, Effect::Emit { id: i, .. } if i == id)),
                    "{id} not derived"
                );
            }
        }
        // A person answers task 0; a stale attempt's answer is refused.
        let t0 = rec.tasks[0].task_id.clone();
        assert_eq!(
            on_input(&mut rec, &t0, 7, Some("x".into()), 3, 1300),
            InputVerdict::NotAwaiting
        );
        assert_eq!(
            on_input(&mut rec, &t0, 1, Some("the red one".into()), 3, 1300),
            InputVerdict::Taken
        );
        assert_eq!(rec.status, SessionStatus::Running);
        let t = &rec.tasks[0];
        assert_eq!((t.state, t.attempt), (TaskState::Dispatched, 2));
        assert_eq!(t.clarification.as_deref(), Some("the red one"));
        assert!(!t.questions_closed && t.question.is_none());
        assert_eq!(
            on_input(&mut rec, &t0, 1, Some("again".into()), 3, 1300),
            InputVerdict::NotAwaiting
        );
        // Task 1 times out: told to commit, and its questions close.
        let t1 = rec.tasks[1].task_id.clone();
        assert_eq!(
            on_input(&mut rec, &t1, 1, None, 3, 9001),
            InputVerdict::Taken
        );
        assert!(rec.tasks[1].questions_closed);
        // Cancelled: waiting tasks wait no longer; nothing is taken after the end.
        assert!(end(
            &mut rec,
            SessionStatus::Cancelled,
            "stop".into(),
            None,
            9100
        ));
        assert!(!end(
            &mut rec,
            SessionStatus::DeadlineExceeded,
            "late".into(),
            None,
            9200
        ));
        let t2 = rec.tasks[2].task_id.clone();
        assert_eq!(
            on_input(&mut rec, &t2, 1, Some("y".into()), 3, 9300),
            InputVerdict::NotAwaiting
        );
        assert!(
            derived_effects(&rec)
                .iter()
                .all(|e| !matches!(e, Effect::Dispatch { .. }))
        );
        assert!(derived_effects(&rec).contains(&Effect::ReleaseSlot));
    }
}

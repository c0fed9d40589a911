//! The task record's transitions, pure: each takes the records as read (or `None`) and
//! `now`, and says what to write. The worker (claim, commit), the watchdog (fence), the
//! dead-letter mover (abandon) and the orchestrator (reading committed outputs) all go
//! through these, applied by one compare-and-set helper
//! (`flotilla_bus::Records::transition`), so there is one place that says who may
//! change a task record and how.
//!
//! A task has two keys (see [`TaskRecord`]): its claim `<sid>.c.<role>.<task>` and its
//! commit `<sid>.t.<role>.<task>`. A commit is written only while the claim it was run
//! under is unchanged, so a fence or a take-over of the claim refuses the old holder's
//! commit.
//!
//! ```text
//!   claim key:          claim
//!              (none) ─────────────▶ running ◀──┐ claim (same attempt: a new holder)
//!                                      │        │
//!                                fence │        │
//!                                      ▼        │
//!                                    queued ────┘
//!   commit key:  running ── commit (fenced on the claim's revision) ──▶ done | failed
//!   a task message of a newer attempt claims over any state of an older one
//! ```
//!
//! The claim is created by the first claim of the task's first attempt: the
//! orchestrator's dispatch publishes the task message and writes no record, and the
//! worker checks the task against the session's task table before claiming.

use crate::ids::{AgentId, Role, SessionId, TaskId};
use crate::inbox::{ResultMessage, TaskMessage, TaskOutcome};
use crate::output::TaskOutput;
use crate::record::{TaskRecord, TaskRunState};
use crate::version::V1;

/// What a delivery of a task attempt should do, given the task record.
#[derive(Debug, Clone, PartialEq, Eq)]
// A short-lived decision, returned once per delivery: boxing the record would cost an
// allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Claim {
    /// Write `record` (by compare-and-set, or create when there was none): the
    /// attempt is ours. `resumed` when an earlier holder may have started it.
    Take {
        /// The claimed record.
        record: TaskRecord,
        /// An earlier holder ran this attempt (its conversation may be in KV).
        resumed: bool,
    },
    /// The record is at a newer attempt: this delivery is stale.
    Stale {
        /// The record's attempt.
        current: u32,
    },
    /// The attempt was committed (a crash came before the ack): re-send its notice.
    Committed(TaskOutcome),
    /// Another holder claimed it `age_ms` ago, within the claim's lifetime: a
    /// duplicate delivery, to come back after `retry_ms`, when the claim would have
    /// expired had its holder died.
    Held {
        /// The holder.
        holder: Option<AgentId>,
        /// How old its claim is.
        age_ms: u64,
        /// When to look again.
        retry_ms: u64,
    },
    /// The record belongs to another role: the message is forged or misrouted.
    WrongRole,
}

/// A fresh record for `task` claimed by `holder`.
fn running(task: &TaskMessage, holder: &AgentId, now: u64) -> TaskRecord {
    bare(
        (&task.session_id, &task.task_id, &task.role, task.attempt),
        TaskRunState::Running,
        Some(holder.clone()),
        1,
        now,
    )
}

/// A record of an attempt (session, task, role, attempt) in `state`, with nothing
/// recorded of a run yet (no ack subject, output, outcome, error or spend).
fn bare(
    (session_id, task_id, role, attempt): (&SessionId, &TaskId, &Role, u32),
    state: TaskRunState,
    holder: Option<AgentId>,
    holders: u32,
    now: u64,
) -> TaskRecord {
    TaskRecord {
        v: V1,
        session_id: session_id.clone(),
        task_id: task_id.clone(),
        role: role.clone(),
        attempt,
        state,
        holder,
        holders,
        ack_subject: None,
        output: None,
        error: None,
        outcome: None,
        spend: None,
        memory: None,
        attempt_tokens: None,
        updated_ms: now,
    }
}

/// What the commit key says of `task`'s attempt, before its claim is looked at: `Stale`
/// when a newer attempt was committed, `Committed` when this one was, `None` when the
/// claim decides (nothing committed, or only older attempts).
pub fn settled(committed: Option<&TaskRecord>, task: &TaskMessage) -> Option<Claim> {
    let rec = committed?;
    if rec.role != task.role {
        return Some(Claim::WrongRole);
    }
    if rec.attempt > task.attempt {
        return Some(Claim::Stale {
            current: rec.attempt,
        });
    }
    if rec.attempt == task.attempt {
        return committed_outcome(rec).map(Claim::Committed);
    }
    None
}

/// The result a committed record reports (`None` while it is not committed): what
/// the orchestrator acts on when the commit reaches it.
pub fn result_of(rec: &TaskRecord) -> Option<ResultMessage> {
    Some(ResultMessage {
        v: V1,
        session_id: rec.session_id.clone(),
        task_id: rec.task_id.clone(),
        role: rec.role.clone(),
        attempt: rec.attempt,
        outcome: committed_outcome(rec)?,
        spend: rec.spend,
        memory: rec.memory,
        attempt_tokens: rec.attempt_tokens,
    })
}

/// `holder`'s claim of the attempt `rec` is at: one more holder (also when the same
/// process claims again: its first handler may still be running).
fn next_holder(rec: &TaskRecord, task: &TaskMessage, holder: &AgentId, now: u64) -> TaskRecord {
    TaskRecord {
        holders: rec.holders.max(1) + 1,
        ..running(task, holder, now)
    }
}

/// Claims `task` for `holder` over `current` (the record as read, `None` if absent).
/// The caller sets the taken record's `ack_subject` to its delivery's (see
/// [`TaskRecord::ack_subject`]).
/// A claim younger than `claim_ttl_ms` held by another process is respected; an older
/// one is presumed dead and taken over (its late commit then fails the
/// compare-and-set).
pub fn claim(
    current: Option<&TaskRecord>,
    task: &TaskMessage,
    holder: &AgentId,
    claim_ttl_ms: u64,
    now: u64,
) -> Claim {
    let Some(rec) = current else {
        return Claim::Take {
            record: running(task, holder, now),
            resumed: false,
        };
    };
    if rec.role != task.role {
        return Claim::WrongRole;
    }
    if rec.attempt > task.attempt {
        return Claim::Stale {
            current: rec.attempt,
        };
    }
    if rec.attempt < task.attempt {
        // A newer attempt fences the older one, whatever its state.
        return Claim::Take {
            record: running(task, holder, now),
            resumed: false,
        };
    }
    match rec.state {
        TaskRunState::Done | TaskRunState::Failed => {
            Claim::Committed(committed_outcome(rec).unwrap_or(TaskOutcome::Completed))
        }
        TaskRunState::Running if rec.holder.as_ref() != Some(holder) => {
            let age_ms = now.saturating_sub(rec.updated_ms);
            if age_ms < claim_ttl_ms {
                Claim::Held {
                    holder: rec.holder.clone(),
                    age_ms,
                    retry_ms: claim_ttl_ms - age_ms + 50,
                }
            } else {
                Claim::Take {
                    record: next_holder(rec, task, holder, now),
                    resumed: true,
                }
            }
        }
        TaskRunState::Running | TaskRunState::Queued => Claim::Take {
            record: next_holder(rec, task, holder, now),
            resumed: rec.state == TaskRunState::Running,
        },
    }
}

/// The outcome a committed record reports (`None` while it is not committed).
pub fn committed_outcome(rec: &TaskRecord) -> Option<TaskOutcome> {
    match (&rec.outcome, rec.state) {
        (Some(o), TaskRunState::Done | TaskRunState::Failed) => Some(o.clone()),
        (None, TaskRunState::Done) => Some(TaskOutcome::Completed),
        (None, TaskRunState::Failed) => Some(TaskOutcome::Failed {
            reason: rec.error.clone().unwrap_or_default(),
        }),
        _ => None,
    }
}

/// The claimed record with the attempt's end: `Done` with its output, or `Failed`
/// with the reason its outcome gives.
pub fn commit(
    claimed: &TaskRecord,
    outcome: TaskOutcome,
    output: Option<TaskOutput>,
    now: u64,
) -> TaskRecord {
    let (state, error) = match &outcome {
        TaskOutcome::Completed => (TaskRunState::Done, None),
        TaskOutcome::Failed { reason } => (TaskRunState::Failed, Some(reason.clone())),
        TaskOutcome::Stopped { budget, reason } => (
            TaskRunState::Failed,
            Some(format!("budget {budget} exhausted: {reason}")),
        ),
        TaskOutcome::Clarify { question } => (
            TaskRunState::Failed,
            Some(format!("needs clarification: {question}")),
        ),
    };
    TaskRecord {
        state,
        output: if state == TaskRunState::Done {
            output
        } else {
            None
        },
        error,
        outcome: Some(outcome),
        ack_subject: None,
        updated_ms: now,
        ..claimed.clone()
    }
}

/// What a holder keeps of its claimed record through the attempt: what [`commit`]
/// takes from it. A claim ([`claim`]'s `Take`) sets nothing else that a commit keeps
/// (the outcome, output, error, ack subject and time are the commit's own; a claim
/// leaves spend, memory and attempt tokens unset), so `held.commit(task, holder, ..)`
/// is `commit(&claimed, ..)`. Eight bytes: every task in a model call holds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    attempt: u32,
    holders: u32,
}

impl Held {
    /// What a holder keeps of `claimed`: its attempt and holder count. The rest of a
    /// claimed record is the task message's ids and the claimer, as [`claim`] builds
    /// every record it takes, so [`Held::commit`] has them from the task and holder.
    pub fn of(claimed: &TaskRecord) -> Self {
        Self {
            attempt: claimed.attempt,
            holders: claimed.holders,
        }
    }

    /// How many holders the attempt has had, this one included.
    pub fn holders(&self) -> u32 {
        self.holders
    }

    /// The claimed attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// [`commit`] of the record `holder` claimed for `task`.
    pub fn commit(
        self,
        task: &TaskMessage,
        holder: &AgentId,
        outcome: TaskOutcome,
        output: Option<TaskOutput>,
        now: u64,
    ) -> TaskRecord {
        let claimed = bare(
            (&task.session_id, &task.task_id, &task.role, self.attempt),
            TaskRunState::Running,
            Some(holder.clone()),
            self.holders,
            now,
        );
        commit(&claimed, outcome, output, now)
    }
}

/// The watchdog's release: back to `queued` if `holder` still runs `attempt`, so its
/// late commit fails and the next delivery claims at once; `None` when there is
/// nothing to fence.
pub fn fence(current: &TaskRecord, holder: &AgentId, attempt: u32, now: u64) -> Option<TaskRecord> {
    if current.attempt != attempt
        || current.state != TaskRunState::Running
        || current.holder.as_ref() != Some(holder)
    {
        return None;
    }
    Some(TaskRecord {
        state: TaskRunState::Queued,
        holder: None,
        ack_subject: None,
        updated_ms: now,
        ..current.clone()
    })
}

/// The output committed for `attempt`, if the record holds one.
pub fn output_of(rec: &TaskRecord, attempt: u32) -> Option<&TaskOutput> {
    match (rec.attempt == attempt, rec.state, &rec.output) {
        (true, TaskRunState::Done, Some(o)) => Some(o),
        _ => None,
    }
}

/// The dead-letter mover's fence for an attempt that exhausted its deliveries:
/// `Some(claim)` to write at the claim key (the attempt back to `queued` with no
/// holder, so a late holder's commit is refused), after which the mover commits the
/// attempt as failed on it ([`commit`]); `None` when there is nothing to do, because
/// the attempt was committed already (`committed`, the commit key as read) or a newer
/// one exists.
pub fn abandon(
    claim: Option<&TaskRecord>,
    committed: Option<&TaskRecord>,
    task: &TaskMessage,
    now: u64,
) -> Option<TaskRecord> {
    if committed.is_some_and(|c| {
        c.attempt > task.attempt || (c.attempt == task.attempt && committed_outcome(c).is_some())
    }) {
        return None;
    }
    let base = match claim {
        Some(rec) if rec.attempt > task.attempt => return None,
        Some(rec) if rec.attempt == task.attempt => rec.clone(),
        _ => bare(
            (&task.session_id, &task.task_id, &task.role, task.attempt),
            TaskRunState::Queued,
            None,
            0,
            now,
        ),
    };
    Some(TaskRecord {
        state: TaskRunState::Queued,
        holder: None,
        ack_subject: None,
        updated_ms: now,
        ..base
    })
}

/// Whether a result message published to the orchestrator's inbox is what the task's
/// holder committed: `Ok` when `committed` (the commit key, read from the stream
/// leader) holds the result's attempt with the same outcome. Workers send no such
/// message (their commit is the result), so it comes from outside, and this is the
/// check that refuses it unless a commit vouches for it. `claim` (the claim key) tells
/// a stale attempt from one not reached. `redelivered`: the result was delivered
/// before, so a task that has moved on to a newer attempt may be this result's own
/// doing (the orchestrator handled it and died before the ack); the session's task
/// table then decides (stale or duplicate).
pub fn vouch(
    committed: Option<&TaskRecord>,
    claim: Option<&TaskRecord>,
    r: &ResultMessage,
    redelivered: bool,
) -> Result<(), String> {
    let latest = match (committed, claim) {
        (Some(c), Some(k)) if k.attempt > c.attempt => k,
        (Some(c), _) => c,
        (None, Some(k)) => k,
        (None, None) => {
            return Err(format!(
                "task {} has no record: nothing was committed",
                r.task_id
            ));
        }
    };
    if latest.role != r.role {
        return Err(format!(
            "task {} belongs to role {}, not {}",
            r.task_id, latest.role, r.role
        ));
    }
    if latest.attempt > r.attempt {
        if redelivered {
            return Ok(());
        }
        return Err(format!(
            "stale attempt {} of task {}: its record is at attempt {}",
            r.attempt, r.task_id, latest.attempt
        ));
    }
    if latest.attempt < r.attempt {
        return Err(format!(
            "task {} has not reached attempt {} (its record is at {})",
            r.task_id, r.attempt, latest.attempt
        ));
    }
    match committed
        .filter(|c| c.attempt == r.attempt)
        .and_then(committed_outcome)
    {
        Some(o) if o == r.outcome => Ok(()),
        Some(o) => Err(format!(
            "task {} attempt {} was committed as {}, not {}",
            r.task_id,
            r.attempt,
            o.kind(),
            r.outcome.kind()
        )),
        None => Err(format!(
            "task {} attempt {} is {:?}, not committed",
            r.task_id, r.attempt, latest.state
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ids::{Role, SessionId, TaskId};
    use proptest::prelude::*;

    fn task(attempt: u32) -> TaskMessage {
        TaskMessage {
            v: V1,
            session_id: SessionId::parse("s1").unwrap(),
            task_id: TaskId::parse("t1").unwrap(),
            role: Role::parse("research").unwrap(),
            attempt,
            instruction: "i".into(),
            context: "c".into(),
            feedback: None,
            clarification: None,
            questions_closed: false,
            allowance: None,
        }
    }

    fn agent(n: u8) -> AgentId {
        AgentId::parse(format!("research-{n}")).unwrap()
    }

    fn output() -> TaskOutput {
        TaskOutput {
            summary: "s".into(),
            artifacts: vec![],
        }
    }

    fn result(attempt: u32, outcome: TaskOutcome) -> ResultMessage {
        ResultMessage {
            v: V1,
            session_id: SessionId::parse("s1").unwrap(),
            task_id: TaskId::parse("t1").unwrap(),
            role: Role::parse("research").unwrap(),
            attempt,
            outcome,
            spend: None,
            memory: None,
            attempt_tokens: None,
        }
    }

    fn claimed(attempt: u32) -> TaskRecord {
        running(&task(attempt), &agent(1), 1000)
    }

    #[test]
    fn an_abandoned_attempt_is_committed_as_failed_once() {
        let why = || "dead-lettered after 5 deliveries".to_owned();
        let failed = TaskOutcome::Failed { reason: why() };
        // Never claimed, or claimed by a holder that never committed: the claim is
        // fenced (no holder), and the failure committed on it is vouched for.
        for current in [None, Some(claimed(1))] {
            let fenced = abandon(current.as_ref(), None, &task(1), 5000).unwrap();
            assert_eq!(fenced.state, TaskRunState::Queued);
            assert_eq!((fenced.attempt, fenced.holder.as_ref()), (1, None));
            let rec = commit(&fenced, failed.clone(), None, 5000);
            assert_eq!(rec.state, TaskRunState::Failed);
            assert_eq!(
                vouch(Some(&rec), Some(&fenced), &result(1, failed.clone()), false),
                Ok(())
            );
            assert_eq!(result_of(&rec), Some(result(1, failed.clone())));
        }
        // An older attempt's claim or commit is superseded.
        let fenced = abandon(Some(&claimed(1)), None, &task(2), 5000).unwrap();
        assert_eq!(fenced.attempt, 2);
        let old = commit(&claimed(1), TaskOutcome::Completed, Some(output()), 2000);
        assert!(abandon(Some(&claimed(2)), Some(&old), &task(2), 5000).is_some());
        // Committed already, or a newer attempt exists: nothing to write.
        assert_eq!(abandon(Some(&claimed(1)), Some(&old), &task(1), 5000), None);
        assert_eq!(abandon(Some(&claimed(2)), None, &task(1), 5000), None);
        let newer = commit(&claimed(2), TaskOutcome::Completed, Some(output()), 2000);
        assert_eq!(abandon(None, Some(&newer), &task(1), 5000), None);
    }

    #[test]
    fn the_commit_key_settles_an_attempt_before_its_claim_is_looked_at() {
        let done = commit(&claimed(1), TaskOutcome::Completed, Some(output()), 2000);
        assert_eq!(settled(None, &task(1)), None);
        assert_eq!(
            settled(Some(&done), &task(1)),
            Some(Claim::Committed(TaskOutcome::Completed))
        );
        assert_eq!(settled(Some(&done), &task(2)), None);
        let newer = commit(&claimed(3), TaskOutcome::Completed, Some(output()), 2000);
        assert_eq!(
            settled(Some(&newer), &task(2)),
            Some(Claim::Stale { current: 3 })
        );
        // A claim is not a commit.
        assert_eq!(result_of(&claimed(1)), None);
    }

    #[test]
    fn only_the_committed_outcome_of_the_attempt_is_vouched_for() {
        let failed = TaskOutcome::Failed {
            reason: "no sources".into(),
        };
        let done = commit(&claimed(1), TaskOutcome::Completed, Some(output()), 2000);
        let bad = commit(&claimed(1), failed.clone(), None, 2000);
        // The holder's own notices.
        assert_eq!(
            vouch(
                Some(&done),
                Some(&claimed(1)),
                &result(1, TaskOutcome::Completed),
                false
            ),
            Ok(())
        );
        assert_eq!(
            vouch(Some(&bad), None, &result(1, failed.clone()), false),
            Ok(())
        );
        // Forgeries: nothing committed, still running, another outcome, another
        // reason, another role, an attempt not reached, an older attempt.
        assert!(vouch(None, None, &result(1, TaskOutcome::Completed), false).is_err());
        assert!(
            vouch(
                None,
                Some(&claimed(1)),
                &result(1, TaskOutcome::Completed),
                false
            )
            .is_err()
        );
        assert!(vouch(None, Some(&claimed(1)), &result(1, failed.clone()), true).is_err());
        assert!(vouch(Some(&done), None, &result(1, failed.clone()), false).is_err());
        let other = TaskOutcome::Failed {
            reason: "forged failure".into(),
        };
        assert!(vouch(Some(&bad), None, &result(1, other), false).is_err());
        let mut foreign = result(1, TaskOutcome::Completed);
        foreign.role = Role::parse("review").unwrap();
        assert!(vouch(Some(&done), None, &foreign, false).is_err());
        assert!(vouch(Some(&done), None, &result(2, TaskOutcome::Completed), false).is_err());
        // A newer attempt's claim makes the committed one stale.
        let moved_on = claimed(2);
        let why = vouch(
            Some(&bad),
            Some(&moved_on),
            &result(1, failed.clone()),
            false,
        )
        .unwrap_err();
        assert!(why.contains("stale attempt 1"), "{why}");
        // ... unless it is a redelivery: the orchestrator may have handled it and
        // retried the task before dying ahead of the ack (the task table decides).
        assert_eq!(
            vouch(Some(&bad), Some(&moved_on), &result(1, failed), true),
            Ok(())
        );
    }

    #[test]
    fn the_first_claim_creates_and_a_fresh_claim_of_another_is_respected() {
        let Claim::Take { record, resumed } = claim(None, &task(1), &agent(1), 1000, 10) else {
            panic!()
        };
        assert!(!resumed);
        assert_eq!(record.state, TaskRunState::Running);
        assert!(matches!(
            claim(Some(&record), &task(1), &agent(2), 1000, 500),
            Claim::Held { retry_ms: 560, .. }
        ));
        // Past the claim's lifetime its holder is presumed dead.
        assert!(matches!(
            claim(Some(&record), &task(1), &agent(2), 1000, 2000),
            Claim::Take { resumed: true, .. }
        ));
    }

    #[test]
    fn a_committed_attempt_is_re_notified_and_an_old_one_is_stale() {
        let Claim::Take { record, .. } = claim(None, &task(2), &agent(1), 1000, 10) else {
            panic!()
        };
        let done = commit(&record, TaskOutcome::Completed, Some(output()), 20);
        assert_eq!(
            claim(Some(&done), &task(2), &agent(2), 1000, 30),
            Claim::Committed(TaskOutcome::Completed)
        );
        assert_eq!(
            claim(Some(&done), &task(1), &agent(2), 1000, 30),
            Claim::Stale { current: 2 }
        );
        assert_eq!(output_of(&done, 2), Some(&output()));
        assert_eq!(output_of(&done, 1), None);
    }

    #[test]
    fn a_fence_sends_the_attempt_back_to_queued_for_its_holder_only() {
        let Claim::Take { record, .. } = claim(None, &task(1), &agent(1), 1000, 10) else {
            panic!()
        };
        assert!(fence(&record, &agent(2), 1, 20).is_none());
        assert!(fence(&record, &agent(1), 2, 20).is_none());
        let fenced = fence(&record, &agent(1), 1, 20).unwrap();
        assert_eq!(fenced.state, TaskRunState::Queued);
        // The next delivery claims at once, resuming the conversation if any.
        assert!(matches!(
            claim(Some(&fenced), &task(1), &agent(2), 1000, 21),
            Claim::Take { resumed: false, .. }
        ));
    }

    #[test]
    fn every_claim_of_an_attempt_counts_a_holder_and_a_new_attempt_starts_at_one() {
        let Claim::Take { record, .. } = claim(None, &task(1), &agent(1), 1000, 10) else {
            panic!()
        };
        assert_eq!(record.holders, 1);
        // Taken over once its holder is presumed dead.
        let Claim::Take { record, .. } = claim(Some(&record), &task(1), &agent(2), 1000, 2000)
        else {
            panic!()
        };
        assert_eq!(record.holders, 2);
        // Fenced, then claimed again (by the same process, whose first handler may
        // still be running): a third holder.
        let fenced = fence(&record, &agent(2), 1, 2100).unwrap();
        let Claim::Take { record, .. } = claim(Some(&fenced), &task(1), &agent(2), 1000, 2200)
        else {
            panic!()
        };
        assert_eq!(record.holders, 3);
        let Claim::Take { record, .. } = claim(Some(&record), &task(2), &agent(1), 1000, 2300)
        else {
            panic!()
        };
        assert_eq!(record.holders, 1, "a new attempt");
    }

    fn arb_state() -> impl Strategy<Value = TaskRunState> {
        prop_oneof![
            Just(TaskRunState::Queued),
            Just(TaskRunState::Running),
            Just(TaskRunState::Done),
            Just(TaskRunState::Failed),
        ]
    }

    /// A claim against a record in any state: the record (of attempt `rec_attempt`,
    /// claimed by `holder` at `updated`, then put in `state`), and who claims which
    /// attempt when.
    #[derive(Debug, Clone)]
    struct ClaimCase {
        rec_attempt: u32,
        msg_attempt: u32,
        state: TaskRunState,
        holder: u8,
        me: u8,
        updated: u64,
        now: u64,
        ttl: u64,
    }

    impl ClaimCase {
        /// The record claimed over.
        fn current(&self) -> TaskRecord {
            let Claim::Take { mut record, .. } = claim(
                None,
                &task(self.rec_attempt),
                &agent(self.holder),
                self.ttl,
                self.updated,
            ) else {
                unreachable!()
            };
            record.state = self.state;
            record
        }
    }

    prop_compose! {
        fn arb_claim_case()(
            rec_attempt in 1u32..5,
            msg_attempt in 1u32..5,
            state in arb_state(),
            holder in 0u8..3,
            me in 0u8..3,
            updated in 0u64..10_000,
            now in 0u64..20_000,
            ttl in 1u64..5_000,
        ) -> ClaimCase {
            ClaimCase { rec_attempt, msg_attempt, state, holder, me, updated, now, ttl }
        }
    }

    proptest! {
        /// Whatever the record, a claim never goes back in attempts, never takes a
        /// committed attempt, and never takes a live claim of another holder.
        #[test]
        fn claims_respect_attempts_commits_and_live_holders(c in arb_claim_case()) {
            let ClaimCase { rec_attempt, msg_attempt, state, holder, me, updated, now, ttl } = c.clone();
            let mut rec0 = c.current();
            if state == TaskRunState::Queued { rec0.holder = None; }
            match claim(Some(&rec0), &task(msg_attempt), &agent(me), ttl, now) {
                Claim::Take { record, .. } => {
                    prop_assert!(msg_attempt >= rec_attempt);
                    prop_assert_eq!(record.attempt, msg_attempt);
                    prop_assert_eq!(record.holder.clone(), Some(agent(me)));
                    if msg_attempt == rec_attempt {
                        prop_assert!(matches!(state, TaskRunState::Queued | TaskRunState::Running));
                        if state == TaskRunState::Running && holder != me {
                            prop_assert!(now.saturating_sub(updated) >= ttl);
                        }
                    }
                }
                Claim::Stale { current } => prop_assert!(current > msg_attempt),
                Claim::Committed(_) => prop_assert!(msg_attempt == rec_attempt && matches!(state, TaskRunState::Done | TaskRunState::Failed)),
                Claim::Held { age_ms, .. } => {
                    prop_assert!(holder != me && state == TaskRunState::Running);
                    prop_assert!(age_ms < ttl);
                }
                Claim::WrongRole => prop_assert!(false),
            }
        }

        /// What a holder keeps of a claim commits exactly as the claimed record
        /// would, whatever the record claimed over.
        #[test]
        fn a_held_claim_commits_as_the_record(
            c in arb_claim_case(),
            outcome_kind in 0u8..4,
            later in 0u64..1_000_000,
        ) {
            let ClaimCase { msg_attempt, holder, me, now, ttl, .. } = c.clone();
            let mut current = c.current();
            current.holders = u32::from(holder) + 1;
            current.spend = Some(crate::Spend::default());
            current.error = Some("earlier".into());
            if let Claim::Take { record: mut claimed, .. } = claim(Some(&current), &task(msg_attempt), &agent(me), ttl, now) {
                claimed.ack_subject = Some("$JS.ACK.x".into());
                let outcome = match outcome_kind {
                    0 => TaskOutcome::Completed,
                    1 => TaskOutcome::Failed { reason: "r".into() },
                    2 => TaskOutcome::Stopped { budget: crate::BudgetKind::Turns, reason: "t".into() },
                    _ => TaskOutcome::Clarify { question: "q".into() },
                };
                let whole = commit(&claimed, outcome.clone(), Some(output()), later);
                let held = Held::of(&claimed);
                prop_assert_eq!(held.holders(), claimed.holders);
                prop_assert_eq!(held.attempt(), claimed.attempt);
                prop_assert_eq!(held.commit(&task(msg_attempt), &agent(me), outcome, Some(output()), later), whole);
            }
        }

        /// A commit keeps the attempt and holder, and only a completed outcome keeps
        /// an output.
        #[test]
        fn commits_keep_the_claim(failed in any::<bool>(), now in 0u64..1_000_000) {
            let Claim::Take { mut record, .. } = claim(None, &task(3), &agent(1), 1000, 0) else { unreachable!() };
            record.ack_subject = Some("$JS.ACK.x".into());
            let outcome = if failed { TaskOutcome::Failed { reason: "r".into() } } else { TaskOutcome::Completed };
            let c = commit(&record, outcome.clone(), Some(output()), now);
            prop_assert_eq!(c.attempt, 3);
            prop_assert_eq!(c.holder.clone(), Some(agent(1)));
            prop_assert_eq!(committed_outcome(&c), Some(outcome));
            prop_assert_eq!(c.output.is_some(), !failed);
            prop_assert_eq!(c.ack_subject, None);
        }
    }
}

//! The orchestrator agent: the `orchestrator` role pool, served by `flotilla serve`.
//!
//! It consumes `<p>.s.*.in.orchestrator` (starts, a person's answers) and the task
//! commits in the sessions bucket (`$KV.<p>-sessions.*.t.>`: a commit is a task's
//! result), each on one durable consumer shared by every `serve` instance, so a
//! session's orchestration continues on another instance when one dies. Each message drives the session's state machine ([`crate::machine`]) by
//! compare-and-set on the session record; the effects of a transition (dispatches,
//! events, slot release) are committed in the record's outbox in the same write and
//! performed afterwards with deterministic message ids, so a crash between the write
//! and the effects is repaired by whoever handles the session next.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use flotilla_agent::open_inbox_delivery;
use flotilla_bus::{Bus, Delivery, KvError, Outgoing, PoolConsumer, PublishError, VerdictError};
use flotilla_llm::LlmClient;
use flotilla_protocol::subject::keys;
use flotilla_protocol::task_machine;
use flotilla_protocol::{
    Answer, AnswerSection, DEFAULT_MAX_PAYLOAD, Effect, ErrorCode, EventBody, InboxMessage,
    MessageId, Plan, ResultMessage, Role, SessionId, SessionRecord, SessionStatus, TaskId,
    TaskMessage, TaskRecord, TaskState, TraceParent, V1, decode, epoch_ms,
};
use futures::future::Either;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::ControlConfig;
use crate::machine::{self, ResultVerdict};
use crate::prompts;
use crate::slots;

/// How many times a plan is asked for before the session fails.
const PLAN_ATTEMPTS: usize = 3;
/// Compare-and-set rounds before handing the message back for redelivery.
const CAS_ROUNDS: usize = 32;

enum Input {
    Start,
    Result(Box<ResultMessage>),
    Answer(Box<flotilla_protocol::InputMessage>),
}

/// Session records as this process last wrote or read them, one cell per live
/// session: a handler starts from its cell (no read when nobody else wrote since; the
/// compare-and-set says when someone did) and holds it while it works, so the
/// handlers of one session in this process take turns instead of conflicting.
///
/// A plain mutex around the map: each critical section is one map operation, never
/// held across an `.await` (the cells are async mutexes, held across the handler).
///
/// Admission seeds a cell with the record it just created, so the `start` handler of
/// a session admitted by this process reads nothing before it plans.
#[derive(Default, Clone)]
pub(crate) struct RecordCache {
    cells: Arc<std::sync::Mutex<std::collections::HashMap<SessionId, Cell>>>,
    /// Records admission created, until their `start` handler takes them (or another
    /// process's does, and they age out).
    seeds: Arc<std::sync::Mutex<std::collections::HashMap<SessionId, Seed>>>,
    /// Results waiting for their session's cell, which the handler holding it may apply
    /// in its own write (see [`Mail`]).
    mail: Arc<std::sync::Mutex<std::collections::HashMap<SessionId, Mail>>>,
    /// The outputs of the commits this process received, by session, for its
    /// synthesis: with all of them here it reads nothing (see [`Outputs`]).
    outputs: Arc<std::sync::Mutex<OutputCache>>,
}

/// The kept outputs, and about how many bytes they take, within a byte budget
/// (`session.output_cache_bytes`).
struct OutputCache {
    by_session: std::collections::HashMap<SessionId, Outputs>,
    bytes: usize,
    max_bytes: usize,
    /// When entries were last looked over for sessions gone elsewhere.
    swept: Option<std::time::Instant>,
}

impl Default for OutputCache {
    fn default() -> Self {
        Self::with_budget(DEFAULT_OUTPUT_CACHE_BYTES)
    }
}

/// The default of `session.output_cache_bytes`.
pub const DEFAULT_OUTPUT_CACHE_BYTES: usize = 4 << 20;

/// A session's outputs kept longer than this may be dropped when the cache is full:
/// the session ended in another process (its outputs would stay otherwise), or waits
/// long on a task; either way its synthesis reads them, one request.
const OUTPUTS_STALE: Duration = Duration::from_secs(120);

impl OutputCache {
    fn with_budget(max_bytes: usize) -> Self {
        Self {
            by_session: std::collections::HashMap::new(),
            bytes: 0,
            max_bytes,
            swept: None,
        }
    }

    /// Whether an output of `size` bytes for `session` fits: a session with outputs
    /// here may go past the budget (to twice it) to complete its set, as its synthesis
    /// reads nothing then; a new one must fit. When one does not, entries past
    /// [`OUTPUTS_STALE`] are dropped first (looked over at most once a second).
    fn room_for(&mut self, session: &SessionId, size: usize) -> bool {
        let fits = |c: &Self| {
            let limit = if c.by_session.contains_key(session) {
                c.max_bytes.saturating_mul(2)
            } else {
                c.max_bytes
            };
            c.bytes.saturating_add(size) <= limit
        };
        if fits(self) {
            return true;
        }
        let now = std::time::Instant::now();
        if self
            .swept
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return false;
        }
        self.swept = Some(now);
        let mut freed = 0;
        self.by_session.retain(|_, o| {
            let keep = now.duration_since(o.since) < OUTPUTS_STALE;
            if !keep {
                freed += o.bytes();
            }
            keep
        });
        self.bytes = self.bytes.saturating_sub(freed);
        fits(self)
    }
}

/// A session's task outputs as their commits were delivered here (a commit read from
/// the stream is what its holder wrote under its claim, so it needs no second read).
/// The synthesis takes its sections from here when every finished task's attempt has
/// one, and reads the task records otherwise (the session's commits went to several
/// processes, this one restarted, or the cache was full). Kept until the session ends
/// here, or, when the cache is full, for [`OUTPUTS_STALE`] at least.
struct Outputs {
    since: std::time::Instant,
    kept: Vec<(TaskId, u32, flotilla_protocol::TaskOutput, usize)>,
}

impl Outputs {
    fn bytes(&self) -> usize {
        self.kept.iter().map(|o| o.3).sum()
    }
}

/// A session's results waiting for its cell. Results of one session often arrive
/// together (the tasks of a wave end at about the same time), and their handlers take
/// turns on the cell: the one holding it applies the waiting ones too, in the same
/// compare-and-set, and marks them applied once the write and its effects are done.
/// Their handlers, getting the cell, find the mark and only ack. One write for several
/// results instead of one each.
///
/// Everything in a session's mail belongs to a handler still running (`live`): a mark
/// is made only for one, and each takes its result and its mark with it when it ends.
/// So the mail outlives its session's end for exactly as long as its handlers do, and
/// the handlers of results applied in the session's last write find their marks.
#[derive(Default)]
struct Mail {
    pending: Vec<ResultMessage>,
    applied: Vec<(TaskId, u32)>,
    /// The results whose handlers are running.
    live: Vec<(TaskId, u32)>,
    /// Woken when a result is posted (for a handler lingering on the cell).
    arrived: Arc<tokio::sync::Notify>,
}

/// A handler's result posted to its session's [`Mail`]; taken back (or its mark
/// cleared) when the handler ends, however it ends.
struct Posted<'a> {
    cache: &'a RecordCache,
    session: SessionId,
    task_id: TaskId,
    attempt: u32,
}

impl Posted<'_> {
    /// Whether another handler applied this result (and took it out of the mail);
    /// otherwise takes it back, for this handler to apply.
    fn applied_by_another(&self) -> bool {
        let mut mail = self.cache.mail.lock().unwrap_or_else(|p| p.into_inner());
        let Some(m) = mail.get_mut(&self.session) else {
            return false;
        };
        let key = (self.task_id.clone(), self.attempt);
        if let Some(i) = m.applied.iter().position(|a| *a == key) {
            m.applied.swap_remove(i);
            return true;
        }
        if let Some(i) = m
            .pending
            .iter()
            .position(|r| r.task_id == self.task_id && r.attempt == self.attempt)
        {
            m.pending.swap_remove(i);
        }
        m.release_empty();
        false
    }
}

impl Mail {
    /// Lets go of the buffers of empty lists: the mail lives as long as its session's
    /// handlers, one of which may hold the cell through a synthesis call, and a list of
    /// results that held one keeps room for four (900 bytes).
    fn release_empty(&mut self) {
        if self.pending.is_empty() {
            self.pending = Vec::new();
        }
        if self.applied.is_empty() {
            self.applied = Vec::new();
        }
    }
}

impl Drop for Posted<'_> {
    fn drop(&mut self) {
        let mut mail = self.cache.mail.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = mail.get_mut(&self.session) {
            let key = (self.task_id.clone(), self.attempt);
            m.applied.retain(|a| *a != key);
            m.pending
                .retain(|r| !(r.task_id == self.task_id && r.attempt == self.attempt));
            if let Some(i) = m.live.iter().position(|a| *a == key) {
                m.live.swap_remove(i);
            }
            if m.live.is_empty() {
                mail.remove(&self.session);
            } else {
                m.release_empty();
            }
        }
    }
}

type Seed = (SessionRecord, u64, std::time::Instant);

/// How long a seeded record waits for its `start` handler in this process.
const SEED_TTL: Duration = Duration::from_secs(30);

impl std::fmt::Debug for RecordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordCache").finish_non_exhaustive()
    }
}

/// A session's cached record (boxed: a handler holds it through its model calls, and
/// inline it made each handler's future 400 bytes larger, twice over).
type Cell = Arc<tokio::sync::Mutex<Option<(Box<SessionRecord>, u64)>>>;

/// A session's task records by task.
type TaskRecords = std::collections::HashMap<TaskId, TaskRecord>;

/// Most sessions cached; past it the cache starts over (it is only a hint).
const CACHE_MAX: usize = 100_000;

impl RecordCache {
    /// A cache keeping at most about `bytes` of task outputs (as their commits' sizes)
    /// for synthesis here (`session.output_cache_bytes`).
    pub(crate) fn with_output_budget(bytes: usize) -> Self {
        Self {
            outputs: Arc::new(std::sync::Mutex::new(OutputCache::with_budget(bytes))),
            ..Self::default()
        }
    }

    fn cell(&self, session: &SessionId) -> Cell {
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        if cells.len() >= CACHE_MAX && !cells.contains_key(session) {
            cells.clear();
        }
        cells.entry(session.clone()).or_default().clone()
    }

    /// Keeps `rec`, just created at `revision`, for its session's first `start`
    /// handler here. Seeds older than [`SEED_TTL`] are dropped (their start went to
    /// another process, or is long done).
    pub(crate) fn seed(&self, session: &SessionId, rec: &SessionRecord, revision: u64) {
        let now = std::time::Instant::now();
        let mut seeds = self.seeds.lock().unwrap_or_else(|p| p.into_inner());
        if seeds.len() >= 1024 && seeds.len().is_power_of_two() {
            seeds.retain(|_, (_, _, at)| now.duration_since(*at) < SEED_TTL);
        }
        if seeds.len() < CACHE_MAX {
            seeds.insert(session.clone(), (rec.clone(), revision, now));
        }
    }

    /// The record admission created for `session`, if it is still kept.
    fn take_seed(&self, session: &SessionId) -> Option<(Box<SessionRecord>, u64)> {
        self.seeds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session)
            .map(|(rec, rev, _)| (Box::new(rec), rev))
    }

    /// Posts `r` for whoever holds its session's cell (see [`Mail`]).
    fn post(&self, r: &ResultMessage) -> Posted<'_> {
        self.mail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(r.session_id.clone())
            .or_default()
            .live
            .push((r.task_id.clone(), r.attempt));
        self.repost(r.clone());
        Posted {
            cache: self,
            session: r.session_id.clone(),
            task_id: r.task_id.clone(),
            attempt: r.attempt,
        }
    }

    /// Puts `r` (back) in its session's mail, if its handler is still running (one
    /// that ended is redelivered, and decides it itself).
    fn repost(&self, r: ResultMessage) {
        let mut mail = self.mail.lock().unwrap_or_else(|p| p.into_inner());
        let Some(m) = mail.get_mut(&r.session_id) else {
            return;
        };
        if !m
            .live
            .iter()
            .any(|(t, a)| *t == r.task_id && *a == r.attempt)
        {
            return;
        }
        m.pending.push(r);
        m.arrived.notify_waiters();
    }

    /// Waits until `want` results wait in `session`'s mail, or until `deadline`.
    async fn gather(&self, session: &SessionId, want: usize, deadline: tokio::time::Instant) {
        loop {
            let arrived = {
                let mail = self.mail.lock().unwrap_or_else(|p| p.into_inner());
                let Some(m) = mail.get(session) else {
                    return;
                };
                if m.pending.len() >= want {
                    return;
                }
                m.arrived.clone()
            };
            let notified = arrived.notified();
            tokio::pin!(notified);
            // Registered before the count is looked at again: no post is missed.
            notified.as_mut().enable();
            let enough = self
                .mail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(session)
                .is_some_and(|m| m.pending.len() >= want);
            if enough {
                return;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// The results waiting for `session`'s cell, taken out of its mail.
    fn drain(&self, session: &SessionId) -> Vec<ResultMessage> {
        self.mail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(session)
            .map(|m| std::mem::take(&mut m.pending))
            .unwrap_or_default()
    }

    /// Marks results this handler applied for their own handlers (those still
    /// running: a stopped one's result needs no mark).
    fn mark_applied(&self, session: &SessionId, results: &[(ResultMessage, Role, &'static str)]) {
        if results.is_empty() {
            return;
        }
        let mut mail = self.mail.lock().unwrap_or_else(|p| p.into_inner());
        let Some(m) = mail.get_mut(session) else {
            return;
        };
        for (r, _, _) in results {
            let key = (r.task_id.clone(), r.attempt);
            if m.live.contains(&key) {
                m.applied.push(key);
            }
        }
    }

    /// Keeps the output a commit of `size` bytes delivered, for the session's
    /// synthesis here.
    fn keep_output(
        &self,
        session: &SessionId,
        task: &TaskId,
        attempt: u32,
        mut output: flotilla_protocol::TaskOutput,
        size: usize,
    ) {
        // Kept until the synthesis: without the room decoding left for more artifacts.
        output.artifacts.shrink_to_fit();
        let mut cache = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.room_for(session, size) {
            // Over its budget: this session's synthesis reads its outputs instead.
            return;
        }
        let kept = &mut cache
            .by_session
            .entry(session.clone())
            .or_insert_with(|| Outputs {
                since: std::time::Instant::now(),
                kept: Vec::new(),
            })
            .kept;
        let freed = match kept.iter_mut().find(|(t, ..)| t == task) {
            Some(slot) if slot.1 <= attempt => {
                std::mem::replace(slot, (task.clone(), attempt, output, size)).3
            }
            Some(_) => return,
            None => {
                kept.push((task.clone(), attempt, output, size));
                0
            }
        };
        cache.bytes = cache.bytes.saturating_add(size).saturating_sub(freed);
    }

    /// The outputs kept for `session`'s tasks at these attempts, taken out of the
    /// cache (they become the answer's sections: one copy of each through the
    /// synthesis call, not two), if this process received every one of their
    /// commits; otherwise `None`, and nothing is taken.
    fn take_outputs(
        &self,
        session: &SessionId,
        wanted: &[(&TaskId, u32)],
    ) -> Option<Vec<flotilla_protocol::TaskOutput>> {
        let mut cache = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
        let kept = &mut cache.by_session.get_mut(session)?.kept;
        let all_here = wanted
            .iter()
            .all(|(task, attempt)| kept.iter().any(|(t, a, ..)| t == *task && a == attempt));
        if !all_here {
            return None;
        }
        let mut freed = 0;
        let mut outputs = Vec::with_capacity(wanted.len());
        for (task, attempt) in wanted {
            let i = kept
                .iter()
                .position(|(t, a, ..)| t == *task && a == attempt)?;
            let (_, _, output, size) = kept.swap_remove(i);
            freed += size;
            outputs.push(output);
        }
        cache.bytes = cache.bytes.saturating_sub(freed);
        Some(outputs)
    }

    /// Drops what is kept for an ended (or stopped) session. Its mail goes with its
    /// last handler (see [`Mail`]): a handler whose result the session's last write
    /// applied finds its mark and acks, and one whose result it did not decides it on
    /// a fresh read (a duplicate of an ended session).
    fn forget(&self, session: &SessionId) {
        self.cells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session);
        let mut cache = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gone) = cache.by_session.remove(session) {
            cache.bytes = cache.bytes.saturating_sub(gone.bytes());
        }
    }
}

/// The orchestrator pool process.
#[derive(Clone)]
pub struct Orchestrator {
    bus: Bus,
    llm: Arc<dyn LlmClient>,
    config: Arc<ControlConfig>,
    tracker: flotilla_agent::Tracker,
    cache: RecordCache,
    stops: flotilla_agent::Stops,
    ender: Option<crate::ender::Ender>,
    signer: Option<flotilla_bus::Signer>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Synthesis {
    summary: String,
}

/// A session ended: its outcome, its duration, and the budget that stopped it, if any.
fn session_ended_metrics(rec: &SessionRecord) {
    let outcome = if rec.status == SessionStatus::Completed {
        "completed"
    } else {
        "failed"
    };
    metrics::counter!("flotilla_sessions_total", "outcome" => outcome).increment(1);
    metrics::histogram!("flotilla_session_duration_seconds")
        .record(rec.updated_ms.saturating_sub(rec.opened_ms) as f64 / 1000.0);
    match rec.stopped_by {
        Some(flotilla_protocol::BudgetKind::CircuitBreaker) => {
            metrics::counter!("flotilla_circuit_opens_total").increment(1);
            flotilla_bus::trace::span_event("circuit_open", Vec::new());
        }
        Some(kind) => {
            metrics::counter!("flotilla_budget_exhausted_total", "kind" => kind.to_string())
                .increment(1);
            flotilla_bus::trace::span_event(
                "budget_exhausted",
                vec![flotilla_bus::trace::KeyValue::new(
                    "flotilla.budget",
                    kind.to_string(),
                )],
            );
        }
        None => {}
    }
}

/// One handler's model calls, as the session's token account must see them.
#[derive(Debug, Default)]
struct Calls {
    /// How many times the handler's message has been delivered.
    delivered: u64,
    /// Tokens used off the ledger.
    used: u64,
    /// Charged for calls earlier deliveries of the message may have made.
    margin: u64,
    /// The account moved to the ledger, seeded with these tokens.
    seeded: Option<u64>,
}

impl Calls {
    /// Charges the calls made so far to `rec`, the record of this compare-and-set round
    /// (`applied`: what this round's copy already holds). Done before a transition
    /// that may grant allowances, so they are granted on what the calls used, and
    /// again before the write.
    fn charge(&self, rec: &mut SessionRecord, applied: &mut u64) {
        if let Some(seed) = self.seeded {
            if !rec.tokens.metered {
                rec.tokens.granted = seed;
                rec.tokens.metered = true;
            }
            return;
        }
        if rec.tokens.metered || rec.tokens.budget == 0 {
            return;
        }
        let total = self.used + self.margin;
        rec.tokens.granted += total.saturating_sub(*applied);
        *applied = total;
    }
}

/// Why an orchestrator call ends the session instead of being retried.
#[derive(Debug, Clone)]
enum Halt {
    /// A budget is spent.
    Budget(flotilla_agent::Exhausted),
    /// The model refused the request or kept answering unusably: retrying would not
    /// help.
    Failed(String),
}

/// Ends the session for `h`.
fn halt(rec: &mut SessionRecord, h: Halt, now: u64) {
    match h {
        Halt::Budget(e) => machine::stop(rec, e.budget, None, e.reason, now),
        Halt::Failed(why) => machine::fail(rec, why, now),
    }
}

/// A spent fleet-wide budget, a refusal or an unusable answer end the session
/// (`Ok(Err(_))`); other failures (rate limits, an unreachable provider) are the
/// caller's to retry.
fn halting(e: flotilla_llm::LlmError) -> Result<Result<String, Halt>, flotilla_llm::LlmError> {
    use flotilla_llm::LlmError;
    match e {
        LlmError::OverBudget(reason) => Ok(Err(Halt::Budget(flotilla_agent::Exhausted {
            budget: flotilla_protocol::BudgetKind::GlobalTokens,
            reason,
        }))),
        LlmError::Refused(_) | LlmError::BadResponse(_) => Ok(Err(Halt::Failed(format!(
            "the orchestrator's model call failed: {e}"
        )))),
        other => Err(other),
    }
}

/// The keys of the task records `rec`'s finished tasks committed to.
pub(crate) fn task_keys(rec: &SessionRecord) -> Vec<String> {
    rec.tasks
        .iter()
        .filter(|t| t.state == TaskState::Done)
        .map(|t| keys::task(&rec.session_id, &t.role, &t.task_id))
        .collect()
}

/// Reads a delivery of the commits consumer: the result its task record reports, or
/// `None` when there is nothing to act on (a key deleted or purged, or a record that
/// is not a commit), with the output of a completed one. A record that does not
/// decode, or that names another task than its key, is refused (dead-lettered with its
/// reason).
fn open_commit_delivery(
    bus: &Bus,
    d: &Delivery,
) -> Result<Option<(ResultMessage, Option<flotilla_protocol::TaskOutput>)>, VerdictError> {
    if flotilla_bus::kv::is_delete_marker(d.header(flotilla_bus::kv::KV_OPERATION)) {
        return Ok(None);
    }
    let prefix = bus.names().sessions_key_subject("");
    let key = d
        .subject()
        .strip_prefix(prefix.as_str())
        .unwrap_or_default();
    let mut rec: TaskRecord = decode(d.payload(), bus.config().max_payload)
        .map_err(|e| VerdictError::poison(e.code(), format!("commit at {key}: {e}")))?;
    if key != keys::task(&rec.session_id, &rec.role, &rec.task_id) {
        return Err(VerdictError::poison(
            ErrorCode::WrongSession,
            format!(
                "the record at {key} is of task {} of role {} in session {}",
                rec.task_id, rec.role, rec.session_id
            ),
        ));
    }
    let result = task_machine::result_of(&rec);
    let output = match task_machine::output_of(&rec, rec.attempt) {
        Some(_) => rec.output.take(),
        None => None,
    };
    Ok(result.map(|r| (r, output)))
}

fn now() -> u64 {
    epoch_ms(SystemTime::now())
}

impl Orchestrator {
    /// An orchestrator planning and synthesizing with `llm`.
    pub fn new(bus: Bus, llm: Arc<dyn LlmClient>, config: Arc<ControlConfig>) -> Self {
        let cache = RecordCache::with_output_budget(config.session.output_cache_bytes);
        Self {
            bus,
            llm,
            config,
            tracker: flotilla_agent::Tracker::default(),
            cache,
            stops: flotilla_agent::Stops::default(),
            ender: None,
            signer: None,
        }
    }

    /// Shares its record cache with admission (see [`RecordCache`]).
    pub(crate) fn with_cache(mut self, cache: RecordCache) -> Self {
        self.cache = cache;
        self
    }

    /// Signs every task it dispatches with `signer` (registered by the caller), so
    /// workers trust them without reading the session record (`flotilla_bus::signing`).
    pub fn with_signer(mut self, signer: flotilla_bus::Signer) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Keeps the timers of questions waiting for a person with `ender`.
    pub fn with_ender(mut self, ender: crate::ender::Ender) -> Self {
        self.ender = Some(ender);
        self
    }

    /// Sessions ended from outside (cancel, deadline) whose messages this process
    /// drops, and whose handlers (and their model calls) it aborts.
    pub fn with_stops(mut self, stops: flotilla_agent::Stops) -> Self {
        self.stops = stops;
        self
    }

    /// Reports in-flight deliveries to `tracker` (published by the process's presence).
    pub fn with_tracker(mut self, tracker: flotilla_agent::Tracker) -> Self {
        self.tracker = tracker;
        self
    }

    /// Serves the orchestrator role until `shutdown`: its inbox, and the task commits.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), flotilla_bus::ConsumerError> {
        let inbox = PoolConsumer::for_role(
            &self.bus,
            &Role::orchestrator(),
            self.config.orchestrator.clone(),
        )
        .await?;
        let commits =
            PoolConsumer::for_commits(&self.bus, self.config.orchestrator.clone()).await?;
        // Shared by pointer: each handler's future holds one for its whole life (a
        // model call), and a clone of the orchestrator by value was 168 bytes of it,
        // which put tokio's task cell in the 1,536-byte class instead of 1,280.
        let shared = Arc::new(self);
        let this = shared.clone();
        let inbox = inbox.serve(
            shared.bus.clone(),
            shutdown.clone(),
            move |mut d: Delivery| {
                let this = this.clone();
                async move {
                    let verdict = this.handle(&mut d).await;
                    (d, verdict)
                }
            },
        );
        let this = shared.clone();
        let commits = commits.serve(shared.bus.clone(), shutdown, move |mut d: Delivery| {
            let this = this.clone();
            async move {
                let verdict = this.handle_commit(&mut d).await;
                (d, verdict)
            }
        });
        tokio::join!(inbox, commits);
        Ok(())
    }

    /// An inbox delivery. (Its input is opened before the future is made: an `async
    /// fn` would keep the orchestrator and the delivery in slots beside the handling's,
    /// which lives through plan and synthesis calls.)
    fn handle<'a>(
        &'a self,
        d: &'a mut Delivery,
    ) -> impl Future<Output = Result<(), VerdictError>> + Send + 'a {
        match self.open_input(d) {
            Ok((session, input)) => Either::Left(self.take(d, session, input, false)),
            Err(e) => Either::Right(std::future::ready(Err(e))),
        }
    }

    /// Decodes an inbox delivery into its session and input, and releases its payload.
    /// (Not async: the decoded message is gone before the handler's first await, so
    /// no slot of it stays in the future held through plan and synthesis calls.)
    fn open_input(&self, d: &mut Delivery) -> Result<(SessionId, Input), VerdictError> {
        let msg = open_inbox_delivery(&self.bus, d, &Role::orchestrator())?;
        // Decoded: the payload is not held through plan and synthesis calls (the
        // stream keeps the message until it is acked; a dead-letter copy reads it).
        d.release_payload();
        let session = msg.session_id().clone();
        let input = match msg {
            InboxMessage::Start(_) => Input::Start,
            // Only a result its task's commit vouches for is acted on (workers commit
            // and send nothing else: a result here is from an outsider).
            InboxMessage::Result(r) => Input::Result(Box::new(r)),
            InboxMessage::Input(i) => Input::Answer(Box::new(i)),
            InboxMessage::Task(_) => {
                return Err(VerdictError::poison(
                    ErrorCode::UnknownRole,
                    "task messages do not go to the orchestrator",
                ));
            }
        };
        Ok((session, input))
    }

    /// A task's commit: its result, as the holder wrote it under its claim.
    /// (Opened before the future is made, as [`Self::handle`] is.)
    fn handle_commit<'a>(
        &'a self,
        d: &'a mut Delivery,
    ) -> impl Future<Output = Result<(), VerdictError>> + Send + 'a {
        match self.open_commit(d) {
            Ok(Some((session, input))) => Either::Left(self.take(d, session, input, true)),
            Ok(None) => Either::Right(std::future::ready(Ok(()))),
            Err(e) => Either::Right(std::future::ready(Err(e))),
        }
    }

    /// Decodes a commit into its session and result, keeps its output for the
    /// synthesis, and releases the payload (not async: see [`Self::open_input`]).
    fn open_commit(&self, d: &mut Delivery) -> Result<Option<(SessionId, Input)>, VerdictError> {
        let Some((r, output)) = open_commit_delivery(&self.bus, d)? else {
            return Ok(None);
        };
        let session = r.session_id.clone();
        if let Some(output) = output {
            self.cache
                .keep_output(&session, &r.task_id, r.attempt, output, d.payload().len());
        }
        // Decoded (a commit carries its output: the largest of the messages a session
        // waits on): see `handle`.
        d.release_payload();
        Ok(Some((session, Input::Result(Box::new(r)))))
    }

    /// Drives `session` with `input` (`committed`: a result read from its commit, which
    /// needs no check against it).
    ///
    /// (An `async` block rather than an `async fn`: an `async fn` moves each argument
    /// into a second slot of its own, 56 bytes of this future, which lives through
    /// plan and synthesis calls.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps a second slot per argument"
    )]
    fn take<'a>(
        &'a self,
        d: &'a Delivery,
        session: SessionId,
        input: Input,
        committed: bool,
    ) -> impl Future<Output = Result<(), VerdictError>> + Send + 'a {
        async move {
            // Ended from outside: the record says so; nothing is left to do here.
            let Some(guard) = self.stops.guard(&session) else {
                return Ok(());
            };
            if let Some(ack) = &d.handle() {
                self.tracker.start(
                    ack,
                    flotilla_agent::InFlightWork {
                        session_id: session.clone(),
                        task: None,
                    },
                );
            }
            // Listed in our presence soon after (never awaited: a crash before that write
            // leaves this message to its ack wait), so the watchdog can release it at once
            // if this process dies in a long call.
            // (The span is made in this block and moved into the instrumented future:
            // this future, which lives through plan and synthesis calls, keeps no copy.)
            let drive = {
                let span = orchestrate_span(&session, &input, d);
                self.drive(&session, input, d.delivered(), committed)
                    .instrument(span)
            };
            // Both pinned in place (see `unless_stopped`): this future lives through plan
            // and synthesis calls.
            tokio::pin!(drive);
            let stopped = guard.stopped();
            tokio::pin!(stopped);
            let finished = flotilla_agent::unless_stopped(drive, stopped).await;
            // Stopped meanwhile: a plan or synthesis call in flight is dropped (aborted).
            let result = finished.unwrap_or_else(|span| {
                span.in_scope(|| tracing::info!("session stopped; handler aborted"));
                self.cache.forget(&session);
                Ok(())
            });
            self.tracker.finish(d.ack_subject().unwrap_or_default());
            result
        }
    }

    /// Refuses a result from the inbox that is not what the task's holder committed (a
    /// forgery: anyone who can publish to the inbox could otherwise end a task, or the
    /// session, with a made-up outcome). Workers send no results (their commit is the
    /// result, taken from the commits consumer), so this runs only for messages from
    /// outside: two reads from the stream leader, the commit and the claim.
    async fn vouch(&self, r: &ResultMessage, delivered: u64) -> Result<(), VerdictError> {
        let records = self.bus.sessions();
        let committed = records
            .get_latest::<TaskRecord>(&keys::task(&r.session_id, &r.role, &r.task_id))
            .await?;
        let claim = records
            .get_latest::<TaskRecord>(&keys::claim(&r.session_id, &r.role, &r.task_id))
            .await?;
        task_machine::vouch(
            committed.as_ref().map(|(t, _)| t),
            claim.as_ref().map(|(t, _)| t),
            r,
            delivered > 1,
        )
        .map_err(|why| {
            self.bus.counters.forged.increment();
            tracing::warn!(task = %r.task_id, attempt = r.attempt, %why, "forged result refused");
            VerdictError::poison(ErrorCode::Forged, why)
        })
    }

    /// (An `async` block rather than an `async fn`, as [`Self::take`] is: see there.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps a second slot per argument"
    )]
    fn drive<'a>(
        &'a self,
        session: &'a SessionId,
        input: Input,
        delivered: u64,
        committed: bool,
    ) -> impl Future<Output = Result<(), VerdictError>> + Send + 'a {
        async move {
            let mut redelivered = delivered > 1;
            let records = self.bus.sessions();
            let key = keys::session(session);
            // Handlers of one session in this process take turns (no conflicts among
            // themselves), and start from the record as the last one left it. A commit's
            // result waits in the session's mail meanwhile: the handler before it may
            // apply it in its own write.
            let cell = self.cache.cell(session);
            let carrier = committed
                && matches!(&input, Input::Result(r)
                if !matches!(r.outcome, flotilla_protocol::TaskOutcome::Clarify { .. }));
            let posted = match &input {
                Input::Result(r) if carrier && !redelivered => Some(self.cache.post(r)),
                _ => None,
            };
            // (Waits are boxed here and below: this future lives through plan and
            // synthesis calls, and is as large as its largest wait.)
            let mut cached = Box::pin(cell.lock()).await;
            if posted.as_ref().is_some_and(|p| p.applied_by_another()) {
                tracing::debug!("result applied by the session's previous handler");
                return Ok(());
            }
            // The session's other tasks in flight often end within moments of this one (a
            // wave's tasks run side by side): their results, posted meanwhile, then share
            // this handler's write. It waits at most `session.result_linger`, holding the
            // cell, and only while the cached record shows other tasks dispatched.
            let linger = self.config.session.result_linger;
            if let (Some(_), Some((rec, _)), Input::Result(r)) = (&posted, cached.as_ref(), &input)
                && !linger.is_zero()
                && rec.status == SessionStatus::Running
            {
                let others = rec
                    .tasks
                    .iter()
                    .filter(|t| t.state == TaskState::Dispatched && t.task_id != r.task_id)
                    .count();
                if others > 0 {
                    Box::pin(self.cache.gather(
                        session,
                        others,
                        tokio::time::Instant::now() + linger,
                    ))
                    .await;
                }
            }
            // A result from the inbox is checked against the task's commit first.
            if let Input::Result(r) = &input
                && !committed
            {
                Box::pin(self.vouch(r, delivered)).await?;
            }
            let mut input = Some(input);
            // LLM answers, kept across compare-and-set rounds (one call each).
            let mut clarified: Option<Result<String, Halt>> = None;
            let mut planned: Option<Result<Result<Plan, String>, Halt>> = None;
            let mut synthesized: Option<Result<Answer, Halt>> = None;
            // The model calls this handler made off the session's ledger.
            let mut calls = Calls {
                delivered,
                ..Calls::default()
            };
            // Whether the record in hand was read or written by this handler (the cell's
            // copy may lag behind another process's writes).
            let mut fresh = false;
            // A result's effect on its task, counted once its write lands.
            let mut task_outcome: Option<(Role, &'static str)> = None;
            // Other handlers' results applied in this handler's write (see `Mail`).
            let mut carried: Vec<(ResultMessage, Role, &'static str)> = Vec::new();
            for _ in 0..CAS_ROUNDS {
                // What of `calls` this round's copy of the record holds.
                let mut applied = 0;
                let from_cell = cached.take();
                // A cached copy only ever lags behind: it is good for a compare-and-set
                // (which fails if it lags) but not for a decision to write nothing, to
                // reject, or to call the model. Those are made on a fresh read.
                let plain_result = matches!(&input, Some(Input::Result(r))
                if !matches!(r.outcome, flotilla_protocol::TaskOutcome::Clarify { .. }));
                // A first `start` may plan on the record admission created in this process
                // (seeded in the cell): nothing but this message's handler moves a session
                // out of planning, and a cancel in between fails the plan's write.
                let first_start = matches!(&input, Some(Input::Start)) && delivered == 1;
                let from_cell = match from_cell {
                    None if first_start => self.cache.take_seed(session),
                    known => known,
                };
                let (mut rec, rev) = match from_cell {
                    Some(known) if fresh || plain_result => known,
                    Some(known) if first_start && known.0.status == SessionStatus::Planning => {
                        fresh = true;
                        known
                    }
                    _ => {
                        fresh = true;
                        // (A miss is asked of the leader again before it is final.)
                        match Box::pin(records.get_current::<SessionRecord>(&key, |_| true)).await?
                        {
                            Some((found, rev)) => (Box::new(found), rev),
                            None => {
                                return Err(VerdictError::poison(
                                    ErrorCode::UnknownSession,
                                    format!("no session {session}"),
                                ));
                            }
                        }
                    }
                };
                if !fresh && rec.status == SessionStatus::Synthesizing {
                    fresh = true;
                    continue;
                }
                let mut changed = match (&input, rec.status) {
                    (Some(Input::Start), SessionStatus::Planning) => {
                        self.open_account(&mut rec);
                        if planned.is_none() {
                            planned = Some(
                                Box::pin(
                                    self.plan(&rec, &mut calls)
                                        .instrument(tracing::info_span!("plan")),
                                )
                                .await?,
                            );
                        }
                        calls.charge(&mut rec, &mut applied);
                        self.on_start(&mut rec, planned.clone());
                        true
                    }
                    (Some(Input::Result(r)), _)
                        if matches!(r.outcome, flotilla_protocol::TaskOutcome::Clarify { .. }) =>
                    {
                        Box::pin(self.on_clarification(
                            &mut rec,
                            r,
                            &mut clarified,
                            &mut calls,
                            &mut applied,
                        ))
                        .await?
                    }
                    (Some(Input::Result(r)), _) => match self.on_result(&mut rec, r) {
                        Ok(Some(outcome)) => {
                            task_outcome = Some((r.role.clone(), outcome));
                            true
                        }
                        // Rejected or a duplicate as the cached copy saw it: look again.
                        Ok(None) | Err(_) if !fresh => {
                            fresh = true;
                            continue;
                        }
                        other => other?.is_some(),
                    },
                    (Some(Input::Answer(a)), _) => {
                        let cfg = &self.config.session;
                        match machine::on_input(
                            &mut rec,
                            &a.task_id,
                            a.attempt,
                            a.answer.clone(),
                            cfg.max_in_flight,
                            now(),
                        ) {
                            machine::InputVerdict::Taken => true,
                            machine::InputVerdict::NotAwaiting if !fresh => {
                                fresh = true;
                                continue;
                            }
                            machine::InputVerdict::NotAwaiting => false,
                        }
                    }
                    _ => false,
                };
                // Results waiting for the cell go in this write too, when they are of the
                // current attempt (a rejection is decided by their own handler, on a
                // fresh read).
                if carrier && input.is_some() && rec.status == SessionStatus::Running {
                    for other in self.cache.drain(session) {
                        let mut probe = rec.clone();
                        match self.on_result(&mut probe, &other) {
                            Ok(Some(o @ ("completed" | "retried" | "failed"))) => {
                                rec = probe;
                                changed = true;
                                let role = other.role.clone();
                                carried.push((other, role, o));
                            }
                            _ => self.cache.repost(other),
                        }
                    }
                }
                // The last result and the answer go in one write: a crash during the
                // synthesis redelivers the result, whose handler synthesizes again.
                if rec.status == SessionStatus::Synthesizing {
                    if synthesized.is_none() {
                        // What this write will perform after the call, without the room
                        // left for more.
                        rec.outbox.shrink_to_fit();
                        synthesized = Some(
                            Box::pin(
                                self.synthesize(&rec, &mut calls)
                                    .instrument(tracing::info_span!("synthesize")),
                            )
                            .await?,
                        );
                    }
                    match synthesized.clone() {
                        Some(Ok(answer)) => machine::on_synthesized(&mut rec, answer, now()),
                        Some(Err(h)) => halt(&mut rec, h, now()),
                        None => {}
                    }
                    changed = true;
                }
                if !changed {
                    if redelivered {
                        // The handler that wrote this state may have died before
                        // performing its effects: perform them again (de-duplicated).
                        Box::pin(self.perform(&rec, &machine::derived_effects(&rec), false))
                            .await?;
                    }
                    if !rec.status.is_terminal() {
                        *cached = Some((rec, rev));
                    }
                    return Ok(());
                }
                calls.charge(&mut rec, &mut applied);
                // The record keeps no outbox: these effects are performed right after the
                // write, before the ack; a crash in between redelivers this message.
                let effects = std::mem::take(&mut rec.outbox);
                // An outage is waited out at this write rather than by running the
                // handler, and its model call, again. A write that got no answer may have
                // landed: the conflict that follows then reads our own record, and its
                // effects are performed as a repeat's.
                let mut tries = 0;
                let written = Box::pin(flotilla_bus::outlast(
                    || {
                        tries += 1;
                        records.update(&key, &rec, rev)
                    },
                    |e| matches!(e, KvError::Unavailable { .. }),
                ))
                .await;
                if tries > 1 && matches!(written, Err(KvError::Conflict { .. })) {
                    redelivered = true;
                }
                match written {
                    Ok(new_rev) => {
                        fresh = true;
                        let mut effects = effects;
                        if redelivered {
                            // Also what an earlier handler of this message may have left
                            // unperformed (without repeating this transition's own).
                            for e in machine::derived_effects(&rec) {
                                if !effects.contains(&e) {
                                    effects.push(e);
                                }
                            }
                        }
                        Box::pin(self.perform(&rec, &effects, !redelivered)).await?;
                        if let Some(ender) = &self.ender {
                            for t in rec
                                .tasks
                                .iter()
                                .filter(|t| t.state == TaskState::AwaitingInput)
                            {
                                if let Some(d) = t.input_deadline_ms {
                                    ender.at_input_deadline(session, &t.task_id, t.attempt, d);
                                }
                            }
                        }
                        if let Some((role, outcome)) = task_outcome.take() {
                            metrics::counter!("flotilla_tasks_total", "role" => role.to_string(), "outcome" => outcome)
                            .increment(1);
                        }
                        for (_, role, outcome) in &carried {
                            metrics::counter!("flotilla_tasks_total", "role" => role.to_string(), "outcome" => *outcome)
                            .increment(1);
                        }
                        // Written and performed: their handlers only ack.
                        self.cache.mark_applied(session, &carried);
                        carried.clear();
                        if rec.status.is_terminal() {
                            session_ended_metrics(&rec);
                            tracing::info!(status = ?rec.status, "session ended");
                            self.cache.forget(session);
                            return Ok(());
                        }
                        if rec.status == SessionStatus::Synthesizing {
                            *cached = Some((rec, new_rev));
                            input = None;
                            continue;
                        }
                        *cached = Some((rec, new_rev));
                        return Ok(());
                    }
                    // Another process wrote since: read it again (and the carried results
                    // wait for the next round's write, or their own handlers).
                    Err(KvError::Conflict { .. }) => {
                        for (other, _, _) in carried.drain(..) {
                            self.cache.repost(other);
                        }
                        metrics::counter!("flotilla_cas_conflicts_total", "bucket" => "sessions")
                            .increment(1);
                        flotilla_bus::trace::span_event(
                            "cas_conflict",
                            vec![flotilla_bus::trace::KeyValue::new(
                                "flotilla.bucket",
                                "sessions",
                            )],
                        );
                        fresh = false;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(VerdictError::retry(
                Duration::from_millis(100),
                "session record kept changing",
            ))
        }
    }

    /// `start`: the plan (or why there is none) becomes the task table.
    fn on_start(
        &self,
        rec: &mut SessionRecord,
        planned: Option<Result<Result<Plan, String>, Halt>>,
    ) {
        match planned {
            Some(Ok(Ok(plan))) => {
                machine::on_planned(rec, &plan, self.config.session.max_in_flight, now())
            }
            Some(Ok(Err(why))) => machine::fail(rec, why, now()),
            Some(Err(h)) => halt(rec, h, now()),
            None => {}
        }
    }

    /// A worker's result: accepted, retried or failed by the state machine. `Ok(false)`
    /// when it changes nothing (a duplicate).
    /// The task outcome for the metrics (`completed`, `retried`, `failed`, `stale`),
    /// or `None` when the result changes nothing (a duplicate).
    fn on_result(
        &self,
        rec: &mut SessionRecord,
        r: &ResultMessage,
    ) -> Result<Option<&'static str>, VerdictError> {
        let cfg = &self.config.session;
        let v = machine::on_result(rec, r, cfg.max_in_flight, cfg.max_task_attempts, now());
        let outcome = match &v {
            ResultVerdict::Duplicate => return Ok(None),
            ResultVerdict::Foreign(why) => {
                return Err(VerdictError::poison(ErrorCode::WrongSession, why.clone()));
            }
            ResultVerdict::Accepted => "completed",
            ResultVerdict::Retrying => "retried",
            ResultVerdict::Failed => "failed",
            ResultVerdict::Stale => "stale",
        };
        tracing::info!(verdict = ?v, task = %r.task_id, attempt = r.attempt, "result");
        Ok(Some(outcome))
    }

    /// A worker's question: answered with the LLM (once across rounds), or, with the
    /// session's clarifications spent, answered with "commit to your reading".
    async fn on_clarification(
        &self,
        rec: &mut SessionRecord,
        r: &ResultMessage,
        clarified: &mut Option<Result<String, Halt>>,
        calls: &mut Calls,
        applied: &mut u64,
    ) -> Result<bool, VerdictError> {
        let cfg = &self.config.session;
        // A question for a person: the task waits for an answer on
        // `<p>.session.answer`, or for the deadline.
        if rec.human_input || cfg.human_roles.contains(&r.role) {
            let deadline = now().saturating_add(cfg.input_wait.as_millis() as u64);
            return match machine::on_input_requested(rec, r, deadline, cfg.max_in_flight, now()) {
                ResultVerdict::Duplicate => Ok(false),
                ResultVerdict::Foreign(why) => {
                    Err(VerdictError::poison(ErrorCode::WrongSession, why))
                }
                v => {
                    tracing::info!(verdict = ?v, task = %r.task_id, attempt = r.attempt, "question for a person");
                    Ok(true)
                }
            };
        }
        let verdict = match machine::check(rec, r) {
            Err(v) => v,
            Ok(idx) => {
                // Checked on every round: a concurrent clarification may have spent
                // the budget since the answer was asked for.
                let budget = self.config.budgets.clarifications;
                let (answer, closed) = if rec.counters.clarifications >= budget {
                    let commit = format!(
                        "No more questions: the session's {budget} clarifications \
                         are spent. Commit to your best interpretation of the \
                         instruction as written."
                    );
                    (Ok(commit), true)
                } else {
                    match clarified {
                        Some(a) => (a.clone(), false),
                        None => {
                            let a = self.clarify(rec, idx, r, calls).await?;
                            *clarified = Some(a.clone());
                            (a, false)
                        }
                    }
                };
                // Charged before the transition: it may dispatch with an allowance.
                calls.charge(rec, applied);
                match answer {
                    Ok(answer) => {
                        machine::on_clarify(rec, r, answer, closed, cfg.max_in_flight, now())
                    }
                    Err(h) => {
                        halt(rec, h, now());
                        ResultVerdict::Failed
                    }
                }
            }
        };
        match verdict {
            ResultVerdict::Duplicate => Ok(false),
            ResultVerdict::Foreign(why) => Err(VerdictError::poison(ErrorCode::WrongSession, why)),
            v => {
                tracing::info!(verdict = ?v, task = %r.task_id, attempt = r.attempt, "clarification");
                Ok(true)
            }
        }
    }

    /// Answers the clarification question of task `idx` with the LLM (the caller has
    /// checked the session has clarifications left).
    async fn clarify(
        &self,
        rec: &SessionRecord,
        idx: usize,
        r: &ResultMessage,
        calls: &mut Calls,
    ) -> Result<Result<String, Halt>, VerdictError> {
        let flotilla_protocol::TaskOutcome::Clarify { question } = &r.outcome else {
            return Ok(Ok(String::new()));
        };
        let task = &rec.tasks[idx];
        let req = prompts::clarification(
            &self.config.session.orchestrator_model,
            rec,
            &task.instruction,
            question,
        );
        let asking = Some((idx, r.attempt_tokens));
        let content = match self.complete(rec, calls, &req, asking).await? {
            Ok(c) => c,
            Err(e) => return Ok(Err(e)),
        };
        #[derive(serde::Deserialize)]
        struct Clarified {
            answer: String,
        }
        let answer = serde_json::from_str::<Clarified>(&content)
            .map(|c| c.answer)
            .unwrap_or(content);
        Ok(Ok(answer))
    }

    /// Opens the session's token account from the budgets (once, at planning).
    fn open_account(&self, rec: &mut SessionRecord) {
        let b = &self.config.budgets;
        if rec.tokens.budget == 0 && b.session_tokens > 0 {
            rec.tokens.budget = b.session_tokens;
            rec.tokens.allowance = b.task_tokens.saturating_add(b.call_tokens);
        }
    }

    /// One orchestrator call within the session's token budget: `Ok(Err(_))` when the
    /// budget is spent. Off the ledger while the account has room for it (`asking`: the
    /// call answers the question of task `idx`, whose attempt reported it used the
    /// given tokens: its allowance goes back to the budget); otherwise reserved and
    /// settled on the session's ledger, switching the account over first.
    ///
    /// (An `async` block rather than an `async fn`, as [`Self::take`] is: the plan and
    /// synthesis futures hold it through their model calls.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps a second slot per argument"
    )]
    fn complete<'a>(
        &'a self,
        rec: &'a SessionRecord,
        calls: &'a mut Calls,
        req: &'a flotilla_llm::CompletionRequest,
        asking: Option<(usize, Option<u64>)>,
    ) -> impl Future<Output = Result<Result<String, Halt>, VerdictError>> + Send + 'a {
        async move {
            let transient = |e: String| VerdictError::retry(Duration::from_secs(1), e);
            let estimate = u64::from(flotilla_llm::estimate_request_tokens(req));
            // (The ledger's round trips are boxed where they are awaited: inline, the
            // largest of them made this future, and the plan's and the synthesis' around
            // it, 3 KB for the whole model call.)
            let ledger = flotilla_agent::SessionLedger::new(self.bus.clone());
            let account = &rec.tokens;
            if account.budget > 0 && !account.metered && calls.seeded.is_none() {
                if calls.margin == 0 && calls.delivered > 1 {
                    // Earlier deliveries of this message may have made calls and died
                    // before recording them.
                    calls.margin = (calls.delivered - 1)
                        .saturating_mul(PLAN_ATTEMPTS as u64)
                        .saturating_mul(estimate);
                }
                let before = match asking {
                    Some((idx, reported)) => machine::granted_after(rec, idx, reported),
                    None => account.granted,
                };
                let granted = before + calls.used + calls.margin;
                // Questions of several tasks may be answered at once, each on this account.
                let at_once = if asking.is_some() {
                    rec.tasks.len().max(1) as u64
                } else {
                    1
                };
                if granted + estimate.saturating_mul(at_once) <= account.budget {
                    let result = self.llm.complete(req).await;
                    calls.used += result.as_ref().map_or(0, |c| u64::from(c.usage.total()));
                    return match result {
                        Ok(c) => Ok(Ok(c.content)),
                        Err(e) => halting(e).map_err(|e| transient(e.to_string())),
                    };
                }
                let in_flight = rec
                    .tasks
                    .iter()
                    .enumerate()
                    .any(|(i, t)| t.allowance > 0 && asking.is_none_or(|(a, _)| a != i));
                if in_flight {
                    return Err(VerdictError::retry(
                        Duration::from_secs(1),
                        "the session's budget waits for attempts in flight to report their spend",
                    ));
                }
                // Over to the ledger for good: what was granted becomes used there.
                Box::pin(ledger.seed(&rec.session_id, granted))
                    .await
                    .map_err(|e| transient(e.to_string()))?;
                calls.seeded = Some(granted);
            }
            if account.budget == 0 && self.config.budgets.session_tokens == 0 {
                // No session budget: nothing to reserve.
                return match self.llm.complete(req).await {
                    Ok(c) => Ok(Ok(c.content)),
                    Err(e) => halting(e).map_err(|e| transient(e.to_string())),
                };
            }
            let reservation = match Box::pin(ledger.reserve(
                &rec.session_id,
                estimate,
                self.config.budgets.session_tokens,
            ))
            .await
            .map_err(|e| transient(e.to_string()))?
            {
                Ok(r) => r,
                Err(e) => return Ok(Err(Halt::Budget(e))),
            };
            let result = self.llm.complete(req).await;
            let used = result.as_ref().map_or(0, |c| u64::from(c.usage.total()));
            Box::pin(ledger.settle(reservation, used))
                .await
                .map_err(|e| transient(e.to_string()))?;
            match result {
                Ok(c) => Ok(Ok(c.content)),
                Err(e) => halting(e).map_err(|e| transient(e.to_string())),
            }
        }
    }

    /// Asks for a plan, up to [`PLAN_ATTEMPTS`] times; `Ok(Err(why))` when every plan
    /// was invalid (the session fails), `Err` for a transient failure (redeliver).
    ///
    /// (An `async` block rather than an `async fn`, as [`Self::take`] is, around
    /// [`Self::complete`], which is one too: boxed with its span, it is 376 bytes,
    /// mimalloc's 384-byte class rather than 448.)
    #[allow(clippy::type_complexity)]
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps a second slot per argument"
    )]
    fn plan<'a>(
        &'a self,
        rec: &'a SessionRecord,
        calls: &'a mut Calls,
    ) -> impl Future<Output = Result<Result<Result<Plan, String>, Halt>, VerdictError>> + Send + 'a
    {
        async move {
            let mut feedback: Option<String> = None;
            for _ in 0..PLAN_ATTEMPTS {
                let req = prompts::plan(
                    &self.config.session.orchestrator_model,
                    rec,
                    feedback.as_deref(),
                );
                let content = match self.complete(rec, calls, &req, None).await? {
                    Ok(c) => c,
                    Err(e) => return Ok(Err(e)),
                };
                let why = match decode::<Plan>(content.as_bytes(), DEFAULT_MAX_PAYLOAD) {
                    Ok(plan) => match plan.validate(&rec.roles, self.config.session.max_tasks) {
                        Ok(()) => return Ok(Ok(Ok(plan))),
                        Err(e) => e.to_string(),
                    },
                    Err(e) => e.to_string(),
                };
                tracing::warn!(reason = %why, "plan rejected");
                feedback = Some(why);
            }
            Ok(Ok(Err(format!(
                "no valid plan after {PLAN_ATTEMPTS} attempts: {}",
                feedback.unwrap_or_default()
            ))))
        }
    }

    /// (An `async` block rather than an `async fn`, as [`Self::take`] is, around
    /// [`Self::complete`], which is one too, and what the request is made from is gone
    /// before the call: boxed with its span, it is 384 bytes, mimalloc's 384-byte class
    /// rather than 512; every session holds it through its synthesis call.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps a second slot per argument"
    )]
    fn synthesize<'a>(
        &'a self,
        rec: &'a SessionRecord,
        calls: &'a mut Calls,
    ) -> impl Future<Output = Result<Result<Answer, Halt>, VerdictError>> + Send + 'a {
        async move {
            // (In a block of its own: nothing it makes the request from outlives it in
            // this future, which is held through the call.)
            let req = {
                let done: Vec<_> = rec
                    .tasks
                    .iter()
                    .filter(|t| t.state == TaskState::Done)
                    .collect();
                // The outputs whose commits came here, when they are all here: no read.
                // (A synthesis that fails and runs again reads them.)
                let wanted: Vec<_> = done.iter().map(|t| (&t.task_id, t.attempt)).collect();
                let sections = match self.cache.take_outputs(&rec.session_id, &wanted) {
                    Some(outputs) => done
                        .iter()
                        .zip(outputs)
                        .map(|(t, output)| AnswerSection {
                            task_id: t.task_id.clone(),
                            role: t.role.clone(),
                            output,
                        })
                        .collect(),
                    None => Box::pin(self.read_sections(rec)).await?,
                };
                // The request carries the outputs through the call: the sections are
                // read back from it after, not kept beside it.
                prompts::synthesis(&self.config.session.orchestrator_model, rec, &sections)
            };
            let content = match self.complete(rec, calls, &req, None).await? {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            let s: Synthesis = match decode(content.as_bytes(), DEFAULT_MAX_PAYLOAD) {
                Ok(s) => s,
                Err(e) => return Ok(Err(Halt::Failed(format!("synthesis unusable: {e}")))),
            };
            let Some(sections) = prompts::sections_of(&req) else {
                // (Cannot happen: `prompts::synthesis` wrote them.)
                return Ok(Err(Halt::Failed(
                    "the synthesis request lost its results".to_owned(),
                )));
            };
            Ok(Ok(Answer {
                summary: s.summary,
                sections,
            }))
        }
    }

    /// The finished tasks' outputs, from their task records.
    async fn read_sections(&self, rec: &SessionRecord) -> Result<Vec<AnswerSection>, VerdictError> {
        // Every committed task record of the session in one request (a batched direct
        // get).
        let mut records: TaskRecords = self
            .bus
            .sessions()
            .get_each::<TaskRecord>(&keys::task_pattern(&rec.session_id), &task_keys(rec))
            .await?
            .into_iter()
            .map(|(_, r, _)| (r.task_id.clone(), r))
            .collect();
        // A replica may not have the commit that was just delivered from the leader:
        // the leader is asked for any output the batch lacks.
        for t in rec.tasks.iter().filter(|t| t.state == TaskState::Done) {
            let has = records
                .get(&t.task_id)
                .and_then(|tr| flotilla_protocol::task_machine::output_of(tr, t.attempt))
                .is_some();
            if !has
                && let Some((tr, _)) = self
                    .bus
                    .sessions()
                    .get_latest::<TaskRecord>(&keys::task(&rec.session_id, &t.role, &t.task_id))
                    .await?
            {
                records.insert(t.task_id.clone(), tr);
            }
        }
        let mut sections = Vec::with_capacity(rec.tasks.len());
        for t in rec.tasks.iter().filter(|t| t.state == TaskState::Done) {
            let output = records
                .get(&t.task_id)
                .and_then(|tr| flotilla_protocol::task_machine::output_of(tr, t.attempt));
            let Some(output) = output else {
                return Err(VerdictError::retry(
                    Duration::from_millis(500),
                    format!(
                        "task {} has no committed output for attempt {}",
                        t.task_id, t.attempt
                    ),
                ));
            };
            sections.push(AnswerSection {
                task_id: t.task_id.clone(),
                role: t.role.clone(),
                output: output.clone(),
            });
        }
        Ok(sections)
    }

    /// Performs `effects` of `rec`'s outbox. Every effect is idempotent.
    ///
    /// With `fold` (a step's own effects, performed for the first time), the task
    /// attempts dispatched are recorded on the step's last event (`Event::dispatched`)
    /// instead of one `dispatched` event each: the tasks are published first, then the
    /// events. Without it (effects re-derived after a crash or a repeat), each dispatch
    /// has its own event, as the step's events may already be stored.
    async fn perform(
        &self,
        rec: &SessionRecord,
        effects: &[Effect],
        fold: bool,
    ) -> Result<(), VerdictError> {
        let trace = TraceParent::parse(&rec.traceparent).ok();
        let carrier = effects
            .iter()
            .rposition(|e| {
                matches!(e, Effect::Emit { body, .. } if !matches!(body, EventBody::Done { .. }))
            })
            .filter(|_| fold);
        // Seeding the ledger comes before any attempt that reserves against it, then the
        // dispatches, then everything else in order.
        let rank = |e: &Effect| match e {
            Effect::Seed { .. } => 0,
            Effect::Dispatch { .. } => 1,
            _ => 2,
        };
        let mut order: Vec<usize> = (0..effects.len()).collect();
        order.sort_by_key(|&i| rank(&effects[i]));
        // The attempts dispatched together are signed as one batch: one signature for
        // the step, and one check for the workers of a process (`flotilla_bus::signing`).
        let messages: Vec<Option<TaskOut>> = effects
            .iter()
            .map(|e| match e {
                Effect::Dispatch { task_id, attempt } => {
                    self.task_message(rec, task_id, *attempt, trace)
                }
                _ => None,
            })
            .collect();
        // (A step dispatches at most `session.max_in_flight` tasks; a larger one is
        // signed in batches of `MAX_BATCH`.)
        let mut signed: Vec<Option<flotilla_bus::SignedBatch>> = vec![None; messages.len()];
        if let Some(signer) = &self.signer {
            let present: Vec<usize> = (0..messages.len())
                .filter(|&i| messages[i].is_some())
                .collect();
            for chunk in present.chunks(flotilla_bus::signing::MAX_BATCH) {
                let batch = signer.sign_batch(chunk.iter().filter_map(|&i| {
                    let t = messages[i].as_ref()?;
                    Some((t.out.subject.as_str(), &t.out.payload[..]))
                }));
                for &i in chunk {
                    signed[i] = batch.clone();
                }
            }
        }
        let mut dispatched = Vec::new();
        for i in order {
            match &effects[i] {
                Effect::Dispatch { .. } => {
                    // No such task in the session: nothing to dispatch.
                    let Some(task) = &messages[i] else {
                        continue;
                    };
                    let sent = self
                        .dispatch(rec, task, signed[i].as_ref(), trace, carrier.is_none())
                        .await;
                    if let Err(e) = sent {
                        // The step's event still goes out with what was dispatched
                        // (a repeat performs the rest, each with its own event).
                        if let Some(Effect::Emit { id, body }) = carrier.map(|c| &effects[c]) {
                            let _ = self
                                .bus
                                .emit_with(&rec.session_id, id, body.clone(), dispatched, trace)
                                .await;
                        }
                        return Err(e);
                    }
                    dispatched.push(flotilla_protocol::DispatchedTask {
                        task_id: task.task_id.clone(),
                        role: task.role.clone(),
                        attempt: task.attempt,
                    });
                }
                Effect::Emit { id, body } => {
                    let carried = if Some(i) == carrier {
                        std::mem::take(&mut dispatched)
                    } else {
                        Vec::new()
                    };
                    self.bus
                        .emit_with(&rec.session_id, id, body.clone(), carried, trace)
                        .await?
                }
                Effect::ReleaseSlot if rec.slot_revision > 0 => {
                    slots::release_taken(&self.bus, rec.slot, rec.slot_revision).await?
                }
                Effect::ReleaseSlot => slots::release(&self.bus, rec.slot, &rec.session_id).await?,
                Effect::Seed { tokens } => flotilla_agent::SessionLedger::new(self.bus.clone())
                    .seed(&rec.session_id, *tokens)
                    .await
                    .map_err(|e| VerdictError::retry(Duration::from_secs(1), e.to_string()))?,
            }
        }
        Ok(())
    }

    /// The message of a task attempt, or `None` if the session has no such task.
    fn task_message(
        &self,
        rec: &SessionRecord,
        task_id: &TaskId,
        attempt: u32,
        trace: Option<TraceParent>,
    ) -> Option<TaskOut> {
        let entry = rec.tasks.iter().find(|t| &t.task_id == task_id)?;
        let msg = InboxMessage::Task(TaskMessage {
            v: V1,
            session_id: rec.session_id.clone(),
            task_id: task_id.clone(),
            role: entry.role.clone(),
            attempt,
            instruction: entry.instruction.clone(),
            context: rec.task.clone(),
            feedback: entry.last_error.as_deref().map(str::to_owned),
            clarification: entry.clarification.as_deref().map(str::to_owned),
            questions_closed: entry.questions_closed,
            allowance: (entry.allowance > 0).then_some(entry.allowance),
        });
        let out = Outgoing {
            subject: self.bus.names().inbox(&rec.session_id, &entry.role),
            msg_id: MessageId::task(&rec.session_id, task_id, attempt),
            session: Some(rec.session_id.clone()),
            attempt: Some(attempt),
            trace,
            payload: Bytes::from(serde_json::to_vec(&msg).unwrap_or_default()),
        };
        Some(TaskOut {
            task_id: task_id.clone(),
            role: entry.role.clone(),
            attempt,
            out,
        })
    }

    /// Publishes a task attempt (`out`, from [`Self::task_message`]) with the
    /// signature of its batch; with `own_event`, also its `dispatched` event.
    async fn dispatch(
        &self,
        rec: &SessionRecord,
        task: &TaskOut,
        signed: Option<&flotilla_bus::SignedBatch>,
        trace: Option<TraceParent>,
        own_event: bool,
    ) -> Result<(), VerdictError> {
        let TaskOut {
            task_id,
            role,
            attempt,
            out,
        } = task;
        let attempt = *attempt;
        // No task record is written here: the worker creates it with its claim. The
        // message is signed, which tells the worker that this orchestrator dispatched
        // exactly this (the task table, written before this, is the check for a task
        // without a good signature).
        // A full inbox is backpressure: log it once, then retry with backoff for up to
        // half the ack wait; past that, hand the message back (the effect stays in
        // the outbox and is performed on a later pass).
        let deadline =
            tokio::time::Instant::now() + self.config.orchestrator.effective_ack_wait() / 2;
        let backoff = flotilla_protocol::Backoff::exponential(
            Duration::from_millis(50),
            Duration::from_secs(1),
        )
        .with_jitter(flotilla_protocol::Jitter::Half);
        let mut full = 0u32;
        let mut logged = false;
        loop {
            let published = match signed {
                Some(signed) => self.bus.publish_signed(out, signed).await,
                None => self.bus.publish(out).await,
            };
            match published {
                Ok(p) => {
                    if !p.duplicate {
                        self.bus.counters.dispatched.increment();
                    }
                    break;
                }
                Err(PublishError::Full { .. }) => {
                    if !logged {
                        logged = true;
                        let body = EventBody::Backpressure {
                            task_id: task_id.clone(),
                            role: role.clone(),
                            attempt,
                        };
                        let id = format!("backpressure.{task_id}.{attempt}.{}", now());
                        self.bus.emit(&rec.session_id, &id, body, trace).await?;
                        tracing::info!(task = %task_id, role = %role, "inbox full, backing off");
                    }
                    let wait = backoff.delay(full);
                    full = full.saturating_add(1);
                    if tokio::time::Instant::now() + wait > deadline {
                        return Err(VerdictError::retry(
                            Duration::from_millis(500),
                            format!("inbox of {role} is full"),
                        ));
                    }
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if own_event {
            let body = EventBody::Dispatched {
                task_id: task_id.clone(),
                role: role.clone(),
                attempt,
            };
            self.bus
                .emit(
                    &rec.session_id,
                    &format!("dispatched.{task_id}.{attempt}"),
                    body,
                    trace,
                )
                .await?;
        }
        Ok(())
    }
}

/// A task attempt's message, ready to publish.
struct TaskOut {
    task_id: TaskId,
    role: Role,
    attempt: u32,
    out: Outgoing,
}

/// The span of an orchestrator handler's run on one input.
fn orchestrate_span(session: &SessionId, input: &Input, d: &Delivery) -> tracing::Span {
    let span = tracing::info_span!(
        "orchestrate",
        session = %session,
        role = "orchestrator",
        task = match &input {
            Input::Result(r) => r.task_id.as_str().to_owned(),
            Input::Answer(a) => a.task_id.as_str().to_owned(),
            Input::Start => String::new(),
        },
        input = match &input {
            Input::Result(_) => "result",
            Input::Answer(_) => "answer",
            Input::Start => "start",
        },
        trace_id = d.trace().map(|t| t.trace_id_hex()).unwrap_or_default(),
    );
    flotilla_bus::trace::set_parent(&span, d.trace());
    span
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use flotilla_protocol::TokenAccount;

    fn result(task: &str) -> ResultMessage {
        ResultMessage {
            v: V1,
            session_id: SessionId::parse("s1").unwrap(),
            task_id: TaskId::parse(task).unwrap(),
            role: Role::parse("research").unwrap(),
            attempt: 1,
            outcome: flotilla_protocol::TaskOutcome::Completed,
            spend: None,
            memory: None,
            attempt_tokens: None,
        }
    }

    #[test]
    fn a_result_applied_by_the_cells_holder_is_found_applied_and_the_rest_taken_back() {
        let cache = RecordCache::default();
        let session = SessionId::parse("s1").unwrap();
        let (r1, r2, r3) = (result("t1"), result("t2"), result("t3"));
        let p1 = cache.post(&r1);
        let p2 = cache.post(&r2);
        let p3 = cache.post(&r3);
        // The holder takes all three, applies t1 and t2, gives t3 back.
        let taken = cache.drain(&session);
        assert_eq!(taken.len(), 3);
        assert!(cache.drain(&session).is_empty());
        cache.repost(r3.clone());
        let role = r1.role.clone();
        cache.mark_applied(
            &session,
            &[
                (r1.clone(), role.clone(), "completed"),
                (r2.clone(), role, "completed"),
            ],
        );
        assert!(p1.applied_by_another());
        // A mark is consumed once.
        assert!(!p1.applied_by_another());
        assert!(p2.applied_by_another());
        // Not applied: its handler takes it back and applies it itself.
        assert!(!p3.applied_by_another());
        assert!(cache.drain(&session).is_empty());
        drop((p1, p2, p3));
        assert!(cache.mail.lock().unwrap().is_empty());
    }

    #[test]
    fn outputs_are_kept_by_attempt_and_within_their_byte_budget() {
        let cache = RecordCache::default();
        let session = SessionId::parse("s1").unwrap();
        let t1 = TaskId::parse("t1").unwrap();
        let out = |summary: &str| flotilla_protocol::TaskOutput {
            summary: summary.into(),
            artifacts: Vec::new(),
        };
        let t2 = TaskId::parse("t2").unwrap();
        let summaries = |kept: Option<Vec<flotilla_protocol::TaskOutput>>| {
            kept.map(|o| o.into_iter().map(|o| o.summary).collect::<Vec<_>>())
        };
        let bytes = || cache.outputs.lock().unwrap().bytes;
        cache.keep_output(&session, &t1, 1, out("first"), 100);
        assert_eq!(
            summaries(cache.take_outputs(&session, &[(&t1, 2)])),
            None,
            "another attempt's"
        );
        // All or nothing: with one missing, nothing is taken.
        assert_eq!(
            summaries(cache.take_outputs(&session, &[(&t1, 1), (&t2, 1)])),
            None
        );
        assert_eq!(bytes(), 100);
        assert_eq!(
            summaries(cache.take_outputs(&session, &[(&t1, 1)])),
            Some(vec!["first".to_owned()])
        );
        assert_eq!(bytes(), 0, "taken out, not copied");
        assert_eq!(summaries(cache.take_outputs(&session, &[(&t1, 1)])), None);
        // A later attempt replaces it; an earlier one does not. Taken in the order asked.
        cache.keep_output(&session, &t1, 2, out("second"), 300);
        cache.keep_output(&session, &t1, 1, out("stale"), 50);
        cache.keep_output(&session, &t2, 1, out("other"), 10);
        assert_eq!(bytes(), 310);
        assert_eq!(summaries(cache.take_outputs(&session, &[(&t1, 1)])), None);
        assert_eq!(
            summaries(cache.take_outputs(&session, &[(&t2, 1), (&t1, 2)])),
            Some(vec!["other".to_owned(), "second".to_owned()])
        );
        assert_eq!(bytes(), 0);
        cache.keep_output(&session, &t1, 3, out("third"), 30);
        cache.forget(&session);
        assert_eq!(summaries(cache.take_outputs(&session, &[(&t1, 3)])), None);
        assert_eq!(bytes(), 0);
        // Within its byte budget: a new session's output that does not fit is not kept
        // (that session's synthesis reads its outputs); one with outputs here may go to
        // twice the budget to complete its set.
        let cache = RecordCache::with_output_budget(1000);
        let bytes = || cache.outputs.lock().unwrap().bytes;
        let other = SessionId::parse("s2").unwrap();
        cache.keep_output(&session, &t1, 1, out("kept"), 900);
        cache.keep_output(&other, &t1, 1, out("over"), 200);
        assert_eq!(bytes(), 900);
        assert_eq!(summaries(cache.take_outputs(&other, &[(&t1, 1)])), None);
        cache.keep_output(&session, &t2, 1, out("completes"), 900);
        assert_eq!(bytes(), 1800);
        cache.keep_output(
            &session,
            &TaskId::parse("t3").unwrap(),
            1,
            out("past twice"),
            300,
        );
        assert_eq!(bytes(), 1800);
        assert_eq!(
            summaries(cache.take_outputs(&session, &[(&t1, 1), (&t2, 1)])),
            Some(vec!["kept".to_owned(), "completes".to_owned()])
        );
        assert_eq!(bytes(), 0);
        cache.keep_output(&other, &t1, 1, out("fits now"), 200);
        assert_eq!(
            summaries(cache.take_outputs(&other, &[(&t1, 1)])),
            Some(vec!["fits now".to_owned()])
        );
        // A full cache drops what it kept past `OUTPUTS_STALE` (a session that ended in
        // another process) to make room.
        let gone = SessionId::parse("s3").unwrap();
        cache.keep_output(&gone, &t1, 1, out("left"), 1000);
        let fresh = SessionId::parse("s4").unwrap();
        cache.keep_output(&fresh, &t1, 1, out("refused"), 100);
        assert_eq!(bytes(), 1000, "nothing stale yet");
        {
            let mut c = cache.outputs.lock().unwrap();
            c.by_session.get_mut(&gone).unwrap().since -= OUTPUTS_STALE;
            // (Looked over at most once a second: as if the last look were long ago.)
            c.swept = None;
        }
        cache.keep_output(&fresh, &t1, 1, out("new"), 100);
        assert_eq!(bytes(), 100);
        assert_eq!(summaries(cache.take_outputs(&gone, &[(&t1, 1)])), None);
        assert_eq!(
            summaries(cache.take_outputs(&fresh, &[(&t1, 1)])),
            Some(vec!["new".to_owned()])
        );
    }

    #[test]
    fn a_handler_that_ends_takes_its_result_and_its_mark_with_it() {
        let cache = RecordCache::default();
        let session = SessionId::parse("s1").unwrap();
        let r1 = result("t1");
        drop(cache.post(&r1));
        assert!(cache.drain(&session).is_empty());
        let p1 = cache.post(&r1);
        let role = r1.role.clone();
        cache.mark_applied(&session, &[(r1.clone(), role.clone(), "completed")]);
        drop(p1);
        assert!(cache.mail.lock().unwrap().is_empty());
        // No mark is made, and nothing is given back, for a handler that was stopped
        // meanwhile (a conflict hands back what a write was to carry).
        cache.mark_applied(&session, &[(r1.clone(), role.clone(), "completed")]);
        cache.repost(r1.clone());
        assert!(cache.mail.lock().unwrap().is_empty());
        // A mark made before the session's end is still found after it.
        let p1 = cache.post(&r1);
        cache.drain(&session);
        cache.mark_applied(&session, &[(r1.clone(), role, "completed")]);
        cache.forget(&session);
        assert!(p1.applied_by_another());
        drop(p1);
        assert!(cache.mail.lock().unwrap().is_empty());
    }

    fn record(account: TokenAccount) -> SessionRecord {
        SessionRecord {
            tokens: account,
            ..SessionRecord::planning(
                SessionId::parse("s1").unwrap(),
                "T".into(),
                vec![],
                0,
                0,
                String::new(),
                0,
            )
        }
    }

    fn account(granted: u64, metered: bool) -> TokenAccount {
        TokenAccount {
            budget: 100_000,
            allowance: 10_000,
            granted,
            metered,
        }
    }

    #[test]
    fn calls_are_charged_once_per_round_whatever_the_number_of_charges() {
        let mut calls = Calls {
            delivered: 2,
            used: 700,
            margin: 3_000,
            seeded: None,
        };
        let mut rec = record(account(1_000, false));
        let mut applied = 0;
        calls.charge(&mut rec, &mut applied);
        assert_eq!(rec.tokens.granted, 4_700);
        // Another call in the same round (the synthesis after the last result): only
        // what is new is added.
        calls.used += 300;
        calls.charge(&mut rec, &mut applied);
        calls.charge(&mut rec, &mut applied);
        assert_eq!(rec.tokens.granted, 5_000);
        // A fresh copy of the record in the next round gets everything once.
        let mut again = record(account(1_000, false));
        let mut applied = 0;
        calls.charge(&mut again, &mut applied);
        assert_eq!(again.tokens.granted, 5_000);
    }

    #[test]
    fn a_seeded_handler_moves_the_record_to_the_ledger_with_its_seed() {
        let calls = Calls {
            delivered: 1,
            used: 900,
            margin: 0,
            seeded: Some(42_000),
        };
        let mut rec = record(account(41_100, false));
        calls.charge(&mut rec, &mut 0);
        assert!(rec.tokens.metered);
        assert_eq!(rec.tokens.granted, 42_000);
        // Already metered (another handler switched it): frozen.
        let mut rec = record(account(50_000, true));
        calls.charge(&mut rec, &mut 0);
        assert_eq!(rec.tokens.granted, 50_000);
        let unseeded = Calls {
            used: 900,
            ..Calls::default()
        };
        unseeded.charge(&mut rec, &mut 0);
        assert_eq!(
            rec.tokens.granted, 50_000,
            "the ledger counts metered calls"
        );
    }
}

//! The built-in agent: LLM turns with the role's system prompt until the model gives a
//! final [`TaskOutput`] or a budget stops it.

use std::sync::Arc;

use flotilla_bus::MemKey;
use flotilla_llm::{ChatMessage, CompletionRequest, LlmClient, LlmError, ResponseFormat, schema};
use flotilla_protocol::{BudgetKind, DEFAULT_MAX_PAYLOAD, Role, TaskMessage, TaskOutput, decode};

use crate::agent::{Agent, AgentError, AgentFuture, TaskContext};
use crate::budget::{BudgetConfig, CallFingerprints, Exhausted, SessionLedger};
use crate::history::HistoryStore;

/// The prefix of the shared-memory keys where built-in agents whose role shares its
/// findings ([`LlmAgent::with_shared_findings`], `share_findings` in a role's
/// configuration) record what they found: one key per task, `finding-<task>` (read them
/// all with `SessionMemory::scan(FINDING_PREFIX)`).
pub const FINDING_PREFIX: &str = "finding-";

/// The shared-memory key of `task`'s finding.
/// (Task ids are 1-32 of `[A-Za-z0-9_-]`, so it always parses.)
pub fn finding_key(task: &flotilla_protocol::TaskId) -> Result<MemKey, flotilla_bus::MemoryError> {
    MemKey::parse(&format!("{FINDING_PREFIX}{task}"))
}

/// What a built-in agent found for one task, at its `finding-<task>` memory key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    /// The task.
    pub task_id: String,
    /// The role that did it.
    pub role: String,
    /// Its summary.
    pub summary: String,
}

/// An agent that asks an LLM to do the task, over as many turns as it needs within
/// its budgets.
///
/// Each turn the model answers with an action (see [`turn_schema`]): `final` (the
/// output), `continue` (more work), `tool` (a tool call) or `clarify` (a question for
/// the orchestrator). A plain [`TaskOutput`] counts as `final`. Every call is checked
/// against the call, task and session token budgets first, turns are capped, and the
/// same call made `circuit_repeats` times opens the circuit breaker.
#[derive(Clone)]
pub struct LlmAgent {
    role: Role,
    system_prompt: Arc<str>,
    model: Arc<str>,
    llm: Arc<dyn LlmClient>,
    budgets: BudgetConfig,
    ledger: Option<SessionLedger>,
    history: Option<HistoryStore>,
    call_timeout: Option<std::time::Duration>,
    tools: Option<(crate::tools::ToolGateway, Vec<String>)>,
    share_findings: bool,
}

impl std::fmt::Debug for LlmAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmAgent")
            .field("role", &self.role)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// One turn's answer.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
enum Turn {
    Final {
        summary: String,
        artifacts: Vec<flotilla_protocol::Artifact>,
    },
    Continue {
        note: String,
    },
    Tool {
        tool: String,
        #[serde(default)]
        arguments: serde_json::Value,
    },
    Clarify {
        question: String,
    },
}

/// The JSON Schema of one agent turn: an object with an `action`, or a bare
/// [`TaskOutput`] (a final answer from a model that ignores the turn protocol).
pub fn turn_schema() -> Arc<serde_json::Value> {
    static SCHEMA: std::sync::LazyLock<Arc<serde_json::Value>> =
        std::sync::LazyLock::new(|| Arc::new(build_turn_schema()));
    SCHEMA.clone()
}

fn build_turn_schema() -> serde_json::Value {
    let output = task_output_schema();
    let mut bare = output.clone();
    if let Some(o) = bare.as_object_mut() {
        for k in ["$schema", "$defs", "title", "description"] {
            o.remove(k);
        }
    }
    serde_json::json!({
        "$defs": output.get("$defs").cloned().unwrap_or(serde_json::json!({})),
        "anyOf": [
            {
                "type": "object",
                "required": ["action"],
                "properties": {
                    "action": {"type": "string", "enum": ["final", "continue", "tool", "clarify"]},
                    "summary": {"type": "string"},
                    "artifacts": output.get("properties").and_then(|p| p.get("artifacts")).cloned().unwrap_or(serde_json::json!({"type": "array"})),
                    "note": {"type": "string"},
                    "tool": {"type": "string"},
                    "arguments": {"type": "object"},
                    "question": {"type": "string"}
                }
            },
            bare
        ]
    })
}

impl LlmAgent {
    /// An agent for `role` with a default system prompt and default budgets (no
    /// session ledger: session budgets are then not checked).
    pub fn new(role: Role, model: impl Into<String>, llm: Arc<dyn LlmClient>) -> Self {
        let system_prompt = format!(
            "You are the {role} specialist of a team of agents. Do the instruction you are given. \
             Answer every turn with one JSON object whose `action` is `final` (with a short \
             `summary` and at least one `artifact` (`name`, `kind`, `content`) holding your \
             actual work product), `continue` (with a `note`) when you need another turn, \
             `tool` (with `tool` and `arguments`) to call a tool, or `clarify` (with a \
             `question`) when the instruction is ambiguous."
        );
        Self {
            role,
            system_prompt: system_prompt.into(),
            model: Arc::from(model.into()),
            llm,
            budgets: BudgetConfig::default(),
            ledger: None,
            history: None,
            call_timeout: None,
            tools: None,
            share_findings: false,
        }
    }

    /// Shares each final answer's summary in the session's memory, at
    /// `finding-<task>` (see [`FINDING_PREFIX`]): one KV write per task, on top of the
    /// commit that already carries the whole output to the orchestrator. Off unless a
    /// role asks for it (`share_findings`).
    pub fn with_shared_findings(mut self, share: bool) -> Self {
        self.share_findings = share;
        self
    }

    /// Lets the agent call `allowed` tools through `gateway` when the model asks.
    pub fn with_tools(mut self, gateway: crate::tools::ToolGateway, allowed: Vec<String>) -> Self {
        if !allowed.is_empty() {
            self.system_prompt = format!(
                "{} Tools you may call: {}.",
                self.system_prompt,
                allowed.join(", ")
            )
            .into();
            self.tools = Some((gateway, allowed));
        }
        self
    }

    /// Keeps the conversation in KV after every turn (see [`crate::history`]), so a
    /// backup process continues it.
    pub fn with_history(mut self, history: HistoryStore) -> Self {
        self.history = Some(history);
        self
    }

    /// Gives up on a call after `timeout` (the attempt is then retried later).
    pub fn with_call_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// Replaces the system prompt.
    pub fn with_system_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.system_prompt = Arc::from(prompt.into());
        self
    }

    /// Sets the budgets, and the session ledger they are checked against.
    pub fn with_budgets(mut self, budgets: BudgetConfig, ledger: SessionLedger) -> Self {
        self.budgets = budgets;
        self.ledger = Some(ledger);
        self
    }

    /// The first request this agent sends for `task`.
    pub fn request(&self, task: &TaskMessage) -> CompletionRequest {
        let mut input = serde_json::json!({
            "session_id": task.session_id,
            "task_id": task.task_id,
            "role": task.role,
            "attempt": task.attempt,
            "instruction": task.instruction,
            "context": task.context,
        });
        if let Some(f) = &task.feedback {
            input["previous_attempt_rejected_because"] = serde_json::Value::String(f.clone());
        }
        if let Some(c) = &task.clarification {
            input["clarification"] = serde_json::Value::String(c.clone());
        }
        if task.questions_closed {
            input["questions_closed"] = serde_json::Value::Bool(true);
        }
        CompletionRequest {
            model: self.model.clone(),
            messages: vec![
                ChatMessage::system(self.system_prompt.clone()),
                ChatMessage::user(input.to_string()),
            ],
            response_format: Some(ResponseFormat {
                name: schema::TASK_OUTPUT.into(),
                schema: turn_schema(),
            }),
            max_tokens: Some(2048.min(self.budgets.call_tokens as u32)),
        }
    }

    /// The most turns a task takes (at least one).
    fn max_turns(&self) -> u32 {
        self.budgets.max_turns.max(1)
    }

    /// One call, within the call, task and session budgets.
    ///
    /// (An `async` block rather than an `async fn`, which moves each argument into a
    /// second slot, and what follows the model's answer is its own boxed future: this
    /// one is part of the task's run future through every model call, and is as large
    /// as its largest state.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn keeps a second slot per argument"
    )]
    fn call<'a>(
        &'a self,
        ctx: &'a TaskContext,
        task: &'a TaskMessage,
        request: &'a mut CompletionRequest,
        task_spent: &'a mut u64,
    ) -> impl Future<Output = Result<String, AgentError>> + Send + 'a {
        async move {
            let estimate = self.admit(ctx, *task_spent, request)?;
            if let Some(a) = &ctx.allowance {
                // On an allowance, only while the claim is still ours (a holder taken
                // over while stuck stops at its next call). (Round trips are boxed.)
                if ctx.spend.spend().calls > 0 && !Box::pin(a.still_held(task)).await? {
                    return Err(AgentError::Unusable(
                        "the attempt was taken over by another holder".into(),
                    ));
                }
            }
            let reservation = match &self.ledger {
                // On an allowance, or with no session budget: nothing to reserve.
                Some(l) if self.budgets.session_tokens > 0 && ctx.allowance.is_none() => Some(
                    Box::pin(l.reserve(&task.session_id, estimate, self.budgets.session_tokens))
                        .await
                        .map_err(|e| AgentError::Transient(e.to_string()))??,
                ),
                _ => None,
            };
            // (The timer is boxed: inline, it was a third of this future, timer or not.
            // Its length is read again for the error, not held through the call.)
            let request = &*request;
            let result = match self.call_timeout {
                Some(t) => Box::pin(tokio::time::timeout(t, self.llm.complete(request)))
                    .await
                    .unwrap_or_else(|_| {
                        let t = self.call_timeout.unwrap_or_default();
                        Err(LlmError::Unavailable(format!("no answer within {t:?}")))
                    }),
                None => self.llm.complete(request).await,
            };
            Box::pin(self.account(ctx, task_spent, reservation, result)).await
        }
    }

    /// Before a call: the task's budget must have room, and the prompt must leave room
    /// in the call's budget (the completion may use what it leaves, set on the request
    /// in place, not on a copy of the conversation: later turns only lower it, their
    /// prompts being longer), and on an allowance the call's ceiling must fit in it.
    /// The call's ceiling (prompt and completion) is what it may use.
    fn admit(
        &self,
        ctx: &TaskContext,
        task_spent: u64,
        request: &mut CompletionRequest,
    ) -> Result<u64, AgentError> {
        let b = &self.budgets;
        if task_spent >= b.task_tokens {
            return Err(Exhausted {
                budget: BudgetKind::TaskTokens,
                reason: format!("task spent {task_spent} of {} tokens", b.task_tokens),
            }
            .into());
        }
        let prompt = u64::from(flotilla_llm::estimate_prompt_tokens(&request.messages));
        if prompt >= b.call_tokens {
            return Err(Exhausted {
                budget: BudgetKind::CallTokens,
                reason: format!(
                    "the prompt alone is about {prompt} tokens, the call budget {}",
                    b.call_tokens
                ),
            }
            .into());
        }
        let room = (b.call_tokens - prompt).min(u64::from(request.max_tokens.unwrap_or(u32::MAX)));
        request.max_tokens = Some(room as u32);
        let estimate = prompt + room;
        if let Some(a) = &ctx.allowance {
            let held_back = a.held_back(b.call_tokens);
            if held_back + task_spent + estimate > a.tokens {
                return Err(Exhausted {
                    budget: BudgetKind::SessionTokens,
                    reason: format!(
                        "the attempt's share of the session budget is spent: {} of {} tokens, \
                         and the next call may use {estimate}",
                        held_back + task_spent,
                        a.tokens
                    ),
                }
                .into());
            }
        }
        Ok(estimate)
    }

    /// After a call: settles its reservation on the session's ledger with what it
    /// used, and counts the use in the task's spend.
    async fn account(
        &self,
        ctx: &TaskContext,
        task_spent: &mut u64,
        reservation: Option<crate::budget::Reservation>,
        result: Result<flotilla_llm::Completion, LlmError>,
    ) -> Result<String, AgentError> {
        let used = match &result {
            Ok(c) => u64::from(c.usage.total()),
            Err(_) => 0,
        };
        if let (Some(l), Some(r)) = (&self.ledger, reservation) {
            l.settle(r, used)
                .await
                .map_err(|e| AgentError::Transient(e.to_string()))?;
        }
        let completion = match result {
            Ok(c) => c,
            Err(LlmError::OverBudget(why)) => {
                return Err(Exhausted {
                    budget: BudgetKind::GlobalTokens,
                    reason: why,
                }
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        ctx.spend.add_call(used);
        *task_spent += used;
        if let Some(a) = &ctx.allowance {
            a.record_spent(*task_spent, self.budgets.call_tokens);
        }
        Ok(completion.content)
    }
}

fn task_output_schema() -> serde_json::Value {
    flotilla_protocol::schema::get("task_output.json")
        .cloned()
        .unwrap_or_default()
}

/// What the agent says to the model after a non-final turn.
const CONTINUE: &str = "Continue. When the work is complete, answer with action `final`.";
const CLOSED: &str = "Clarifications are closed for this session: commit to your best \
     interpretation of the instruction and answer with action `final`.";

impl Agent for LlmAgent {
    fn run<'a>(&'a self, ctx: &'a TaskContext, task: &'a TaskMessage) -> AgentFuture<'a> {
        Box::pin(async move {
            let mut request = self.request(task);
            let mut task_spent = 0u64;
            let mut calls = CallFingerprints::default();
            let mut told_closed = false;

            // Continue the conversation a failed process left, if any.
            let mut conversation = match &self.history {
                Some(h) if ctx.resumed => Some(
                    Box::pin(h.load(&task.session_id, &task.role, &task.task_id, task.attempt))
                        .await
                        .map_err(|e| AgentError::Transient(e.to_string()))?,
                ),
                // A first delivery has no conversation to continue: skip the read.
                Some(h) => Some(h.fresh(task.attempt)),
                None => None,
            };
            // The turn to take next (a counter, not a range: the run future keeps it
            // through every call).
            let mut turn = 1;
            if let Some(a) = &ctx.allowance {
                // Nothing spent yet by this holder: what earlier ones recorded. Without
                // a conversation store there is no telling, so nothing is left.
                let earlier = match &conversation {
                    Some(c) => c.history.tokens,
                    None if a.earlier_holders > 0 => a.tokens,
                    None => 0,
                };
                task_spent = earlier;
                a.record_spent(earlier, self.budgets.call_tokens);
            }
            if let Some(c) = &conversation {
                let h = &c.history;
                if !h.summary.is_empty() {
                    request.messages.push(ChatMessage::user(format!(
                        "Your earlier turns on this task, summarized:\n{}",
                        h.summary
                    )));
                }
                for t in &h.recent {
                    request
                        .messages
                        .push(ChatMessage::assistant(t.assistant.clone()));
                    request.messages.push(ChatMessage::user(t.user.clone()));
                }
                task_spent = h.tokens;
                turn = h.turns_taken + 1;
                if h.turns_taken > 0 {
                    tracing::info!(turns = h.turns_taken, "continuing a conversation from KV");
                }
            }
            while turn <= self.max_turns() {
                turn += 1;
                let content = self.call(ctx, task, &mut request, &mut task_spent).await?;
                // What the answer leads to is its own boxed future: what a turn keeps
                // (the answer, its parse, a tool's result) is no part of this one,
                // which every task holds through its model calls.
                let answer = Turn::of(content)?;
                let mut state = TurnState {
                    request: &mut request,
                    calls: &mut calls,
                    told_closed: &mut told_closed,
                    conversation: conversation.as_mut(),
                    task_spent,
                };
                if let Some(output) =
                    Box::pin(self.take_turn(ctx, task, answer, &mut state)).await?
                {
                    return Ok(output);
                }
            }
            Err(Exhausted {
                budget: BudgetKind::Turns,
                reason: format!("no final answer after {} turns", self.max_turns()),
            }
            .into())
        })
    }
}

/// The parts of a task's run that a turn changes (see [`LlmAgent::take_turn`]).
struct TurnState<'r> {
    request: &'r mut CompletionRequest,
    calls: &'r mut CallFingerprints,
    told_closed: &'r mut bool,
    conversation: Option<&'r mut crate::history::Conversation>,
    task_spent: u64,
}

/// A model's answer and the text it came as (kept for the conversation).
struct TurnAnswer {
    content: String,
    turn: Turn,
}

impl Turn {
    /// Parses a model's answer: a turn, or else a bare task output (a final answer).
    fn of(content: String) -> Result<TurnAnswer, AgentError> {
        let turn = match serde_json::from_str::<Turn>(&content) {
            Ok(t) => t,
            Err(_) => {
                let output: TaskOutput =
                    decode(content.as_bytes(), DEFAULT_MAX_PAYLOAD).map_err(|e| {
                        AgentError::Unusable(format!("output does not match the schema: {e}"))
                    })?;
                Turn::Final {
                    summary: output.summary,
                    artifacts: output.artifacts,
                }
            }
        };
        Ok(TurnAnswer { content, turn })
    }
}

impl LlmAgent {
    /// Acts on one answer of the model: the task's output if it is final; otherwise
    /// the reply (a tool's result, or the nudge to go on) is added to the request and
    /// the conversation, and `None` asks for the next turn.
    async fn take_turn(
        &self,
        ctx: &TaskContext,
        task: &TaskMessage,
        answer: TurnAnswer,
        st: &mut TurnState<'_>,
    ) -> Result<Option<TaskOutput>, AgentError> {
        let TurnAnswer { content, turn } = answer;
        let reply = match &turn {
            Turn::Final { summary, artifacts } => {
                let output = TaskOutput {
                    summary: summary.clone(),
                    artifacts: artifacts.clone(),
                };
                output.validate()?;
                if self.share_findings {
                    Box::pin(self.record_finding(ctx, task, &output)).await?;
                }
                return Ok(Some(output));
            }
            Turn::Clarify { question } => {
                if !task.questions_closed {
                    return Err(AgentError::Clarify(question.clone()));
                }
                if *st.told_closed {
                    return Err(Exhausted {
                        budget: BudgetKind::Clarifications,
                        reason: format!(
                            "the agent asked again after clarifications closed: {question}"
                        ),
                    }
                    .into());
                }
                *st.told_closed = true;
                CLOSED.to_owned()
            }
            Turn::Tool { tool, arguments } => {
                st.calls.observe(
                    &format!("tool {tool} {arguments}"),
                    self.budgets.circuit_repeats,
                )?;
                Box::pin(self.call_tool(task, tool, arguments)).await?
            }
            Turn::Continue { note } => {
                st.calls
                    .observe(&format!("continue {note}"), self.budgets.circuit_repeats)?;
                CONTINUE.to_owned()
            }
        };
        if let (Some(h), Some(c)) = (&self.history, st.conversation.as_deref_mut()) {
            let turn = flotilla_protocol::HistoryTurn {
                assistant: content.clone(),
                user: reply.clone(),
            };
            Box::pin(h.push(
                (&task.session_id, &task.role, &task.task_id),
                c,
                turn,
                st.task_spent,
            ))
            .await
            .map_err(|e| AgentError::Transient(e.to_string()))?;
        }
        Box::pin(ctx.progress.report()).await;
        st.request.messages.push(ChatMessage::assistant(content));
        st.request.messages.push(ChatMessage::user(reply));
        Ok(None)
    }
}
impl LlmAgent {
    /// Runs a tool the model asked for; its result (or why it failed) is the next
    /// message. Transient gateway failures retry the attempt later.
    async fn call_tool(
        &self,
        task: &TaskMessage,
        tool: &str,
        arguments: &serde_json::Value,
    ) -> Result<String, AgentError> {
        let Some((gateway, allowed)) = &self.tools else {
            return Ok(format!(
                "Tool `{tool}` is not available to this agent; continue without it."
            ));
        };
        if !allowed.iter().any(|t| t == tool) || !gateway.knows(tool) {
            return Ok(format!(
                "Tool `{tool}` is not available to this agent (it may call: {}); continue without it.",
                allowed.join(", ")
            ));
        }
        match gateway
            .call(&task.session_id, &task.task_id, tool, arguments)
            .await
        {
            Ok(result) => Ok(format!("Tool `{tool}` returned: {result}")),
            Err(e) if e.is_transient() => Err(AgentError::Transient(e.to_string())),
            Err(e) => Ok(format!("Tool `{tool}` failed: {e}. Continue without it.")),
        }
    }

    /// Shares the finding with the session's other agents, at the task's own key: one
    /// write and no read, and no contention with the session's other tasks. A
    /// redelivered attempt finds the key taken and replaces the value.
    async fn record_finding(
        &self,
        ctx: &TaskContext,
        task: &TaskMessage,
        output: &TaskOutput,
    ) -> Result<(), AgentError> {
        let key = finding_key(&task.task_id)?;
        let finding = Finding {
            task_id: task.task_id.to_string(),
            role: task.role.to_string(),
            summary: output.summary.clone(),
        };
        // After the model's answer: an outage is waited out here (the write is safe to
        // repeat), not by running the task, and its call, again.
        flotilla_bus::outlast(
            || async {
                match ctx.memory.create(&key, &finding).await {
                    Err(flotilla_bus::MemoryError::Exists(_)) => ctx
                        .memory
                        .update_with(&key, |_: Option<Finding>| finding.clone())
                        .await
                        .map(|_| ()),
                    other => other.map(|_| ()),
                }
            },
            |e| matches!(e, flotilla_bus::MemoryError::Unavailable(_)),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_turn_matches_the_turn_schema_and_bad_ones_do_not() {
        let schema = turn_schema();
        for ok in [
            r#"{"action":"final","summary":"s","artifacts":[{"name":"n","kind":"note","content":"c"}]}"#,
            r#"{"action":"continue","note":"more"}"#,
            r#"{"action":"tool","tool":"search","arguments":{"q":"x"}}"#,
            r#"{"action":"clarify","question":"which?"}"#,
        ] {
            flotilla_llm::structured::check(ok, &schema).unwrap_or_else(|e| panic!("{ok}: {e}"));
            serde_json::from_str::<Turn>(ok).unwrap();
        }
        let bare = r#"{"summary":"s","artifacts":[{"name":"n","kind":"note","content":"c"}]}"#;
        flotilla_llm::structured::check(bare, &schema).unwrap();
        for bad in [
            r#"{"action":"dance"}"#,
            r#"{"summary":"no action"}"#,
            r#"{"action":"final","summary":"s","artifacts":[{"name":1}]}"#,
        ] {
            assert!(
                flotilla_llm::structured::check(bad, &schema).is_err(),
                "{bad}"
            );
        }
    }
}

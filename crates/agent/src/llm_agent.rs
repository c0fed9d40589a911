//! The built-in agent: one LLM call with the role's system prompt, asking for a
//! [`TaskOutput`] as structured output.

use std::sync::Arc;

use flotilla_bus::MemKey;
use flotilla_llm::{ChatMessage, CompletionRequest, LlmClient, ResponseFormat, schema};
use flotilla_protocol::{DEFAULT_MAX_PAYLOAD, Role, TaskMessage, TaskOutput, decode};

use crate::agent::{Agent, AgentError, AgentFuture, TaskContext};

/// The shared-memory key where built-in agents record what they found.
pub const FINDINGS: &str = "findings";

/// One entry of the `findings` list in a session's shared memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    /// The task.
    pub task_id: String,
    /// The role that did it.
    pub role: String,
    /// Its summary.
    pub summary: String,
}

/// An agent that asks an LLM to do the task.
#[derive(Clone)]
pub struct LlmAgent {
    role: Role,
    system_prompt: String,
    model: String,
    llm: Arc<dyn LlmClient>,
}

impl std::fmt::Debug for LlmAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmAgent")
            .field("role", &self.role)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl LlmAgent {
    /// An agent for `role` with a default system prompt.
    pub fn new(role: Role, model: impl Into<String>, llm: Arc<dyn LlmClient>) -> Self {
        let system_prompt = format!(
            "You are the {role} specialist of a team of agents. Do the instruction you are given \
             and answer with JSON: a short `summary` and at least one `artifact` \
             (`name`, `kind`, `content`) holding your actual work product."
        );
        Self {
            role,
            system_prompt,
            model: model.into(),
            llm,
        }
    }

    /// Replaces the system prompt.
    pub fn with_system_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.system_prompt = prompt.into();
        self
    }

    /// The request this agent sends for `task`.
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
        CompletionRequest {
            model: self.model.clone(),
            messages: vec![
                ChatMessage::system(self.system_prompt.clone()),
                ChatMessage::user(input.to_string()),
            ],
            response_format: Some(ResponseFormat {
                name: schema::TASK_OUTPUT.to_owned(),
                schema: serde_json::to_value(schemars_schema()).unwrap_or_default(),
            }),
            max_tokens: Some(2048),
        }
    }
}

fn schemars_schema() -> serde_json::Value {
    flotilla_protocol::schema::all()
        .into_iter()
        .find(|(n, _)| *n == "task_output.json")
        .and_then(|(_, s)| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

impl Agent for LlmAgent {
    fn run<'a>(&'a self, ctx: &'a TaskContext, task: &'a TaskMessage) -> AgentFuture<'a> {
        Box::pin(async move {
            let request = self.request(task);
            let completion = self.llm.complete(&request).await?;
            let output: TaskOutput = decode(completion.content.as_bytes(), DEFAULT_MAX_PAYLOAD)
                .map_err(|e| {
                    AgentError::Unusable(format!("output does not match the schema: {e}"))
                })?;
            output.validate()?;
            // Share the finding with the session's other agents. Keyed by task, so a
            // redelivered attempt replaces its entry instead of appending a second one.
            let key = MemKey::parse(FINDINGS)?;
            let finding = Finding {
                task_id: task.task_id.to_string(),
                role: task.role.to_string(),
                summary: output.summary.clone(),
            };
            ctx.memory
                .update_with(&key, |list: Option<Vec<Finding>>| {
                    let mut list = list.unwrap_or_default();
                    list.retain(|f| f.task_id != finding.task_id);
                    list.push(finding.clone());
                    list
                })
                .await?;
            Ok(output)
        })
    }
}

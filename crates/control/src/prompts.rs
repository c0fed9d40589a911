//! The orchestrator's prompts. The user message is always a JSON object, which real
//! models read well and the simulated provider parses.

use flotilla_llm::{ChatMessage, CompletionRequest, ResponseFormat, schema};
use flotilla_protocol::{AnswerSection, SessionRecord};
use std::sync::{Arc, LazyLock};

/// The plan's schema, built once and shared by every request.
fn plan_schema() -> Arc<serde_json::Value> {
    static SCHEMA: LazyLock<Arc<serde_json::Value>> = LazyLock::new(|| {
        Arc::new(
            flotilla_protocol::schema::get("plan.json")
                .cloned()
                .unwrap_or_default(),
        )
    });
    SCHEMA.clone()
}

fn synthesis_schema() -> Arc<serde_json::Value> {
    static SCHEMA: LazyLock<Arc<serde_json::Value>> = LazyLock::new(|| {
        Arc::new(serde_json::json!({
            "type": "object",
            "properties": {"summary": {"type": "string"}},
            "required": ["summary"],
            "additionalProperties": false
        }))
    });
    SCHEMA.clone()
}

fn clarification_schema() -> Arc<serde_json::Value> {
    static SCHEMA: LazyLock<Arc<serde_json::Value>> = LazyLock::new(|| {
        Arc::new(serde_json::json!({
            "type": "object",
            "required": ["answer"],
            "properties": {"answer": {"type": "string"}}
        }))
    });
    SCHEMA.clone()
}

/// Asks for a plan: one subtask per worker role, in a sensible order.
pub fn plan(model: &str, rec: &SessionRecord, feedback: Option<&str>) -> CompletionRequest {
    let mut input = serde_json::json!({
        "task": rec.task,
        "roles": rec.roles,
    });
    if let Some(f) = feedback {
        input["previous_plan_rejected_because"] = serde_json::Value::String(f.to_owned());
    }
    CompletionRequest {
        model: model.to_owned(),
        messages: vec![
            ChatMessage::system(
                "You are the orchestrator of a team of specialist agents. Split the user's task into \
                 subtasks, one per listed role, each with a precise instruction. Use only the listed roles.",
            ),
            ChatMessage::user(input.to_string()),
        ],
        response_format: Some(ResponseFormat {
            name: schema::PLAN.to_owned(),
            schema: plan_schema(),
        }),
        max_tokens: Some(2048),
    }
}

/// Asks for the final answer from the workers' results.
pub fn synthesis(model: &str, rec: &SessionRecord, results: &[AnswerSection]) -> CompletionRequest {
    let input = serde_json::json!({
        "task": rec.task,
        "results": results.iter().map(|s| serde_json::json!({
            "role": s.role,
            "summary": s.output.summary,
            "artifacts": s.output.artifacts,
        })).collect::<Vec<_>>(),
    });
    CompletionRequest {
        model: model.to_owned(),
        messages: vec![
            ChatMessage::system(
                "You are the orchestrator of a team of specialist agents. Write the final answer to the \
                 user's task from your team's results. Answer with JSON: {\"summary\": string}.",
            ),
            ChatMessage::user(input.to_string()),
        ],
        response_format: Some(ResponseFormat {
            name: schema::SYNTHESIS.to_owned(),
            schema: synthesis_schema(),
        }),
        max_tokens: Some(4096),
    }
}

/// Asks the orchestrator to answer a worker's clarification question.
pub fn clarification(
    model: &str,
    rec: &SessionRecord,
    instruction: &str,
    question: &str,
) -> CompletionRequest {
    let input = serde_json::json!({
        "task": rec.task,
        "instruction": instruction,
        "question": question,
    });
    CompletionRequest {
        model: model.to_owned(),
        messages: vec![
            ChatMessage::system(
                "You are the orchestrator of a team of specialist agents. A specialist asks a \
                 question about its instruction. Answer it briefly and decisively, as JSON \
                 `{\"answer\": string}`.",
            ),
            ChatMessage::user(input.to_string()),
        ],
        response_format: Some(ResponseFormat {
            name: schema::CLARIFICATION.to_owned(),
            schema: clarification_schema(),
        }),
        max_tokens: Some(512),
    }
}

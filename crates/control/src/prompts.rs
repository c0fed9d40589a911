//! The orchestrator's prompts. The user message is always a JSON object, which real
//! models read well and the simulated provider parses.

use flotilla_llm::{ChatMessage, CompletionRequest, ResponseFormat, schema};
use flotilla_protocol::{AnswerSection, Artifact, Role, SessionRecord, TaskId, TaskOutput};
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

/// A system prompt, made once and shared by every request in flight (a request holds
/// it through its model call: a copy each was a few hundred bytes a session).
macro_rules! shared_prompt {
    ($text:expr) => {{
        static PROMPT: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from($text));
        PROMPT.clone()
    }};
}

/// Asks for a plan: one subtask per worker role, in a sensible order.
pub fn plan(model: &Arc<str>, rec: &SessionRecord, feedback: Option<&str>) -> CompletionRequest {
    let mut input = serde_json::json!({
        "task": rec.task,
        "roles": rec.roles,
    });
    if let Some(f) = feedback {
        input["previous_plan_rejected_because"] = serde_json::Value::String(f.to_owned());
    }
    CompletionRequest {
        model: model.clone(),
        messages: vec![
            ChatMessage::system(shared_prompt!(
                "You are the orchestrator of a team of specialist agents. Split the user's task into \
                 subtasks, one per listed role, each with a precise instruction. Use only the listed roles."
            )),
            ChatMessage::user(input.to_string()),
        ],
        response_format: Some(ResponseFormat {
            name: schema::PLAN.into(),
            schema: plan_schema(),
        }),
        max_tokens: Some(2048),
    }
}

/// The synthesis prompt's input: the task and the finished tasks' outputs.
#[derive(serde::Serialize)]
struct SynthesisInput<'a> {
    task: &'a str,
    results: Vec<SynthesisResult<'a>>,
}

#[derive(serde::Serialize)]
struct SynthesisResult<'a> {
    task_id: &'a TaskId,
    role: &'a Role,
    summary: &'a str,
    artifacts: &'a [Artifact],
}

/// The same input, read back ([`sections_of`]).
#[derive(serde::Deserialize)]
struct SynthesisInputOwned {
    results: Vec<SynthesisResultOwned>,
}

#[derive(serde::Deserialize)]
struct SynthesisResultOwned {
    task_id: TaskId,
    role: Role,
    summary: String,
    artifacts: Vec<Artifact>,
}

/// Asks for the final answer from the workers' results. The request carries them
/// whole: [`sections_of`] reads them back for the answer after the call, so that one
/// copy of the outputs, not two, lives through the model call.
pub fn synthesis(
    model: &Arc<str>,
    rec: &SessionRecord,
    results: &[AnswerSection],
) -> CompletionRequest {
    let input = SynthesisInput {
        task: &rec.task,
        results: results
            .iter()
            .map(|s| SynthesisResult {
                task_id: &s.task_id,
                role: &s.role,
                summary: &s.output.summary,
                artifacts: &s.output.artifacts,
            })
            .collect(),
    };
    // (Plain data with string keys: serializing it cannot fail.)
    let input = serde_json::to_string(&input).unwrap_or_default();
    CompletionRequest {
        model: model.clone(),
        messages: vec![
            ChatMessage::system(shared_prompt!(
                "You are the orchestrator of a team of specialist agents. Write the final answer to the \
                 user's task from your team's results. Answer with JSON: {\"summary\": string}."
            )),
            ChatMessage::user(input),
        ],
        response_format: Some(ResponseFormat {
            name: schema::SYNTHESIS.into(),
            schema: synthesis_schema(),
        }),
        max_tokens: Some(4096),
    }
}

/// The answer's sections a [`synthesis`] request carries, in order; `None` if `req`
/// is not one.
pub fn sections_of(req: &CompletionRequest) -> Option<Vec<AnswerSection>> {
    let input = req
        .messages
        .iter()
        .find(|m| m.role == flotilla_llm::ChatRole::User)?;
    let input: SynthesisInputOwned = serde_json::from_str(&input.content).ok()?;
    Some(
        input
            .results
            .into_iter()
            .map(|r| AnswerSection {
                task_id: r.task_id,
                role: r.role,
                output: TaskOutput {
                    summary: r.summary,
                    artifacts: r.artifacts,
                },
            })
            .collect(),
    )
}

/// Asks the orchestrator to answer a worker's clarification question.
pub fn clarification(
    model: &Arc<str>,
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
        model: model.clone(),
        messages: vec![
            ChatMessage::system(shared_prompt!(
                "You are the orchestrator of a team of specialist agents. A specialist asks a \
                 question about its instruction. Answer it briefly and decisively, as JSON \
                 `{\"answer\": string}`."
            )),
            ChatMessage::user(input.to_string()),
        ],
        response_format: Some(ResponseFormat {
            name: schema::CLARIFICATION.into(),
            schema: clarification_schema(),
        }),
        max_tokens: Some(512),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use flotilla_protocol::SessionId;

    #[test]
    fn a_synthesis_request_carries_its_sections_whole() {
        let rec = SessionRecord::planning(
            SessionId::parse("s1").unwrap(),
            "compare \"vector\" databases".into(),
            Vec::new(),
            0,
            0,
            String::new(),
            0,
        );
        let section = |t: &str, r: &str, n: usize| AnswerSection {
            task_id: TaskId::parse(t).unwrap(),
            role: Role::parse(r).unwrap(),
            output: TaskOutput {
                summary: format!("{r} found {n} things\nwith a \"quote\""),
                artifacts: (0..n)
                    .map(|i| Artifact {
                        name: format!("{t}-{i}"),
                        kind: "note".into(),
                        content: format!("content {i} ✓"),
                    })
                    .collect(),
            },
        };
        let sections = vec![
            section("t2", "research", 2),
            section("t1", "analysis", 0),
            section("t3", "review", 3),
        ];
        let req = synthesis(&"m".into(), &rec, &sections);
        assert_eq!(sections_of(&req).unwrap(), sections, "in order, each whole");
        // What the model reads: the task and every result.
        let input: serde_json::Value =
            serde_json::from_str(&req.messages.last().unwrap().content).unwrap();
        assert_eq!(input["task"], "compare \"vector\" databases");
        assert_eq!(input["results"][0]["role"], "research");
        assert_eq!(
            input["results"][2]["artifacts"][2]["content"],
            "content 2 ✓"
        );
        // Not a synthesis request: nothing to read back.
        assert!(sections_of(&plan(&"m".into(), &rec, None)).is_none());
    }
}

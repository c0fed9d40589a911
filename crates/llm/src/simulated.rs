//! The simulated provider: deterministic for a seed, with configurable latency and
//! token usage, producing valid plans, task outputs with artifacts, and syntheses.
//!
//! The user message of each Flotilla prompt is a JSON object (see the prompt builders
//! in the agent and control crates); the simulator reads it to produce output that
//! refers to the real task, role and instruction, so tests can check that every answer
//! holds its own session's work and nothing else. Randomness comes from a hash of the
//! seed and the request, so the same request always gets the same answer and latency,
//! whatever the scheduling.

use std::time::Duration;

use flotilla_protocol::{Artifact, Plan, Role, Subtask, TaskOutput};
use serde::{Deserialize, Serialize};

use crate::client::{Completion, CompletionRequest, LlmClient, LlmError, LlmFuture, Usage};
use crate::schema;

/// Simulated provider settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Seed: the same seed and request give the same output and latency.
    pub seed: u64,
    /// Mean latency of a call, in milliseconds.
    pub latency_ms: u64,
    /// Latency spread: each call takes `latency_ms x (1 ± jitter)`, uniformly.
    pub jitter: f64,
    /// Completion tokens per call: uniformly between these two.
    pub completion_tokens: (u32, u32),
    /// Subtasks per role in a plan (more than 1 makes several tasks share an inbox).
    pub subtasks_per_role: u32,
    /// How worker agents' model behaves (the adversarial ones test budgets).
    pub behaviour: Behaviour,
}

/// How the simulated model answers worker turns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Answers with a final output on the first turn.
    #[default]
    Cooperative,
    /// Always asks for another turn (a new note each time): stopped by max turns.
    NeverDone,
    /// Always sends a longer draft to improve: stopped by a token budget.
    ImproveForever,
    /// Always asks the orchestrator a question, even after clarifications close.
    ClarifyForever,
    /// Asks a question until clarifications close, then answers.
    ClarifyUntilClosed,
    /// Asks one question, then answers quoting the clarification it got (tests that
    /// an answer, from a person or not, reaches the task).
    ClarifyOnce,
    /// Calls the same tool with the same arguments forever: stopped by the circuit
    /// breaker.
    SameToolForever,
    /// Takes notes on the first turn, then answers citing how many earlier turns it
    /// saw (tests that a conversation survives its process).
    TwoTurns,
    /// Calls the `lookup` tool on the first turn, then answers quoting what it said.
    UseTool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            latency_ms: 200,
            jitter: 0.5,
            completion_tokens: (80, 400),
            subtasks_per_role: 1,
            behaviour: Behaviour::Cooperative,
        }
    }
}

/// A deterministic PRNG (SplitMix64) seeded from the request.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        lo + (self.next() % u64::from(hi - lo + 1)) as u32
    }
}

/// FNV-1a: a stable hash (unlike `std`'s, which is randomized per process).
fn fnv1a(seed: u64, parts: &[&str]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A worker turn of an adversarial behaviour.
fn adversarial(b: Behaviour, w: &WorkInput, turn: usize, last: &str) -> String {
    let v = match b {
        Behaviour::NeverDone => serde_json::json!({
            "action": "continue",
            "note": format!("step {turn} of {}: still working", w.task_id),
        }),
        Behaviour::ImproveForever => serde_json::json!({
            "action": "continue",
            "note": format!(
                "draft v{turn}, not perfect yet: {}",
                w.instruction.repeat(4 * turn)
            ),
        }),
        Behaviour::ClarifyForever | Behaviour::ClarifyUntilClosed | Behaviour::ClarifyOnce => {
            serde_json::json!({
                "action": "clarify",
                "question": format!("What exactly is meant by \"{}\"?", w.instruction),
            })
        }
        Behaviour::SameToolForever => serde_json::json!({
            "action": "tool",
            "tool": "search",
            "arguments": {"query": w.instruction},
        }),
        Behaviour::TwoTurns if turn == 1 => serde_json::json!({
            "action": "continue",
            "note": format!("notes on {}", w.task_id),
        }),
        Behaviour::TwoTurns => serde_json::json!({
            "action": "final",
            "summary": format!("{} finished {} after {} earlier turn(s)", w.role, w.task_id, turn - 1),
            "artifacts": [{"name": format!("{}-{}", w.role, w.task_id), "kind": "note", "content": w.instruction}],
        }),
        Behaviour::UseTool if turn == 1 => serde_json::json!({
            "action": "tool",
            "tool": "lookup",
            "arguments": {"query": w.task_id},
        }),
        Behaviour::UseTool => serde_json::json!({
            "action": "final",
            "summary": format!("{} used a tool: {last}", w.role),
            "artifacts": [{"name": format!("{}-{}", w.role, w.task_id), "kind": "note", "content": w.instruction}],
        }),
        Behaviour::Cooperative => serde_json::json!({"action": "continue", "note": ""}),
    };
    v.to_string()
}

/// The simulated provider.
#[derive(Debug, Clone, Default)]
pub struct SimulatedProvider {
    config: SimConfig,
}

#[derive(Deserialize)]
struct PlanInput {
    task: String,
    roles: Vec<Role>,
}

#[derive(Deserialize)]
struct WorkInput {
    role: String,
    task_id: String,
    instruction: String,
    #[serde(default)]
    questions_closed: bool,
    #[serde(default)]
    clarification: Option<String>,
}

#[derive(Deserialize)]
struct SynthesisInput {
    task: String,
    results: Vec<SynthesisItem>,
}

#[derive(Deserialize)]
struct SynthesisItem {
    role: String,
    summary: String,
}

impl SimulatedProvider {
    /// A provider with these settings.
    pub fn new(config: SimConfig) -> Self {
        Self { config }
    }

    /// The latency and output for `request`, without waiting.
    pub fn respond(&self, request: &CompletionRequest) -> Result<(Duration, Completion), LlmError> {
        let (rng, latency) = self.draw_latency(request);
        self.respond_drawn(request, rng, latency)
    }

    /// [`SimulatedProvider::respond`] with the draw made: the request's text is hashed
    /// once per call, not again when the latency is over.
    fn respond_drawn(
        &self,
        request: &CompletionRequest,
        mut rng: Rng,
        latency: Duration,
    ) -> Result<(Duration, Completion), LlmError> {
        // The first user message holds the input; later ones continue a conversation.
        let input = request
            .messages
            .iter()
            .find(|m| m.role == crate::client::ChatRole::User)
            .map(|m| &*m.content)
            .ok_or_else(|| LlmError::Refused("no user message".into()))?;
        let name = request.response_format.as_ref().map(|f| &*f.name);
        let bad = |e: serde_json::Error| {
            LlmError::Refused(format!("simulator cannot read its input: {e}"))
        };
        let content = match name {
            Some(schema::PLAN) => {
                let p: PlanInput = serde_json::from_str(input).map_err(bad)?;
                let rounds = self.config.subtasks_per_role.max(1);
                let (roles, task) = (&p.roles, p.task.as_str());
                let plan = Plan {
                    subtasks: (1..=rounds)
                        .flat_map(|n| {
                            roles.iter().map(move |r| Subtask {
                                role: r.clone(),
                                instruction: if rounds == 1 {
                                    format!("As the {r} specialist, handle your part of: {task}")
                                } else {
                                    format!("As the {r} specialist, handle part {n} of: {task}")
                                },
                            })
                        })
                        .collect(),
                };
                serde_json::to_string(&plan).map_err(|e| LlmError::BadResponse(e.to_string()))?
            }
            Some(schema::TASK_OUTPUT)
                if self.config.behaviour != Behaviour::Cooperative
                    && !(self.config.behaviour == Behaviour::ClarifyUntilClosed
                        && serde_json::from_str::<WorkInput>(input)
                            .is_ok_and(|w| w.questions_closed))
                    && !(self.config.behaviour == Behaviour::ClarifyOnce
                        && serde_json::from_str::<WorkInput>(input)
                            .is_ok_and(|w| w.clarification.is_some())) =>
            {
                let w: WorkInput = serde_json::from_str(input).map_err(bad)?;
                let turn = 1 + request
                    .messages
                    .iter()
                    .filter(|m| m.role == crate::client::ChatRole::Assistant)
                    .count();
                let last = request.messages.last().map_or("", |m| &*m.content);
                adversarial(self.config.behaviour, &w, turn, last)
            }
            Some(schema::CLARIFICATION) => serde_json::json!({
                "answer": format!("Interpret it in the most useful way ({:08x}).", rng.next() as u32)
            })
            .to_string(),
            Some(schema::TASK_OUTPUT) => {
                let w: WorkInput = serde_json::from_str(input).map_err(bad)?;
                let n = 1 + (rng.next() % 3) as usize;
                let told = w
                    .clarification
                    .as_deref()
                    .map(|c| format!(" (told: {c})"))
                    .unwrap_or_default();
                let out = TaskOutput {
                    summary: format!("{} result for {}: {}{told}", w.role, w.task_id, w.instruction),
                    artifacts: (1..=n)
                        .map(|i| Artifact {
                            name: format!("{}-{}-{i}", w.role, w.task_id),
                            kind: ["note", "table", "citation"][i % 3].to_owned(),
                            content: format!(
                                "[{}#{:08x}] {}",
                                w.role,
                                rng.next() as u32,
                                w.instruction
                            ),
                        })
                        .collect(),
                };
                serde_json::to_string(&out).map_err(|e| LlmError::BadResponse(e.to_string()))?
            }
            Some(schema::SYNTHESIS) => {
                let s: SynthesisInput = serde_json::from_str(input).map_err(bad)?;
                let parts: Vec<String> = s
                    .results
                    .iter()
                    .map(|r| format!("{}: {}", r.role, r.summary))
                    .collect();
                serde_json::json!({
                    "summary": format!("Answer to \"{}\", from {} specialists. {}", s.task, s.results.len(), parts.join(" | "))
                })
                .to_string()
            }
            _ => format!("simulated reply #{:08x}", rng.next() as u32),
        };
        // Counted as a provider would: the prompt by the shared estimator, the
        // completion within the request's ceiling.
        let prompt_tokens = crate::tokens::estimate_prompt_tokens(&request.messages);
        let (lo, hi) = self.config.completion_tokens;
        let completion_tokens = rng
            .range(lo, hi)
            .min(request.max_tokens.unwrap_or(u32::MAX));
        Ok((
            latency,
            Completion {
                content,
                usage: Usage {
                    prompt_tokens,
                    completion_tokens,
                },
            },
        ))
    }
}

impl SimulatedProvider {
    /// The request's generator (seeded by its messages) and the latency it draws first.
    fn draw_latency(&self, request: &CompletionRequest) -> (Rng, Duration) {
        let texts: Vec<&str> = request.messages.iter().map(|m| &*m.content).collect();
        let mut rng = Rng(fnv1a(self.config.seed, &texts));
        let jitter = self.config.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * (2.0 * rng.unit() - 1.0);
        let latency = Duration::from_micros(
            (self.config.latency_ms as f64 * 1000.0 * factor).max(0.0) as u64,
        );
        (rng, latency)
    }
}

impl LlmClient for SimulatedProvider {
    fn complete<'a>(&'a self, request: &'a CompletionRequest) -> LlmFuture<'a> {
        Box::pin(async move {
            // The answer is made when the latency is over, as a provider's arrives:
            // nothing of it is held while the call waits.
            let (rng, latency) = self.draw_latency(request);
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            let (_, completion) = self.respond_drawn(request, rng, latency)?;
            crate::client::record_usage(&request.model, &completion.usage);
            Ok(completion)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ChatMessage, ResponseFormat};

    fn req(name: &str, input: serde_json::Value) -> CompletionRequest {
        CompletionRequest {
            model: "sim".into(),
            messages: vec![
                ChatMessage::system("s"),
                ChatMessage::user(input.to_string()),
            ],
            response_format: Some(ResponseFormat {
                name: name.to_owned().into(),
                schema: serde_json::json!({}).into(),
            }),
            max_tokens: None,
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        let p = SimulatedProvider::new(SimConfig::default());
        let r = req(
            schema::TASK_OUTPUT,
            serde_json::json!({"role":"research","task_id":"t1","instruction":"x"}),
        );
        let a = p.respond(&r).unwrap();
        let b = p.respond(&r).unwrap();
        assert_eq!(a, b);
        let other = SimulatedProvider::new(SimConfig {
            seed: 8,
            ..SimConfig::default()
        });
        assert_ne!(a.1.content, other.respond(&r).unwrap().1.content);
    }

    #[test]
    fn outputs_are_valid() {
        let p = SimulatedProvider::new(SimConfig::default());
        let roles = ["research", "analysis", "writing"];
        let plan = p
            .respond(&req(
                schema::PLAN,
                serde_json::json!({"task":"T","roles":roles}),
            ))
            .unwrap()
            .1;
        let plan: Plan = serde_json::from_str(&plan.content).unwrap();
        let roles: Vec<Role> = roles.iter().map(|r| Role::parse(*r).unwrap()).collect();
        plan.validate(&roles, 5).unwrap();
        let out = p
            .respond(&req(
                schema::TASK_OUTPUT,
                serde_json::json!({"role":"research","task_id":"t1","instruction":"dig"}),
            ))
            .unwrap()
            .1;
        let out: TaskOutput = serde_json::from_str(&out.content).unwrap();
        out.validate().unwrap();
        assert!(out.artifacts.iter().all(|a| a.content.contains("dig")));
    }

    #[test]
    fn latency_within_configured_spread() {
        let p = SimulatedProvider::new(SimConfig {
            latency_ms: 100,
            jitter: 0.2,
            ..SimConfig::default()
        });
        for i in 0..50 {
            let (lat, c) = p
                .respond(&req(
                    schema::TASK_OUTPUT,
                    serde_json::json!({"role":"r","task_id":format!("t{i}"),"instruction":"i"}),
                ))
                .unwrap();
            assert!(
                lat >= Duration::from_millis(80) && lat <= Duration::from_millis(120),
                "{lat:?}"
            );
            assert!((80..=400).contains(&c.usage.completion_tokens));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn complete_waits_the_latency() {
        let p = SimulatedProvider::new(SimConfig {
            latency_ms: 1000,
            jitter: 0.0,
            ..SimConfig::default()
        });
        let r = req(
            schema::SYNTHESIS,
            serde_json::json!({"task":"T","results":[{"role":"a","summary":"s"}]}),
        );
        let start = tokio::time::Instant::now();
        let c = p.complete(&r).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(1000));
        assert!(c.content.contains("Answer to"));
    }
}

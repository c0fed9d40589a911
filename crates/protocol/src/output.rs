//! What agents produce: plans, task outputs with artifacts, and the final answer.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{Role, TaskId};

/// One piece of work product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Short name, unique within the output.
    pub name: String,
    /// What it is (`note`, `table`, `code`, `citation`, ...).
    pub kind: String,
    /// The content itself.
    pub content: String,
}

/// A worker's output for one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskOutput {
    /// What was found or done, in a sentence or three.
    pub summary: String,
    /// The work product; at least one.
    pub artifacts: Vec<Artifact>,
}

/// Why an output is not accepted as a task's result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    /// No artifacts: nothing was produced.
    #[error("the output has no artifacts")]
    NoArtifacts,
    /// The summary is empty or a bare acknowledgement ("done", "ok").
    #[error("the summary {0:?} says nothing")]
    EmptySummary(String),
    /// An artifact has an empty name or content.
    #[error("artifact {0:?} is empty")]
    EmptyArtifact(String),
}

impl TaskOutput {
    /// Checks that the output carries real work product.
    pub fn validate(&self) -> Result<(), OutputError> {
        let s = self
            .summary
            .trim()
            .trim_end_matches(['.', '!'])
            .to_ascii_lowercase();
        if s.is_empty()
            || ["done", "ok", "okay", "finished", "complete", "completed"].contains(&s.as_str())
        {
            return Err(OutputError::EmptySummary(self.summary.clone()));
        }
        if self.artifacts.is_empty() {
            return Err(OutputError::NoArtifacts);
        }
        for a in &self.artifacts {
            if a.name.trim().is_empty() || a.content.trim().is_empty() {
                return Err(OutputError::EmptyArtifact(a.name.clone()));
            }
        }
        Ok(())
    }
}

/// One subtask of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Subtask {
    /// The worker role that does it.
    pub role: Role,
    /// What to do.
    pub instruction: String,
}

/// The orchestrator's plan for a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The subtasks, in dispatch order.
    pub subtasks: Vec<Subtask>,
}

/// Why a plan is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No subtasks.
    #[error("the plan has no subtasks")]
    Empty,
    /// More subtasks than allowed.
    #[error("the plan has {0} subtasks, the limit is {1}")]
    TooMany(usize, usize),
    /// A subtask names a role the session does not have.
    #[error("the plan uses role {0}, which is not one of the session's roles")]
    ForeignRole(Role),
    /// A subtask has an empty instruction.
    #[error("subtask {0} has an empty instruction")]
    EmptyInstruction(usize),
}

impl Plan {
    /// Checks the plan against the session's roles.
    pub fn validate(&self, roles: &[Role], max_subtasks: usize) -> Result<(), PlanError> {
        if self.subtasks.is_empty() {
            return Err(PlanError::Empty);
        }
        if self.subtasks.len() > max_subtasks {
            return Err(PlanError::TooMany(self.subtasks.len(), max_subtasks));
        }
        for (i, s) in self.subtasks.iter().enumerate() {
            if !roles.contains(&s.role) {
                return Err(PlanError::ForeignRole(s.role.clone()));
            }
            if s.instruction.trim().is_empty() {
                return Err(PlanError::EmptyInstruction(i));
            }
        }
        Ok(())
    }
}

/// One worker's contribution to the final answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnswerSection {
    /// The task.
    pub task_id: TaskId,
    /// The role that did it.
    pub role: Role,
    /// The accepted output of the task's current attempt.
    pub output: TaskOutput,
}

/// The session's final answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// The synthesized answer.
    pub summary: String,
    /// Every worker's accepted result, in plan order.
    pub sections: Vec<AnswerSection>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(summary: &str, n: usize) -> TaskOutput {
        TaskOutput {
            summary: summary.into(),
            artifacts: (0..n)
                .map(|i| Artifact {
                    name: format!("a{i}"),
                    kind: "note".into(),
                    content: "c".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn output_validation() {
        assert!(out("found three sources", 1).validate().is_ok());
        assert_eq!(out("found", 0).validate(), Err(OutputError::NoArtifacts));
        assert!(matches!(
            out(" Done. ", 2).validate(),
            Err(OutputError::EmptySummary(_))
        ));
    }

    #[test]
    fn plan_validation() {
        let r = Role::parse("research").unwrap();
        let p = Plan {
            subtasks: vec![Subtask {
                role: Role::parse("other").unwrap(),
                instruction: "x".into(),
            }],
        };
        assert!(matches!(
            p.validate(std::slice::from_ref(&r), 5),
            Err(PlanError::ForeignRole(_))
        ));
        assert_eq!(
            Plan { subtasks: vec![] }.validate(&[r], 5),
            Err(PlanError::Empty)
        );
    }
}

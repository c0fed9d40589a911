//! Agent conversations kept in KV (`<sid>.h.<role>.<task>` in the sessions bucket): the last
//! `window` turns plus a running summary of older ones, written after every turn by
//! compare-and-set, so a backup process continues the conversation where a failed one
//! stopped, and a fenced-off holder cannot overwrite its successor's turns.

use flotilla_bus::{Bus, KvError};
use flotilla_protocol::{AgentHistory, HistoryTurn, Role, SessionId, TaskId, V1, subject::keys};

/// Longest running summary kept, in characters (the oldest part is dropped first).
const SUMMARY_MAX: usize = 4_000;
/// Characters of a turn kept when it is folded into the summary.
const FOLD_MAX: usize = 300;

/// Reads and writes agent conversations.
#[derive(Debug, Clone)]
pub struct HistoryStore {
    bus: Bus,
    window: usize,
}

/// A conversation being continued, with the revision it was read at. (Its key is made
/// from the task's ids when it is written, not held through the model calls.)
#[derive(Debug, Clone)]
pub struct Conversation {
    /// (A revision is never 0: 8 bytes, not 16, in every task's run future.)
    revision: Option<std::num::NonZeroU64>,
    /// The conversation.
    pub history: AgentHistory,
}

/// The conversation could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Another process wrote the conversation since: this one was taken over; stop.
    #[error("the conversation was taken over by another process")]
    TakenOver,
    /// NATS is unreachable: retry the attempt later.
    #[error(transparent)]
    Unavailable(KvError),
}

fn cut(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl HistoryStore {
    /// Keeps the last `window` turns verbatim (at least 1).
    pub fn new(bus: Bus, window: usize) -> Self {
        Self {
            bus,
            window: window.max(1),
        }
    }

    /// The conversation of `task`'s `attempt`: the stored one if it belongs to this
    /// attempt, else a new one.
    pub async fn load(
        &self,
        session: &SessionId,
        role: &Role,
        task: &TaskId,
        attempt: u32,
    ) -> Result<Conversation, HistoryError> {
        let key = keys::history(session, role, task);
        let stored = self
            .bus
            .sessions()
            .get::<AgentHistory>(&key)
            .await
            .map_err(HistoryError::Unavailable)?;
        let fresh = AgentHistory {
            v: V1,
            attempt,
            turns_taken: 0,
            tokens: 0,
            summary: String::new(),
            recent: Vec::new(),
        };
        Ok(match stored {
            Some((h, rev)) if h.attempt == attempt => Conversation {
                revision: std::num::NonZeroU64::new(rev),
                history: h,
            },
            Some((_, rev)) => Conversation {
                revision: std::num::NonZeroU64::new(rev),
                history: fresh,
            },
            None => Conversation {
                revision: None,
                history: fresh,
            },
        })
    }

    /// A new conversation for `task`'s `attempt`, without reading KV (a first delivery
    /// has nothing to continue).
    pub fn fresh(&self, attempt: u32) -> Conversation {
        Conversation {
            revision: None,
            history: AgentHistory {
                v: V1,
                attempt,
                turns_taken: 0,
                tokens: 0,
                summary: String::new(),
                recent: Vec::new(),
            },
        }
    }

    /// Appends a turn (folding the oldest into the summary past the window) and saves
    /// it as the conversation of `task` of `session`'s `role`.
    pub async fn push(
        &self,
        (session, role, task): (&SessionId, &Role, &TaskId),
        c: &mut Conversation,
        turn: HistoryTurn,
        tokens: u64,
    ) -> Result<(), HistoryError> {
        let key = keys::history(session, role, task);
        let h = &mut c.history;
        h.turns_taken += 1;
        h.tokens = tokens;
        h.recent.push(turn);
        while h.recent.len() > self.window {
            let old = h.recent.remove(0);
            let n = h.turns_taken as usize - h.recent.len();
            h.summary
                .push_str(&format!("[turn {n}] {}\n", cut(&old.assistant, FOLD_MAX)));
        }
        if h.summary.chars().count() > SUMMARY_MAX {
            let drop = h.summary.chars().count() - SUMMARY_MAX;
            h.summary = h.summary.chars().skip(drop).collect();
        }
        let records = self.bus.sessions();
        let mut res = match c.revision {
            Some(rev) => records.update(&key, &c.history, rev.get()).await,
            None => records.create(&key, &c.history).await,
        };
        if let Err(KvError::Exists { .. }) = res {
            // A fresh conversation over an earlier attempt's: replace it; over this
            // attempt's, someone else is running it.
            match records
                .get::<AgentHistory>(&key)
                .await
                .map_err(HistoryError::Unavailable)?
            {
                Some((old, rev)) if old.attempt < c.history.attempt => {
                    res = records.update(&key, &c.history, rev).await;
                }
                _ => return Err(HistoryError::TakenOver),
            }
        }
        match res {
            Ok(rev) => {
                c.revision = std::num::NonZeroU64::new(rev);
                Ok(())
            }
            Err(KvError::Conflict { .. } | KvError::Exists { .. }) => Err(HistoryError::TakenOver),
            Err(e) => Err(HistoryError::Unavailable(e)),
        }
    }
}

//! Sessions this process must do no more work for: ended from outside their course
//! (cancelled, or past their deadline) while work of theirs may be in flight here.
//!
//! The process that ends a session sends a [`StopSession`] notice to `<p>.ctl.stop`
//! as a request; every process answers it ([`listen`]) only after marking the session
//! stopped here and cancelling the token of every handler working for it. A handler
//! takes a [`StopGuard`] before its first model call and runs under its token, so once
//! a process has answered, no model or tool call of that session starts in it. The
//! ender counts the answers against the processes listed in presence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_bus::Bus;
use flotilla_protocol::{SessionId, StopAck, StopSession, TaskId, V1};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// How long a stopped session is remembered (a late delivery of one of its tasks is
/// refused by the session record's status after that).
const REMEMBER: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Inner {
    /// Sessions with handlers here: their token, and the guards that hold it.
    running: HashMap<SessionId, Holders>,
    /// Sessions stopped, and when.
    stopped: HashMap<SessionId, Instant>,
}

/// A session's guards in this process: how many, and the task attempts of those
/// taken for one ([`Stops::guard_attempt`]).
struct Holders {
    token: CancellationToken,
    n: usize,
    attempts: Vec<(TaskId, u32)>,
}

/// The stopped sessions of one process, and the tokens of its handlers. Cheap to clone.
#[derive(Clone, Default)]
pub struct Stops {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Stops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stops").finish_non_exhaustive()
    }
}

/// A handler's hold on its session: its token is cancelled when the session is
/// stopped. Released on drop.
#[derive(Debug)]
pub struct StopGuard {
    stops: Stops,
    session: SessionId,
    token: CancellationToken,
    attempt: Option<(TaskId, u32)>,
}

impl StopGuard {
    /// Cancelled once the session is stopped.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        let mut inner = self.stops.lock();
        if let Some(h) = inner.running.get_mut(&self.session) {
            h.n -= 1;
            if h.n == 0 {
                inner.running.remove(&self.session);
            } else if let Some(a) = &self.attempt
                && let Some(i) = h.attempts.iter().position(|x| x == a)
            {
                h.attempts.swap_remove(i);
            }
        }
    }
}

impl Stops {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A guard for work on `session`, or `None` if it was stopped.
    pub fn guard(&self, session: &SessionId) -> Option<StopGuard> {
        self.take(session, None)
    }

    /// A guard for work on `task`'s `attempt` of `session`, or `None` if the session
    /// was stopped. It also counts the handler in on that attempt, for
    /// [`Stops::attempt_shared`] (one entry per session serves both, so a task in
    /// flight costs one map entry here, not two).
    pub fn guard_attempt(
        &self,
        session: &SessionId,
        task: &TaskId,
        attempt: u32,
    ) -> Option<StopGuard> {
        self.take(session, Some((task.clone(), attempt)))
    }

    fn take(&self, session: &SessionId, attempt: Option<(TaskId, u32)>) -> Option<StopGuard> {
        let mut inner = self.lock();
        if inner.stopped.contains_key(session) {
            return None;
        }
        let h = inner
            .running
            .entry(session.clone())
            .or_insert_with(|| Holders {
                token: CancellationToken::new(),
                n: 0,
                attempts: Vec::new(),
            });
        h.n += 1;
        if let Some(a) = &attempt {
            h.attempts.push(a.clone());
        }
        Some(StopGuard {
            stops: self.clone(),
            session: session.clone(),
            token: h.token.clone(),
            attempt,
        })
    }

    /// Whether more than one guard of this process holds `task`'s `attempt` of
    /// `session` (a copy of an attempt that a handler here is running).
    pub fn attempt_shared(&self, session: &SessionId, task: &TaskId, attempt: u32) -> bool {
        self.lock().running.get(session).is_some_and(|h| {
            h.attempts
                .iter()
                .filter(|(t, a)| t == task && *a == attempt)
                .count()
                > 1
        })
    }

    /// Whether `session` was stopped.
    pub fn is_stopped(&self, session: &SessionId) -> bool {
        self.lock().stopped.contains_key(session)
    }

    /// Stops `session`: no guard is given for it from now on, and the handlers that
    /// hold one are cancelled. Returns how many were.
    pub fn stop(&self, session: &SessionId) -> u32 {
        let mut inner = self.lock();
        let now = Instant::now();
        inner
            .stopped
            .retain(|_, at| now.duration_since(*at) < REMEMBER);
        inner.stopped.insert(session.clone(), now);
        match inner.running.remove(session) {
            Some(h) => {
                h.token.cancel();
                u32::try_from(h.n).unwrap_or(u32::MAX)
            }
            None => 0,
        }
    }
}

/// Subscribes to stop notices on `<p>.ctl.stop` for this process (`agent_id`, its
/// presence key), and answers them until `shutdown` in a task of its own. Returns once
/// the server knows the subscription, so work taken after it cannot miss a notice.
pub async fn listen(
    bus: Bus,
    agent_id: String,
    stops: Stops,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let sub = match bus.subscribe(bus.names().ctl_stop()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot hear stop notices; cancelled sessions' work here runs to its end (and is fenced)");
            return tokio::spawn(async {});
        }
    };
    let _ = bus.flush().await;
    tokio::spawn(answer(bus, agent_id, stops, sub, shutdown))
}

async fn answer(
    bus: Bus,
    agent_id: String,
    stops: Stops,
    mut sub: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let Ok(notice) = serde_json::from_slice::<StopSession>(&msg.payload) else {
            tracing::warn!("unreadable stop notice ignored");
            continue;
        };
        let aborted = stops.stop(&notice.session_id);
        if aborted > 0 {
            tracing::info!(session = %notice.session_id, aborted, outcome = ?notice.outcome, "session stopped; its work here aborted");
        }
        if let Some(reply) = msg.reply {
            let ack = StopAck {
                v: V1,
                agent_id: agent_id.clone(),
                aborted,
            };
            let body = Bytes::from(serde_json::to_vec(&ack).unwrap_or_default());
            if let Err(e) = bus.respond(reply, body).await {
                tracing::debug!(error = %e, "could not answer a stop notice");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_cancels_holders_and_refuses_new_guards() {
        let stops = Stops::default();
        let s = SessionId::generate();
        let other = SessionId::generate();
        let a = stops.guard(&s).unwrap();
        let b = stops.guard(&s).unwrap();
        let c = stops.guard(&other).unwrap();
        drop(b);
        assert_eq!(stops.stop(&s), 1, "one guard still held");
        assert!(a.token().is_cancelled());
        assert!(!c.token().is_cancelled());
        assert!(stops.guard(&s).is_none());
        assert!(stops.is_stopped(&s) && !stops.is_stopped(&other));
        assert_eq!(stops.stop(&s), 0, "idempotent");
        drop(a);
        drop(c);
        assert!(stops.lock().running.is_empty(), "guards clean up");
    }

    #[test]
    fn guards_of_one_attempt_are_counted_by_attempt() {
        let stops = Stops::default();
        let s = SessionId::generate();
        let (t1, t2) = (TaskId::nth(1), TaskId::nth(2));
        let first = stops.guard_attempt(&s, &t1, 1).unwrap();
        let other_task = stops.guard_attempt(&s, &t2, 1).unwrap();
        let plain = stops.guard(&s).unwrap();
        assert!(!stops.attempt_shared(&s, &t1, 1));
        let copy = stops.guard_attempt(&s, &t1, 1).unwrap();
        let next = stops.guard_attempt(&s, &t1, 2).unwrap();
        assert!(stops.attempt_shared(&s, &t1, 1));
        assert!(!stops.attempt_shared(&s, &t1, 2) && !stops.attempt_shared(&s, &t2, 1));
        drop(copy);
        assert!(
            !stops.attempt_shared(&s, &t1, 1),
            "the copy's count goes with it"
        );
        drop((first, other_task, plain, next));
        assert!(stops.lock().running.is_empty());
        // A stopped session's attempt guards are refused like any other.
        let g = stops.guard_attempt(&s, &t1, 3).unwrap();
        assert_eq!(stops.stop(&s), 1);
        assert!(g.token().is_cancelled());
        assert!(stops.guard_attempt(&s, &t1, 3).is_none());
        drop(g);
        assert!(stops.lock().running.is_empty());
    }
}

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
use flotilla_protocol::{SessionId, StopAck, StopSession, V1};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// How long a stopped session is remembered (a late delivery of one of its tasks is
/// refused by the session record's status after that).
const REMEMBER: Duration = Duration::from_secs(600);

#[derive(Default)]
struct Inner {
    /// Sessions with handlers here: their token and how many guards hold it.
    running: HashMap<SessionId, (CancellationToken, usize)>,
    /// Sessions stopped, and when.
    stopped: HashMap<SessionId, Instant>,
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
        if let Some((_, n)) = inner.running.get_mut(&self.session) {
            *n -= 1;
            if *n == 0 {
                inner.running.remove(&self.session);
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
        let mut inner = self.lock();
        if inner.stopped.contains_key(session) {
            return None;
        }
        let (token, n) = inner
            .running
            .entry(session.clone())
            .or_insert_with(|| (CancellationToken::new(), 0));
        *n += 1;
        Some(StopGuard {
            stops: self.clone(),
            session: session.clone(),
            token: token.clone(),
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
            Some((token, n)) => {
                token.cancel();
                u32::try_from(n).unwrap_or(u32::MAX)
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
}

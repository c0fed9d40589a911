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
    /// Sessions with handlers here: the guards that hold them.
    running: HashMap<SessionId, Holders>,
    /// Sessions stopped, and when.
    stopped: HashMap<SessionId, Instant>,
}

/// A session's guards in this process: how many, and the task attempts of those
/// taken for one ([`Stops::guard_attempt`]).
struct Holders {
    n: usize,
    attempts: Vec<(TaskId, u32)>,
}

/// The stopped sessions of one process, and the guards of its handlers. Cheap to clone.
///
/// A guard waits on one of [`WAKE_SHARDS`] notifiers, chosen by its session, and looks
/// at the stopped set when woken: a session in flight costs no allocation of its own
/// (a cancellation token each was about 100 bytes for every task in flight), and a
/// stop wakes the handlers of about one session in [`WAKE_SHARDS`], which look again.
#[derive(Clone)]
pub struct Stops {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    wake: [tokio::sync::Notify; WAKE_SHARDS],
}

/// How many notifiers the guards of one process are spread over.
const WAKE_SHARDS: usize = 64;

impl Default for Stops {
    fn default() -> Self {
        Self {
            shared: Arc::new(Shared {
                inner: Mutex::default(),
                wake: std::array::from_fn(|_| tokio::sync::Notify::new()),
            }),
        }
    }
}

impl std::fmt::Debug for Stops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stops").finish_non_exhaustive()
    }
}

/// A handler's hold on its session: [`StopGuard::stopped`] completes when the session
/// is stopped. Released on drop (of the guard, or of the wait it became).
///
/// It borrows the registry and the ids from its handler (which has them already), so
/// it adds four words to a handler's future, which lives through the model call.
#[derive(Debug)]
pub struct StopGuard<'a> {
    stops: &'a Stops,
    session: &'a SessionId,
    attempt: Option<(&'a TaskId, u32)>,
}

impl<'a> StopGuard<'a> {
    /// Completes once the session is stopped (at once if it is already). The guard
    /// goes into the wait and is held as long as it is (one slot in a handler's
    /// future, not a guard and a pointer to it).
    pub fn stopped(self) -> Stopped<'a> {
        Stopped {
            // Listening before looking: a stop between the look and the wait wakes it
            // (a `Notified` receives `notify_waiters` from its creation on, polled or
            // not).
            woken: self.stops.wake(self.session).notified(),
            guard: self,
        }
    }
}

pin_project_lite::pin_project! {
    /// What [`StopGuard::stopped`] returns: the guard and one wait on its notifier,
    /// 96 bytes (an `async fn` kept two more pointers and a pinned reference). It is
    /// part of every handler's future through the model call.
    #[must_use = "futures do nothing unless polled"]
    pub struct Stopped<'a> {
        guard: StopGuard<'a>,
        #[pin]
        woken: tokio::sync::futures::Notified<'a>,
    }
}

/// `run` (a handler's work in its span), unless its session is stopped first: `Ok`
/// with `run`'s output (polled first, so a result ready beside a stop is kept), or
/// once `stopped` completes, `Err` with `run`'s span (to say so in it). Both are
/// polled in place, by reference, and taken by value: `select!` would keep a second
/// slot for the stop's wait, and state of its own, in a handler's future, which lives
/// through the model call, and a pinned reference the handler kept to read the span
/// after would be one more.
pub fn unless_stopped<'p, F: std::future::Future>(
    mut run: std::pin::Pin<&'p mut tracing::instrument::Instrumented<F>>,
    mut stopped: std::pin::Pin<&'p mut Stopped<'_>>,
) -> impl std::future::Future<Output = Result<F::Output, tracing::Span>> + 'p {
    std::future::poll_fn(move |cx| {
        if let std::task::Poll::Ready(r) = run.as_mut().poll(cx) {
            return std::task::Poll::Ready(Ok(r));
        }
        stopped.as_mut().poll(cx).map(|()| Err(run.span().clone()))
    })
}

impl std::fmt::Debug for Stopped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stopped")
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl std::future::Future for Stopped<'_> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let mut this = self.project();
        loop {
            if this.guard.stops.is_stopped(this.guard.session) {
                return std::task::Poll::Ready(());
            }
            std::task::ready!(this.woken.as_mut().poll(cx));
            // Woken (a stop of a session sharing the notifier, perhaps another one):
            // listen again, then look.
            this.woken
                .set(this.guard.stops.wake(this.guard.session).notified());
        }
    }
}

impl Drop for StopGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.stops.lock();
        if let Some(h) = inner.running.get_mut(self.session) {
            h.n -= 1;
            if h.n == 0 {
                inner.running.remove(self.session);
            } else if let Some((task, attempt)) = self.attempt
                && let Some(i) = h
                    .attempts
                    .iter()
                    .position(|(t, a)| t == task && *a == attempt)
            {
                h.attempts.swap_remove(i);
            }
        }
    }
}

impl Stops {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The notifier `session`'s guards wait on.
    fn wake(&self, session: &SessionId) -> &tokio::sync::Notify {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        session.as_str().hash(&mut h);
        &self.shared.wake[(h.finish() % WAKE_SHARDS as u64) as usize]
    }

    /// A guard for work on `session`, or `None` if it was stopped.
    pub fn guard<'a>(&'a self, session: &'a SessionId) -> Option<StopGuard<'a>> {
        self.take(session, None)
    }

    /// A guard for work on `task`'s `attempt` of `session`, or `None` if the session
    /// was stopped. It also counts the handler in on that attempt, for
    /// [`Stops::attempt_shared`] (one entry per session serves both, so a task in
    /// flight costs one map entry here, not two).
    pub fn guard_attempt<'a>(
        &'a self,
        session: &'a SessionId,
        task: &'a TaskId,
        attempt: u32,
    ) -> Option<StopGuard<'a>> {
        self.take(session, Some((task, attempt)))
    }

    fn take<'a>(
        &'a self,
        session: &'a SessionId,
        attempt: Option<(&'a TaskId, u32)>,
    ) -> Option<StopGuard<'a>> {
        let mut inner = self.lock();
        if inner.stopped.contains_key(session) {
            return None;
        }
        let h = inner
            .running
            .entry(session.clone())
            .or_insert_with(|| Holders {
                n: 0,
                attempts: Vec::new(),
            });
        h.n += 1;
        if let Some((task, attempt)) = attempt {
            // (Room for one more, not four: a session has one task in a process, as a
            // rule, held through its model call.)
            h.attempts.reserve_exact(1);
            h.attempts.push((task.clone(), attempt));
        }
        Some(StopGuard {
            stops: self,
            session,
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
    /// hold one are woken ([`StopGuard::stopped`]). Returns how many were.
    pub fn stop(&self, session: &SessionId) -> u32 {
        let held = {
            let mut inner = self.lock();
            let now = Instant::now();
            inner
                .stopped
                .retain(|_, at| now.duration_since(*at) < REMEMBER);
            inner.stopped.insert(session.clone(), now);
            inner.running.remove(session).map_or(0, |h| h.n)
        };
        if held > 0 {
            self.wake(session).notify_waiters();
        }
        u32::try_from(held).unwrap_or(u32::MAX)
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
    use futures::FutureExt;

    #[tokio::test]
    async fn a_stop_wakes_the_handlers_waiting_on_it_and_only_them() {
        let stops = Stops::default();
        let s = SessionId::generate();
        // Sessions sharing its notifier, and one that does not.
        let sessions: Vec<SessionId> = (0..200).map(|_| SessionId::generate()).collect();
        let guard = stops.guard(&s).unwrap();
        let others: Vec<StopGuard> = sessions.iter().map(|o| stops.guard(o).unwrap()).collect();
        // (Guards borrow their handler's ids: the waits are polled here, not spawned.)
        let mut waiting = Box::pin(guard.stopped());
        let mut bystanders: Vec<_> = others.into_iter().map(|g| Box::pin(g.stopped())).collect();
        assert!(waiting.as_mut().now_or_never().is_none(), "not stopped yet");
        for b in &mut bystanders {
            assert!(b.as_mut().now_or_never().is_none(), "not stopped");
        }
        assert_eq!(stops.stop(&s), 1);
        tokio::time::timeout(Duration::from_secs(10), waiting.as_mut())
            .await
            .expect("woken by the stop");
        assert!(
            bystanders
                .iter_mut()
                .all(|b| b.as_mut().now_or_never().is_none()),
            "other sessions' handlers look again and keep waiting"
        );
    }

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
        let (mut a, mut c) = (Box::pin(a.stopped()), Box::pin(c.stopped()));
        assert!(a.as_mut().now_or_never().is_some());
        assert!(c.as_mut().now_or_never().is_none());
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
        let mut g = Box::pin(g.stopped());
        assert!(g.as_mut().now_or_never().is_some());
        assert!(stops.guard_attempt(&s, &t1, 3).is_none());
        drop(g);
        assert!(stops.lock().running.is_empty());
    }
}

//! The state machine of a service's flows: pure code, no sockets, time passed in.
//!
//! Every flow of a service follows the service's [`Phase`]; the data path only asks two things of
//! it: may client-to-service data flow ([`Phase::client_data_flows`]), and where do new flows go
//! ([`ServiceState::backend`]).
//!
//! ```text
//!            pause                 quiesced
//!   Active ─────────▶ Pausing ───────────────▶ Paused ◀──────────┐
//!     ▲ │  ◀───────────  │ quiesce deadline      │ │ redirect     │ finish_redirect
//!     │ │  (pause fails)  │                      │ └──────▶ Redirecting
//!     │ │ redirect        │ resume / hold expiry │ resume / hold expiry
//!     │ └──▶ Redirecting ─┘(back to Active)      ▼
//!     └──────────────────────────────────── Resuming
//!                      finish_resume
//! ```
//!
//! - A pause starts in `Pausing`: client-to-service data stops, and the pause is confirmed
//!   (`Paused`) only once every upstream socket is quiet. If that does not happen before the
//!   quiesce deadline, the pause fails and the service goes back to `Active` as it was.
//! - `Redirecting` and `Resuming` are short transitions while the data path re-points UDP flows
//!   or releases held datagrams; commands in them get [`StateError::Busy`].
//! - A pause has a maximum hold time: once it passes, [`ServiceState::expire_hold`] starts a
//!   resume toward the backend the service had before the pause, undoing any redirect, so that a
//!   crashed migrator never leaves clients hanging.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Where a service's flows are in a pause, redirect, resume cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Data flows both ways.
    Active,
    /// Client-to-service data has stopped; waiting until the upstream sockets are quiet.
    Pausing,
    /// Client-to-service data is held; every upstream socket was quiet when confirmed.
    Paused,
    /// Moving the service's UDP flows and new connections to another backend. Entered from
    /// `Active` or `Paused`; client data is held only if it was `Paused` (the data path re-points
    /// UDP flows between two datagrams, so a redirect while active needs no hold).
    Redirecting,
    /// Releasing held data; client-to-service data flows again.
    Resuming,
}

impl Phase {
    /// Whether client-to-service data may be read and forwarded in this phase (for
    /// `Redirecting`, see [`ServiceState::client_data_flows`]).
    pub fn client_data_flows(self) -> bool {
        matches!(self, Phase::Active | Phase::Resuming)
    }

    /// The phase's name as used in the control API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Active => "active",
            Phase::Pausing => "pausing",
            Phase::Paused => "paused",
            Phase::Redirecting => "redirecting",
            Phase::Resuming => "resuming",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command that the service's current phase does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// `pause` while a pause is in progress or in force.
    #[error("the service is already {0}; resume it first")]
    AlreadyPaused(Phase),
    /// `resume` while nothing is paused.
    #[error("the service is not paused")]
    NotPaused,
    /// `redirect` while a pause waits for quiescence.
    #[error("a pause is waiting for the flows to quiesce; redirect once it is confirmed")]
    PauseInProgress,
    /// Any command during a transition.
    #[error("the service is {0}; try again when it has finished")]
    Busy(Phase),
    /// The pause this step belongs to has already ended (resumed, expired or failed).
    #[error("pause {0} is no longer in progress")]
    StalePause(u64),
    /// A step that belongs to another phase, e.g. `finish_resume` while `Active`.
    #[error("the service is {actual}, not {expected}")]
    UnexpectedPhase {
        /// The phase the step needs.
        expected: Phase,
        /// The phase the service is in.
        actual: Phase,
    },
}

/// What a started pause must meet: returned by [`ServiceState::begin_pause`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseTicket {
    /// Identifies this pause in later steps.
    pub id: u64,
    /// When the pause fails unless the flows have quiesced.
    pub quiesce_deadline: Instant,
    /// When the pause ends by itself (resume toward the old backend).
    pub hold_deadline: Instant,
}

/// A pause that the hold timeout ended: returned by [`ServiceState::expire_hold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldExpired {
    /// The pause that expired.
    pub pause_id: u64,
    /// The backend the service goes back to (the one before the pause).
    pub backend: SocketAddr,
    /// The backend a redirect during the pause had chosen, now abandoned.
    pub abandoned_redirect: Option<SocketAddr>,
    /// How long the pause lasted.
    pub held: Duration,
}

/// A pause that ended: returned by [`ServiceState::finish_resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseRecord {
    /// The pause.
    pub pause_id: u64,
    /// From the pause command to the end of the resume.
    pub held: Duration,
    /// Whether the pause had been confirmed quiesced.
    pub was_quiesced: bool,
    /// Whether it ended by the hold timeout rather than a resume command.
    pub expired: bool,
    /// The backend flows go to from now on.
    pub backend: SocketAddr,
}

#[derive(Debug, Clone, Copy)]
struct Pause {
    id: u64,
    started: Instant,
    ticket: PauseTicket,
    quiesced_at: Option<Instant>,
    backend_before: SocketAddr,
    expired: bool,
}

/// The pure state of one service: phase, backend and the pause in force, if any.
#[derive(Debug, Clone)]
pub struct ServiceState {
    phase: Phase,
    /// The phase a redirect returns to.
    redirect_return: Phase,
    backend: SocketAddr,
    pause: Option<Pause>,
    next_pause_id: u64,
}

impl ServiceState {
    /// A service that is active toward `backend`.
    pub fn new(backend: SocketAddr) -> ServiceState {
        ServiceState {
            phase: Phase::Active,
            redirect_return: Phase::Active,
            backend,
            pause: None,
            next_pause_id: 1,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether client-to-service data may be read and forwarded now: in `Active` and
    /// `Resuming`, and in `Redirecting` when the redirect started while active.
    pub fn client_data_flows(&self) -> bool {
        match self.phase {
            Phase::Redirecting => self.redirect_return.client_data_flows(),
            p => p.client_data_flows(),
        }
    }

    /// Where new TCP connections and UDP flows go.
    pub fn backend(&self) -> SocketAddr {
        self.backend
    }

    /// The backend before the pause in force, if any.
    pub fn backend_before_pause(&self) -> Option<SocketAddr> {
        self.pause.map(|p| p.backend_before)
    }

    /// The id of the pause in force (in `Pausing`, `Paused`, `Resuming`, or `Redirecting` during
    /// a pause).
    pub fn pause_id(&self) -> Option<u64> {
        self.pause.map(|p| p.id)
    }

    /// How long the pause in force has lasted at `now`.
    pub fn held_for(&self, now: Instant) -> Option<Duration> {
        self.pause.map(|p| now.saturating_duration_since(p.started))
    }

    /// When the pause in force ends by itself.
    pub fn hold_deadline(&self) -> Option<Instant> {
        self.pause.map(|p| p.ticket.hold_deadline)
    }

    /// Starts a pause: `Active` → `Pausing`. The quiesce deadline is `quiesce_timeout` from now,
    /// but never later than the hold deadline (`max_hold` from now).
    pub fn begin_pause(
        &mut self,
        now: Instant,
        quiesce_timeout: Duration,
        max_hold: Duration,
    ) -> Result<PauseTicket, StateError> {
        match self.phase {
            Phase::Active => {}
            Phase::Pausing | Phase::Paused => return Err(StateError::AlreadyPaused(self.phase)),
            Phase::Redirecting | Phase::Resuming => return Err(StateError::Busy(self.phase)),
        }
        let id = self.next_pause_id;
        self.next_pause_id += 1;
        let hold_deadline = now + max_hold;
        let ticket = PauseTicket {
            id,
            quiesce_deadline: (now + quiesce_timeout).min(hold_deadline),
            hold_deadline,
        };
        self.pause = Some(Pause {
            id,
            started: now,
            ticket,
            quiesced_at: None,
            backend_before: self.backend,
            expired: false,
        });
        self.phase = Phase::Pausing;
        Ok(ticket)
    }

    fn pause_in(&self, id: u64, expected: Phase) -> Result<Pause, StateError> {
        match self.pause {
            Some(p) if p.id == id && self.phase == expected => Ok(p),
            Some(p) if p.id == id => Err(StateError::UnexpectedPhase {
                expected,
                actual: self.phase,
            }),
            _ => Err(StateError::StalePause(id)),
        }
    }

    /// Confirms pause `id`: every flow is quiet. `Pausing` → `Paused`. Returns the time from the
    /// pause command to now.
    pub fn confirm_quiesced(&mut self, id: u64, now: Instant) -> Result<Duration, StateError> {
        let p = self.pause_in(id, Phase::Pausing)?;
        self.phase = Phase::Paused;
        if let Some(p) = self.pause.as_mut() {
            p.quiesced_at = Some(now);
        }
        Ok(now.saturating_duration_since(p.started))
    }

    /// Fails pause `id` (its flows did not quiesce in time): `Pausing` → `Active`, as before the
    /// pause. Returns how long the attempt lasted.
    pub fn fail_pause(&mut self, id: u64, now: Instant) -> Result<Duration, StateError> {
        let p = self.pause_in(id, Phase::Pausing)?;
        self.phase = Phase::Active;
        self.pause = None;
        Ok(now.saturating_duration_since(p.started))
    }

    /// Starts a redirect of new flows and UDP flows to `to`: `Active` or `Paused` →
    /// `Redirecting`. Returns the previous backend.
    pub fn begin_redirect(&mut self, to: SocketAddr) -> Result<SocketAddr, StateError> {
        match self.phase {
            Phase::Active | Phase::Paused => {}
            Phase::Pausing => return Err(StateError::PauseInProgress),
            Phase::Redirecting | Phase::Resuming => return Err(StateError::Busy(self.phase)),
        }
        self.redirect_return = self.phase;
        self.phase = Phase::Redirecting;
        Ok(std::mem::replace(&mut self.backend, to))
    }

    /// Ends a redirect: back to the phase it started in.
    pub fn finish_redirect(&mut self) -> Result<Phase, StateError> {
        if self.phase != Phase::Redirecting {
            return Err(StateError::UnexpectedPhase {
                expected: Phase::Redirecting,
                actual: self.phase,
            });
        }
        self.phase = self.redirect_return;
        Ok(self.phase)
    }

    /// Starts releasing held data: `Pausing` or `Paused` → `Resuming`. Resuming a pause that
    /// has not been confirmed yet cancels it. Returns the pause's id.
    pub fn begin_resume(&mut self) -> Result<u64, StateError> {
        match self.phase {
            Phase::Pausing | Phase::Paused => {}
            Phase::Active => return Err(StateError::NotPaused),
            Phase::Redirecting | Phase::Resuming => return Err(StateError::Busy(self.phase)),
        }
        self.phase = Phase::Resuming;
        // The pause exists in Pausing and Paused (set by begin_pause, cleared only on leaving).
        self.pause.map(|p| p.id).ok_or(StateError::NotPaused)
    }

    /// Ends a resume: `Resuming` → `Active`.
    pub fn finish_resume(&mut self, now: Instant) -> Result<PauseRecord, StateError> {
        if self.phase != Phase::Resuming {
            return Err(StateError::UnexpectedPhase {
                expected: Phase::Resuming,
                actual: self.phase,
            });
        }
        let p = self.pause.take().ok_or(StateError::NotPaused)?;
        self.phase = Phase::Active;
        Ok(PauseRecord {
            pause_id: p.id,
            held: now.saturating_duration_since(p.started),
            was_quiesced: p.quiesced_at.is_some(),
            expired: p.expired,
            backend: self.backend,
        })
    }

    /// Ends pause `id` by itself if its hold deadline has passed at `now`: the backend goes back
    /// to the one before the pause, and the phase to `Resuming` (finish it with
    /// [`finish_resume`](Self::finish_resume)). `None` if the pause has already ended, is not
    /// due yet, or is in a transition (the caller retries after the transition).
    pub fn expire_hold(&mut self, id: u64, now: Instant) -> Option<HoldExpired> {
        let p = self.pause.as_mut()?;
        if p.id != id || now < p.ticket.hold_deadline {
            return None;
        }
        if !matches!(self.phase, Phase::Pausing | Phase::Paused) {
            return None;
        }
        p.expired = true;
        let abandoned = (self.backend != p.backend_before).then_some(self.backend);
        self.backend = p.backend_before;
        self.phase = Phase::Resuming;
        Some(HoldExpired {
            pause_id: id,
            backend: p.backend_before,
            abandoned_redirect: abandoned,
            held: now.saturating_duration_since(p.started),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    const Q: Duration = Duration::from_millis(500);
    const HOLD: Duration = Duration::from_secs(5);

    #[test]
    fn starts_active_and_client_data_flows_only_when_active_or_resuming() {
        let s = ServiceState::new(a(1));
        assert_eq!(s.phase(), Phase::Active);
        assert_eq!(s.backend(), a(1));
        assert_eq!(s.pause_id(), None);
        assert!(Phase::Active.client_data_flows());
        assert!(Phase::Resuming.client_data_flows());
        assert!(!Phase::Pausing.client_data_flows());
        assert!(!Phase::Paused.client_data_flows());
        assert!(!Phase::Redirecting.client_data_flows());
    }

    #[test]
    fn pause_quiesce_resume_cycle() {
        let t0 = Instant::now();
        let mut s = ServiceState::new(a(1));
        let t = s.begin_pause(t0, Q, HOLD).expect("pause");
        assert_eq!(s.phase(), Phase::Pausing);
        assert!(!s.client_data_flows());
        assert_eq!(t.quiesce_deadline, t0 + Q);
        assert_eq!(t.hold_deadline, t0 + HOLD);
        assert_eq!(s.hold_deadline(), Some(t0 + HOLD));
        let q = s
            .confirm_quiesced(t.id, t0 + Duration::from_millis(3))
            .expect("confirm");
        assert_eq!(q, Duration::from_millis(3));
        assert_eq!(s.phase(), Phase::Paused);
        assert_eq!(
            s.held_for(t0 + Duration::from_millis(10)),
            Some(Duration::from_millis(10))
        );
        assert!(!s.client_data_flows());
        assert_eq!(s.begin_resume(), Ok(t.id));
        assert_eq!(s.phase(), Phase::Resuming);
        assert!(s.client_data_flows());
        let r = s
            .finish_resume(t0 + Duration::from_millis(20))
            .expect("finish");
        assert_eq!(s.phase(), Phase::Active);
        assert_eq!(r.held, Duration::from_millis(20));
        assert!(r.was_quiesced);
        assert!(!r.expired);
        assert_eq!(r.backend, a(1));
        assert_eq!(s.pause_id(), None);
        // A second cycle gets a new id.
        let t2 = s.begin_pause(t0, Q, HOLD).expect("pause again");
        assert_ne!(t2.id, t.id);
    }

    #[test]
    fn quiesce_deadline_is_capped_by_hold_deadline() {
        let t0 = Instant::now();
        let mut s = ServiceState::new(a(1));
        let t = s
            .begin_pause(t0, Duration::from_secs(60), HOLD)
            .expect("pause");
        assert_eq!(t.quiesce_deadline, t0 + HOLD);
    }

    #[test]
    fn failed_pause_goes_back_to_active_unchanged() {
        let t0 = Instant::now();
        let mut s = ServiceState::new(a(1));
        let t = s.begin_pause(t0, Q, HOLD).expect("pause");
        assert_eq!(s.fail_pause(t.id, t0 + Q), Ok(Q));
        assert_eq!(s.phase(), Phase::Active);
        assert!(s.client_data_flows());
        assert_eq!(s.backend(), a(1));
        assert_eq!(s.pause_id(), None);
        // Steps of the failed pause are now stale.
        assert_eq!(
            s.confirm_quiesced(t.id, t0),
            Err(StateError::StalePause(t.id))
        );
        assert_eq!(s.fail_pause(t.id, t0), Err(StateError::StalePause(t.id)));
        assert_eq!(s.expire_hold(t.id, t0 + HOLD), None);
    }

    #[test]
    fn redirect_while_paused_then_resume_keeps_new_backend() {
        let t0 = Instant::now();
        let mut s = ServiceState::new(a(1));
        let t = s.begin_pause(t0, Q, HOLD).expect("pause");
        s.confirm_quiesced(t.id, t0).expect("confirm");
        assert_eq!(s.begin_redirect(a(2)), Ok(a(1)));
        assert_eq!(s.phase(), Phase::Redirecting);
        assert!(!s.client_data_flows(), "held while redirecting a pause");
        assert_eq!(s.backend(), a(2));
        assert_eq!(s.backend_before_pause(), Some(a(1)));
        assert_eq!(s.finish_redirect(), Ok(Phase::Paused));
        assert_eq!(s.phase(), Phase::Paused);
        s.begin_resume().expect("resume");
        let r = s.finish_resume(t0).expect("finish");
        assert_eq!(r.backend, a(2));
        assert_eq!(s.backend(), a(2));
    }

    #[test]
    fn redirect_while_active() {
        let mut s = ServiceState::new(a(1));
        assert!(s.client_data_flows());
        assert_eq!(s.begin_redirect(a(3)), Ok(a(1)));
        assert!(s.client_data_flows(), "an active redirect holds nothing");
        assert_eq!(s.finish_redirect(), Ok(Phase::Active));
        assert_eq!(s.backend(), a(3));
        assert_eq!(s.phase(), Phase::Active);
    }

    #[test]
    fn hold_timeout_resumes_toward_old_backend() {
        let t0 = Instant::now();
        let mut s = ServiceState::new(a(1));
        let t = s.begin_pause(t0, Q, HOLD).expect("pause");
        s.confirm_quiesced(t.id, t0).expect("confirm");
        s.begin_redirect(a(2)).expect("redirect");
        s.finish_redirect().expect("finish redirect");
        // Not yet due.
        assert_eq!(
            s.expire_hold(t.id, t0 + HOLD - Duration::from_millis(1)),
            None
        );
        assert_eq!(s.phase(), Phase::Paused);
        // Wrong id.
        assert_eq!(s.expire_hold(t.id + 1, t0 + HOLD), None);
        let e = s.expire_hold(t.id, t0 + HOLD).expect("expired");
        assert_eq!(e.backend, a(1));
        assert_eq!(e.abandoned_redirect, Some(a(2)));
        assert_eq!(e.held, HOLD);
        assert_eq!(s.phase(), Phase::Resuming);
        assert!(s.client_data_flows());
        assert_eq!(s.backend(), a(1));
        // A resume command now finds the transition.
        assert_eq!(s.begin_resume(), Err(StateError::Busy(Phase::Resuming)));
        let r = s.finish_resume(t0 + HOLD).expect("finish");
        assert!(r.expired);
        assert_eq!(r.backend, a(1));
        assert_eq!(s.phase(), Phase::Active);
        // Expiring again does nothing.
        assert_eq!(s.expire_hold(t.id, t0 + HOLD * 2), None);
    }

    #[test]
    fn hold_timeout_during_pausing_and_without_redirect() {
        let t0 = Instant::now();
        let mut s = ServiceState::new(a(1));
        let t = s.begin_pause(t0, HOLD, HOLD).expect("pause");
        let e = s.expire_hold(t.id, t0 + HOLD).expect("expired");
        assert_eq!(e.abandoned_redirect, None);
        assert_eq!(e.backend, a(1));
        // The pause waiter's confirmation is refused: it is no longer pausing.
        assert_eq!(
            s.confirm_quiesced(t.id, t0 + HOLD),
            Err(StateError::UnexpectedPhase {
                expected: Phase::Pausing,
                actual: Phase::Resuming
            })
        );
        let r = s.finish_resume(t0 + HOLD).expect("finish");
        assert!(!r.was_quiesced);
        assert!(r.expired);
    }

    #[test]
    fn hold_timeout_waits_for_a_transition() {
        let t0 = Instant::now();
        let mut s = ServiceState::new(a(1));
        let t = s.begin_pause(t0, Q, HOLD).expect("pause");
        s.confirm_quiesced(t.id, t0).expect("confirm");
        s.begin_redirect(a(2)).expect("redirect");
        assert_eq!(s.expire_hold(t.id, t0 + HOLD), None);
        assert_eq!(s.phase(), Phase::Redirecting);
        s.finish_redirect().expect("finish");
        assert!(s.expire_hold(t.id, t0 + HOLD).is_some());
    }

    #[test]
    fn resume_during_pausing_cancels_the_pause() {
        let t0 = Instant::now();
        let mut s = ServiceState::new(a(1));
        let t = s.begin_pause(t0, Q, HOLD).expect("pause");
        assert_eq!(s.begin_resume(), Ok(t.id));
        assert_eq!(
            s.confirm_quiesced(t.id, t0),
            Err(StateError::UnexpectedPhase {
                expected: Phase::Pausing,
                actual: Phase::Resuming
            })
        );
        let r = s.finish_resume(t0).expect("finish");
        assert!(!r.was_quiesced);
        assert_eq!(
            s.confirm_quiesced(t.id, t0),
            Err(StateError::StalePause(t.id))
        );
    }

    #[test]
    fn commands_in_wrong_states_are_refused_and_change_nothing() {
        let t0 = Instant::now();
        let mut s = ServiceState::new(a(1));
        // Active.
        assert_eq!(s.begin_resume(), Err(StateError::NotPaused));
        assert_eq!(
            s.finish_resume(t0),
            Err(StateError::UnexpectedPhase {
                expected: Phase::Resuming,
                actual: Phase::Active
            })
        );
        assert_eq!(
            s.finish_redirect(),
            Err(StateError::UnexpectedPhase {
                expected: Phase::Redirecting,
                actual: Phase::Active
            })
        );
        assert_eq!(s.phase(), Phase::Active);
        // Pausing.
        let t = s.begin_pause(t0, Q, HOLD).expect("pause");
        assert_eq!(
            s.begin_pause(t0, Q, HOLD),
            Err(StateError::AlreadyPaused(Phase::Pausing))
        );
        assert_eq!(s.begin_redirect(a(2)), Err(StateError::PauseInProgress));
        assert_eq!(s.backend(), a(1));
        assert_eq!(s.phase(), Phase::Pausing);
        // Paused.
        s.confirm_quiesced(t.id, t0).expect("confirm");
        assert_eq!(
            s.begin_pause(t0, Q, HOLD),
            Err(StateError::AlreadyPaused(Phase::Paused))
        );
        assert_eq!(
            s.fail_pause(t.id, t0),
            Err(StateError::UnexpectedPhase {
                expected: Phase::Pausing,
                actual: Phase::Paused
            })
        );
        assert_eq!(s.phase(), Phase::Paused);
        // Redirecting.
        s.begin_redirect(a(2)).expect("redirect");
        assert_eq!(
            s.begin_pause(t0, Q, HOLD),
            Err(StateError::Busy(Phase::Redirecting))
        );
        assert_eq!(
            s.begin_redirect(a(3)),
            Err(StateError::Busy(Phase::Redirecting))
        );
        assert_eq!(s.begin_resume(), Err(StateError::Busy(Phase::Redirecting)));
        assert_eq!(s.backend(), a(2));
        s.finish_redirect().expect("finish redirect");
        // Resuming.
        s.begin_resume().expect("resume");
        assert_eq!(
            s.begin_pause(t0, Q, HOLD),
            Err(StateError::Busy(Phase::Resuming))
        );
        assert_eq!(
            s.begin_redirect(a(3)),
            Err(StateError::Busy(Phase::Resuming))
        );
        assert_eq!(s.begin_resume(), Err(StateError::Busy(Phase::Resuming)));
        assert_eq!(
            s.finish_redirect(),
            Err(StateError::UnexpectedPhase {
                expected: Phase::Redirecting,
                actual: Phase::Resuming
            })
        );
        s.finish_resume(t0).expect("finish");
        assert_eq!(s.phase(), Phase::Active);
        assert_eq!(s.backend(), a(2));
    }

    #[test]
    fn phase_names() {
        for (p, n) in [
            (Phase::Active, "active"),
            (Phase::Pausing, "pausing"),
            (Phase::Paused, "paused"),
            (Phase::Redirecting, "redirecting"),
            (Phase::Resuming, "resuming"),
        ] {
            assert_eq!(p.to_string(), n);
            assert_eq!(serde_json::to_string(&p).expect("json"), format!("\"{n}\""));
        }
    }
}

//! Property tests: the flow state machine and the hold queue under random operation sequences,
//! each against a plain reference model written from their documentation.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tether_proxy::hold::{HoldLimits, HoldQueue, Usage};
use tether_proxy::metrics::DropReason;
use tether_proxy::state::{HoldExpired, PauseRecord, PauseTicket, ServiceState, StateError};
use tether_proxy::Phase;

fn backend(n: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, n], 7000))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

mod state_model {
    use super::*;

    /// Which pause a step names: the one in force (or the last one), or another id.
    #[derive(Debug, Clone, Copy)]
    pub enum Id {
        Current,
        Other(u64),
    }

    #[derive(Debug, Clone)]
    pub enum Op {
        BeginPause { quiesce_ms: u64, hold_ms: u64 },
        Confirm(Id),
        Fail(Id),
        BeginRedirect(u8),
        FinishRedirect,
        BeginResume,
        FinishResume,
        ExpireHold(Id),
        Advance(u64),
    }

    pub fn op() -> impl Strategy<Value = Op> {
        let id = prop_oneof![3 => Just(Id::Current), 1 => (0u64..6).prop_map(Id::Other)];
        prop_oneof![
            (1u64..200, 1u64..400).prop_map(|(quiesce_ms, hold_ms)| Op::BeginPause {
                quiesce_ms,
                hold_ms
            }),
            id.clone().prop_map(Op::Confirm),
            id.clone().prop_map(Op::Fail),
            (1u8..4).prop_map(Op::BeginRedirect),
            Just(Op::FinishRedirect),
            Just(Op::BeginResume),
            Just(Op::FinishResume),
            id.prop_map(Op::ExpireHold),
            (0u64..300).prop_map(Op::Advance),
        ]
    }

    #[derive(Debug, Clone, Copy)]
    struct Pause {
        id: u64,
        started: Instant,
        hold_deadline: Instant,
        backend_before: SocketAddr,
        quiesced: bool,
        expired: bool,
    }

    /// The reference: the phase diagram of `state`'s documentation, spelled out.
    #[derive(Debug)]
    pub struct Model {
        phase: Phase,
        /// In `Redirecting`: whether it started from `Paused`.
        redirect_from_paused: bool,
        backend: SocketAddr,
        pause: Option<Pause>,
        last_id: u64,
    }

    impl Model {
        pub fn new(b: SocketAddr) -> Model {
            Model {
                phase: Phase::Active,
                redirect_from_paused: false,
                backend: b,
                pause: None,
                last_id: 0,
            }
        }

        pub fn id(&self, id: Id) -> u64 {
            match id {
                Id::Current => self.pause.map_or(self.last_id, |p| p.id),
                Id::Other(n) => n,
            }
        }

        fn busy(&self) -> Option<StateError> {
            matches!(self.phase, Phase::Redirecting | Phase::Resuming)
                .then_some(StateError::Busy(self.phase))
        }

        pub fn begin_pause(
            &mut self,
            now: Instant,
            quiesce: Duration,
            hold: Duration,
        ) -> Result<PauseTicket, StateError> {
            match self.phase {
                Phase::Active => {}
                Phase::Pausing | Phase::Paused => {
                    return Err(StateError::AlreadyPaused(self.phase))
                }
                _ => return Err(self.busy().expect("a transition")),
            }
            self.last_id += 1;
            let ticket = PauseTicket {
                id: self.last_id,
                quiesce_deadline: now + quiesce.min(hold),
                hold_deadline: now + hold,
            };
            self.pause = Some(Pause {
                id: self.last_id,
                started: now,
                hold_deadline: ticket.hold_deadline,
                backend_before: self.backend,
                quiesced: false,
                expired: false,
            });
            self.phase = Phase::Pausing;
            Ok(ticket)
        }

        fn step_of(&self, id: u64) -> Result<Pause, StateError> {
            match self.pause {
                Some(p) if p.id == id => Ok(p),
                _ => Err(StateError::StalePause(id)),
            }
        }

        fn in_pausing(&self, id: u64) -> Result<Pause, StateError> {
            let p = self.step_of(id)?;
            if self.phase != Phase::Pausing {
                return Err(StateError::UnexpectedPhase {
                    expected: Phase::Pausing,
                    actual: self.phase,
                });
            }
            Ok(p)
        }

        pub fn confirm(&mut self, id: u64, now: Instant) -> Result<Duration, StateError> {
            let p = self.in_pausing(id)?;
            self.phase = Phase::Paused;
            self.pause = Some(Pause {
                quiesced: true,
                ..p
            });
            Ok(now - p.started)
        }

        pub fn fail(&mut self, id: u64, now: Instant) -> Result<Duration, StateError> {
            let p = self.in_pausing(id)?;
            self.phase = Phase::Active;
            self.pause = None;
            Ok(now - p.started)
        }

        pub fn begin_redirect(&mut self, to: SocketAddr) -> Result<SocketAddr, StateError> {
            match self.phase {
                Phase::Active | Phase::Paused => {}
                Phase::Pausing => return Err(StateError::PauseInProgress),
                _ => return Err(self.busy().expect("a transition")),
            }
            self.redirect_from_paused = self.phase == Phase::Paused;
            self.phase = Phase::Redirecting;
            Ok(std::mem::replace(&mut self.backend, to))
        }

        pub fn finish_redirect(&mut self) -> Result<Phase, StateError> {
            if self.phase != Phase::Redirecting {
                return Err(StateError::UnexpectedPhase {
                    expected: Phase::Redirecting,
                    actual: self.phase,
                });
            }
            self.phase = if self.redirect_from_paused {
                Phase::Paused
            } else {
                Phase::Active
            };
            Ok(self.phase)
        }

        pub fn begin_resume(&mut self) -> Result<u64, StateError> {
            match self.phase {
                Phase::Pausing | Phase::Paused => {}
                Phase::Active => return Err(StateError::NotPaused),
                _ => return Err(self.busy().expect("a transition")),
            }
            self.phase = Phase::Resuming;
            Ok(self.pause.expect("a pause in force").id)
        }

        pub fn finish_resume(&mut self, now: Instant) -> Result<PauseRecord, StateError> {
            if self.phase != Phase::Resuming {
                return Err(StateError::UnexpectedPhase {
                    expected: Phase::Resuming,
                    actual: self.phase,
                });
            }
            let p = self.pause.take().expect("a pause in force");
            self.phase = Phase::Active;
            Ok(PauseRecord {
                pause_id: p.id,
                held: now - p.started,
                was_quiesced: p.quiesced,
                expired: p.expired,
                backend: self.backend,
            })
        }

        pub fn expire_hold(&mut self, id: u64, now: Instant) -> Option<HoldExpired> {
            let p = self.step_of(id).ok()?;
            if now < p.hold_deadline || !matches!(self.phase, Phase::Pausing | Phase::Paused) {
                return None;
            }
            let abandoned = (self.backend != p.backend_before).then_some(self.backend);
            self.backend = p.backend_before;
            self.phase = Phase::Resuming;
            self.pause = Some(Pause { expired: true, ..p });
            Some(HoldExpired {
                pause_id: id,
                backend: p.backend_before,
                abandoned_redirect: abandoned,
                held: now - p.started,
            })
        }

        /// Compares everything the state machine shows, and checks the invariants.
        pub fn check(&self, s: &ServiceState, now: Instant) {
            assert_eq!(s.phase(), self.phase);
            assert_eq!(s.backend(), self.backend);
            assert_eq!(s.pause_id(), self.pause.map(|p| p.id));
            assert_eq!(
                s.backend_before_pause(),
                self.pause.map(|p| p.backend_before)
            );
            assert_eq!(s.hold_deadline(), self.pause.map(|p| p.hold_deadline));
            assert_eq!(s.held_for(now), self.pause.map(|p| now - p.started));
            let flows = match self.phase {
                Phase::Active | Phase::Resuming => true,
                Phase::Redirecting => !self.redirect_from_paused,
                _ => false,
            };
            assert_eq!(s.client_data_flows(), flows);
            // A pause is in force exactly in the phases of a pause.
            let pausing = matches!(self.phase, Phase::Pausing | Phase::Paused | Phase::Resuming)
                || (self.phase == Phase::Redirecting && self.redirect_from_paused);
            assert_eq!(s.pause_id().is_some(), pausing, "{:?}", self.phase);
        }
    }
}

mod hold_model {
    use super::*;

    #[derive(Debug, Clone)]
    pub enum Op {
        Push { flow: u8, len: usize },
        Advance(u64),
        Expire,
        Pop,
        RemoveFlow(u8),
        ReleaseAll,
    }

    pub fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..4, 0usize..40).prop_map(|(flow, len)| Op::Push { flow, len }),
            2 => (0u64..60).prop_map(Op::Advance),
            1 => Just(Op::Expire),
            1 => Just(Op::Pop),
            1 => (0u8..5).prop_map(Op::RemoveFlow),
            1 => Just(Op::ReleaseAll),
        ]
    }

    pub fn limits() -> impl Strategy<Value = HoldLimits> {
        (1usize..8, 0usize..120, 1usize..16, 0usize..300, 0u64..120).prop_map(
            |(flow_datagrams, flow_bytes, total_datagrams, total_bytes, age)| HoldLimits {
                flow_datagrams,
                flow_bytes,
                total_datagrams,
                total_bytes,
                max_age: ms(age),
            },
        )
    }

    /// A datagram: its flow, a serial number in its first bytes (to tell datagrams apart), its
    /// arrival time.
    pub type Dgram = (u8, Vec<u8>, Instant);

    pub fn payload(serial: u32, len: usize) -> Vec<u8> {
        let mut v = serial.to_be_bytes().repeat(len.div_ceil(4));
        v.truncate(len);
        v
    }

    pub fn usage<'a>(it: impl Iterator<Item = &'a Dgram>) -> Usage {
        it.fold(Usage::default(), |u, (_, d, _)| Usage {
            datagrams: u.datagrams + 1,
            bytes: u.bytes + d.len(),
        })
    }

    /// The reference: one FIFO, usage summed from it.
    pub fn expected_push(
        q: &VecDeque<Dgram>,
        l: &HoldLimits,
        flow: u8,
        len: usize,
    ) -> Result<(), DropReason> {
        let f = usage(q.iter().filter(|d| d.0 == flow));
        let t = usage(q.iter());
        if f.datagrams + 1 > l.flow_datagrams {
            Err(DropReason::HoldFlowDatagrams)
        } else if f.bytes + len > l.flow_bytes {
            Err(DropReason::HoldFlowBytes)
        } else if t.datagrams + 1 > l.total_datagrams {
            Err(DropReason::HoldTotalDatagrams)
        } else if t.bytes + len > l.total_bytes {
            Err(DropReason::HoldTotalBytes)
        } else {
            Ok(())
        }
    }

    pub fn check(q: &HoldQueue<u8>, m: &VecDeque<Dgram>, l: &HoldLimits) {
        let total = usage(m.iter());
        assert_eq!(q.usage(), total);
        assert!(total.datagrams <= l.total_datagrams && total.bytes <= l.total_bytes);
        for flow in 0..5 {
            let f = usage(m.iter().filter(|d| d.0 == flow));
            assert_eq!(q.flow_usage(&flow), f, "flow {flow}");
            assert!(f.datagrams <= l.flow_datagrams && f.bytes <= l.flow_bytes);
        }
        assert_eq!(q.is_empty(), m.is_empty());
        assert_eq!(q.next_expiry(), m.front().map(|d| d.2 + l.max_age));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn state_machine_matches_its_model(ops in proptest::collection::vec(state_model::op(), 1..80)) {
        use state_model::{Model, Op};
        let t0 = Instant::now();
        let mut now = t0;
        let mut s = ServiceState::new(backend(1));
        let mut m = Model::new(backend(1));
        let mut ids_seen = Vec::new();
        for op in ops {
            match op {
                Op::BeginPause { quiesce_ms, hold_ms } => {
                    let got = s.begin_pause(now, ms(quiesce_ms), ms(hold_ms));
                    prop_assert_eq!(&got, &m.begin_pause(now, ms(quiesce_ms), ms(hold_ms)));
                    if let Ok(t) = got {
                        // Pause ids are never reused.
                        prop_assert!(ids_seen.iter().all(|&i| i < t.id));
                        ids_seen.push(t.id);
                        prop_assert!(t.quiesce_deadline <= t.hold_deadline);
                    }
                }
                Op::Confirm(id) => {
                    let id = m.id(id);
                    prop_assert_eq!(s.confirm_quiesced(id, now), m.confirm(id, now));
                }
                Op::Fail(id) => {
                    let id = m.id(id);
                    prop_assert_eq!(s.fail_pause(id, now), m.fail(id, now));
                }
                Op::BeginRedirect(b) => {
                    prop_assert_eq!(s.begin_redirect(backend(b)), m.begin_redirect(backend(b)));
                }
                Op::FinishRedirect => prop_assert_eq!(s.finish_redirect(), m.finish_redirect()),
                Op::BeginResume => prop_assert_eq!(s.begin_resume(), m.begin_resume()),
                Op::FinishResume => prop_assert_eq!(s.finish_resume(now), m.finish_resume(now)),
                Op::ExpireHold(id) => {
                    let id = m.id(id);
                    prop_assert_eq!(s.expire_hold(id, now), m.expire_hold(id, now));
                }
                Op::Advance(n) => now += ms(n),
            }
            m.check(&s, now);
        }
    }

    #[test]
    fn hold_queue_matches_its_model(
        limits in hold_model::limits(),
        ops in proptest::collection::vec(hold_model::op(), 1..120),
    ) {
        use hold_model::{check, expected_push, payload, Dgram, Op};
        let t0 = Instant::now();
        let mut now = t0;
        let mut q: HoldQueue<u8> = HoldQueue::new(limits);
        let mut m: VecDeque<Dgram> = VecDeque::new();
        // Every datagram accepted, and every one that left the queue, in the order it left.
        let mut accepted: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut left: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut serial = 0u32;
        for op in ops {
            match op {
                Op::Push { flow, len } => {
                    serial += 1;
                    // Serial numbers make every datagram of 4 bytes or more unique.
                    let data = payload(serial, len.max(4));
                    let want = expected_push(&m, &limits, flow, data.len());
                    prop_assert_eq!(q.push(flow, data.clone(), now), want);
                    if want.is_ok() {
                        accepted.push((flow, data.clone()));
                        m.push_back((flow, data, now));
                    }
                }
                Op::Advance(n) => now += ms(n),
                Op::Expire => {
                    let old = m
                        .iter()
                        .take_while(|d| now.saturating_duration_since(d.2) > limits.max_age)
                        .count();
                    let gone: Vec<Dgram> = m.drain(..old).collect();
                    prop_assert_eq!(q.expire(now), hold_model::usage(gone.iter()));
                    left.extend(gone.into_iter().map(|(f, d, _)| (f, d)));
                }
                Op::Pop => {
                    let got = q.pop().map(|h| (h.flow, h.data, h.at));
                    let want = m.pop_front();
                    prop_assert_eq!(&got, &want);
                    left.extend(got.map(|(f, d, _)| (f, d)));
                }
                Op::RemoveFlow(flow) => {
                    let gone: Vec<Dgram> = m.iter().filter(|d| d.0 == flow).cloned().collect();
                    m.retain(|d| d.0 != flow);
                    prop_assert_eq!(q.remove_flow(&flow), hold_model::usage(gone.iter()));
                    left.extend(gone.into_iter().map(|(f, d, _)| (f, d)));
                }
                Op::ReleaseAll => {
                    // A resume: everything comes out once, in arrival order.
                    let released: Vec<(u8, Vec<u8>, Instant)> =
                        std::iter::from_fn(|| q.pop()).map(|h| (h.flow, h.data, h.at)).collect();
                    let want: Vec<Dgram> = m.drain(..).collect();
                    prop_assert_eq!(&released, &want);
                    left.extend(released.into_iter().map(|(f, d, _)| (f, d)));
                }
            }
            check(&q, &m, &limits);
        }
        // Nothing lost, nothing duplicated: what left plus what is still held is what came in,
        // each flow's datagrams in their order.
        left.extend(m.into_iter().map(|(f, d, _)| (f, d)));
        let mut a = accepted.clone();
        let mut l = left.clone();
        a.sort();
        l.sort();
        prop_assert_eq!(a, l);
        for flow in 0..4 {
            let of = |v: &[(u8, Vec<u8>)]| -> Vec<Vec<u8>> {
                v.iter().filter(|d| d.0 == flow).map(|d| d.1.clone()).collect()
            };
            prop_assert_eq!(of(&accepted), of(&left), "flow {}", flow);
        }
    }
}

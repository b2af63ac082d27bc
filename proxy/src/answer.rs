//! When the service answered after a resume: the first byte (TCP) and the first datagram (UDP)
//! it sent toward a client after the proxy released what it held.
//!
//! A migration's downtime, as a client sees it, ends there and not when CRIU's restore returns:
//! a lazily restored service may still be faulting its memory in, and an interpreted one may
//! take tens of milliseconds before its first reply. The data paths report every transfer
//! toward a client with [`AnswerWatch::seen`] (one relaxed load while nothing is awaited); the
//! resume arms the watch; `answered` on the control socket reads it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::api::AnswerReport;
use crate::metrics::ServiceMetrics;

/// A transport the service answers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Tcp = 0,
    Udp = 1,
}

/// See the [module documentation](self).
#[derive(Debug)]
pub(crate) struct AnswerWatch {
    /// Per transport: an answer is awaited (set on resume, cleared by the first answer).
    awaited: [AtomicBool; 2],
    last: Mutex<Option<Resumed>>,
    changed: Notify,
    /// Where the time from each resume to the first answer on any transport is observed.
    metrics: Arc<ServiceMetrics>,
}

#[derive(Debug, Clone, Copy)]
struct Resumed {
    at: Instant,
    /// Per transport: it had flows when the resume came (an answer can be expected).
    expected: [bool; 2],
    first: [Option<Duration>; 2],
}

impl AnswerWatch {
    pub fn new(metrics: Arc<ServiceMetrics>) -> AnswerWatch {
        AnswerWatch {
            awaited: Default::default(),
            last: Mutex::new(None),
            changed: Notify::new(),
            metrics,
        }
    }

    /// A resume released the held data at `at`; `tcp`/`udp`: the service had flows of that
    /// transport then.
    pub fn armed(&self, at: Instant, tcp: bool, udp: bool) {
        let mut last = self.lock();
        *last = Some(Resumed {
            at,
            expected: [tcp, udp],
            first: [None, None],
        });
        for a in &self.awaited {
            a.store(true, Ordering::Release);
        }
    }

    /// Data went from the service toward a client on `t`.
    pub fn seen(&self, t: Transport) {
        let flag = &self.awaited[t as usize];
        if !flag.load(Ordering::Relaxed) || !flag.swap(false, Ordering::AcqRel) {
            return;
        }
        let now = Instant::now();
        let mut last = self.lock();
        let Some(r) = last.as_mut() else { return };
        if r.first[t as usize].is_some() {
            return;
        }
        let took = now.saturating_duration_since(r.at);
        if r.first.iter().all(Option::is_none) {
            self.metrics.first_answer.observe(took);
        }
        r.first[t as usize] = Some(took);
        drop(last);
        self.changed.notify_waiters();
    }

    /// The answers to the last resume, once every transport that had flows has answered, or at
    /// `timeout` after the resume with what came by then. `None`: no resume yet.
    pub async fn answered(&self, timeout: Duration) -> Option<AnswerReport> {
        loop {
            // Register before looking, so that an answer between the look and the wait wakes.
            let changed = self.changed.notified();
            let r = (*self.lock())?;
            let complete = (0..2).all(|t| !r.expected[t] || r.first[t].is_some());
            let deadline = r.at + timeout;
            let now = Instant::now();
            if complete || now >= deadline {
                return Some(report(&r, now));
            }
            let _ = tokio::time::timeout(deadline - now, changed).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Resumed>> {
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn report(r: &Resumed, now: Instant) -> AnswerReport {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    AnswerReport {
        resumed_ms_ago: ms(now.saturating_duration_since(r.at)),
        tcp_expected: r.expected[0],
        udp_expected: r.expected[1],
        first_tcp_ms: r.first[0].map(ms),
        first_udp_ms: r.first[1].map(ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nothing_before_a_resume_and_only_the_first_answer_per_transport_counts() {
        let w = AnswerWatch::new(Arc::default());
        w.seen(Transport::Tcp);
        assert!(w.answered(Duration::ZERO).await.is_none());

        let at = Instant::now();
        w.armed(at, true, true);
        std::thread::sleep(Duration::from_millis(5));
        w.seen(Transport::Tcp);
        let first = w.answered(Duration::ZERO).await.expect("resumed");
        assert!(first.tcp_expected && first.udp_expected);
        let tcp = first.first_tcp_ms.expect("a TCP answer");
        assert!(tcp >= 5.0, "{tcp}");
        assert_eq!(first.first_udp_ms, None, "no datagram yet");

        std::thread::sleep(Duration::from_millis(5));
        w.seen(Transport::Tcp);
        w.seen(Transport::Udp);
        let both = w.answered(Duration::ZERO).await.expect("resumed");
        assert_eq!(both.first_tcp_ms, Some(tcp), "later bytes do not count");
        assert!(both.first_udp_ms.expect("a datagram") >= tcp + 5.0);
        assert_eq!(
            w.metrics.first_answer.count(),
            1,
            "one observation per resume"
        );
    }

    #[tokio::test]
    async fn answered_waits_for_every_transport_that_had_flows_or_the_timeout() {
        let w = Arc::new(AnswerWatch::new(Arc::default()));
        w.armed(Instant::now(), false, true);
        let waiter = {
            let w = w.clone();
            tokio::spawn(async move { w.answered(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "no datagram yet");
        w.seen(Transport::Udp);
        let r = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("answered once the only expected transport answered")
            .expect("task")
            .expect("resumed");
        assert!(r.first_udp_ms.is_some() && !r.tcp_expected);

        w.armed(Instant::now(), true, false);
        let r = w
            .answered(Duration::from_millis(30))
            .await
            .expect("resumed");
        assert_eq!(r.first_tcp_ms, None, "no answer within the timeout");
        assert!(r.resumed_ms_ago >= 30.0, "{}", r.resumed_ms_ago);
    }
}

//! The queue of client-to-service datagrams held while a service is paused: pure code, time
//! passed in.
//!
//! One FIFO for all flows of a UDP listener keeps the arrival order (every flow's datagrams stay
//! in order, and the oldest datagram is always at the front, which makes the age limit cheap),
//! with usage counted per flow and in total. A release drains it round-robin across flows
//! ([`HoldQueue::drain_round_robin`]): every flow's first datagram, then every flow's second, ... Limits are by datagrams, bytes and
//! age; a datagram over a limit is refused (the newest is dropped, so what is held stays a prefix
//! of what the client sent), and too old datagrams are discarded from the front.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::metrics::DropReason;

/// Limits of a [`HoldQueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldLimits {
    /// Most datagrams held for one flow.
    pub flow_datagrams: usize,
    /// Most payload bytes held for one flow.
    pub flow_bytes: usize,
    /// Most datagrams held in all.
    pub total_datagrams: usize,
    /// Most payload bytes held in all.
    pub total_bytes: usize,
    /// Oldest a held datagram may get; older ones are discarded.
    pub max_age: Duration,
}

/// Datagrams and bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Number of datagrams.
    pub datagrams: usize,
    /// Payload bytes.
    pub bytes: usize,
}

impl Usage {
    fn add(&mut self, len: usize) {
        self.datagrams += 1;
        self.bytes += len;
    }
    fn sub(&mut self, len: usize) {
        self.datagrams = self.datagrams.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(len);
    }
}

/// One held datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held<K> {
    /// The flow it belongs to.
    pub flow: K,
    /// Its payload.
    pub data: Vec<u8>,
    /// When it was held.
    pub at: Instant,
}

/// Held datagrams of many flows, in arrival order, with limits.
#[derive(Debug)]
pub struct HoldQueue<K> {
    limits: HoldLimits,
    queue: VecDeque<Held<K>>,
    per_flow: HashMap<K, Usage>,
    total: Usage,
}

impl<K: Copy + Eq + Hash> HoldQueue<K> {
    /// An empty queue.
    pub fn new(limits: HoldLimits) -> HoldQueue<K> {
        HoldQueue {
            limits,
            queue: VecDeque::new(),
            per_flow: HashMap::new(),
            total: Usage::default(),
        }
    }

    /// The limits.
    pub fn limits(&self) -> HoldLimits {
        self.limits
    }

    /// What is held in all.
    pub fn usage(&self) -> Usage {
        self.total
    }

    /// What is held for `flow`.
    pub fn flow_usage(&self, flow: &K) -> Usage {
        self.per_flow.get(flow).copied().unwrap_or_default()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Holds `data` for `flow`, or says which limit refused it (nothing changes then). Call
    /// [`expire`](Self::expire) first, so that datagrams past their age free their room.
    pub fn push(&mut self, flow: K, data: Vec<u8>, now: Instant) -> Result<(), DropReason> {
        let len = data.len();
        let f = self.flow_usage(&flow);
        if f.datagrams + 1 > self.limits.flow_datagrams {
            return Err(DropReason::HoldFlowDatagrams);
        }
        if f.bytes + len > self.limits.flow_bytes {
            return Err(DropReason::HoldFlowBytes);
        }
        if self.total.datagrams + 1 > self.limits.total_datagrams {
            return Err(DropReason::HoldTotalDatagrams);
        }
        if self.total.bytes + len > self.limits.total_bytes {
            return Err(DropReason::HoldTotalBytes);
        }
        self.per_flow.entry(flow).or_default().add(len);
        self.total.add(len);
        self.queue.push_back(Held {
            flow,
            data,
            at: now,
        });
        Ok(())
    }

    /// Discards datagrams held longer than the maximum age at `now` (strictly older). Returns
    /// what was discarded.
    pub fn expire(&mut self, now: Instant) -> Usage {
        let mut dropped = Usage::default();
        while let Some(front) = self.queue.front() {
            if now.saturating_duration_since(front.at) <= self.limits.max_age {
                break;
            }
            if let Some(h) = self.pop() {
                dropped.add(h.data.len());
            }
        }
        dropped
    }

    /// When the oldest held datagram passes the maximum age.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.queue.front().map(|h| h.at + self.limits.max_age)
    }

    /// Takes the oldest held datagram.
    pub fn pop(&mut self) -> Option<Held<K>> {
        let h = self.queue.pop_front()?;
        let len = h.data.len();
        self.total.sub(len);
        if let Some(u) = self.per_flow.get_mut(&h.flow) {
            u.sub(len);
            if u.datagrams == 0 {
                self.per_flow.remove(&h.flow);
            }
        }
        Some(h)
    }

    /// Takes everything held, in release order: round-robin across flows (each flow's first
    /// datagram, flows in the order of their first, then each flow's second, ...), each flow's
    /// datagrams in their order. Returns them and what they add up to.
    pub fn drain_round_robin(&mut self) -> (Vec<Held<K>>, Usage) {
        let total = self.total;
        let mut per_flow: HashMap<K, VecDeque<Held<K>>> = HashMap::new();
        let mut order: Vec<K> = Vec::new();
        for h in self.queue.drain(..) {
            per_flow
                .entry(h.flow)
                .or_insert_with(|| {
                    order.push(h.flow);
                    VecDeque::new()
                })
                .push_back(h);
        }
        self.per_flow.clear();
        self.total = Usage::default();
        let mut out = Vec::with_capacity(total.datagrams);
        while out.len() < total.datagrams {
            for flow in &order {
                if let Some(h) = per_flow.get_mut(flow).and_then(VecDeque::pop_front) {
                    out.push(h);
                }
            }
        }
        (out, total)
    }

    /// Discards everything held for `flow`. Returns what was discarded.
    pub fn remove_flow(&mut self, flow: &K) -> Usage {
        let Some(u) = self.per_flow.remove(flow) else {
            return Usage::default();
        };
        self.queue.retain(|h| h.flow != *flow);
        self.total.datagrams = self.total.datagrams.saturating_sub(u.datagrams);
        self.total.bytes = self.total.bytes.saturating_sub(u.bytes);
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HoldLimits {
        HoldLimits {
            flow_datagrams: 3,
            flow_bytes: 100,
            total_datagrams: 5,
            total_bytes: 150,
            max_age: Duration::from_millis(100),
        }
    }

    #[test]
    fn drains_round_robin_across_flows_each_in_order() {
        let t = Instant::now();
        let mut q = HoldQueue::new(HoldLimits {
            flow_datagrams: 10,
            total_datagrams: 10,
            ..limits()
        });
        for (flow, d) in [(1, 10), (1, 11), (2, 20), (1, 12), (3, 30), (2, 21)] {
            q.push(flow, vec![d], t).expect("push");
        }
        let (out, total) = q.drain_round_robin();
        let got: Vec<u8> = out.iter().map(|h| h.data[0]).collect();
        assert_eq!(got, [10, 20, 30, 11, 21, 12]);
        assert_eq!(
            total,
            Usage {
                datagrams: 6,
                bytes: 6
            }
        );
        assert!(q.is_empty());
        assert_eq!(q.usage(), Usage::default());
        assert_eq!(q.flow_usage(&1), Usage::default());
    }

    #[test]
    fn keeps_arrival_order_across_flows() {
        let t = Instant::now();
        let mut q = HoldQueue::new(limits());
        q.push(1, vec![1], t).expect("push");
        q.push(2, vec![2], t).expect("push");
        q.push(1, vec![3], t).expect("push");
        assert_eq!(
            q.usage(),
            Usage {
                datagrams: 3,
                bytes: 3
            }
        );
        assert_eq!(
            q.flow_usage(&1),
            Usage {
                datagrams: 2,
                bytes: 2
            }
        );
        let order: Vec<_> = std::iter::from_fn(|| q.pop())
            .map(|h| (h.flow, h.data[0]))
            .collect();
        assert_eq!(order, vec![(1, 1), (2, 2), (1, 3)]);
        assert!(q.is_empty());
        assert_eq!(q.usage(), Usage::default());
        assert_eq!(q.flow_usage(&1), Usage::default());
    }

    #[test]
    fn per_flow_limits_refuse_and_change_nothing() {
        let t = Instant::now();
        let mut q = HoldQueue::new(limits());
        for i in 0..3 {
            q.push(1, vec![i; 10], t).expect("push");
        }
        assert_eq!(q.push(1, vec![0; 1], t), Err(DropReason::HoldFlowDatagrams));
        assert_eq!(
            q.flow_usage(&1),
            Usage {
                datagrams: 3,
                bytes: 30
            }
        );
        // Another flow is not affected by flow 1's limit.
        q.push(2, vec![0; 60], t).expect("push");
        assert_eq!(q.push(2, vec![0; 41], t), Err(DropReason::HoldFlowBytes));
        q.push(2, vec![0; 40], t).expect("exactly at the limit");
        assert_eq!(
            q.usage(),
            Usage {
                datagrams: 5,
                bytes: 130
            }
        );
    }

    #[test]
    fn total_limits_refuse() {
        let t = Instant::now();
        let mut q = HoldQueue::new(limits());
        q.push(1, vec![0; 70], t).expect("push");
        q.push(2, vec![0; 70], t).expect("push");
        assert_eq!(q.push(3, vec![0; 11], t), Err(DropReason::HoldTotalBytes));
        q.push(3, vec![0; 10], t).expect("push");
        q.push(4, vec![], t).expect("push");
        q.push(5, vec![], t).expect("push");
        assert_eq!(q.push(6, vec![], t), Err(DropReason::HoldTotalDatagrams));
        assert_eq!(
            q.usage(),
            Usage {
                datagrams: 5,
                bytes: 150
            }
        );
    }

    #[test]
    fn expires_by_age_from_the_front() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut q = HoldQueue::new(limits());
        q.push(1, vec![0; 5], t).expect("push");
        q.push(2, vec![0; 6], t + ms(50)).expect("push");
        assert_eq!(q.next_expiry(), Some(t + ms(100)));
        assert_eq!(q.expire(t + ms(100)), Usage::default());
        assert_eq!(
            q.expire(t + ms(101)),
            Usage {
                datagrams: 1,
                bytes: 5
            }
        );
        assert_eq!(q.flow_usage(&1), Usage::default());
        assert_eq!(q.next_expiry(), Some(t + ms(150)));
        assert_eq!(
            q.expire(t + ms(500)),
            Usage {
                datagrams: 1,
                bytes: 6
            }
        );
        assert!(q.is_empty());
        assert_eq!(q.next_expiry(), None);
    }

    #[test]
    fn remove_flow_discards_only_that_flow() {
        let t = Instant::now();
        let mut q = HoldQueue::new(limits());
        q.push(1, vec![1; 5], t).expect("push");
        q.push(2, vec![2; 7], t).expect("push");
        q.push(1, vec![3; 5], t).expect("push");
        assert_eq!(
            q.remove_flow(&1),
            Usage {
                datagrams: 2,
                bytes: 10
            }
        );
        assert_eq!(q.remove_flow(&1), Usage::default());
        assert_eq!(
            q.usage(),
            Usage {
                datagrams: 1,
                bytes: 7
            }
        );
        assert_eq!(q.pop().map(|h| h.flow), Some(2));
    }
}

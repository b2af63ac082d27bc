//! What a service shares with its TCP flows: its name, limits and counters, the gate on
//! client-to-service data (which carries the backend new flows go to), and the signal a flow
//! gives when it stops reading from its client.
//!
//! The service (its coordinator in `service.rs`) sets the gate from its pure state; the flows
//! (`tcp.rs`) only read it, and neither side needs the other's module.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};

use crate::answer::AnswerWatch;
use crate::config::Limits;
use crate::metrics::{GlobalMetrics, ServiceMetrics};

#[derive(Debug)]
pub(crate) struct FlowCtx {
    pub name: String,
    pub limits: Limits,
    pub metrics: Arc<ServiceMetrics>,
    pub global: Arc<GlobalMetrics>,
    /// When the service answered after a resume; shared with its UDP listeners.
    pub answers: Arc<AnswerWatch>,
    /// Flow ids, shared with the service's UDP listeners.
    ids: Arc<AtomicU64>,
    /// Open (`Some(backend)`: where new flows go) while client-to-service data may flow.
    gate: watch::Sender<Option<SocketAddr>>,
    /// Signalled when a flow stops reading from its client (for a pause waiting to quiesce).
    parked: Notify,
}

impl FlowCtx {
    pub fn new(
        name: String,
        backend: SocketAddr,
        limits: Limits,
        ids: Arc<AtomicU64>,
        metrics: Arc<ServiceMetrics>,
        global: Arc<GlobalMetrics>,
        answers: Arc<AnswerWatch>,
    ) -> FlowCtx {
        FlowCtx {
            name,
            limits,
            metrics,
            global,
            answers,
            ids,
            gate: watch::Sender::new(Some(backend)),
            parked: Notify::new(),
        }
    }

    pub fn next_flow_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Follows the gate: `Some(backend)` while client-to-service data may flow, with where new
    /// flows go.
    pub fn watch_gate(&self) -> watch::Receiver<Option<SocketAddr>> {
        self.gate.subscribe()
    }

    /// Sets whether client data may flow and where new flows go, as one value. Receivers are
    /// woken only when the gate opens or closes. The service calls this with its state locked,
    /// after every change of it.
    pub fn publish(&self, backend: SocketAddr, open: bool) {
        self.gate.send_if_modified(|g| {
            let was_open = g.is_some();
            *g = open.then_some(backend);
            was_open != open
        });
    }

    /// Tells a waiting pause that a flow has stopped reading from its client.
    pub fn notify_parked(&self) {
        self.parked.notify_one();
    }

    /// Resolves when a flow has stopped reading from its client.
    pub fn parked(&self) -> Notified<'_> {
        self.parked.notified()
    }
}

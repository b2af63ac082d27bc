//! What a service shares with its TCP flows: its name, limits and counters, the gate on
//! client-to-service data, the backend new flows go to, and the signal a flow gives when it
//! stops reading from its client.
//!
//! The service (its coordinator in `service.rs`) sets the gate and the backend from its pure
//! state; the flows (`tcp.rs`) only read them, and neither side needs the other's module.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::futures::Notified;
use tokio::sync::{watch, Notify};

use crate::config::Limits;
use crate::metrics::{GlobalMetrics, ServiceMetrics};

#[derive(Debug)]
pub(crate) struct FlowCtx {
    pub name: String,
    pub limits: Limits,
    pub metrics: Arc<ServiceMetrics>,
    pub global: Arc<GlobalMetrics>,
    /// Flow ids, shared with the service's UDP listeners.
    ids: Arc<AtomicU64>,
    /// Open (`true`) while client-to-service data may flow.
    gate: watch::Sender<bool>,
    /// Where new flows go.
    backend: Mutex<SocketAddr>,
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
    ) -> FlowCtx {
        FlowCtx {
            name,
            limits,
            metrics,
            global,
            ids,
            gate: watch::Sender::new(true),
            backend: Mutex::new(backend),
            parked: Notify::new(),
        }
    }

    pub fn next_flow_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Where new flows go.
    pub fn backend(&self) -> SocketAddr {
        *self.backend.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the gate: `true` while client-to-service data may flow.
    pub fn watch_gate(&self) -> watch::Receiver<bool> {
        self.gate.subscribe()
    }

    /// Sets where new flows go and whether client data may flow, in that order: a flow that
    /// sees the gate open reads the backend after it, so it never gets one older than the
    /// state that opened the gate. The service calls this with its state locked, after every
    /// change of it.
    pub fn publish(&self, backend: SocketAddr, open: bool) {
        *self.backend.lock().unwrap_or_else(|e| e.into_inner()) = backend;
        self.gate
            .send_if_modified(|g| std::mem::replace(g, open) != open);
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

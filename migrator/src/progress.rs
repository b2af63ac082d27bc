//! Progress of long transfers: while a [`Progress`] lives, a task logs once a second how many
//! bytes the QUIC connection has put on the wire since it started, and at what rate. It reads
//! the connection's own counters, so it costs the transfer nothing and counts what left, not
//! what was buffered (quinn buffers up to its send window, tens of MiB, at once).

use std::time::{Duration, Instant};

use tracing::info;

/// How often progress is logged.
pub const EVERY: Duration = Duration::from_secs(1);

/// Logs the progress of `what` until dropped.
#[derive(Debug)]
pub struct Progress(tokio::task::JoinHandle<()>);

impl Progress {
    /// Starts logging the bytes `conn` sends from now on, as `what`; the first line comes after
    /// [`EVERY`], so short transfers log nothing.
    pub fn start(conn: &quinn::Connection, what: String) -> Progress {
        let conn = conn.clone();
        let base = conn.stats().udp_tx.bytes;
        let started = Instant::now();
        Progress(tokio::spawn(async move {
            let first = tokio::time::Instant::from_std(started + EVERY);
            let mut tick = tokio::time::interval_at(first, EVERY);
            loop {
                tick.tick().await;
                let sent = conn.stats().udp_tx.bytes.saturating_sub(base);
                let secs = started.elapsed().as_secs_f64();
                info!(
                    sent_mib = format_args!("{:.1}", sent as f64 / f64::from(1u32 << 20)),
                    mbit_s = format_args!("{:.1}", sent as f64 * 8.0 / secs / 1e6),
                    elapsed_s = format_args!("{secs:.0}"),
                    "{what}: in progress"
                );
            }
        }))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.abort();
    }
}

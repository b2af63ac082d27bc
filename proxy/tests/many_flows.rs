//! 1,000 concurrent TCP flows through the proxy, paused and resumed together, with bounded
//! memory. Its own test binary, so that the process's RSS reflects this test alone.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const FLOWS: usize = 1000;
const PER_FLOW: usize = 64 * 1024;
const BUF: usize = 16 * 1024;
const BLOCK: usize = 4096;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// An echo backend with small buffers, so that the measurement is the proxy's.
async fn small_echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                let mut buf = [0u8; 2048];
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if wr.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = wr.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_flows_relay_exactly_with_bounded_memory() {
    // Four descriptors per flow in this process (client, proxy ×2, backend).
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            hard.min(65536),
            hard,
        );
    }
    let backend = small_echo().await;
    let mut cfg = service("s", backend);
    cfg.udp_listen.clear();
    cfg.limits.tcp_buffer_bytes = BUF;
    let p = start(vec![cfg]).await;
    let h = p.proxy.handle();
    let global = h.global_metrics();
    let rss_before = rss_bytes();

    // Open every connection first, so that all 1,000 flows exist at once.
    let mut conns = Vec::with_capacity(FLOWS);
    for _ in 0..FLOWS {
        conns.push(connect(p.tcp("s")).await);
    }
    let m = h.metrics("s").expect("metrics");
    eventually("1000 flows", Duration::from_secs(20), || {
        m.tcp_flows.get() == FLOWS as i64
    })
    .await;

    // Pause and resume them all together.
    let report = h
        .pause("s", Some(Duration::from_secs(5)))
        .await
        .expect("1000 idle flows quiesce");
    assert_eq!(report.tcp_flows, FLOWS as u64);
    h.resume("s").await.expect("resume");

    // Track the peak of allocated copy buffers while everything transfers at once.
    let peak = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (peak, global) = (peak.clone(), global.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(global.tcp_buffer_bytes.get(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let start = tokio::sync::Barrier::new(FLOWS);
    let start = Arc::new(start);
    let mut tasks = Vec::with_capacity(FLOWS);
    for (i, c) in conns.into_iter().enumerate() {
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            // The stream is made of 4 KiB blocks generated on the fly (and again to check), so
            // that the test itself holds little memory per flow.
            let block = |k: usize| random_bytes((i * 1000 + k) as u64, BLOCK);
            let (mut rd, mut wr) = c.into_split();
            start.wait().await;
            let writer = async {
                for k in 0..PER_FLOW / BLOCK {
                    wr.write_all(&block(k)).await.expect("write");
                }
                wr.shutdown().await.expect("shutdown");
            };
            let reader = async {
                let mut got = vec![0u8; BLOCK];
                for k in 0..PER_FLOW / BLOCK {
                    rd.read_exact(&mut got).await.expect("read");
                    assert!(got == block(k), "flow {i}: block {k} differs");
                }
                assert_eq!(
                    rd.read(&mut got).await.expect("eof"),
                    0,
                    "flow {i}: extra bytes"
                );
            };
            tokio::join!(reader, writer);
        }));
    }
    let mut rss_peak = 0;
    for t in tasks {
        t.await.expect("flow verified");
        rss_peak = rss_peak.max(rss_bytes());
    }
    sampler.abort();
    peak.fetch_max(global.tcp_buffer_bytes.get(), Ordering::Relaxed);
    let peak = peak.load(Ordering::Relaxed);
    let bound = (FLOWS * 2 * BUF) as i64;
    let rss_growth = rss_peak.saturating_sub(rss_before);
    eprintln!(
        "peak copy buffers {} KiB (bound {} KiB); RSS growth {} MiB",
        peak / 1024,
        bound / 1024,
        rss_growth >> 20
    );
    assert!(peak > 0 && peak <= bound, "copy buffers {peak} > {bound}");
    // Copy buffers (32 MiB at most) plus task state of the proxy, the clients and the backend.
    assert!(
        rss_growth < 96 << 20,
        "RSS grew by {} MiB",
        rss_growth >> 20
    );
    assert_eq!(m.tcp_bytes_to_service.get(), (FLOWS * PER_FLOW) as u64);
    assert_eq!(m.tcp_bytes_to_client.get(), (FLOWS * PER_FLOW) as u64);
    eventually("flows closed", Duration::from_secs(20), || {
        m.tcp_flows.get() == 0
    })
    .await;
    eventually("buffers freed", Duration::from_secs(20), || {
        global.tcp_buffer_bytes.get() == 0
    })
    .await;
}

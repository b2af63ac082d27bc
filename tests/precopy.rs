//! Integration tests of iterative pre-copy (no soft-dirty: content hashing), convergence,
//! auto-converge, cancellation, and the destination's checks of page frames. Real CRIU, real
//! namespaces, real QUIC; they need root and `scripts/setup.sh`, and fail when those are missing.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{assert_clean, scenario, wait_for_log};
use tether::scenario::ScenarioConfig;
use tether::testbed::Host;
use tether_migrator::report::Report;

fn rounds(r: &Report) -> String {
    r.precopy
        .rounds
        .iter()
        .map(|x| {
            format!(
                "r{} sent {} ({:.0} ms)",
                x.round, x.pages_sent, x.duration_ms
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn precopy_of_128_mib_writing_2000_pages_per_second_over_1_gbit() {
    let mut s = scenario(&ScenarioConfig {
        link_rate: Some(1_000_000_000),
        state_mb: 128,
        dirty_pages_per_sec: 2000,
        proxy: false,
        full_restore_on: Vec::new(),
        proxy_max_hold_ms: None,
        hot_first_mib: None,
        interpreted: false,
        container: false,
        container_args: Vec::new(),
        workers: 0,
        lazy_pages_from: None,
    });
    let clients = s
        .start_clients(8, 2, Duration::from_secs(8), None)
        .expect("clients");
    std::thread::sleep(Duration::from_millis(1500));
    let r = s.migrate(Host::Dst).expect("pre-copy migration");
    s.verify_state().expect("state verifies after the move");
    let c = clients.finish().expect("client report");
    let fin = r.precopy.final_difference.expect("final difference");
    let state_pages = 128 * 256;
    println!(
        "rounds: {}; stop: {:?}; final difference {} of {} dumped pages; downtime {:.1} ms; \
         client stall tcp {:.1} ms quic {:.1} ms; timings {:?}",
        rounds(&r),
        r.precopy.stop_reason,
        fin.pages_sent,
        fin.pages_dumped,
        r.timings.downtime_ms,
        c.tcp.max_stall_ms,
        c.quic.max_stall_ms,
        r.timings
    );
    assert_clean(&c, "pre-copy");
    assert!(r.precopy.rounds.len() > 1, "more than one round");
    assert!(
        r.precopy.rounds[0].pages_sent >= state_pages,
        "round 0 sends the state"
    );
    assert!(
        fin.pages_sent * 10 < state_pages,
        "final difference ({}) far smaller than the state ({state_pages} pages)",
        fin.pages_sent
    );
}

#[test]
fn a_dirtier_faster_than_the_link_hits_max_rounds_and_auto_converge_converges_earlier() {
    // 32 MiB rewritten at 50,000 random pages/s (the dirtier is CPU-bound) over 100 Mbit/s
    // (~3,000 pages/s): every round finds nearly the whole state dirty again, ~2.7 s of it on
    // the wire, so a 1 s downtime limit is out of reach without a throttle. A CPU cut slows
    // the dirtier in proportion, which is what auto-converge relies on.
    let mut s = scenario(&ScenarioConfig {
        link_rate: Some(100_000_000),
        state_mb: 32,
        dirty_pages_per_sec: 50_000,
        proxy: false,
        full_restore_on: Vec::new(),
        proxy_max_hold_ms: None,
        hot_first_mib: None,
        interpreted: false,
        container: false,
        container_args: Vec::new(),
        workers: 0,
        lazy_pages_from: None,
    });
    let clients = s
        .start_clients(2, 1, Duration::from_secs(30), None)
        .expect("clients");
    std::thread::sleep(Duration::from_millis(500));
    let plain = s
        .migrate_with(
            Host::Dst,
            None,
            // It sends ~33 MB while frozen (~2.7 s at 100 Mbit/s): room for a loaded machine.
            &[
                "--max-rounds",
                "3",
                "--downtime-limit",
                "1s",
                "--max-frozen",
                "15s",
            ],
        )
        .expect("run migrate");
    assert!(plain.success, "{}", plain.stderr);
    // Rounds of ~2.7 s report their progress while they send.
    assert!(
        plain.stderr.contains("pre-copy round 1: in progress"),
        "progress of long rounds is shown: {}",
        plain.stderr
    );
    let plain = plain.report.expect("report");
    s.verify_state()
        .expect("state verifies after the capped pre-copy");
    println!(
        "without auto-converge: {}; stop {:?}",
        rounds(&plain),
        plain.precopy.stop_reason
    );
    assert_eq!(plain.precopy.stop_reason.as_deref(), Some("MaxRounds"));
    assert_eq!(plain.precopy.rounds.len(), 3);
    assert!(plain.precopy.max_throttle.is_none());

    let conv = s
        .migrate_with(
            Host::Src,
            None,
            &[
                "--max-rounds",
                "12",
                "--downtime-limit",
                "1s",
                "--auto-converge",
                "--throttle-initial",
                "60",
                "--throttle-increment",
                "20",
            ],
        )
        .expect("run migrate");
    assert!(conv.success, "{}", conv.stderr);
    let conv = conv.report.expect("report");
    s.verify_state()
        .expect("state verifies after auto-converge");
    let c = clients.finish().expect("client report");
    println!(
        "with auto-converge: {}; stop {:?}; throttle up to {:?}%",
        rounds(&conv),
        conv.precopy.stop_reason,
        conv.precopy.max_throttle
    );
    assert_clean(&c, "fast dirtier");
    assert!(
        conv.precopy.max_throttle.is_some(),
        "the service was throttled"
    );
    assert_eq!(
        conv.precopy.stop_reason.as_deref(),
        Some("DowntimeUnderLimit"),
        "auto-converge reaches the downtime limit before the round cap"
    );
    let fin = |r: &Report| {
        r.precopy
            .final_difference
            .as_ref()
            .map_or(0, |f| f.pages_sent)
    };
    assert!(
        fin(&conv) < fin(&plain),
        "a smaller final difference with auto-converge ({} vs {})",
        fin(&conv),
        fin(&plain)
    );
    // The throttle is gone: no tether cgroup remains.
    let left: Vec<_> = std::fs::read_dir("/sys/fs/cgroup/cpu")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("tether-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "throttle cgroups left: {left:?}");
}

#[test]
fn cancelling_during_precopy_leaves_the_service_untouched() {
    // 96 MiB over 50 Mbit/s: round 0 alone takes about 15 s.
    let mut s = scenario(&ScenarioConfig {
        link_rate: Some(50_000_000),
        state_mb: 96,
        dirty_pages_per_sec: 100,
        proxy: false,
        full_restore_on: Vec::new(),
        proxy_max_hold_ms: None,
        hot_first_mib: None,
        interpreted: false,
        container: false,
        container_args: Vec::new(),
        workers: 0,
        lazy_pages_from: None,
    });
    let pid = s.pid();
    let clients = s
        .start_clients(4, 1, Duration::from_secs(5), None)
        .expect("clients");
    let child = s
        .migrate_command(Host::Dst, &s.certs(Host::Src))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn migrate");
    std::thread::sleep(Duration::from_millis(2500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let out = child.wait_with_output().expect("migrate exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(!out.status.success());
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert!(stderr.contains("Nothing was changed"), "{stderr}");
    assert_eq!(s.pid(), pid);
    assert!(s.service_alive());
    s.verify_state().expect("state intact");
    assert_clean(&clients.finish().expect("client report"), "cancel");
    // The agent dropped what it had received and changed nothing on its host.
    let log = wait_for_log(
        &s.agent_log(Host::Dst),
        "source aborted",
        Duration::from_secs(10),
    );
    assert!(log.contains("source aborted"), "{log}");
    assert!(!s
        .addresses(Host::Dst)
        .expect("addrs")
        .contains(&s.topo.service_ip()));
}

/// A source that speaks the protocol by hand, to send what a correct source never sends.
mod hostile {
    use super::*;
    use tether_migrator::protocol::{FromAgent, MigrationId, PageBatch, ToAgent, PAGE, PROTOCOL};
    use tether_migrator::tls::Identity;
    use tether_migrator::transport::{self, FrameReceiver, FrameSender};

    pub async fn open(
        certs: &std::path::Path,
        agent: SocketAddr,
    ) -> (quinn::Connection, FrameSender, FrameReceiver) {
        let id = Identity::load(certs).expect("certs");
        let (_endpoint, conn) = transport::connect(&id, agent, "dst", Duration::from_secs(5))
            .await
            .expect("connect");
        let (s, r) = conn.open_bi().await.expect("stream");
        let (mut tx, mut rx) = (FrameSender(s), FrameReceiver(r));
        tx.send(&ToAgent::Hello {
            protocol: PROTOCOL,
            migration_id: MigrationId::random(),
            service_addr: "10.77.0.100/24".parse().expect("addr"),
            container: None,
        })
        .await
        .expect("hello");
        match rx.message::<FromAgent>().await.expect("answer") {
            FromAgent::Ready { .. } => {}
            other => panic!("agent did not accept: {other:?}"),
        }
        (conn, tx, rx)
    }

    pub async fn expect_failed(rx: &mut FrameReceiver) -> String {
        match rx
            .message_within::<FromAgent>(Duration::from_secs(10), "failure")
            .await
            .expect("an answer")
        {
            FromAgent::Failed { phase, reason, .. } => format!("{phase}: {reason}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// Says the tree is frozen, sends `pagemap` as the dump's only image file and opens the
    /// final difference.
    pub async fn frozen_with_pagemap(tx: &mut FrameSender, pagemap: &[u8]) {
        tx.send(&ToAgent::Frozen).await.expect("frozen");
        tx.send(&ToAgent::File {
            name: "pagemap-1.img".into(),
            size: pagemap.len() as u64,
        })
        .await
        .expect("file");
        tx.send_data(pagemap).await.expect("data");
        tx.send(&ToAgent::FinalPages).await.expect("final");
    }

    pub fn page(owner: u64, addr: u64) -> Vec<u8> {
        let data = vec![0xabu8; PAGE];
        PageBatch::encode(owner, &[(addr, Some(&data))])
    }

    /// A pagemap image listing one present page at `addr` for pid 1.
    pub fn pagemap(addr: u64) -> Vec<u8> {
        use tether_migrator::criu::pages::{pagemap_image, PagemapEntry, PE_PRESENT};
        pagemap_image(
            1,
            &[PagemapEntry {
                vaddr: addr,
                compat_nr_pages: 0,
                in_parent: None,
                flags: Some(PE_PRESENT),
                nr_pages: Some(1),
            }],
        )
    }
}

#[test]
fn the_agent_rejects_pages_it_was_not_told_about_and_an_incomplete_final_difference() {
    use tether_migrator::protocol::ToAgent;
    let mut s = scenario(&ScenarioConfig::default());
    let certs = s.certs(Host::Src);
    let agent = s.agent_addr(Host::Dst);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let reasons = s
        .topo
        .in_host(Host::Src, || {
            rt.block_on(async {
                let mut reasons = Vec::new();
                // 1. Pages of a process the source never announced.
                let (_c, mut tx, mut rx) = hostile::open(&certs, agent).await;
                tx.send(&ToAgent::Layout {
                    owner: 1,
                    ranges: vec![(0x1000, 0x3000)],
                })
                .await
                .expect("layout");
                tx.send_frame(&hostile::page(2, 0x1000))
                    .await
                    .expect("page");
                reasons.push(hostile::expect_failed(&mut rx).await);
                // 2. A page outside the announced mappings.
                let (_c, mut tx, mut rx) = hostile::open(&certs, agent).await;
                tx.send(&ToAgent::Layout {
                    owner: 1,
                    ranges: vec![(0x1000, 0x3000)],
                })
                .await
                .expect("layout");
                tx.send_frame(&hostile::page(1, 0x8000))
                    .await
                    .expect("page");
                reasons.push(hostile::expect_failed(&mut rx).await);
                // 3. A final difference that leaves out a page the dump's page map lists.
                let (_c, mut tx, mut rx) = hostile::open(&certs, agent).await;
                let pm = hostile::pagemap(0x4000);
                hostile::frozen_with_pagemap(&mut tx, &pm).await;
                tx.send(&ToAgent::ImagesDone {
                    files: 1,
                    bytes: pm.len() as u64,
                    final_pages: 0,
                })
                .await
                .expect("done");
                reasons.push(hostile::expect_failed(&mut rx).await);
                // 4. A final page the dump's page map does not list.
                let (_c, mut tx, mut rx) = hostile::open(&certs, agent).await;
                hostile::frozen_with_pagemap(&mut tx, &pm).await;
                tx.send_frame(&hostile::page(1, 0x9000))
                    .await
                    .expect("page");
                reasons.push(hostile::expect_failed(&mut rx).await);
                reasons
            })
        })
        .expect("in src");
    println!("{reasons:#?}");
    assert!(reasons[0].contains("did not announce"), "{}", reasons[0]);
    assert!(
        reasons[1].contains("outside the announced"),
        "{}",
        reasons[1]
    );
    assert!(
        reasons[2].contains("missing") || reasons[2].contains("Missing"),
        "{}",
        reasons[2]
    );
    assert!(
        reasons[3].contains("not in the dump's page map"),
        "{}",
        reasons[3]
    );
    // Nothing stayed behind on the destination, and a real migration still works.
    std::thread::sleep(Duration::from_millis(300));
    assert!(!s
        .addresses(Host::Dst)
        .expect("addrs")
        .contains(&s.topo.service_ip()));
    assert_eq!(
        s.nft_tables(Host::Dst).expect("tables"),
        Vec::<String>::new()
    );
    s.migrate(Host::Dst)
        .expect("a real migration after the hostile ones");
    s.verify_state().expect("state verifies");
}

#[test]
fn dirty_rate_measures_a_live_service() {
    let s = scenario(&ScenarioConfig {
        state_mb: 64,
        dirty_pages_per_sec: 4000,
        ..Default::default()
    });
    let out = s
        .topo
        .command(Host::Src, s.tether())
        .args([
            "dirty-rate",
            "--pid",
            &s.pid().to_string(),
            "--window",
            "1s",
            "--json",
        ])
        .output()
        .expect("run dirty-rate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let rate = v["pages_per_sec"].as_f64().expect("pages_per_sec");
    println!("configured 4000 pages/s, measured {rate:.0} pages/s: {v}");
    // Random pages are rewritten, so some are hit twice (counted once), and the service's own
    // heap and stacks add a little: a loose bound, not a timing assertion.
    assert!((2000.0..8000.0).contains(&rate), "measured {rate}");
    assert!(s.service_alive(), "measuring does not disturb the service");
    s.verify_state().expect("state intact");
}

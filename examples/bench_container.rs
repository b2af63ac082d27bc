//! A container moved by tether against what a Podman user does today, on the same container in
//! the same run: the example service as a Podman container (its state dirtied at
//! --dirty-pages-per-sec) on two Podman hosts joined by a --rate link.
//!
//! - tether: `tether migrate --container` src -> dst (pre-copy, the default policy), clients
//!   through tether-proxy and direct;
//! - Podman: `podman container checkpoint --tcp-established --export` on dst, the archive copied
//!   to src over the same link, `podman container restore --tcp-established --import` there;
//!   clients direct (Podman has no proxy). Its downtime runs from the checkpoint's start (the
//!   container freezes) to the restore's end.
//!
//! For each state size it prints both downtimes, their ratio and the clients' longest stalls.
//!
//! Run as root after `scripts/setup.sh`: `cargo run --release --example bench_container --
//! [--sizes 64,256,512]` (or `scripts/bench-container.sh`).

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use tether::scenario::{Binaries, ClientRun, Scenario, ScenarioConfig, CONTAINER_NAME};
use tether::testbed::{require_prerequisites, Host};

/// Container moves: tether against Podman's checkpoint, copy and restore.
#[derive(Debug, Parser)]
struct Args {
    /// State sizes, MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,256,512")]
    sizes: Vec<u32>,
    /// Pages the service rewrites per second.
    #[arg(long, default_value_t = 1000)]
    dirty_pages_per_sec: u32,
    /// Rate of the src-dst link, bit/s.
    #[arg(long, default_value_t = 1_000_000_000)]
    rate: u64,
    /// Also write the rows as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    state_mib: u32,
    tether_downtime_ms: f64,
    tether_dump_ms: f64,
    tether_transfer_ms: f64,
    tether_restore_ms: f64,
    tether_stall_proxied_ms: f64,
    tether_stall_direct_ms: f64,
    podman_checkpoint_ms: f64,
    podman_copy_ms: f64,
    podman_restore_ms: f64,
    podman_downtime_ms: f64,
    podman_stall_ms: f64,
    archive_mib: f64,
}

fn stall(run: ClientRun) -> anyhow::Result<f64> {
    let r = run.finish()?;
    if !r.ok || r.tcp.resets > 0 || r.quic.errors > 0 || r.tcp.errors > 0 {
        bail!("a client saw errors: {:?}", r.errors);
    }
    Ok(r.tcp.max_stall_ms.max(r.quic.max_stall_ms))
}

/// Copies `from` (on `src`'s side) to `to` over the migration link, `src` -> `dst`; returns the
/// bytes copied.
fn copy_over_link(
    s: &Scenario,
    src: Host,
    dst: Host,
    from: &Path,
    to: &Path,
) -> anyhow::Result<u64> {
    let addr = SocketAddr::from((s.topo.migration_addr(dst), 7799));
    let listener = s.topo.listen_in(dst, addr)?;
    let to = to.to_path_buf();
    let receiver = std::thread::spawn(move || -> anyhow::Result<u64> {
        let (mut conn, _) = listener.accept()?;
        let mut out = std::fs::File::create(&to)?;
        Ok(std::io::copy(&mut conn, &mut out)?)
    });
    let mut conn = s.topo.connect_in(src, addr, Duration::from_secs(5))?;
    let mut file = std::fs::File::open(from)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        conn.write_all(&buf[..n])?;
    }
    drop(conn);
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?
}

fn measure(bins: &Binaries, args: &Args, mib: u32) -> anyhow::Result<Row> {
    let mut s = Scenario::start(
        bins.clone(),
        &ScenarioConfig {
            container: true,
            proxy: true,
            link_rate: Some(args.rate),
            state_mb: mib,
            dirty_pages_per_sec: args.dirty_pages_per_sec,
            ..Default::default()
        },
    )?;
    let run_for = Duration::from_secs(8 + u64::from(mib) / 32);
    let busy = ["--interval-ms", "5"];
    // tether, src -> dst.
    let proxied = s.start_clients_to(s.proxy_addr(), 4, 1, run_for, None, &busy)?;
    let direct = s.start_clients_to(s.service_addr(), 4, 1, run_for, None, &busy)?;
    std::thread::sleep(Duration::from_secs(1));
    let mut margs = s.proxy_args();
    margs.extend(["--bandwidth".into(), args.rate.to_string()]);
    let margs: Vec<&str> = margs.iter().map(String::as_str).collect();
    let run = s.migrate_with(Host::Dst, None, &margs)?;
    if !run.success {
        bail!("tether's move failed: {}", run.stderr);
    }
    let report = run.report.context("no report")?;
    let tether_stall_proxied_ms = stall(proxied)?;
    let tether_stall_direct_ms = stall(direct)?;
    s.verify_state()?;

    // Podman, dst -> src, direct clients.
    let direct = s.start_clients_to(
        s.service_addr(),
        4,
        1,
        run_for + Duration::from_secs(10),
        None,
        &busy,
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let archive = s.topo.work_dir().join("podman-export.tar");
    let copied = s.topo.work_dir().join("podman-import.tar");
    let t0 = Instant::now();
    s.topo.podman(
        Host::Dst,
        &[
            "container",
            "checkpoint",
            "--tcp-established",
            "--compress",
            "none",
            "--export",
            &archive.display().to_string(),
            CONTAINER_NAME,
        ],
    )?;
    let t1 = Instant::now();
    let bytes = copy_over_link(&s, Host::Dst, Host::Src, &archive, &copied)?;
    let t2 = Instant::now();
    s.topo.podman(
        Host::Src,
        &[
            "container",
            "restore",
            "--tcp-established",
            "--import",
            &copied.display().to_string(),
        ],
    )?;
    let t3 = Instant::now();
    let podman_stall_ms = stall(direct)?;
    s.topo
        .podman(Host::Dst, &["rm", "--force", CONTAINER_NAME])?;
    let pid = s
        .container_pid(Host::Src)?
        .context("Podman's restore does not run")?;
    s.adopt(Host::Src, pid);
    s.verify_state()?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(Row {
        state_mib: mib,
        tether_downtime_ms: report.timings.downtime_ms,
        tether_dump_ms: report.timings.dump_ms,
        tether_transfer_ms: report.timings.transfer_ms,
        tether_restore_ms: report.timings.restore_ms,
        tether_stall_proxied_ms,
        tether_stall_direct_ms,
        podman_checkpoint_ms: ms(t1 - t0),
        podman_copy_ms: ms(t2 - t1),
        podman_restore_ms: ms(t3 - t2),
        podman_downtime_ms: ms(t3 - t0),
        podman_stall_ms,
        archive_mib: bytes as f64 / (1024.0 * 1024.0),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    require_prerequisites().map_err(anyhow::Error::msg)?;
    let bins = Binaries::for_this_example()?;
    let mut rows = Vec::new();
    for &mib in &args.sizes {
        eprintln!("bench_container: {mib} MiB ...");
        let row = measure(&bins, &args, mib).with_context(|| format!("{mib} MiB"))?;
        eprintln!("{row:?}");
        rows.push(row);
    }
    println!(
        "container moves at {} pages/s over {:.0} Mbit/s: tether (pre-copy, proxy) against Podman \
         (checkpoint --export, copy, restore --import), one run",
        args.dirty_pages_per_sec,
        args.rate as f64 / 1e6
    );
    println!(
        "{:>6} | {:>10} {:>7} {:>9} {:>8} {:>12} {:>11} | {:>10} {:>9} {:>9} {:>10} {:>10} | {:>13}",
        "MiB",
        "tether ms",
        "dump",
        "transfer",
        "restore",
        "stall proxy",
        "stall dir.",
        "podman ms",
        "ckpt",
        "copy",
        "restore",
        "stall",
        "tether/podman"
    );
    for r in &rows {
        println!(
            "{:>6} | {:>10.1} {:>7.1} {:>9.1} {:>8.1} {:>12.1} {:>11.1} | {:>10.1} {:>9.1} {:>9.1} {:>10.1} {:>10.1} | {:>12.3}x",
            r.state_mib,
            r.tether_downtime_ms,
            r.tether_dump_ms,
            r.tether_transfer_ms,
            r.tether_restore_ms,
            r.tether_stall_proxied_ms,
            r.tether_stall_direct_ms,
            r.podman_downtime_ms,
            r.podman_checkpoint_ms,
            r.podman_copy_ms,
            r.podman_restore_ms,
            r.podman_stall_ms,
            r.tether_downtime_ms / r.podman_downtime_ms,
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rows)?)?;
    }
    Ok(())
}

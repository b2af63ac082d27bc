//! Host-network benchmark: the operations `tether migrate` and `tether agent` make on the
//! service address (block, unblock, add, remove, list), through tether-migrator's `HostNet`
//! (netlink and libnftables) against the `nft` and `ip` processes that did the same before, side
//! by side in one run. Prints the medians and their ratios.
//!
//! Everything runs on one thread inside a network namespace of its own (`unshare(CLONE_NEWNET)`
//! of that thread), which vanishes with its links and tables when the thread ends.
//!
//! Run as root: `scripts/bench-hostnet.sh` (sets up, builds, runs this).

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use tether_migrator::hostnet::{HostNet, ServiceAddr};
use tokio::io::AsyncWriteExt;

/// Benchmark tether's netlink/libnftables host-network path against `ip` and `nft` processes.
#[derive(Debug, Parser)]
struct Args {
    /// Runs of each operation (the median is reported).
    #[arg(long, default_value_t = 50)]
    runs: usize,
}

const DEV: &str = "th0";
const TABLE: &str = "tether-bench";
const SVC: &str = "10.77.0.100/24";

/// The same block `HostNet::block` installs, as an `nft -f -` script.
fn nft_block() -> String {
    format!(
        "table inet {TABLE} {{\n\
         \x20 chain input {{ type filter hook input priority -300; policy accept; iifname \"{DEV}\" ip daddr 10.77.0.100 drop; }}\n\
         \x20 chain output {{ type filter hook output priority -300; policy accept; oifname \"{DEV}\" ip saddr 10.77.0.100 drop; }}\n\
         }}\n\
         table arp {TABLE} {{\n\
         \x20 chain input {{ type filter hook input priority 0; policy accept; iifname \"{DEV}\" arp daddr ip 10.77.0.100 drop; }}\n\
         \x20 chain output {{ type filter hook output priority 0; policy accept; arp saddr ip 10.77.0.100 drop; }}\n\
         }}\n"
    )
}

/// Runs a tool to success (children inherit the calling thread's network namespace).
async fn tool(tool: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {tool} (scripts/setup.sh installs it)"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One operation's timings, both ways.
struct Row {
    what: &'static str,
    netlink: Vec<Duration>,
    tools: Vec<Duration>,
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn measure(runs: usize) -> anyhow::Result<Vec<Row>> {
    // The test bed of this namespace: a veth pair, up, with a host address.
    tool(
        "ip",
        &["link", "add", DEV, "type", "veth", "peer", "name", "tp0"],
        None,
    )
    .await?;
    tool("ip", &["link", "set", DEV, "up"], None).await?;
    tool("ip", &["addr", "add", "10.77.0.1/24", "dev", DEV], None).await?;

    let net = HostNet::new().context("HostNet::new (netlink route socket and libnftables)")?;
    let svc: ServiceAddr = SVC.parse().map_err(anyhow::Error::msg)?;
    let ip: Ipv4Addr = svc.addr();
    let block = nft_block();
    let mut rows = [
        "block (inet+arp, 4 rules)",
        "unblock (delete inet+arp)",
        "add address",
        "remove address",
        "list tables",
    ]
    .map(|what| Row {
        what,
        netlink: Vec::with_capacity(runs),
        tools: Vec::with_capacity(runs),
    });
    // Alternating, so that both ways see the same machine.
    for _ in 0..runs {
        let t = Instant::now();
        net.block(TABLE, ip, DEV).await?;
        rows[0].netlink.push(t.elapsed());
        let t = Instant::now();
        net.delete_table(TABLE).await?;
        rows[1].netlink.push(t.elapsed());
        let t = Instant::now();
        net.add_address(svc, DEV).await?;
        rows[2].netlink.push(t.elapsed());
        let t = Instant::now();
        net.remove_address(svc, DEV).await?;
        rows[3].netlink.push(t.elapsed());
        let t = Instant::now();
        net.tables().await?;
        rows[4].netlink.push(t.elapsed());

        let t = Instant::now();
        tool("nft", &["-f", "-"], Some(&block)).await?;
        rows[0].tools.push(t.elapsed());
        let t = Instant::now();
        let unblock = format!("delete table inet {TABLE}\ndelete table arp {TABLE}\n");
        tool("nft", &["-f", "-"], Some(&unblock)).await?;
        rows[1].tools.push(t.elapsed());
        let t = Instant::now();
        tool("ip", &["addr", "add", SVC, "dev", DEV], None).await?;
        rows[2].tools.push(t.elapsed());
        let t = Instant::now();
        tool("ip", &["addr", "del", SVC, "dev", DEV], None).await?;
        rows[3].tools.push(t.elapsed());
        let t = Instant::now();
        tool("nft", &["-j", "list", "tables"], None).await?;
        rows[4].tools.push(t.elapsed());
    }
    Ok(rows.into())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (a network namespace of its own, nftables); run scripts/bench-hostnet.sh as root");
    }
    let runs = args.runs;
    let rows = std::thread::spawn(move || -> anyhow::Result<Vec<Row>> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .context("unshare(CLONE_NEWNET): needs CAP_SYS_ADMIN")?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(measure(runs))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))??;

    println!("median of {runs} runs each, alternating, in a private network namespace:");
    println!(
        "{:<28} {:>12} {:>12} {:>16}",
        "operation", "netlink ms", "ip/nft ms", "netlink / tools"
    );
    for r in &rows {
        let (n, t) = (median(&r.netlink), median(&r.tools));
        println!(
            "{:<28} {:>12.3} {:>12.3} {:>15.3}x",
            r.what,
            ms(n),
            ms(t),
            n.as_secs_f64() / t.as_secs_f64()
        );
    }
    Ok(())
}

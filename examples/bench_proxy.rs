//! Data-path benchmark of tether-proxy, side by side in one run on the same netns path:
//! direct (client -> service host), through `tether proxy`, and through HAProxy (TCP mode) /
//! socat (UDP). Prints absolute figures and ratios against direct and against the other proxy.
//!
//! Run as root: `scripts/bench-proxy.sh` (installs haproxy and socat, builds, runs this).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use tether::testbed::{become_subreaper, require_prerequisites, Host, HostProcess, Topology};

/// Benchmark direct vs tether-proxy vs HAProxy/socat on one netns path.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Write the results as JSON here.
    #[arg(long, default_value = "target/bench-proxy.json")]
    json: PathBuf,
}

/// The backend's TCP and UDP port (tether-proxy has one backend address per service).
const TCP_BACKEND: u16 = 9000;
const UDP_BACKEND: u16 = 9000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
enum Path {
    Direct,
    Tether,
    Other,
}

#[derive(Debug, Default, Clone, Serialize)]
struct Row {
    path: String,
    bulk_1_gbit: f64,
    bulk_64_gbit: f64,
    rr_1_p50_us: f64,
    rr_1_p99_us: f64,
    rr_64_p50_us: f64,
    rr_64_p99_us: f64,
    rr_64_rps: f64,
    udp_mbit: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(missing) = require_prerequisites() {
        bail!("{missing}\nRun scripts/setup.sh as root.");
    }
    for tool in ["haproxy", "socat"] {
        if which(tool).is_none() {
            bail!("{tool} is not installed (scripts/bench-proxy.sh installs it)");
        }
    }
    become_subreaper()?;
    let tether = tether::scenario::Binaries::for_this_example()?.tether;
    let topo = Topology::builder().with_proxy(true).build()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let dur = Duration::from_secs_f64(args.seconds);
    let _guard = rt.enter();

    // Backends on `src`: sockets are created inside the namespace and served by our runtime.
    let tcp_backend = topo.listen_in(Host::Src, (topo.lan_addr(Host::Src), TCP_BACKEND).into())?;
    let udp_backend = topo.in_host(Host::Src, || {
        std::net::UdpSocket::bind((std::net::Ipv4Addr::new(10, 77, 0, 2), UDP_BACKEND))
    })??;
    tcp_backend.set_nonblocking(true)?;
    udp_backend.set_nonblocking(true)?;
    rt.spawn(serve_tcp(tokio::net::TcpListener::from_std(tcp_backend)?));
    let udp_backend = UdpSocket::from_std(udp_backend)?;
    rt.spawn(serve_udp(udp_backend));

    let proxy_ip = topo.lan_addr(Host::Proxy);
    let src_ip = topo.lan_addr(Host::Src);
    let work = topo.work_dir().to_path_buf();
    // tether proxy
    let control = work.join("proxy.sock");
    let _tether = topo.spawn(
        Host::Proxy,
        &tether,
        [
            "proxy".to_string(),
            "--name".into(),
            "bench".into(),
            "--tcp-listen".into(),
            format!("{proxy_ip}:8000"),
            "--udp-listen".into(),
            format!("{proxy_ip}:8000"),
            "--backend".into(),
            format!("{src_ip}:{TCP_BACKEND}"),
            "--control".into(),
            control.display().to_string(),
        ],
        Some(&work.join("tether-proxy.log")),
    )?;
    // HAProxy, TCP mode, and socat for UDP.
    let cfg = work.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             listen bench\n  bind {proxy_ip}:8100\n  server s1 {src_ip}:{TCP_BACKEND}\n"
        ),
    )?;
    let _haproxy: HostProcess = topo.spawn(
        Host::Proxy,
        "haproxy",
        ["-db", "-f", &cfg.display().to_string()],
        Some(&work.join("haproxy.log")),
    )?;
    let _socat = topo.spawn(
        Host::Proxy,
        "socat",
        [
            format!("UDP4-LISTEN:8101,bind={proxy_ip},fork,reuseaddr"),
            format!("UDP4:{src_ip}:{UDP_BACKEND}"),
        ],
        Some(&work.join("socat.log")),
    )?;
    for port in [8000, 8100] {
        topo.wait_for_tcp(
            Host::Client,
            (proxy_ip, port).into(),
            Duration::from_secs(10),
        )
        .with_context(|| format!("proxy on port {port} did not come up"))?;
    }

    let paths = [
        (
            Path::Direct,
            "direct",
            SocketAddr::from((src_ip, TCP_BACKEND)),
            SocketAddr::from((src_ip, UDP_BACKEND)),
        ),
        (
            Path::Tether,
            "tether-proxy",
            (proxy_ip, 8000).into(),
            (proxy_ip, 8000).into(),
        ),
        (
            Path::Other,
            "haproxy / socat",
            (proxy_ip, 8100).into(),
            (proxy_ip, 8101).into(),
        ),
    ];
    let topo = Arc::new(topo);
    let mut rows = Vec::new();
    for (_, name, tcp, udp) in paths {
        eprintln!("measuring {name} ...");
        let mut row = Row {
            path: name.into(),
            ..Default::default()
        };
        row.bulk_1_gbit = rt.block_on(bulk(&topo, tcp, 1, dur))?;
        row.bulk_64_gbit = rt.block_on(bulk(&topo, tcp, 64, dur))?;
        let (p50, p99, _) = rt.block_on(request_response(&topo, tcp, 1, dur))?;
        row.rr_1_p50_us = p50;
        row.rr_1_p99_us = p99;
        let (p50, p99, rps) = rt.block_on(request_response(&topo, tcp, 64, dur))?;
        row.rr_64_p50_us = p50;
        row.rr_64_p99_us = p99;
        row.rr_64_rps = rps;
        row.udp_mbit = rt.block_on(udp_relay(&topo, udp, dur))?;
        rows.push(row);
    }
    print_table(&rows);
    std::fs::write(&args.json, serde_json::to_string_pretty(&rows)?)?;
    eprintln!("results written to {}", args.json.display());
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

async fn serve_tcp(l: tokio::net::TcpListener) {
    while let Ok((mut s, _)) = l.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 256 * 1024];
            if mode[0] == b'S' {
                let mut total: u64 = 0;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            } else {
                let mut msg = [0u8; 64];
                while s.read_exact(&mut msg).await.is_ok() {
                    if s.write_all(&msg).await.is_err() {
                        break;
                    }
                }
            }
        });
    }
}

async fn serve_udp(s: UdpSocket) {
    let mut buf = vec![0u8; 65536];
    while let Ok((n, from)) = s.recv_from(&mut buf).await {
        let _ = s.send_to(&buf[..n], from).await;
    }
}

async fn connect(topo: &Topology, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let s = topo.connect_in(Host::Client, to, Duration::from_secs(5))?;
    s.set_nonblocking(true)?;
    let s = TcpStream::from_std(s)?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Bulk TCP throughput with `conns` connections writing for `dur`; Gbit/s received by the sink.
async fn bulk(
    topo: &Arc<Topology>,
    to: SocketAddr,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut s = connect(topo, to).await?;
        tasks.push(tokio::spawn(async move {
            let buf = vec![0x5au8; 64 * 1024];
            s.write_all(b"S").await?;
            let end = Instant::now() + dur;
            while Instant::now() < end {
                s.write_all(&buf).await?;
            }
            s.shutdown().await?;
            let mut total = [0u8; 8];
            s.read_exact(&mut total).await?;
            anyhow::Ok(u64::from_be_bytes(total))
        }));
    }
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await??;
    }
    Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
}

/// Closed-loop 64-byte request/response on `conns` connections: (p50 µs, p99 µs, requests/s).
async fn request_response(
    topo: &Arc<Topology>,
    to: SocketAddr,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<(f64, f64, f64)> {
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..conns {
        let mut s = connect(topo, to).await?;
        tasks.push(tokio::spawn(async move {
            s.write_all(b"E").await?;
            let mut lat = Vec::new();
            let msg = [7u8; 64];
            let mut back = [0u8; 64];
            let end = Instant::now() + dur;
            while Instant::now() < end {
                let t = Instant::now();
                s.write_all(&msg).await?;
                s.read_exact(&mut back).await?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let rps = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok((q(0.5), q(0.99), rps))
}

/// UDP echo throughput of 1200-byte datagrams with 64 in flight; Mbit/s echoed.
async fn udp_relay(topo: &Arc<Topology>, to: SocketAddr, dur: Duration) -> anyhow::Result<f64> {
    let sock = topo.in_host(Host::Client, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect(to)?;
        s.set_nonblocking(true)?;
        std::io::Result::Ok(s)
    })??;
    let sock = UdpSocket::from_std(sock)?;
    let payload = vec![0xa5u8; 1200];
    let mut buf = vec![0u8; 2048];
    let start = Instant::now();
    let end = start + dur;
    let mut echoed: u64 = 0;
    let mut refused = 0u64;
    // An ICMP error reported on the socket counts as a lost datagram.
    let send = |r: std::io::Result<usize>, refused: &mut u64| match r {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            *refused += 1;
            Ok(())
        }
        Err(e) => Err(e),
        Ok(_) => Ok(()),
    };
    for _ in 0..64 {
        send(sock.send(&payload).await, &mut refused)?;
    }
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_millis(50), sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                echoed += n as u64;
                send(sock.send(&payload).await, &mut refused)?;
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Ok(Err(e)) => return Err(e.into()),
            // Lost datagrams: refill the window.
            Err(_) => {
                for _ in 0..64 {
                    send(sock.send(&payload).await, &mut refused)?;
                }
            }
        }
    }
    if refused > 0 {
        eprintln!("  udp to {to}: {refused} ICMP errors (counted as losses)");
    }
    Ok(echoed as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e6)
}

fn print_table(rows: &[Row]) {
    println!(
        "\n{:<16} {:>10} {:>11} {:>11} {:>11} {:>12} {:>12} {:>11} {:>10}",
        "path",
        "bulk 1c",
        "bulk 64c",
        "rr 1c p50",
        "rr 1c p99",
        "rr 64c p50",
        "rr 64c p99",
        "rr 64c",
        "udp"
    );
    println!(
        "{:<16} {:>10} {:>11} {:>11} {:>11} {:>12} {:>12} {:>11} {:>10}",
        "", "Gbit/s", "Gbit/s", "us", "us", "us", "us", "req/s", "Mbit/s"
    );
    for r in rows {
        println!(
            "{:<16} {:>10.2} {:>11.2} {:>11.0} {:>11.0} {:>12.0} {:>12.0} {:>11.0} {:>10.0}",
            r.path,
            r.bulk_1_gbit,
            r.bulk_64_gbit,
            r.rr_1_p50_us,
            r.rr_1_p99_us,
            r.rr_64_p50_us,
            r.rr_64_p99_us,
            r.rr_64_rps,
            r.udp_mbit
        );
    }
    if let [direct, tether, other] = rows {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        println!("\nratios (throughput: higher is better; latency: lower is better)");
        println!(
            "{:<26} {:>10.2} {:>11.2} {:>11.2} {:>11.2} {:>12.2} {:>12.2} {:>11.2} {:>10.2}",
            "tether-proxy / direct",
            ratio(tether.bulk_1_gbit, direct.bulk_1_gbit),
            ratio(tether.bulk_64_gbit, direct.bulk_64_gbit),
            ratio(tether.rr_1_p50_us, direct.rr_1_p50_us),
            ratio(tether.rr_1_p99_us, direct.rr_1_p99_us),
            ratio(tether.rr_64_p50_us, direct.rr_64_p50_us),
            ratio(tether.rr_64_p99_us, direct.rr_64_p99_us),
            ratio(tether.rr_64_rps, direct.rr_64_rps),
            ratio(tether.udp_mbit, direct.udp_mbit)
        );
        println!(
            "{:<26} {:>10.2} {:>11.2} {:>11.2} {:>11.2} {:>12.2} {:>12.2} {:>11.2} {:>10.2}",
            "tether-proxy / haproxy,socat",
            ratio(tether.bulk_1_gbit, other.bulk_1_gbit),
            ratio(tether.bulk_64_gbit, other.bulk_64_gbit),
            ratio(tether.rr_1_p50_us, other.rr_1_p50_us),
            ratio(tether.rr_1_p99_us, other.rr_1_p99_us),
            ratio(tether.rr_64_p50_us, other.rr_64_p50_us),
            ratio(tether.rr_64_p99_us, other.rr_64_p99_us),
            ratio(tether.rr_64_rps, other.rr_64_rps),
            ratio(tether.udp_mbit, other.udp_mbit)
        );
    }
}

//! `tether` raises its open-files limit to the hard limit at start, and `tether proxy` fits its
//! default flow limits to it and refuses set ones that cannot fit. Runs the real binary; needs no
//! root.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `tether proxy` with open-files limits `soft` and `hard`, with `config`.
fn spawn_proxy(dir: &Path, config: &str, soft: u64, hard: u64) -> Child {
    let cfg = dir.join("proxy.toml");
    std::fs::write(&cfg, config).expect("write config");
    let sock = dir.join("control.sock");
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            r#"ulimit -Sn {soft} && ulimit -Hn {hard} && exec "$0" proxy --config "$1" --control "$2""#
        ))
        .arg(env!("CARGO_BIN_EXE_tether"))
        .arg(&cfg)
        .arg(&sock)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start tether proxy")
}

/// [`spawn_proxy`] with a soft limit of 256 and a hard one of 4096, once its control socket is
/// there.
fn proxy_with_limits(dir: &Path, config: &str) -> Child {
    let mut child = spawn_proxy(dir, config, 256, 4096);
    wait_ready(dir, &mut child);
    child
}

fn wait_ready(dir: &Path, child: &mut Child) {
    let sock = dir.join("control.sock");
    let t0 = Instant::now();
    while !sock.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            let err = stop(std::mem::replace(
                child,
                Command::new("true").spawn().expect("true"),
            ));
            panic!("tether proxy exited ({status}): {err}");
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The soft and hard open-files limits of `pid`.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

fn stop(mut child: Child) -> String {
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(e) = child.stderr.take() {
        for line in BufReader::new(e).lines().map_while(Result::ok) {
            err.push_str(&line);
            err.push('\n');
        }
    }
    err
}

const SERVICE: &str = "[[service]]\nname = 'a'\nbackend = '127.0.0.1:9'\ntcp_listen = ['127.0.0.1:0']\nudp_listen = ['127.0.0.1:0']\n";

#[test]
fn the_proxy_raises_its_limit_and_fits_its_default_flow_limits_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");

    // The defaults (16,384 TCP and 4,096 UDP flows) need 36,930 descriptors: lowered to fit.
    let first = dir.path().join("defaults");
    std::fs::create_dir(&first).expect("mkdir");
    let child = proxy_with_limits(&first, SERVICE);
    let (soft, hard) = nofile(child.id());
    let err = stop(child);
    assert_eq!(
        (soft, hard),
        (4096, 4096),
        "soft limit raised to the hard one"
    );
    // 4096 - 64 - 2 = 4030 shared 32,768 : 4,096 between the two.
    assert!(
        err.contains("max_tcp_flows 16384 -> 1791") && err.contains("udp_max_flows 4096 -> 447"),
        "{err}"
    );

    // Limits that fit: left alone, nothing said.
    let small = format!("{SERVICE}[service.limits]\nmax_tcp_flows = 1000\nudp_max_flows = 500\n");
    let second = dir.path().join("small");
    std::fs::create_dir(&second).expect("mkdir");
    let child = proxy_with_limits(&second, &small);
    let (soft, _) = nofile(child.id());
    let err = stop(child);
    assert_eq!(soft, 4096);
    assert!(!err.contains("flow limits"), "{err}");
}

#[test]
fn set_flow_limits_that_cannot_fit_are_refused_with_what_they_need() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = format!("{SERVICE}[service.limits]\nmax_tcp_flows = 16384\n");
    let mut child = spawn_proxy(dir.path(), &big, 256, 4096);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the proxy started with limits that cannot fit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = stop(child);
    assert!(!status.success());
    // 64 + 2 listeners + 2 x 16,384 + 64 UDP flows at the least.
    assert!(
        err.contains("need 32898 open files")
            && err.contains("may open only 4096")
            && err.contains("ulimit -Hn 32898"),
        "{err}"
    );
    assert!(!dir.path().join("control.sock").exists());
}

/// Echoes every connection on `listener` until the process ends.
fn echo_backend(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let l = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    });
}

/// The issue's case: a proxy started with a soft limit of 1024 (a new login shell's) serves
/// 2,000 TCP flows at once, because it raised the limit.
#[test]
fn with_a_soft_limit_of_1024_the_proxy_serves_2000_tcp_flows() {
    use std::io::{Read, Write};
    const FLOWS: usize = 2000;
    // This test holds both ends of every flow: 4,000 descriptors and some.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let hard = hard.max(8192);
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        panic!("this test needs an open-files limit of 8192 (ulimit -Hn 8192, or root): {e}");
    }

    let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let backend_addr = backend.local_addr().expect("addr");
    echo_backend(backend);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "[[service]]\nname = 'a'\nbackend = '{backend_addr}'\ntcp_listen = ['127.0.0.1:{port}']\n"
    );
    let mut child = spawn_proxy(dir.path(), &config, 1024, 8192);
    wait_ready(dir.path(), &mut child);
    assert_eq!(nofile(child.id()).0, 8192, "soft limit raised");

    let mut flows = Vec::with_capacity(FLOWS);
    for i in 0..FLOWS {
        let s = std::net::TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("flow {i}: connect: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        flows.push(s);
    }
    // Every flow open at once, each echoed through the proxy.
    for (i, s) in flows.iter_mut().enumerate() {
        s.write_all(&(i as u64).to_be_bytes())
            .unwrap_or_else(|e| panic!("flow {i}: write: {e}"));
    }
    for (i, s) in flows.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        s.read_exact(&mut b)
            .unwrap_or_else(|e| panic!("flow {i}: no echo through the proxy: {e}"));
        assert_eq!(u64::from_be_bytes(b), i as u64, "flow {i}");
    }
    let err = stop(child);
    assert!(!err.contains("ERROR"), "{err}");
}

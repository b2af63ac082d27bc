//! `tether` raises its open-files limit to the hard limit at start, and `tether proxy` says when
//! its configured flow limits need more descriptors than that. Runs the real binary; needs no
//! root.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `tether proxy` with a soft open-files limit of 256 and a hard one of 4096, with
/// `config`, and waits for its control socket.
fn proxy_with_limits(dir: &Path, config: &str) -> Child {
    let cfg = dir.join("proxy.toml");
    std::fs::write(&cfg, config).expect("write config");
    let sock = dir.join("control.sock");
    let child = Command::new("bash")
        .arg("-c")
        .arg(r#"ulimit -Sn 256 && ulimit -Hn 4096 && exec "$0" proxy --config "$1" --control "$2""#)
        .arg(env!("CARGO_BIN_EXE_tether"))
        .arg(&cfg)
        .arg(&sock)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start tether proxy");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
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
fn the_proxy_raises_its_limit_and_warns_when_its_flow_limits_do_not_fit() {
    let dir = tempfile::tempdir().expect("tempdir");

    // The defaults (16,384 TCP and 4,096 UDP flows) need more than 4096 descriptors.
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
    assert!(
        err.contains("need 36930 open files") && err.contains("ulimit -Hn"),
        "{err}"
    );

    // Limits that fit: no warning.
    let small = format!("{SERVICE}[service.limits]\nmax_tcp_flows = 1000\nudp_max_flows = 500\n");
    let second = dir.path().join("small");
    std::fs::create_dir(&second).expect("mkdir");
    let child = proxy_with_limits(&second, &small);
    let (soft, _) = nofile(child.id());
    let err = stop(child);
    assert_eq!(soft, 4096);
    assert!(!err.contains("open files"), "{err}");
}

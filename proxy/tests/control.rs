//! The control socket: protocol errors, the client, socket permissions and peer checks, and the
//! metrics endpoint.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use tether_proxy::api::ErrorKind;
use tether_proxy::control::{Client, ControlError, Reply};
use tether_proxy::{Config, Phase, Proxy};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

async fn raw(path: &std::path::Path, line: &[u8]) -> Reply {
    let mut c = Client::connect(path).await.expect("connect");
    c.send_raw(line).await.expect("reply")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_and_misplaced_commands_get_clear_errors_and_change_nothing() {
    let echo = tcp_echo().await;
    let other: std::net::SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let p = start(vec![service("s", echo.addr)]).await;
    let path = p.control();
    let h = p.proxy.handle();
    let before = h.status();

    let cases: &[(&[u8], ErrorKind, &str)] = &[
        (b"", ErrorKind::BadRequest, "malformed JSON"),
        (b"not json", ErrorKind::BadRequest, "malformed JSON"),
        (
            b"{\"cmd\":\"pause\"",
            ErrorKind::BadRequest,
            "malformed JSON",
        ),
        (b"[]", ErrorKind::BadRequest, "JSON object"),
        (
            b"{\"service\":\"s\"}",
            ErrorKind::BadRequest,
            "missing field \"cmd\"",
        ),
        (
            b"{\"cmd\":\"shutdown\"}",
            ErrorKind::BadRequest,
            "unknown command \"shutdown\"",
        ),
        (
            b"{\"cmd\":\"PAUSE\",\"service\":\"s\"}",
            ErrorKind::BadRequest,
            "unknown command",
        ),
        (
            b"{\"cmd\":\"pause\",\"service\":\"s\",\"force\":true}",
            ErrorKind::BadRequest,
            "unknown field \"force\"",
        ),
        (
            b"{\"cmd\":\"pause\",\"service\":\"s\",\"timeout_ms\":\"5\"}",
            ErrorKind::BadRequest,
            "positive integer",
        ),
        (
            b"{\"cmd\":\"pause\",\"service\":\"s\",\"timeout_ms\":99999999999}",
            ErrorKind::BadRequest,
            "timeout_ms must be between",
        ),
        (
            b"{\"cmd\":\"redirect\",\"service\":\"s\"}",
            ErrorKind::BadRequest,
            "missing field \"backend\"",
        ),
        (
            b"{\"cmd\":\"redirect\",\"service\":\"s\",\"backend\":\"10.0.0.1\"}",
            ErrorKind::BadRequest,
            "IP:PORT",
        ),
        (
            b"{\"cmd\":\"redirect\",\"service\":\"s\",\"backend\":\"0.0.0.0:80\"}",
            ErrorKind::BadRequest,
            "needs an address",
        ),
        (
            b"{\"cmd\":\"redirect\",\"service\":\"s\",\"backend\":\"10.0.0.1:0\"}",
            ErrorKind::BadRequest,
            "needs an address",
        ),
        (
            b"{\"cmd\":\"pause\",\"service\":\"nope\"}",
            ErrorKind::UnknownService,
            "unknown service \"nope\"",
        ),
        (
            b"{\"cmd\":\"flows\",\"service\":\"nope\"}",
            ErrorKind::UnknownService,
            "unknown service",
        ),
        (
            b"{\"cmd\":\"resume\",\"service\":\"s\"}",
            ErrorKind::WrongState,
            "not paused",
        ),
    ];
    for (line, kind, want) in cases {
        let r = raw(&path, line).await;
        let text = String::from_utf8_lossy(line);
        assert!(!r.ok, "{text}: {r:?}");
        assert_eq!(r.kind, Some(*kind), "{text}: {r:?}");
        let msg = r.error.expect("message");
        assert!(msg.contains(want), "{text}: {msg}");
    }
    // Nothing changed.
    let after = h.status();
    assert_eq!(after.services, before.services);
    assert_eq!(h.metrics("s").expect("m").pauses_total.get(), 0);

    // Commands in the wrong phase, with a pause in force.
    let mut c = p.client().await;
    c.pause("s", Duration::from_secs(1)).await.expect("pause");
    let e = c
        .pause("s", Duration::from_secs(1))
        .await
        .expect_err("twice");
    assert_eq!(e.kind(), Some(ErrorKind::WrongState));
    assert!(e.to_string().contains("already paused"), "{e}");
    let r = raw(&path, b"{\"cmd\":\"bogus\"}").await;
    assert_eq!(r.kind, Some(ErrorKind::BadRequest));
    let st = c.status().await.expect("status");
    assert_eq!(st.services[0].phase, Phase::Paused);
    assert_eq!(st.services[0].backend, echo.addr);
    assert_eq!(
        st.services[0].max_hold_ms,
        tether_proxy::Limits::default().max_hold_ms
    );
    c.redirect("s", other).await.expect("redirect while paused");
    c.redirect("s", echo.addr).await.expect("and back");
    let r = c.resume("s").await.expect("resume");
    assert_eq!(r.backend, echo.addr);
    let e = c.flows("nope").await.expect_err("unknown");
    assert_eq!(e.kind(), Some(ErrorKind::UnknownService));
    assert!(matches!(e, ControlError::Rejected { cmd: "flows", .. }));

    // Several requests on one connection, answered in order; a blank line is an error too.
    let mut s = UnixStream::connect(&path).await.expect("connect");
    s.write_all(b"{\"cmd\":\"status\"}\n\n{\"cmd\":\"flows\",\"service\":\"s\"}\n")
        .await
        .expect("write");
    let mut lines = BufReader::new(s).lines();
    let mut replies = Vec::new();
    for _ in 0..3 {
        let l = lines.next_line().await.expect("read").expect("line");
        replies.push(serde_json::from_str::<Reply>(&l).expect("json"));
    }
    assert!(
        replies[0].ok && !replies[1].ok && replies[2].ok,
        "{replies:?}"
    );
    assert!(replies[2].result.as_ref().expect("result")["tcp"].is_array());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_and_the_connection_closed() {
    let echo = tcp_echo().await;
    let p = start(vec![service("s", echo.addr)]).await;
    let mut s = UnixStream::connect(p.control()).await.expect("connect");
    let big = vec![b'x'; 10_000];
    s.write_all(&big).await.expect("write");
    let mut reply = String::new();
    let mut rd = BufReader::new(s);
    rd.read_line(&mut reply).await.expect("reply");
    let r: Reply = serde_json::from_str(&reply).expect("json");
    assert_eq!(r.kind, Some(ErrorKind::BadRequest));
    assert!(r.error.expect("msg").contains("longer than 4096 bytes"));
    // Closed after the error (with unread data, a Unix socket's close may show as a reset).
    let mut rest = Vec::new();
    match rd.read_to_end(&mut rest).await {
        Ok(_) => assert!(rest.is_empty(), "nothing after the error"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    assert_eq!(p.proxy.handle().status().services[0].phase, Phase::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_is_fresh_private_and_exclusive() {
    let echo = tcp_echo().await;
    let p = start(vec![service("s", echo.addr)]).await;
    let path = p.control();
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    // A second proxy on a live socket is refused.
    let mut cfg = Config {
        control: Some(path.clone()),
        metrics: None,
        services: vec![service("s", echo.addr)],
    };
    let e = Proxy::start(&cfg).await.expect_err("socket in use");
    assert!(
        e.to_string().contains("another process is listening"),
        "{e}"
    );

    // A stale socket file is replaced; a regular file is not touched.
    let dir = tempfile::tempdir().expect("tempdir");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    cfg.control = Some(stale.clone());
    let p2 = Proxy::start(&cfg).await.expect("stale socket replaced");
    let mut c = Client::connect(&stale).await.expect("connect");
    c.status().await.expect("status");
    drop(p2);
    assert!(!stale.exists(), "socket removed when the proxy stops");

    let file = dir.path().join("file");
    std::fs::write(&file, b"keep").expect("write");
    cfg.control = Some(file.clone());
    let e = Proxy::start(&cfg).await.expect_err("not a socket");
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).expect("read"), b"keep");

    // A missing directory is created, private.
    let nested = dir.path().join("run/tether/p.sock");
    cfg.control = Some(nested.clone());
    let _p3 = Proxy::start(&cfg).await.expect("creates the directory");
    let dmode = std::fs::metadata(nested.parent().expect("dir"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(dmode & 0o777, 0o700);
}

const PEER_ENV: &str = "TETHER_PROXY_TEST_PEER_SOCKET";

/// Run by `other_users_are_refused` as another user: connects, asks for the status and prints
/// the reply. Does nothing in a normal test run.
#[test]
fn peer_helper() {
    use std::io::{BufRead, Write};
    let Ok(path) = std::env::var(PEER_ENV) else {
        return;
    };
    match std::os::unix::net::UnixStream::connect(&path) {
        Err(e) => println!("CONNECT-ERROR: {:?}", e.kind()),
        Ok(mut s) => {
            // The proxy may refuse and close before this write; its reply is still readable.
            let _ = s.write_all(b"{\"cmd\":\"status\"}\n");
            let mut line = String::new();
            std::io::BufReader::new(s)
                .read_line(&mut line)
                .expect("read");
            println!("REPLY: {}", line.trim());
        }
    }
}

fn run_peer_helper_as_nobody(socket: &std::path::Path) -> String {
    use std::os::unix::process::CommandExt;
    // A copy of this test binary where any user can run it (the build directory may not be
    // reachable for them).
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let exe = dir.path().join("peer");
    std::fs::copy(std::env::current_exe().expect("exe"), &exe).expect("copy");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = std::process::Command::new(&exe)
        .args(["--exact", "peer_helper", "--nocapture", "--test-threads=1"])
        .env(PEER_ENV, socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run helper");
    format!(
        "{}\n--- stderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_are_refused() {
    // Runs a peer as another user: needs root. It fails (never skips) without it.
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root to run a peer as another user (run scripts/test.sh as root)"
    );
    let echo = tcp_echo().await;
    let p = start(vec![service("s", echo.addr)]).await;
    let path = p.control();
    std::fs::set_permissions(p.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // Mode 0600 keeps other users out at connect.
    let out = tokio::task::spawn_blocking({
        let path = path.clone();
        move || run_peer_helper_as_nobody(&path)
    })
    .await
    .expect("join");
    assert!(out.contains("CONNECT-ERROR: PermissionDenied"), "{out}");
    // With the file opened up, SO_PEERCRED still refuses them.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = tokio::task::spawn_blocking(move || run_peer_helper_as_nobody(&path))
        .await
        .expect("join");
    assert!(out.contains("REPLY: "), "{out}");
    assert!(out.contains("\"kind\":\"permission_denied\""), "{out}");
    assert!(out.contains("uid 65534"), "{out}");
    assert_eq!(
        p.proxy
            .handle()
            .global_metrics()
            .control_refused_total
            .get(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_serves_prometheus_text() {
    let echo = tcp_echo().await;
    let p = start(vec![service("kv", echo.addr)]).await;
    let mut c = connect(p.tcp("kv")).await;
    c.write_all(b"abc").await.expect("write");
    let mut buf = [0u8; 3];
    c.read_exact(&mut buf).await.expect("echo");
    let addr = p.proxy.metrics_addr().expect("metrics");
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    };
    let body = get("/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK\r\n"), "{body}");
    assert!(body.contains("Content-Type: text/plain; version=0.0.4"));
    assert!(body.contains("# TYPE tether_proxy_flows gauge\n"));
    assert!(
        body.contains("tether_proxy_flows{service=\"kv\",proto=\"tcp\"} 1\n"),
        "{body}"
    );
    assert!(body.contains(
        "tether_proxy_bytes_total{service=\"kv\",proto=\"tcp\",direction=\"to_service\"} 3\n"
    ));
    assert!(body.contains("# TYPE tether_proxy_pause_seconds histogram\n"));
    assert!(get("/nothing").await.starts_with("HTTP/1.1 404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_says_when_the_service_first_answered_after_the_resume() {
    let echo = tcp_echo().await;
    let p = start(vec![service("s", echo.addr)]).await;
    let mut c = p.client().await;

    let e = c.answered("s", None).await.expect_err("no resume yet");
    assert_eq!(e.kind(), Some(ErrorKind::WrongState), "{e}");
    assert!(e.to_string().contains("has not been resumed"), "{e}");
    let e = c.answered("nope", None).await.expect_err("unknown");
    assert_eq!(e.kind(), Some(ErrorKind::UnknownService), "{e}");

    // A request held by the pause is answered after the resume: the answer is timed from
    // the release, and only TCP was expected (the service had no UDP flow).
    let mut s = connect(p.tcp("s")).await;
    s.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).await.expect("echo");
    c.pause("s", Duration::from_secs(1)).await.expect("pause");
    s.write_all(b"during").await.expect("write");
    tokio::time::sleep(Duration::from_millis(30)).await;
    c.resume("s").await.expect("resume");
    s.read_exact(&mut buf).await.expect("echo after the resume");
    assert_eq!(&buf, b"during");
    let a = c
        .answered("s", Some(Duration::from_secs(5)))
        .await
        .expect("answered");
    assert!(a.tcp_expected && !a.udp_expected, "{a:?}");
    let first = a.first_tcp_ms.expect("the echo was seen");
    assert!(first < 1000.0, "{a:?}");
    assert_eq!(a.first_udp_ms, None);
    let m = p.proxy.handle().metrics("s").expect("metrics");
    assert_eq!(m.first_answer.count(), 1);

    // A resume nobody answers: the reply comes at the timeout, with no answer.
    c.pause("s", Duration::from_secs(1)).await.expect("pause");
    c.resume("s").await.expect("resume");
    let a = c
        .answered("s", Some(Duration::from_millis(50)))
        .await
        .expect("answered");
    assert_eq!(a.first_tcp_ms, None, "{a:?}");
    assert!(a.resumed_ms_ago >= 50.0, "{a:?}");
    assert_eq!(m.first_answer.count(), 1, "no answer, no observation");
    let text = p.proxy.handle().metrics_text();
    assert!(
        text.contains("tether_proxy_first_answer_seconds_count{service=\"s\"} 1"),
        "{text}"
    );
}

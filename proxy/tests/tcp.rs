//! Loopback tests of the TCP data path: byte-exact relay with half-close, pause and resume with
//! traffic in flight, redirect, hold timeout, failed quiescence and limits.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tether_proxy::api::CommandError;
use tether_proxy::metrics::DropReason;
use tether_proxy::Phase;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;

const LONG: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_large_random_streams_both_ways_with_half_close() {
    const LEN: usize = 6 << 20;
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let p = start(vec![service("s", l.local_addr().expect("addr"))]).await;
    // Mode 0: both directions at once. Mode 1: the client closes first, the service answers
    // after EOF. Mode 2: the service answers and closes first, the client sends afterwards.
    let server = tokio::spawn(async move {
        for mode in 0..3u64 {
            let (s, _) = l.accept().await.expect("accept");
            let (mut rd, mut wr) = s.into_split();
            let a = random_bytes(mode * 2, LEN);
            let b = random_bytes(mode * 2 + 1, LEN);
            let send_b = async {
                write_chunked(&mut wr, &b, mode + 10).await;
                wr.shutdown().await.expect("shutdown");
            };
            match mode {
                0 => {
                    let (got, ()) = tokio::join!(read_to_end(&mut rd), send_b);
                    assert!(
                        got == a,
                        "mode 0: service got {} bytes, not the stream",
                        got.len()
                    );
                }
                1 => {
                    let got = read_to_end(&mut rd).await;
                    assert!(got == a, "mode 1: service got {} bytes", got.len());
                    send_b.await;
                }
                _ => {
                    send_b.await;
                    let got = read_to_end(&mut rd).await;
                    assert!(got == a, "mode 2: service got {} bytes", got.len());
                }
            }
        }
    });
    for mode in 0..3u64 {
        let c = connect(p.tcp("s")).await;
        let (mut rd, mut wr) = c.into_split();
        let a = random_bytes(mode * 2, LEN);
        let b = random_bytes(mode * 2 + 1, LEN);
        let send_a = async {
            write_chunked(&mut wr, &a, mode + 20).await;
            wr.shutdown().await.expect("shutdown");
        };
        match mode {
            0 => {
                let (got, ()) = tokio::join!(read_to_end(&mut rd), send_a);
                assert!(got == b, "mode 0: client got {} bytes", got.len());
            }
            1 => {
                send_a.await;
                let got = read_to_end(&mut rd).await;
                assert!(got == b, "mode 1: client got {} bytes", got.len());
            }
            _ => {
                let got = read_to_end(&mut rd).await;
                assert!(got == b, "mode 2: client got {} bytes", got.len());
                send_a.await;
            }
        }
    }
    server.await.expect("server");
    let m = p.proxy.handle().metrics("s").expect("metrics");
    assert_eq!(m.tcp_bytes_to_service.get(), 3 * LEN as u64);
    assert_eq!(m.tcp_bytes_to_client.get(), 3 * LEN as u64);
    assert_eq!(m.tcp_flows_total.get(), 3);
    eventually("flows closed", LONG, || m.tcp_flows.get() == 0).await;
    let g = p.proxy.handle().global_metrics();
    eventually("buffers freed", LONG, || g.tcp_buffer_bytes.get() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_with_traffic_in_flight_lose_duplicate_and_reorder_nothing() {
    const CONNS: u64 = 8;
    const LEN: usize = 2 << 20;
    let echo = tcp_echo().await;
    let p = start(vec![service("s", echo.addr)]).await;
    let mut clients = Vec::new();
    for i in 0..CONNS {
        let c = connect(p.tcp("s")).await;
        clients.push(tokio::spawn(async move {
            let (mut rd, mut wr) = c.into_split();
            let data = random_bytes(100 + i, LEN);
            let writer = async {
                // Paced, so that the pauses below find traffic in flight.
                for chunk in data.chunks(16 * 1024) {
                    wr.write_all(chunk).await.expect("write");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                wr.shutdown().await.expect("shutdown");
            };
            let (got, ()) = tokio::join!(read_to_end(&mut rd), writer);
            assert!(
                got.len() == data.len(),
                "conn {i}: {} of {} bytes",
                got.len(),
                data.len()
            );
            assert!(got == data, "conn {i}: echoed stream differs");
        }));
    }
    let total = CONNS * LEN as u64;
    let mut client = p.client().await;
    let mut pauses = 0;
    for k in 1..=5u64 {
        let threshold = total * k / 6;
        let t = std::time::Instant::now();
        eventually("progress", LONG, || {
            echo.received.load(Ordering::SeqCst) >= threshold
        })
        .await;
        let report = client
            .pause("s", Duration::from_secs(5))
            .await
            .expect("pause confirms");
        pauses += 1;
        eprintln!("pause {k}: waited {:?}, {report:?}", t.elapsed());
        // Quiesced: nothing unacknowledged upstream, nothing read from clients.
        let flows = client.flows("s").await.expect("flows");
        // (A flow whose client had finished sending may end during the pause.)
        assert!(report.tcp_flows >= flows.tcp.len() as u64);
        assert!(report.tcp_flows <= CONNS);
        for f in &flows.tcp {
            assert_eq!(f.upstream_outq, Some(0), "flow {f:?}");
            assert!(f.client_side_idle, "flow {f:?}");
        }
        // Nothing reaches the service while paused.
        let before = echo.received.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            echo.received.load(Ordering::SeqCst),
            before,
            "data passed a pause"
        );
        let st = client.status().await.expect("status");
        assert_eq!(st.services[0].phase, Phase::Paused);
        let r = client.resume("s").await.expect("resume");
        assert!(r.was_quiesced);
        assert_eq!(r.backend, echo.addr);
    }
    for c in clients {
        c.await.expect("client verified its stream");
    }
    assert_eq!(echo.received.load(Ordering::SeqCst), total);
    let m = p.proxy.handle().metrics("s").expect("metrics");
    assert_eq!(m.pauses_total.get(), pauses);
    assert_eq!(m.pause_duration.count(), pauses);
    assert_eq!(m.quiesce_duration.count(), pauses);
    assert_eq!(m.pause_failures_total.get(), 0);
}

/// One backend connection: what it read, and a way to make it write.
type ScriptedConn = (
    mpsc::UnboundedReceiver<Vec<u8>>,
    mpsc::UnboundedSender<Vec<u8>>,
);

/// A backend whose connections report what they read and write what they are told.
struct Scripted {
    addr: std::net::SocketAddr,
    conns: mpsc::UnboundedReceiver<ScriptedConn>,
    _task: tokio::task::JoinHandle<()>,
}

async fn scripted() -> Scripted {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, conns) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (mut rd, mut wr) = s.into_split();
            let (got_tx, got_rx) = mpsc::unbounded_channel();
            let (say_tx, mut say_rx) = mpsc::unbounded_channel::<Vec<u8>>();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 || got_tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some(v) = say_rx.recv().await {
                    if wr.write_all(&v).await.is_err() {
                        return;
                    }
                }
            });
            if tx.send((got_rx, say_tx)).is_err() {
                return;
            }
        }
    });
    Scripted {
        addr,
        conns,
        _task: task,
    }
}

async fn recv_exact(rx: &mut mpsc::UnboundedReceiver<Vec<u8>>, len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    while v.len() < len {
        let chunk = tokio::time::timeout(LONG, rx.recv())
            .await
            .expect("timely")
            .expect("open");
        v.extend_from_slice(&chunk);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_flows_keep_service_to_client_data_and_redirect_applies_to_new_connections() {
    let mut a = scripted().await;
    let mut b = scripted().await;
    let p = start(vec![service("s", a.addr)]).await;
    let mut client = p.client().await;

    let mut c1 = connect(p.tcp("s")).await;
    c1.write_all(b"before").await.expect("write");
    let (mut a1_got, a1_say) = a.conns.recv().await.expect("conn at A");
    assert_eq!(recv_exact(&mut a1_got, 6).await, b"before");

    client
        .pause("s", Duration::from_secs(5))
        .await
        .expect("pause");
    // Client → service is held ...
    c1.write_all(b"held").await.expect("write while paused");
    // ... service → client keeps flowing.
    a1_say.send(b"while paused".to_vec()).expect("say");
    let mut buf = [0u8; 12];
    c1.read_exact(&mut buf).await.expect("read while paused");
    assert_eq!(&buf, b"while paused");
    // A connection accepted during the pause waits before connecting upstream.
    let mut c2 = connect(p.tcp("s")).await;
    c2.write_all(b"new").await.expect("write");
    let h = p.proxy.handle();
    eventually("second flow registered", LONG, || {
        h.status().services[0].tcp_flows == 2
    })
    .await;
    let flows = client.flows("s").await.expect("flows");
    assert_eq!(flows.tcp.len(), 2);
    assert_eq!(flows.tcp[1].stage, "waiting");
    assert_eq!(flows.tcp[1].backend, None);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(a1_got.try_recv().is_err(), "held data reached the service");
    assert!(
        a.conns.try_recv().is_err(),
        "a connection reached the service during the pause"
    );

    let r = client.redirect("s", b.addr).await.expect("redirect");
    assert_eq!((r.from, r.to, r.phase), (a.addr, b.addr, Phase::Paused));
    let r = client.resume("s").await.expect("resume");
    assert_eq!(r.backend, b.addr);

    // The existing connection stays on A and gets the held bytes; the new one goes to B.
    assert_eq!(recv_exact(&mut a1_got, 4).await, b"held");
    let (mut b2_got, b2_say) = b.conns.recv().await.expect("conn at B");
    assert_eq!(recv_exact(&mut b2_got, 3).await, b"new");
    b2_say.send(b"hi".to_vec()).expect("say");
    let mut buf = [0u8; 2];
    c2.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"hi");
    assert!(a.conns.try_recv().is_err());
    let flows = client.flows("s").await.expect("flows");
    assert_eq!(flows.tcp[0].backend, Some(a.addr));
    assert_eq!(flows.tcp[1].backend, Some(b.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_never_resumed_ends_by_itself_toward_the_old_backend() {
    let mut a = scripted().await;
    let b = scripted().await;
    let mut cfg = service("s", a.addr);
    cfg.limits.max_hold_ms = 300;
    let p = start(vec![cfg]).await;
    let mut client = p.client().await;
    let mut c1 = connect(p.tcp("s")).await;
    c1.write_all(b"x").await.expect("write");
    let (mut a1_got, _a1_say) = a.conns.recv().await.expect("conn at A");
    assert_eq!(recv_exact(&mut a1_got, 1).await, b"x");

    let mut phase = p.proxy.handle().watch_phase("s").expect("watch");
    let report = client
        .pause("s", Duration::from_millis(200))
        .await
        .expect("pause");
    assert!(report.max_hold_ms <= 300);
    client.redirect("s", b.addr).await.expect("redirect");
    c1.write_all(b"held").await.expect("write");
    // The pause ends by itself: the phase goes back to active.
    tokio::time::timeout(LONG, phase.wait_for(|p| *p == Phase::Active))
        .await
        .expect("hold timeout fired")
        .expect("watch");
    let st = client.status().await.expect("status");
    assert_eq!(st.services[0].phase, Phase::Active);
    assert_eq!(st.services[0].backend, a.addr, "the redirect was abandoned");
    assert_eq!(st.services[0].backend_before_pause, None);
    assert_eq!(st.services[0].max_hold_ms, 300);
    assert_eq!(recv_exact(&mut a1_got, 4).await, b"held");
    let mut c2 = connect(p.tcp("s")).await;
    c2.write_all(b"y").await.expect("write");
    let (mut a2_got, _a2_say) = a.conns.recv().await.expect("new conn at A");
    assert_eq!(recv_exact(&mut a2_got, 1).await, b"y");
    let m = p.proxy.handle().metrics("s").expect("metrics");
    assert_eq!(m.hold_timeouts_total.get(), 1);
    // A late resume finds nothing to resume.
    let e = client.resume("s").await.expect_err("not paused");
    assert_eq!(e.kind(), Some(tether_proxy::api::ErrorKind::WrongState));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_whose_upstream_does_not_drain_fails_naming_the_flow_and_is_undone() {
    // A service that never reads, with a small receive buffer.
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    sock.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = sock.local_addr().expect("addr");
    let l = sock.listen(16).expect("listen");
    let hold = tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        std::future::pending::<()>().await;
        drop(s);
    });
    let p = start(vec![service("s", addr)]).await;
    let c = connect(p.tcp("s")).await;
    let (_rd, mut wr) = c.into_split();
    let writer = tokio::spawn(async move {
        let data = random_bytes(1, 8 << 20);
        let _ = wr.write_all(&data).await;
    });
    let h = p.proxy.handle();
    eventually("upstream queue fills", LONG, || {
        h.metrics("s").expect("m").tcp_bytes_to_service.get() > 0
    })
    .await;
    let e = h
        .pause("s", Some(Duration::from_millis(100)))
        .await
        .expect_err("cannot quiesce");
    match &e {
        CommandError::NotQuiesced { flows, waited_ms } => {
            assert_eq!(flows.len(), 1, "{flows:?}");
            assert_eq!(flows[0].proto, "tcp");
            assert!(*waited_ms >= 100);
        }
        other => panic!("unexpected {other}"),
    }
    let mut client = p.client().await;
    let st = client.status().await.expect("status");
    assert_eq!(st.services[0].phase, Phase::Active, "the pause was undone");
    // The same through the control socket, with the flow listed in the reply.
    let e = client
        .pause("s", Duration::from_millis(50))
        .await
        .expect_err("cannot quiesce");
    match e {
        tether_proxy::control::ControlError::Rejected {
            kind, unquiesced, ..
        } => {
            assert_eq!(kind, tether_proxy::api::ErrorKind::NotQuiesced);
            assert_eq!(unquiesced.len(), 1);
        }
        other => panic!("unexpected {other}"),
    }
    assert_eq!(h.metrics("s").expect("m").pause_failures_total.get(), 2);
    writer.abort();
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_and_unreachable_backends_are_reset_and_counted() {
    let echo = tcp_echo().await;
    let mut cfg = service("s", echo.addr);
    cfg.limits.max_tcp_flows = 2.into();
    // A closed port for the second service.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut cfg2 = service("dead", closed);
    cfg2.udp_listen.clear();
    let p = start(vec![cfg, cfg2]).await;
    let h = p.proxy.handle();
    let _c1 = connect(p.tcp("s")).await;
    let _c2 = connect(p.tcp("s")).await;
    eventually("two flows", LONG, || h.status().services[0].tcp_flows == 2).await;
    assert_closed_at_once(p.tcp("s")).await;
    let m = h.metrics("s").expect("m");
    assert_eq!(m.drops(DropReason::TcpFlowLimit), 1);

    assert_closed_at_once(p.tcp("dead")).await;
    let md = h.metrics("dead").expect("m");
    assert_eq!(md.drops(DropReason::TcpUpstreamConnect), 1);
    let st = h.status();
    assert_eq!(st.services[1].drops.get("tcp_upstream_connect"), Some(&1));
}

/// Connects and expects the proxy to close the connection (the reset may already fail the
/// connect).
async fn assert_closed_at_once(addr: std::net::SocketAddr) {
    let Ok(mut c) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(LONG, c.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "connection must be closed: {r:?}"
    );
}

//! Loopback tests of the UDP data path: relay, hold and release in order, hold limits and drop
//! counters, the flow table limit under a flood, redirect and idle expiry.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tether_proxy::metrics::DropReason;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

const LONG: Duration = Duration::from_secs(10);

async fn client_socket(proxy: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(4 << 20)
        .expect("SO_RCVBUF");
    s.connect(proxy).await.expect("connect");
    s
}

async fn recv(s: &UdpSocket) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(LONG, s.recv(&mut buf))
        .await
        .expect("datagram in time")
        .expect("recv");
    buf.truncate(n);
    buf
}

async fn backend_recv(
    rx: &mut mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
) -> (SocketAddr, Vec<u8>) {
    tokio::time::timeout(LONG, rx.recv())
        .await
        .expect("datagram at the backend in time")
        .expect("backend running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_are_held_while_paused_and_released_in_order_and_replies_keep_flowing() {
    let mut echo = udp_echo().await;
    let p = start(vec![service("s", echo.addr)]).await;
    let mut ctl = p.client().await;
    let c = client_socket(p.udp("s")).await;
    for i in 0..10 {
        let m = format!("d{i}");
        c.send(m.as_bytes()).await.expect("send");
        assert_eq!(recv(&c).await, m.as_bytes());
    }
    let mut upstream = None;
    for i in 0..10 {
        let (from, d) = backend_recv(&mut echo.rx).await;
        assert_eq!(d, format!("d{i}").as_bytes());
        assert!(
            upstream.is_none_or(|u| u == from),
            "one upstream socket per flow"
        );
        upstream = Some(from);
    }
    let upstream = upstream.expect("upstream");

    let report = ctl.pause("s", Duration::from_secs(2)).await.expect("pause");
    assert_eq!(report.udp_flows, 1);
    for i in 0..20 {
        c.send(format!("h{i}").as_bytes()).await.expect("send");
    }
    let m = p.proxy.handle().metrics("s").expect("metrics");
    eventually("20 datagrams held", LONG, || m.held_datagrams.get() == 20).await;
    assert!(echo.rx.try_recv().is_err(), "a datagram passed the pause");
    let flows = ctl.flows("s").await.expect("flows");
    assert_eq!(flows.udp.len(), 1);
    assert_eq!(flows.udp[0].held_datagrams, 20);
    assert_eq!(flows.udp[0].upstream_local, upstream);
    // Service → client keeps flowing.
    echo.socket.send_to(b"s2c", upstream).await.expect("send");
    assert_eq!(recv(&c).await, b"s2c");

    let r = ctl.resume("s").await.expect("resume");
    assert_eq!(r.released_datagrams, 20);
    for i in 0..20 {
        let (from, d) = backend_recv(&mut echo.rx).await;
        assert_eq!(from, upstream);
        assert_eq!(d, format!("h{i}").as_bytes(), "released in order");
        assert_eq!(recv(&c).await, format!("h{i}").as_bytes());
    }
    assert_eq!(m.held_datagrams.get(), 0);
    assert_eq!(m.held_bytes.get(), 0);
    assert_eq!(m.released_datagrams_total.get(), 20);
    assert_eq!(m.udp_datagrams_to_service.get(), 30);
    assert_eq!(m.udp_datagrams_to_client.get(), 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_limits_drop_and_count_as_configured() {
    let mut echo = udp_echo().await;
    let mut by_count = service("count", echo.addr);
    by_count.tcp_listen.clear();
    by_count.limits.hold_flow_datagrams = 4;
    by_count.limits.hold_flow_bytes = 1000;
    by_count.limits.hold_total_datagrams = 6;
    let mut by_bytes = service("bytes", echo.addr);
    by_bytes.tcp_listen.clear();
    by_bytes.limits.hold_total_bytes = 300;
    let mut by_age = service("age", echo.addr);
    by_age.tcp_listen.clear();
    by_age.limits.hold_max_age_ms = 40;
    let p = start(vec![by_count, by_bytes, by_age]).await;
    let h = p.proxy.handle();

    // Per-flow datagrams, per-flow bytes, total datagrams.
    let a = client_socket(p.udp("count")).await;
    let b = client_socket(p.udp("count")).await;
    let c = client_socket(p.udp("count")).await;
    for s in [&a, &b, &c] {
        s.send(b"hello").await.expect("send");
        recv(s).await;
        backend_recv(&mut echo.rx).await;
    }
    h.pause("count", None).await.expect("pause");
    for i in 0..6 {
        a.send(format!("a{i}").as_bytes()).await.expect("send");
    }
    b.send(&[0u8; 1001]).await.expect("send");
    b.send(b"b0").await.expect("send");
    b.send(b"b1").await.expect("send");
    c.send(b"c0").await.expect("send");
    let m = h.metrics("count").expect("metrics");
    let dropped = |m: &tether_proxy::metrics::ServiceMetrics| {
        DropReason::ALL.iter().map(|r| m.drops(*r)).sum::<u64>()
    };
    eventually("all 10 datagrams handled", LONG, || {
        m.held_datagrams.get() as u64 + dropped(&m) == 10
    })
    .await;
    assert_eq!(m.held_datagrams.get(), 6);
    assert_eq!(m.drops(DropReason::HoldFlowDatagrams), 2);
    assert_eq!(m.drops(DropReason::HoldFlowBytes), 1);
    assert_eq!(m.drops(DropReason::HoldTotalDatagrams), 1);
    let st = h.status();
    assert_eq!(st.services[0].drops.get("hold_flow_datagrams"), Some(&2));
    assert_eq!(st.services[0].held_datagrams, 6);
    let r = h.resume("count").await.expect("resume");
    assert_eq!(r.released_datagrams, 6);
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(String::from_utf8(backend_recv(&mut echo.rx).await.1).expect("utf8"));
    }
    // Round-robin across flows, each flow in its order.
    assert_eq!(got, ["a0", "b0", "a1", "b1", "a2", "a3"]);

    // Total bytes.
    let a = client_socket(p.udp("bytes")).await;
    let b = client_socket(p.udp("bytes")).await;
    for s in [&a, &b] {
        s.send(b"hello").await.expect("send");
        recv(s).await;
        backend_recv(&mut echo.rx).await;
    }
    h.pause("bytes", None).await.expect("pause");
    a.send(&[1u8; 200]).await.expect("send");
    b.send(&[2u8; 200]).await.expect("send");
    b.send(&[3u8; 100]).await.expect("send");
    let m = h.metrics("bytes").expect("metrics");
    eventually("3 datagrams handled", LONG, || {
        m.held_datagrams.get() as u64 + dropped(&m) == 3
    })
    .await;
    assert_eq!(m.drops(DropReason::HoldTotalBytes), 1);
    assert_eq!(m.held_bytes.get(), 300);
    h.resume("bytes").await.expect("resume");
    assert_eq!(backend_recv(&mut echo.rx).await.1, vec![1u8; 200]);
    assert_eq!(backend_recv(&mut echo.rx).await.1, vec![3u8; 100]);

    // Age.
    let a = client_socket(p.udp("age")).await;
    a.send(b"hello").await.expect("send");
    recv(&a).await;
    backend_recv(&mut echo.rx).await;
    h.pause("age", None).await.expect("pause");
    for _ in 0..3 {
        a.send(b"old").await.expect("send");
    }
    let m = h.metrics("age").expect("metrics");
    eventually("held datagrams expire", LONG, || {
        m.drops(DropReason::HoldAge) == 3
    })
    .await;
    assert_eq!(m.held_datagrams.get(), 0);
    let r = h.resume("age").await.expect("resume");
    assert_eq!(r.released_datagrams, 0);
    a.send(b"new").await.expect("send");
    assert_eq!(backend_recv(&mut echo.rx).await.1, b"new");
    assert!(echo.rx.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_many_source_ports_is_capped_by_the_flow_table_and_spares_existing_flows() {
    const MAX: usize = 32;
    const FLOOD: usize = 400;
    let echo = udp_echo().await;
    let mut cfg = service("s", echo.addr);
    cfg.limits.udp_max_flows = MAX.into();
    let p = start(vec![cfg]).await;
    let existing = client_socket(p.udp("s")).await;
    existing.send(b"first").await.expect("send");
    assert_eq!(recv(&existing).await, b"first");

    let mut flood = Vec::new();
    let mut sent = 1u64;
    let mut seq = 0u32;
    for burst in 0..(FLOOD / 40) {
        for _ in 0..40 {
            let s = client_socket(p.udp("s")).await;
            s.send(b"flood-1").await.expect("send");
            s.send(b"flood-2").await.expect("send");
            sent += 2;
            flood.push(s);
        }
        // The existing flow still gets every answer, in order.
        for _ in 0..5 {
            let m = format!("ping {burst} {seq}");
            seq += 1;
            existing.send(m.as_bytes()).await.expect("send");
            sent += 1;
            assert_eq!(recv(&existing).await, m.as_bytes());
        }
    }
    let h = p.proxy.handle();
    let m = h.metrics("s").expect("metrics");
    eventually("every datagram relayed or dropped", LONG, || {
        m.udp_datagrams_to_service.get() + m.drops(DropReason::UdpFlowTableFull) == sent
    })
    .await;
    assert_eq!(h.status().services[0].udp_flows, MAX as u64);
    assert_eq!(m.udp_flows_total.get(), MAX as u64);
    assert_eq!(
        m.drops(DropReason::UdpFlowTableFull),
        2 * (FLOOD as u64 - (MAX as u64 - 1))
    );
    assert!(h
        .metrics_text()
        .contains("tether_proxy_drops_total{service=\"s\",reason=\"udp_flow_table_full\"} 738\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_moves_udp_flows_to_the_new_backend_from_the_same_proxy_port() {
    let mut a = udp_echo().await;
    let mut b = udp_echo().await;
    let p = start(vec![service("s", a.addr)]).await;
    let h = p.proxy.handle();
    let c = client_socket(p.udp("s")).await;
    c.send(b"one").await.expect("send");
    assert_eq!(recv(&c).await, b"one");
    let (from_a, _) = backend_recv(&mut a.rx).await;

    h.pause("s", None).await.expect("pause");
    c.send(b"two").await.expect("send");
    let m = h.metrics("s").expect("metrics");
    eventually("held", LONG, || m.held_datagrams.get() == 1).await;
    let r = h.redirect("s", b.addr).await.expect("redirect");
    assert_eq!((r.udp_flows, r.udp_flows_failed), (1, 0));
    h.resume("s").await.expect("resume");
    let (from_b, d) = backend_recv(&mut b.rx).await;
    assert_eq!(d, b"two");
    assert_eq!(from_b, from_a, "the service sees the same peer address");
    assert_eq!(recv(&c).await, b"two");
    // New flows go to the new backend too; the old one hears nothing more.
    let c2 = client_socket(p.udp("s")).await;
    c2.send(b"three").await.expect("send");
    assert_eq!(recv(&c2).await, b"three");
    assert_eq!(backend_recv(&mut b.rx).await.1, b"three");
    assert!(a.rx.try_recv().is_err());
    let flows = h.flows("s").await.expect("flows");
    assert!(flows.udp.iter().all(|f| f.backend == b.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flows_are_removed() {
    let echo = udp_echo().await;
    let mut cfg = service("s", echo.addr);
    cfg.limits.udp_idle_timeout_ms = 60;
    let p = start(vec![cfg]).await;
    let c = client_socket(p.udp("s")).await;
    c.send(b"x").await.expect("send");
    assert_eq!(recv(&c).await, b"x");
    let m = p.proxy.handle().metrics("s").expect("metrics");
    assert_eq!(m.udp_flows.get(), 1);
    eventually("idle flow removed", LONG, || m.udp_flows.get() == 0).await;
    // The client comes back as a new flow.
    c.send(b"y").await.expect("send");
    assert_eq!(recv(&c).await, b"y");
    assert_eq!(m.udp_flows_total.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_from_interleaved_clients_keep_per_flow_order_both_ways_also_when_held() {
    // Bursts larger than one recvmmsg batch (32) from three clients at once: the proxy takes
    // them in batches, sends each flow's run with one sendmmsg, and the echoes come back
    // batched the other way. Bursts stay small enough for loopback's socket buffers.
    const CLIENTS: usize = 3;
    const BURST: usize = 40;
    const ROUNDS: usize = 6;
    let mut echo = udp_echo().await;
    let p = start(vec![service("s", echo.addr)]).await;
    let mut ctl = p.client().await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(client_socket(p.udp("s")).await);
    }
    let msg = |c: usize, r: usize, i: usize| -> Vec<u8> {
        let mut m = format!("c{c} r{r} i{i:03} ").into_bytes();
        // Varied lengths, up to a full Ethernet-sized datagram.
        m.resize(
            m.len() + (c * 131 + r * 17 + i * 29) % 1400,
            b'a' + (i % 26) as u8,
        );
        m
    };
    let mut per_backend: std::collections::HashMap<SocketAddr, Vec<Vec<u8>>> =
        std::collections::HashMap::new();
    for r in 0..ROUNDS {
        // Every other round is sent while the service is paused and released at once.
        let held = r % 2 == 1;
        if held {
            ctl.pause("s", Duration::from_secs(2)).await.expect("pause");
        }
        for i in 0..BURST {
            for (c, s) in clients.iter().enumerate() {
                s.send(&msg(c, r, i)).await.expect("send");
            }
        }
        if held {
            let m = p.proxy.handle().metrics("s").expect("metrics");
            let all = (CLIENTS * BURST) as i64;
            eventually("the bursts held", LONG, || m.held_datagrams.get() == all).await;
            let res = ctl.resume("s").await.expect("resume");
            assert_eq!(res.released_datagrams, (CLIENTS * BURST) as u64);
        }
        for _ in 0..CLIENTS * BURST {
            let (from, d) = backend_recv(&mut echo.rx).await;
            per_backend.entry(from).or_default().push(d);
        }
        for (c, s) in clients.iter().enumerate() {
            for i in 0..BURST {
                assert_eq!(recv(s).await, msg(c, r, i), "echo to client {c}, round {r}");
            }
        }
    }
    // Each client has its own upstream socket, and the service saw each flow in order.
    assert_eq!(per_backend.len(), CLIENTS);
    for got in per_backend.values() {
        let c = usize::from(got[0][1] - b'0');
        let want: Vec<Vec<u8>> = (0..ROUNDS)
            .flat_map(|r| (0..BURST).map(move |i| (r, i)))
            .map(|(r, i)| msg(c, r, i))
            .collect();
        assert!(got == &want, "flow of client {c} reordered or changed");
    }
    let m = p.proxy.handle().metrics("s").expect("metrics");
    let all = (CLIENTS * BURST * ROUNDS) as u64;
    // The relay counts a run of datagrams after sending it: a client may read the last ones
    // before they are counted. Wait (briefly) for the counters to settle, then compare.
    let t0 = std::time::Instant::now();
    while (m.udp_datagrams_to_service.get() < all || m.udp_datagrams_to_client.get() < all)
        && t0.elapsed() < Duration::from_secs(2)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(m.udp_datagrams_to_service.get(), all);
    assert_eq!(m.udp_datagrams_to_client.get(), all);
    assert_eq!(
        DropReason::ALL.iter().map(|r| m.drops(*r)).sum::<u64>(),
        0,
        "nothing dropped"
    );
}

/// A release is round-robin across flows and paced: every flow's first held datagram reaches the
/// service before any flow's second, and 400 held datagrams go out over at least a dozen
/// milliseconds (32 a millisecond) instead of in one burst that a service's receive buffer
/// could not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_is_round_robin_across_flows_and_paced() {
    let mut echo = udp_echo().await;
    let mut svc = service("rr", echo.addr);
    svc.tcp_listen.clear();
    let p = start(vec![svc]).await;
    let h = p.proxy.handle();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let s = client_socket(p.udp("rr")).await;
        s.send(b"hello").await.expect("send");
        recv(&s).await;
        backend_recv(&mut echo.rx).await;
        clients.push(s);
    }
    h.pause("rr", None).await.expect("pause");
    for (c, s) in clients.iter().enumerate() {
        for i in 0..50 {
            s.send(format!("{c}:{i}").as_bytes()).await.expect("send");
        }
    }
    let m = h.metrics("rr").expect("metrics");
    eventually("400 datagrams held", LONG, || m.held_datagrams.get() == 400).await;
    let t0 = std::time::Instant::now();
    let r = h.resume("rr").await.expect("resume");
    assert_eq!(r.released_datagrams, 400);
    let mut got = Vec::new();
    for _ in 0..400 {
        got.push(String::from_utf8(backend_recv(&mut echo.rx).await.1).expect("utf8"));
    }
    let took = t0.elapsed();
    // The first round: datagram 0 of each of the 8 flows.
    let mut first: Vec<&str> = got[..8]
        .iter()
        .map(|d| d.split(':').nth(1).unwrap_or(""))
        .collect();
    first.dedup();
    assert_eq!(first, ["0"], "first round: {:?}", &got[..8]);
    // Each flow in its order.
    for c in 0..8 {
        let mine: Vec<usize> = got
            .iter()
            .filter_map(|d| d.strip_prefix(&format!("{c}:"))?.parse().ok())
            .collect();
        assert_eq!(mine, (0..50).collect::<Vec<_>>(), "flow {c}");
    }
    assert!(
        took >= Duration::from_millis(11),
        "400 datagrams released in {took:?}: not paced"
    );
}

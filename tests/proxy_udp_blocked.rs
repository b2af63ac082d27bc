//! One UDP flow whose upstream socket is full does not delay the other flows of its listener.
//!
//! The proxy's side of the link to the service is slowed to 4 Mbit/s (tbf with a queue longer than
//! any socket buffer, so that datagrams wait there charged to their socket; a FIFO: this kernel
//! has no fair-queueing qdisc). Flow A sends a burst of 1.8 MB, far more than its upstream socket's
//! send buffer holds, so that socket stays full for seconds; flow B then sends a few datagrams.
//! An actor that waited for A's socket handed B's datagrams to the kernel only after every A
//! datagram it had read before them, so B reached the service after all of A's. Now A's excess
//! waits in A's own backlog and B's datagrams go straight to the kernel: they reach the service
//! after the A datagrams already in the socket and qdisc, well before the rest of A's burst.
//! Order at the service, not time, is asserted. Needs root; fails when it is missing.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether::testbed::{prerequisites_or_fail, Host, HostProcess, Topology};

const SERVICE_PORT: u16 = 9000;
const PROXY_PORT: u16 = 7000;

#[test]
fn a_blocked_udp_flow_does_not_delay_another_flows_datagrams() {
    prerequisites_or_fail();
    let topo = Topology::builder()
        .with_proxy(true)
        .build()
        .expect("topology");
    let proxy_ip = topo.lan_addr(Host::Proxy);
    let backend_ip = topo.lan_addr(Host::Src);
    let dev = topo.lan_ifname(Host::Proxy);
    topo.run(
        Host::Proxy,
        &[
            "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", "4mbit", "burst", "1600",
            "limit", "4000000",
        ],
    )
    .expect("tbf on the proxy's link");

    // The service: records the order of arrivals (A's counted, B's numbered).
    let backend = topo
        .in_host(Host::Src, || UdpSocket::bind((backend_ip, SERVICE_PORT)))
        .expect("in src")
        .expect("bind the service");
    backend
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    // (A datagrams seen so far, B's index) for each B datagram; A's total.
    type Seen = (Vec<(usize, u8)>, usize);
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut last = Instant::now();
            // Until the link has been idle for a second (A's burst drained), at most 15 s.
            let start = Instant::now();
            while last.elapsed() < Duration::from_secs(1)
                && start.elapsed() < Duration::from_secs(15)
            {
                if let Ok(n) = backend.recv(&mut buf) {
                    last = Instant::now();
                    let mut s = seen.lock().expect("lock");
                    match (n, buf[0]) {
                        (2, b'B') => {
                            let a = s.1;
                            s.0.push((a, buf[1]));
                        }
                        (_, b'A') => s.1 += 1,
                        _ => {}
                    }
                }
            }
        })
    };

    let tether = env!("CARGO_BIN_EXE_tether");
    let log = topo.work_dir().join("proxy.log");
    let control = topo.work_dir().join("proxy.sock");
    let _proxy: HostProcess = topo
        .spawn(
            Host::Proxy,
            tether,
            [
                "proxy",
                "--name",
                "svc",
                "--backend",
                &format!("{backend_ip}:{SERVICE_PORT}"),
                "--udp-listen",
                &format!("{proxy_ip}:{PROXY_PORT}"),
                "--control",
                control.to_str().expect("utf-8 path"),
            ],
            Some(&log),
        )
        .expect("start tether proxy");
    let t0 = Instant::now();
    while !control.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the proxy did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let to: SocketAddr = (proxy_ip, PROXY_PORT).into();
    let client = topo.lan_addr(Host::Client);
    let (a, b) = topo
        .in_host(Host::Client, || {
            (
                UdpSocket::bind((client, 0)).expect("bind A"),
                UdpSocket::bind((client, 0)).expect("bind B"),
            )
        })
        .expect("in client");

    // A: 1500 x 1200 bytes, paced (about 100 Mbit/s) so that the proxy's listen socket never
    // overflows; more than 3 s of the 4 Mbit/s link.
    let payload = [b'A'; 1200];
    for i in 0..1500 {
        a.send_to(&payload, to).expect("send A");
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // Let the proxy take A's burst and fill A's upstream socket.
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5u8 {
        b.send_to(&[b'B', i], to).expect("send B");
    }
    reader.join().expect("reader");

    let (bs, a_total) = seen.lock().expect("lock").clone();
    let stats = topo
        .run(Host::Proxy, &["tc", "-s", "qdisc", "show", "dev", dev])
        .unwrap_or_default();
    println!(
        "A datagrams at the service: {a_total}; B arrivals (A seen before, B#): {bs:?}\n{stats}"
    );
    assert_eq!(bs.len(), 5, "B's datagrams at the service: {bs:?}");
    assert!(
        a_total >= 500,
        "A's burst did not fill its socket (only {a_total} A datagrams reached the service)"
    );
    for (a_before, i) in &bs {
        assert!(
            *a_before * 2 < a_total,
            "B{i} reached the service after {a_before} of {a_total} A datagrams: it waited \
             behind the blocked flow"
        );
    }
    topo.close().expect("topology removed");
}

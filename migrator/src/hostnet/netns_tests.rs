//! [`HostNet`] against the kernel. Each test runs on a thread of its own in a network namespace
//! made just for it (`unshare(CLONE_NEWNET)` of that thread), with a current-thread tokio
//! runtime; the namespace, its links and its tables vanish with the thread, so nothing can leak
//! into the host. They need root (`CAP_NET_ADMIN`, `CAP_SYS_ADMIN`) and fail without it.
//! Verification may shell out to `ip` and `nft` (children inherit the thread's namespace).

use std::fs::File;
use std::future::Future;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use rtnetlink::{LinkUnspec, LinkVeth};
use serde_json::{json, Value};

use super::*;

const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const SVC_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);

fn svc() -> ServiceAddr {
    "10.77.0.100/24".parse().expect("valid")
}

fn host_addr() -> ServiceAddr {
    "10.77.0.1/24".parse().expect("valid")
}

/// Runs `test` on a new thread inside a fresh network namespace, on a current-thread runtime.
fn in_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWNET) {
            panic!(
                "needs root: CAP_SYS_ADMIN to create a network namespace, CAP_NET_ADMIN in it \
                 (unshare(CLONE_NEWNET) failed: {e})"
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(test());
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

/// A network namespace held open by a descriptor.
struct Netns(File);

impl Netns {
    /// The calling thread's namespace.
    fn current() -> Netns {
        Netns(File::open("/proc/thread-self/ns/net").expect("open /proc/thread-self/ns/net"))
    }

    /// A new namespace (the calling thread stays where it was).
    fn create() -> Netns {
        let here = Netns::current();
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("needs root: unshare(CLONE_NEWNET)");
        let new = Netns::current();
        here.enter();
        new
    }

    /// Moves the calling thread into this namespace.
    fn enter(&self) {
        nix::sched::setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("needs root: CAP_SYS_ADMIN for setns(CLONE_NEWNET)");
    }
}

fn hostnet() -> HostNet {
    HostNet::new().expect("HostNet::new (netlink route socket and libnftables)")
}

async fn add_veth(net: &HostNet, name: &str, peer: &str) {
    net.route()
        .link()
        .add(LinkVeth::new(name, peer).build())
        .execute()
        .await
        .expect("create a veth pair over rtnetlink");
}

async fn set_up(net: &HostNet, dev: &str) {
    let index = net.link(dev).await.expect("link").index();
    net.route()
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .expect("set the link up");
}

async fn move_to(net: &HostNet, dev: &str, ns: &Netns) {
    let index = net.link(dev).await.expect("link").index();
    net.route()
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(ns.0.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .expect("move the link to the other namespace");
}

/// Runs a tool in the calling thread's namespace; its stdout.
fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nft -j list ruleset`, without its metainfo and the kernel's handles.
fn ruleset() -> Vec<Value> {
    let v: Value = serde_json::from_str(&run("nft", &["-j", "list", "ruleset"])).expect("nft JSON");
    v["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter(|o| o.get("metainfo").is_none())
        .map(|o| {
            let mut o = o.clone();
            if let Some(inner) = o.as_object_mut().and_then(|m| m.values_mut().next()) {
                if let Some(m) = inner.as_object_mut() {
                    m.remove("handle");
                }
            }
            o
        })
        .collect()
}

/// The ruleset a block of `table` for SVC_IP on `dev` must be, as nft lists it.
fn expected_block(table: &str, dev: &str) -> Vec<Value> {
    let chain = |family: &str, hook: &str, prio: i32| {
        json!({"chain": {"family": family, "table": table, "name": hook, "type": "filter",
                         "hook": hook, "prio": prio, "policy": "accept"}})
    };
    let rule = |family: &str, chain: &str, expr: Value| json!({"rule": {"family": family, "table": table, "chain": chain, "expr": expr}});
    let meta = |k: &str| json!({"match": {"op": "==", "left": {"meta": {"key": k}}, "right": dev}});
    let payload = |proto: &str, field: &str| {
        json!({"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": field}},
                         "right": "10.77.0.100"}})
    };
    let drop = json!({"drop": null});
    vec![
        json!({"table": {"family": "inet", "name": table}}),
        chain("inet", "input", -300),
        chain("inet", "output", -300),
        rule(
            "inet",
            "input",
            json!([meta("iifname"), payload("ip", "daddr"), drop]),
        ),
        rule(
            "inet",
            "output",
            json!([meta("oifname"), payload("ip", "saddr"), drop]),
        ),
        json!({"table": {"family": "arp", "name": table}}),
        chain("arp", "input", 0),
        chain("arp", "output", 0),
        rule(
            "arp",
            "input",
            json!([meta("iifname"), payload("arp", "daddr ip"), drop]),
        ),
        rule("arp", "output", json!([payload("arp", "saddr ip"), drop])),
    ]
}

#[test]
fn addresses_are_added_listed_and_removed() {
    in_netns(|| async {
        let net = hostnet();
        add_veth(&net, "th0", "tp0").await;
        net.add_address(host_addr(), "th0").await.expect("add");
        let th0 = net.link("th0").await.expect("th0").index();

        // Idempotent add; listed once, with its interface.
        net.add_address(svc(), "th0").await.expect("add");
        net.add_address(svc(), "th0").await.expect("add again");
        let listed: Vec<IfAddr> = net
            .addresses()
            .await
            .expect("addresses")
            .into_iter()
            .filter(|a| a.addr == SVC_IP)
            .collect();
        assert_eq!(
            listed,
            [IfAddr {
                dev: "th0".into(),
                index: th0,
                addr: SVC_IP,
                prefix: 24
            }]
        );
        assert_eq!(
            net.interface_of(SVC_IP).await.expect("interface_of"),
            Some("th0".to_string())
        );
        assert_eq!(
            net.interface_of(Ipv4Addr::new(10, 77, 0, 101))
                .await
                .expect("interface_of"),
            None
        );

        // choose_interface: in use; by subnet; explicit; nowhere.
        match net.choose_interface(svc(), None).await {
            Err(NetError::AddressInUse { addr, dev }) => {
                assert_eq!((addr, dev.as_str()), (SVC_IP, "th0"))
            }
            other => panic!("expected AddressInUse, got {other:?}"),
        }
        let other: ServiceAddr = "10.77.0.101/24".parse().expect("valid");
        assert_eq!(
            net.choose_interface(other, None).await.expect("by subnet"),
            "th0"
        );
        assert_eq!(
            net.choose_interface(other, Some("tp0"))
                .await
                .expect("explicit"),
            "tp0"
        );
        let elsewhere: ServiceAddr = "10.99.0.5/24".parse().expect("valid");
        assert!(matches!(
            net.choose_interface(elsewhere, None).await,
            Err(NetError::NoInterface(a)) if a == elsewhere.addr()
        ));

        // A gateway of this host's routes is never a service address.
        set_up(&net, "th0").await;
        set_up(&net, "tp0").await;
        run(
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                "10.77.0.254",
                "dev",
                "th0",
            ],
        );
        assert!(net
            .gateways()
            .await
            .expect("gateways")
            .contains(&Ipv4Addr::new(10, 77, 0, 254)));
        let gateway: ServiceAddr = "10.77.0.254/24".parse().expect("valid");
        assert!(matches!(
            net.choose_interface(gateway, None).await,
            Err(NetError::Gateway(a)) if a == gateway.addr()
        ));

        // Removal, twice (absent is fine); gone from the listing and from `ip`.
        net.remove_address(svc(), "th0").await.expect("remove");
        net.remove_address(svc(), "th0")
            .await
            .expect("remove again");
        assert_eq!(net.interface_of(SVC_IP).await.expect("interface_of"), None);
        assert!(!run("ip", &["-4", "addr", "show", "dev", "th0"]).contains("10.77.0.100"));
        assert!(run("ip", &["-4", "addr", "show", "dev", "th0"]).contains("10.77.0.1/24"));

        // A missing interface is named as such.
        assert!(matches!(
            net.add_address(svc(), "nosuch0").await,
            Err(NetError::NoSuchInterface(d)) if d == "nosuch0"
        ));
        assert!(matches!(
            net.remove_address(svc(), "nosuch0").await,
            Err(NetError::NoSuchInterface(d)) if d == "nosuch0"
        ));
    });
}

#[test]
fn link_reports_index_and_mac() {
    in_netns(|| async {
        let net = hostnet();
        add_veth(&net, "th0", "tp0").await;
        let link = net.link("th0").await.expect("link");
        let shown: Value =
            serde_json::from_str(&run("ip", &["-j", "link", "show", "dev", "th0"])).expect("JSON");
        assert_eq!(Some(u64::from(link.index())), shown[0]["ifindex"].as_u64());
        let mac = link
            .mac()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(Some(mac.as_str()), shown[0]["address"].as_str());
        assert_ne!(link, net.link("tp0").await.expect("peer"));
        assert!(matches!(
            net.link("nosuch0").await,
            Err(NetError::NoSuchInterface(d)) if d == "nosuch0"
        ));
        assert!(matches!(
            net.link("a-name-longer-than-ifnamsiz").await,
            Err(NetError::NoSuchInterface(_))
        ));
        // The announcement goes out on an up link.
        set_up(&net, "th0").await;
        link.announce(SVC_IP).expect("gratuitous ARP");
    });
}

/// The source's lock: one `inet` table dropping the address both ways on every interface
/// (loopback too); an owned lock dies with the `HostNet` that made it, a kept one stays until
/// deleted, and deleting either works from the lock's maker.
#[test]
fn lock_drops_the_address_and_an_owned_lock_dies_with_its_maker() {
    in_netns(|| async {
        let net = hostnet();
        set_up(&net, "lo").await;
        net.add_address(svc(), "lo").await.expect("add");
        // Unlocked: a local connect to the address is refused at once (nothing listens).
        assert_eq!(
            tcp_connect(SVC_IP, Duration::from_secs(1)),
            Err(ErrorKind::ConnectionRefused)
        );

        let owner = hostnet();
        owner
            .lock("tether-frozen-t", SVC_IP, true)
            .await
            .expect("owned lock");
        assert_eq!(
            net.tables().await.expect("tables"),
            [(Family::Inet, "tether-frozen-t".to_string())]
        );
        let rules = run("nft", &["list", "table", "inet", "tether-frozen-t"]);
        assert!(rules.contains("flags owner"), "{rules}");
        assert!(rules.contains("ip daddr 10.77.0.100 drop"), "{rules}");
        assert!(rules.contains("ip saddr 10.77.0.100 drop"), "{rules}");
        // Locked, loopback included: the SYN is dropped, so the connect times out.
        assert_eq!(
            tcp_connect(SVC_IP, Duration::from_millis(400)),
            Err(ErrorKind::TimedOut)
        );
        // Locking again replaces the table.
        owner
            .lock("tether-frozen-t", SVC_IP, true)
            .await
            .expect("lock again");
        assert_eq!(net.tables().await.expect("tables").len(), 1);
        // Its maker gone, the kernel deletes it.
        drop(owner);
        assert!(net.tables().await.expect("tables").is_empty());
        assert_eq!(
            tcp_connect(SVC_IP, Duration::from_secs(1)),
            Err(ErrorKind::ConnectionRefused)
        );

        // A kept lock outlives its maker and is deleted like any table.
        let maker = hostnet();
        maker
            .lock("tether-lock-t", SVC_IP, false)
            .await
            .expect("kept lock");
        maker
            .lock("tether-frozen-t", SVC_IP, true)
            .await
            .expect("owned lock");
        maker
            .unlock(&[("tether-frozen-t", true)])
            .await
            .expect("unlock owned");
        maker
            .unlock(&[("tether-frozen-t", true)])
            .await
            .expect("unlock owned again");
        drop(maker);
        assert_eq!(
            net.tables().await.expect("tables"),
            [(Family::Inet, "tether-lock-t".to_string())]
        );
        net.unlock(&[("tether-frozen-x", true), ("tether-lock-t", false)])
            .await
            .expect("unlock kept");
        assert!(net.tables().await.expect("tables").is_empty());
        assert!(matches!(
            net.lock("x; flush ruleset", SVC_IP, false).await,
            Err(NetError::BadTableName(_))
        ));
    });
}

#[test]
fn block_installs_exactly_the_rules_and_delete_removes_them() {
    in_netns(|| async {
        let net = hostnet();
        assert!(ruleset().is_empty(), "a new namespace has no ruleset");
        net.block("CRIU-test1", SVC_IP, "th0").await.expect("block");
        assert_eq!(ruleset(), expected_block("CRIU-test1", "th0"));
        // Blocking again replaces, it does not add rules.
        net.block("CRIU-test1", SVC_IP, "th0")
            .await
            .expect("block again");
        assert_eq!(ruleset(), expected_block("CRIU-test1", "th0"));
        let mut tables = net.tables().await.expect("tables");
        tables.sort_by_key(|(f, _)| f.as_str());
        assert_eq!(
            tables,
            [
                (Family::Arp, "CRIU-test1".to_string()),
                (Family::Inet, "CRIU-test1".to_string())
            ]
        );

        net.delete_table("CRIU-test1").await.expect("delete");
        assert!(ruleset().is_empty());
        net.delete_table("CRIU-test1").await.expect("delete again");
        assert!(net.tables().await.expect("tables").is_empty());

        // CRIU's lock table (inet only, made elsewhere) goes too; other tables stay.
        run("nft", &["add", "table", "inet", "CRIU-lock"]);
        run("nft", &["add", "table", "ip", "other"]);
        net.delete_table("CRIU-lock")
            .await
            .expect("delete lock table");
        assert_eq!(
            net.tables().await.expect("tables"),
            [(Family::Ip, "other".to_string())]
        );

        // Refused before anything is sent.
        assert!(matches!(
            net.block("bad name", SVC_IP, "th0").await,
            Err(NetError::BadTableName(_))
        ));
        assert!(matches!(
            net.block("t", SVC_IP, "lo").await,
            Err(NetError::BadInterfaceName(_))
        ));
        assert!(matches!(
            net.block("t", SVC_IP, "eth*").await,
            Err(NetError::BadInterfaceName(_))
        ));
        assert!(matches!(
            net.delete_table("x;y").await,
            Err(NetError::BadTableName(_))
        ));
        assert_eq!(
            net.tables().await.expect("tables"),
            [(Family::Ip, "other".to_string())]
        );
    });
}

/// `connect` to `addr` with a deadline: Ok(()) if accepted, else the error kind.
fn tcp_connect(addr: Ipv4Addr, timeout: Duration) -> Result<(), ErrorKind> {
    TcpStream::connect_timeout(&SocketAddr::from((addr, 9)), timeout)
        .map(drop)
        .map_err(|e| e.kind())
}

fn neighbour_state(ip: Ipv4Addr, dev: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(&run(
        "ip",
        &["-j", "neigh", "show", &ip.to_string(), "dev", dev],
    ))
    .expect("JSON");
    v.as_array()
        .and_then(|a| a.first())
        .and_then(|n| n["state"].as_array())
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `ip neigh` holds a usable entry (one the kernel learnt or confirmed) for `ip`.
fn neighbour_known(ip: Ipv4Addr, dev: &str) -> bool {
    neighbour_state(ip, dev).iter().any(|s| {
        matches!(
            s.as_str(),
            "REACHABLE" | "STALE" | "DELAY" | "PROBE" | "PERMANENT"
        )
    })
}

/// Two namespaces joined by a veth pair: "host" (this thread's, `th0`, 10.77.0.1 and the
/// service address) and "peer" (`tp0`, 10.77.0.2). Nothing listens on TCP port 9 of the host:
/// an unblocked connect is refused (RST), a blocked one times out. Each of the block's rules is
/// observed on its own where traffic can show it: inbound IP (a datagram that never reaches a
/// bound socket), outbound IP (`EPERM` on send), inbound ARP (the host does not even learn the
/// asker, so the request never reached ARP processing).
#[test]
fn block_stops_traffic_between_namespaces_until_deleted() {
    in_netns(|| async {
        let host = Netns::current();
        let peer = Netns::create();
        let net = hostnet();
        add_veth(&net, "th0", "tp0").await;
        move_to(&net, "tp0", &peer).await;
        set_up(&net, "lo").await;
        set_up(&net, "th0").await;
        net.add_address(host_addr(), "th0").await.expect("add");
        net.add_address(svc(), "th0").await.expect("add");
        let host_mac = net.link("th0").await.expect("link").mac();
        let host_mac = host_mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let service = UdpSocket::bind((SVC_IP, 7777)).expect("bind the service's UDP port");
        service
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        let from_service = UdpSocket::bind((SVC_IP, 0)).expect("bind");

        peer.enter();
        let peer_net = hostnet();
        set_up(&peer_net, "lo").await;
        set_up(&peer_net, "tp0").await;
        peer_net
            .add_address("10.77.0.2/24".parse().expect("valid"), "tp0")
            .await
            .expect("add");
        let client = UdpSocket::bind((PEER_IP, 0)).expect("bind");
        // Unblocked: the host answers with a reset, and a datagram arrives.
        assert_eq!(
            tcp_connect(SVC_IP, Duration::from_secs(3)),
            Err(ErrorKind::ConnectionRefused)
        );
        client.send_to(b"before", (SVC_IP, 7777)).expect("send");
        let mut buf = [0u8; 16];
        assert_eq!(service.recv(&mut buf).expect("unblocked datagram"), 6);
        assert_eq!(
            from_service
                .send_to(b"x", (PEER_IP, 9))
                .expect("unblocked send"),
            1
        );

        host.enter();
        net.block("tether-t", SVC_IP, "th0").await.expect("block");
        // Outbound IP: the host cannot send from the address on th0...
        assert_eq!(
            from_service
                .send_to(b"x", (PEER_IP, 9))
                .map_err(|e| e.raw_os_error()),
            Err(Some(libc::EPERM)),
            "a datagram from the blocked address left"
        );
        // ...while loopback stays untouched: a local connect to the address is refused at once.
        assert_eq!(
            tcp_connect(SVC_IP, Duration::from_secs(1)),
            Err(ErrorKind::ConnectionRefused)
        );

        peer.enter();
        // The peer still knows the host's MAC for the address: its SYN arrives and nothing
        // answers.
        let t = Instant::now();
        assert_eq!(
            tcp_connect(SVC_IP, Duration::from_millis(600)),
            Err(ErrorKind::TimedOut),
            "a blocked connect must time out, not be answered"
        );
        assert!(t.elapsed() >= Duration::from_millis(500));
        // Inbound IP: with the MAC pinned, a datagram to the address reaches no socket.
        run(
            "ip",
            &[
                "neigh",
                "replace",
                "10.77.0.100",
                "lladdr",
                &host_mac,
                "dev",
                "tp0",
                "nud",
                "permanent",
            ],
        );
        client.send_to(b"blocked", (SVC_IP, 7777)).expect("send");
        host.enter();
        let got = service.recv(&mut buf).map_err(|e| e.kind());
        assert!(
            matches!(got, Err(ErrorKind::WouldBlock | ErrorKind::TimedOut)),
            "a datagram to the blocked address arrived: {got:?}"
        );

        // Inbound ARP: the host forgets the peer, the peer forgets the host; the peer's ARP
        // request for the address goes unanswered, and the host never learns the peer from it.
        run("ip", &["neigh", "flush", "dev", "th0"]);
        assert!(!neighbour_known(PEER_IP, "th0"));
        peer.enter();
        run("ip", &["neigh", "del", "10.77.0.100", "dev", "tp0"]);
        assert_eq!(
            tcp_connect(SVC_IP, Duration::from_millis(600)),
            Err(ErrorKind::TimedOut)
        );
        let state = neighbour_state(SVC_IP, "tp0");
        assert!(
            state.iter().any(|s| s == "INCOMPLETE" || s == "FAILED"),
            "ARP for the blocked address was answered: {state:?}"
        );
        host.enter();
        assert!(
            !neighbour_known(PEER_IP, "th0"),
            "the ARP request for the blocked address reached ARP processing: {:?}",
            neighbour_state(PEER_IP, "th0")
        );

        // The host's own address is not affected.
        peer.enter();
        assert_eq!(
            tcp_connect(HOST_IP, Duration::from_secs(3)),
            Err(ErrorKind::ConnectionRefused)
        );

        host.enter();
        net.delete_table("tether-t").await.expect("delete");
        assert!(net.tables().await.expect("tables").is_empty());
        assert_eq!(from_service.send_to(b"x", (PEER_IP, 9)).expect("send"), 1);

        peer.enter();
        assert_eq!(
            tcp_connect(SVC_IP, Duration::from_secs(3)),
            Err(ErrorKind::ConnectionRefused),
            "after delete_table the host must answer again (ARP and TCP)"
        );
        assert!(neighbour_known(SVC_IP, "tp0"));
        client.send_to(b"after", (SVC_IP, 7777)).expect("send");
        host.enter();
        assert_eq!(service.recv(&mut buf).expect("datagram after the block"), 5);
        assert_eq!(&buf[..5], b"after");

        assert!(net.tables().await.expect("tables").is_empty());
    });
}

//! Helpers shared by the loopback tests: backends, a proxy in a temporary directory, streams of
//! pseudo-random bytes, and waiting for a condition.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tether_proxy::{Config, Proxy, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

/// A proxy with its control socket in a temporary directory.
pub struct TestProxy {
    pub proxy: Proxy,
    pub dir: tempfile::TempDir,
}

impl TestProxy {
    pub fn control(&self) -> PathBuf {
        self.proxy.control_path().expect("control path").to_owned()
    }
    pub fn tcp(&self, service: &str) -> SocketAddr {
        self.proxy.tcp_addrs(service)[0]
    }
    pub fn udp(&self, service: &str) -> SocketAddr {
        self.proxy.udp_addrs(service)[0]
    }
    pub async fn client(&self) -> tether_proxy::control::Client {
        tether_proxy::control::Client::connect(self.control())
            .await
            .expect("control connect")
    }
}

/// A service listening on loopback port 0 for TCP and UDP.
pub fn service(name: &str, backend: SocketAddr) -> ServiceConfig {
    let mut s = ServiceConfig::new(name, backend);
    s.tcp_listen = vec!["127.0.0.1:0".parse().expect("addr")];
    s.udp_listen = vec!["127.0.0.1:0".parse().expect("addr")];
    s
}

pub async fn start(services: Vec<ServiceConfig>) -> TestProxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config {
        control: Some(dir.path().join("proxy.sock")),
        metrics: Some("127.0.0.1:0".parse().expect("addr")),
        services,
    };
    let proxy = Proxy::start(&config).await.expect("proxy starts");
    TestProxy { proxy, dir }
}

/// A TCP echo backend; counts the bytes it received.
pub struct TcpEcho {
    pub addr: SocketAddr,
    pub received: Arc<AtomicU64>,
    pub accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn tcp_echo() -> TcpEcho {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let received = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let (r, a) = (received.clone(), accepted.clone());
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            a.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            conns.spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    let n = match rd.read(&mut buf).await {
                        Ok(n) => n,
                        Err(_) => return,
                    };
                    if n == 0 {
                        let _ = wr.shutdown().await;
                        return;
                    }
                    r.fetch_add(n as u64, Ordering::SeqCst);
                    if wr.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    TcpEcho {
        addr,
        received,
        accepted,
        task,
    }
}

/// A UDP backend that reports every datagram and echoes it back.
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub socket: Arc<UdpSocket>,
    pub rx: mpsc::UnboundedReceiver<(SocketAddr, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn udp_echo() -> UdpEcho {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    // Room for bursts of a few hundred datagrams (the kernel caps it at rmem_max).
    socket2::SockRef::from(&*socket)
        .set_recv_buffer_size(4 << 20)
        .expect("SO_RCVBUF");
    let addr = socket.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    let s = socket.clone();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = s.recv_from(&mut buf).await else {
                continue;
            };
            let _ = tx.send((from, buf[..n].to_vec()));
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    UdpEcho {
        addr,
        socket,
        rx,
        task,
    }
}

/// `len` pseudo-random bytes from `seed` (xorshift64*: fast also in debug builds).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes `data` in chunks of random size.
pub async fn write_chunked<W: AsyncWriteExt + Unpin>(w: &mut W, data: &[u8], seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut off = 0;
    while off < data.len() {
        let n = rng.gen_range(1..=65536).min(data.len() - off);
        w.write_all(&data[off..off + n]).await.expect("write");
        off += n;
    }
}

/// Reads until EOF.
pub async fn read_to_end<R: AsyncReadExt + Unpin>(r: &mut R) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).await.expect("read");
    v
}

/// Waits until `cond` holds, checking every millisecond, at most `limit`.
pub async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    s
}

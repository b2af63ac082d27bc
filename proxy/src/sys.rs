//! The one place in tether-proxy that needs `unsafe`: two socket queries that neither nix nor
//! socket2 wraps (`SIOCOUTQ` and `TCP_INFO`), and batched UDP I/O (`recvmmsg`, `sendmmsg`).

#![allow(unsafe_code)]

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Most datagrams one [`recv_batch`] or [`send_batch`] call moves.
pub const BATCH: usize = 32;

/// Receives up to `min(bufs.len(), BATCH)` datagrams without blocking, with one `recvmmsg`
/// call. Returns how many arrived; `meta[i]` holds the length and sender of the datagram in
/// `bufs[i]`. A datagram longer than its buffer is reported with `truncated` set.
///
/// # Errors
///
/// `WouldBlock` when nothing is queued; any other error of `recvmmsg` (for a connected socket,
/// a pending ICMP error such as `ConnectionRefused`).
pub fn recv_batch(
    fd: BorrowedFd<'_>,
    bufs: &mut [Vec<u8>],
    meta: &mut [RecvMeta; BATCH],
) -> io::Result<usize> {
    let n = bufs.len().min(BATCH);
    // SAFETY: sockaddr_storage, iovec and mmsghdr are plain old data; all-zero is valid.
    let mut names: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
    let mut iovs: [MaybeUninit<libc::iovec>; BATCH] = [MaybeUninit::uninit(); BATCH];
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        let name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        let name_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let buf = (bufs[i].as_mut_ptr().cast(), bufs[i].len());
        point(&mut hdrs[i], &mut iovs[i], buf, Some((name, name_len)));
    }
    // SAFETY: the first `n` headers point to live, writable buffers (`bufs[i]`, of the length
    // given) and to live sockaddr_storage slots of the size given; the arrays outlive the call
    // and the kernel writes only within those bounds. `fd` is borrowed, so open for the call.
    let rc = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = usize::try_from(rc).unwrap_or(0).min(n);
    for i in 0..got {
        let h = &hdrs[i];
        // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes into names[i], which
        // is a sockaddr_storage, as SockAddr::new requires.
        let addr = unsafe { socket2::SockAddr::new(names[i], h.msg_hdr.msg_namelen) };
        meta[i] = RecvMeta {
            len: (h.msg_len as usize).min(bufs[i].len()),
            from: addr.as_socket(),
            truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        };
    }
    Ok(got)
}

/// Points `hdr` at one buffer (`base`, `len`), whose iovec it keeps in `iov`, and at a socket
/// address, if given. Only stores pointers: the caller's unsafe call is where they must be live.
fn point(
    hdr: &mut libc::mmsghdr,
    iov: &mut MaybeUninit<libc::iovec>,
    (base, len): (*mut libc::c_void, usize),
    name: Option<(*mut libc::c_void, libc::socklen_t)>,
) {
    let iov = iov.write(libc::iovec {
        iov_base: base,
        iov_len: len,
    });
    if let Some((name, name_len)) = name {
        hdr.msg_hdr.msg_name = name;
        hdr.msg_hdr.msg_namelen = name_len;
    }
    hdr.msg_hdr.msg_iov = iov;
    hdr.msg_hdr.msg_iovlen = 1;
}

/// What [`recv_batch`] reports of one datagram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvMeta {
    /// Bytes in the buffer.
    pub len: usize,
    /// The sender (`None` for an address family the proxy does not use).
    pub from: Option<SocketAddr>,
    /// The datagram was longer than the buffer (its tail is lost).
    pub truncated: bool,
}

/// Sends up to `BATCH` datagrams without blocking, with one `sendmmsg` call: to `to`, or on a
/// connected socket to its peer if `to` is `None`. Returns how many were sent (the first ones;
/// fewer than given when the socket buffer filled).
///
/// # Errors
///
/// `WouldBlock` when not even the first could be queued; any other error of `sendmmsg` for the
/// first datagram (for a connected socket, a pending ICMP error such as `ConnectionRefused`).
pub fn send_batch(
    fd: BorrowedFd<'_>,
    datagrams: &[&[u8]],
    to: Option<SocketAddr>,
) -> io::Result<usize> {
    let n = datagrams.len().min(BATCH);
    if n == 0 {
        return Ok(0);
    }
    let name = to.map(socket2::SockAddr::from);
    let mut iovs: [MaybeUninit<libc::iovec>; BATCH] = [MaybeUninit::uninit(); BATCH];
    // SAFETY: mmsghdr is plain old data; all-zero is valid (no name, no control data).
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
    let name = name
        .as_ref()
        .map(|a| (a.as_ptr().cast_mut().cast(), a.len()));
    for i in 0..n {
        // The kernel only reads through this pointer (sendmmsg).
        let buf = (datagrams[i].as_ptr().cast_mut().cast(), datagrams[i].len());
        point(&mut hdrs[i], &mut iovs[i], buf, name);
    }
    // SAFETY: the first `n` headers point to live buffers of the lengths given (`datagrams`)
    // and, if any, to a live socket address of the length given (`name`); sendmmsg only reads
    // them and writes the headers' msg_len. `fd` is borrowed, so open for the call.
    let rc = unsafe {
        libc::sendmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(rc).unwrap_or(0))
}

/// Bytes in a socket's send queue (`SIOCOUTQ`). For TCP: bytes not yet sent plus bytes sent but
/// not acknowledged. For UDP: bytes queued for sending and not yet handed to the device.
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ) writes one int through the pointer, which points to a live
    // local of that type; `fd` is borrowed, so open for the whole call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::try_from(n).unwrap_or(0))
}

/// The parts of `TCP_INFO` the proxy reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpInfo {
    /// `tcpi_state` (1 = established).
    pub state: u8,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Bytes in the send queue not yet sent.
    pub notsent_bytes: u32,
    /// Smoothed round-trip time in microseconds.
    pub rtt_us: u32,
    /// Retransmission timeout in microseconds.
    pub rto_us: u32,
}

/// Reads `TCP_INFO` of a TCP socket.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    // SAFETY: tcp_info is plain old data (integers only); all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a live local of that size, and
    // updates `len`; `fd` is borrowed, so open for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // Older kernels fill a prefix only; the fields below all lie within the first 64 bytes
    // except notsent_bytes, which is zero (from the zeroed value) when not filled.
    Ok(TcpInfo {
        state: info.tcpi_state,
        unacked: info.tcpi_unacked,
        notsent_bytes: info.tcpi_notsent_bytes,
        rtt_us: info.tcpi_rtt,
        rto_us: info.tcpi_rto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn outq_and_tcp_info_of_a_loopback_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut c = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        c.write_all(b"hello").expect("write");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("read");
        // Loopback acknowledges at once once the peer received the bytes.
        let mut tries = 0;
        while outq(c.as_fd()).expect("outq") != 0 && tries < 1000 {
            std::thread::yield_now();
            tries += 1;
        }
        assert_eq!(outq(c.as_fd()).expect("outq"), 0);
        let i = tcp_info(c.as_fd()).expect("tcp_info");
        assert_eq!(i.state, 1);
        assert_eq!(i.unacked, 0);
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        assert_eq!(outq(u.as_fd()).expect("udp outq"), 0);
    }

    #[test]
    fn batches_of_datagrams_keep_order_lengths_and_senders() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("addr");
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind b");
        b.connect(to).expect("connect");
        let mut meta = [RecvMeta::default(); BATCH];
        let mut bufs = vec![vec![0u8; 2048]; BATCH];
        // Nothing queued yet.
        let e = recv_batch(rx.as_fd(), &mut bufs, &mut meta).expect_err("empty");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let msgs: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; usize::from(i) * 30]).collect();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        // More than a batch: only BATCH go in one call, the rest in the next.
        let mut sent = 0;
        while sent < refs.len() {
            sent += send_batch(a.as_fd(), &refs[sent..], Some(to)).expect("send to");
        }
        assert_eq!(
            send_batch(b.as_fd(), &[b"connected"], None).expect("send"),
            1
        );
        assert_eq!(send_batch(b.as_fd(), &[], None).expect("nothing"), 0);
        let mut got = Vec::new();
        while got.len() < 41 {
            match recv_batch(rx.as_fd(), &mut bufs, &mut meta) {
                Ok(n) => {
                    for i in 0..n {
                        assert!(!meta[i].truncated);
                        got.push((bufs[i][..meta[i].len].to_vec(), meta[i].from));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("recv_batch: {e}"),
            }
        }
        let from_a = Some(a.local_addr().expect("a addr"));
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(&got[i].0, m, "datagram {i}");
            assert_eq!(got[i].1, from_a);
        }
        assert_eq!(got[40].0, b"connected");
        assert_eq!(got[40].1, Some(b.local_addr().expect("b addr")));
        // A datagram longer than its buffer is flagged, not silently cut.
        send_batch(a.as_fd(), &[&[7u8; 3000]], Some(to)).expect("long");
        let mut small = vec![vec![0u8; 1000]];
        loop {
            match recv_batch(rx.as_fd(), &mut small, &mut meta) {
                Ok(1) => break,
                Ok(n) => panic!("{n} datagrams"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("recv_batch: {e}"),
            }
        }
        assert!(meta[0].truncated);
        assert_eq!(meta[0].len, 1000);
    }
}

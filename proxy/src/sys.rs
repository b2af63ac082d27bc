//! The one place in tether-proxy that needs `unsafe`: two socket queries that neither nix nor
//! socket2 wraps (`SIOCOUTQ` and `TCP_INFO`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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
}

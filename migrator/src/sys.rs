//! The one place in tether-migrator that needs `unsafe`: handing a file descriptor to a child
//! process at a fixed number. Everything else uses safe wrappers (std, nix, tokio).

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::process::CommandExt;

/// Arranges for `fd` to be open as `target` (without close-on-exec) in the child that `cmd`
/// spawns. Every other descriptor stays close-on-exec, as std creates them.
pub fn pass_fd(cmd: &mut std::process::Command, fd: BorrowedFd<'_>, target: RawFd) {
    let src = fd.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: dup2 and fcntl are. `src` stays open in the parent until spawn returns
    // (the borrow outlives the spawn call in our callers), so it is open in the child too.
    unsafe {
        cmd.pre_exec(move || {
            if src == target {
                // dup2 onto itself keeps FD_CLOEXEC; clear it instead.
                let flags = libc::fcntl(src, libc::F_GETFD);
                if flags < 0 || libc::fcntl(src, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(src, target) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends one gratuitous ARP request (sender and target protocol address both `ip`) for `ip`
/// from interface `ifindex` with hardware address `mac`, to the Ethernet broadcast address.
/// Linux peers update an existing neighbour entry for `ip` from it at once.
pub fn send_gratuitous_arp(
    ifindex: u32,
    mac: [u8; 6],
    ip: std::net::Ipv4Addr,
) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const ETH_P_ARP: u16 = 0x0806;
    let frame = gratuitous_arp_frame(mac, ip);
    // SAFETY: plain socket(2) call; the returned descriptor is checked and then owned.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid starting value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ARP.to_be();
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `frame` and `sll` are valid for the lengths passed; `fd` is open for the call.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The Ethernet frame of a gratuitous ARP request (pure; tested without root).
pub(crate) fn gratuitous_arp_frame(mac: [u8; 6], ip: std::net::Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]); // destination: broadcast
    f[6..12].copy_from_slice(&mac); // source
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // EtherType ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac); // sender hardware address
    f[28..32].copy_from_slice(&ip.octets()); // sender protocol address
                                             // target hardware address stays zero
    f[38..42].copy_from_slice(&ip.octets()); // target protocol address
    f
}

/// Registers an owned descriptor with tokio's reactor.
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: `register` requires that the descriptor stays open and is not registered elsewhere
    // while the AsyncFd lives. We pass ownership of a freshly created descriptor that nothing
    // else holds, so it is closed only when the AsyncFd (its owner) is dropped.
    unsafe { tokio::io::unix::AsyncFd::register(fd).map_err(|e| e.into_parts().1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frame_layout() {
        let mac = [2, 0, 0, 0, 0, 9];
        let ip = std::net::Ipv4Addr::new(10, 77, 0, 100);
        let f = gratuitous_arp_frame(mac, ip);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &ip.octets());
        assert_eq!(&f[38..42], &ip.octets());
        assert_eq!(&f[32..38], &[0; 6]);
    }
}

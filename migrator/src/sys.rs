//! The one place in tether-migrator that needs `unsafe`: handing a file descriptor to a child
//! process at a fixed number, one raw ARP frame, registering a descriptor with tokio, and the
//! calls into libnftables (loaded at run time). Everything else uses safe wrappers (std, nix,
//! tokio).

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

/// A send-only packet socket (protocol 0: no receive hook) in the calling thread's network
/// namespace, for [`send_gratuitous_arp_on`]. Keep it open: closing a packet socket waits for an RCU
/// grace period (the kernel's `packet_release` calls `synchronize_net`), 7-19 ms here.
pub fn packet_socket() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2) call; the returned descriptor is checked and then owned.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sends one gratuitous ARP request (sender and target protocol address both `ip`) for `ip`
/// from interface `ifindex` with hardware address `mac`, to the Ethernet broadcast address,
/// through the packet socket `fd`. Linux peers update an existing neighbour entry for `ip` from
/// it at once.
pub fn send_gratuitous_arp_on(
    fd: BorrowedFd<'_>,
    ifindex: u32,
    mac: [u8; 6],
    ip: std::net::Ipv4Addr,
) -> std::io::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    let frame = gratuitous_arp_frame(mac, ip);
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

/// The name libnftables is loaded by (Debian's `libnftables1`, which CRIU links too).
pub const LIBNFTABLES: &str = "libnftables.so.1";

/// `NFT_CTX_DEFAULT` of `<nftables/libnftables.h>`: a context with its own netlink socket.
const NFT_CTX_DEFAULT: u32 = 0;
/// `NFT_CTX_OUTPUT_JSON`: JSON output, and JSON input is accepted.
const NFT_CTX_OUTPUT_JSON: u32 = 1 << 4;

type NftCtx = std::ffi::c_void;

/// The libnftables functions tether calls, resolved once per process.
struct NftApi {
    ctx_new: unsafe extern "C" fn(u32) -> *mut NftCtx,
    ctx_free: unsafe extern "C" fn(*mut NftCtx),
    output_set_flags: unsafe extern "C" fn(*mut NftCtx, std::ffi::c_uint),
    buffer_output: unsafe extern "C" fn(*mut NftCtx) -> std::ffi::c_int,
    buffer_error: unsafe extern "C" fn(*mut NftCtx) -> std::ffi::c_int,
    get_output_buffer: unsafe extern "C" fn(*mut NftCtx) -> *const std::ffi::c_char,
    get_error_buffer: unsafe extern "C" fn(*mut NftCtx) -> *const std::ffi::c_char,
    run_cmd_from_buffer:
        unsafe extern "C" fn(*mut NftCtx, *const std::ffi::c_char) -> std::ffi::c_int,
    /// Keeps the library mapped (and so the function pointers above valid) for the process's
    /// life: the `NftApi` lives in a static.
    _lib: libloading::Library,
}

/// Serialises every call into libnftables in this process. A context must not be used by two
/// threads at once, and the library keeps process-wide state besides (a one-time initialisation
/// in `nft_ctx_new`, an interface cache), so contexts of different namespaces are not
/// independent either.
static NFT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn nft_lock() -> std::sync::MutexGuard<'static, ()> {
    // The guarded data is `()`: a panic while holding it leaves nothing inconsistent here.
    NFT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn nft_api() -> Result<&'static NftApi, std::io::Error> {
    static API: std::sync::OnceLock<Result<NftApi, String>> = std::sync::OnceLock::new();
    API.get_or_init(|| load_nft_api().map_err(|e| format!("{LIBNFTABLES}: {e}")))
        .as_ref()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e.clone()))
}

fn load_nft_api() -> Result<NftApi, libloading::Error> {
    // SAFETY: loading libnftables runs its ELF constructors; it has none that depend on the
    // caller (it is a plain C library that CRIU and nft load the same way).
    let lib = unsafe { libloading::Library::new(LIBNFTABLES) }?;
    // SAFETY: (each `get` below) the types are the prototypes of `<nftables/libnftables.h>`
    // (nftables 0.9 to 1.1 keep them unchanged); the copied function pointers stay valid
    // because `lib` is stored beside them and never unloaded.
    unsafe {
        Ok(NftApi {
            ctx_new: *lib.get(b"nft_ctx_new\0")?,
            ctx_free: *lib.get(b"nft_ctx_free\0")?,
            output_set_flags: *lib.get(b"nft_ctx_output_set_flags\0")?,
            buffer_output: *lib.get(b"nft_ctx_buffer_output\0")?,
            buffer_error: *lib.get(b"nft_ctx_buffer_error\0")?,
            get_output_buffer: *lib.get(b"nft_ctx_get_output_buffer\0")?,
            get_error_buffer: *lib.get(b"nft_ctx_get_error_buffer\0")?,
            run_cmd_from_buffer: *lib.get(b"nft_run_cmd_from_buffer\0")?,
            _lib: lib,
        })
    }
}

/// A libnftables context: its netlink socket belongs to the network namespace of the thread
/// that created it, whichever thread uses it later. Input and output are JSON; output and
/// error messages are captured in buffers, never printed.
#[derive(Debug)]
pub struct Nftables {
    api: &'static NftApi,
    ctx: std::ptr::NonNull<NftCtx>,
}

impl std::fmt::Debug for NftApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(LIBNFTABLES)
    }
}

// SAFETY: a libnftables context is a heap object with no affinity to the thread that made it
// (its socket is a plain descriptor); every use goes through `NFT_LOCK`, so no two threads use
// it (or the library's global state) at once.
unsafe impl Send for Nftables {}

impl Nftables {
    /// Loads libnftables if needed and opens a context in this thread's network namespace.
    pub fn new() -> std::io::Result<Nftables> {
        let api = nft_api()?;
        let _guard = nft_lock();
        // SAFETY: plain constructor call. With NFT_CTX_DEFAULT it opens a NETLINK_NETFILTER
        // socket (libnftables exits the process if even that fails: nf_tables netlink missing).
        let raw = unsafe { (api.ctx_new)(NFT_CTX_DEFAULT) };
        let ctx = std::ptr::NonNull::new(raw).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::OutOfMemory, "nft_ctx_new failed")
        })?;
        // SAFETY: `ctx` is a live context from nft_ctx_new, used under the lock; on failure it
        // is freed here, once, and never used again.
        unsafe {
            (api.output_set_flags)(ctx.as_ptr(), NFT_CTX_OUTPUT_JSON);
            if (api.buffer_output)(ctx.as_ptr()) != 0 || (api.buffer_error)(ctx.as_ptr()) != 0 {
                (api.ctx_free)(ctx.as_ptr());
                return Err(std::io::Error::other(
                    "libnftables cannot buffer its output (fopencookie failed)",
                ));
            }
        }
        Ok(Nftables { api, ctx })
    }

    /// Runs `commands` (one JSON document) as one transaction. Ok: what libnftables printed
    /// (JSON, possibly empty); Err: its error messages, for people (no decision is made on them).
    pub fn run(&mut self, commands: &str) -> Result<String, String> {
        let input = std::ffi::CString::new(commands)
            .map_err(|_| "a command contains a NUL byte".to_string())?;
        let ctx = self.ctx.as_ptr();
        let _guard = nft_lock();
        // SAFETY: `ctx` is live and used under the lock; `input` is NUL-terminated and outlives
        // the call. The returned buffers are NUL-terminated strings owned by the context, valid
        // until its next call; they are copied out before the lock is released.
        unsafe {
            let rc = (self.api.run_cmd_from_buffer)(ctx, input.as_ptr());
            let output = cstr_lossy((self.api.get_output_buffer)(ctx));
            let errors = cstr_lossy((self.api.get_error_buffer)(ctx));
            if rc == 0 {
                Ok(output)
            } else {
                Err(errors.trim().to_string())
            }
        }
    }
}

/// Copies a C string that may be null.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string valid for the duration of the call.
unsafe fn cstr_lossy(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: per this function's contract.
        unsafe { std::ffi::CStr::from_ptr(p) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Nftables {
    fn drop(&mut self) {
        let _guard = nft_lock();
        // SAFETY: the context came from nft_ctx_new, is freed exactly once (here), under the lock.
        unsafe { (self.api.ctx_free)(self.ctx.as_ptr()) }
    }
}

/// Creates (or truncates) `name` in the directory `dir`, write-only, mode 0600. Allocates
/// nothing (for [`fork_child`]'s children).
pub fn create_at(
    dir: BorrowedFd<'_>,
    name: &std::ffi::CStr,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain openat(2) with a valid directory descriptor and a NUL-terminated name; the
    // returned descriptor is checked and then owned.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `f` in a forked copy of this process, in a process group of its own, and returns the
/// child's pid. The child gets `fds` as descriptors 3, 4, ... (passed to `f` in that order),
/// `/dev/null` as its standard streams, and no other descriptor of this process; its signal
/// handlers for SIGINT, SIGTERM, SIGHUP and SIGQUIT are the defaults; it exits with `f`'s
/// result without running destructors or exit handlers.
///
/// The child is a copy of a multi-threaded process in which only the calling thread goes on:
/// any lock another thread held at the fork (the allocator's among them) stays locked in it.
/// `f` must therefore not allocate, free, lock or log: plain system calls on its descriptors
/// and reads of memory it was handed. Whatever `f` owns must be forgotten, not dropped (wrap it
/// in [`std::mem::ManuallyDrop`]). The memory it reads is shared copy-on-write with this
/// process, which may drop its own copy of it at once.
pub fn fork_child<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    f: impl FnOnce([std::os::fd::OwnedFd; N]) -> i32,
) -> std::io::Result<i32> {
    use std::os::fd::{FromRawFd, OwnedFd};
    const FIRST: RawFd = 3;
    // Above anything the targets may be: sources are moved here before the targets are set.
    const STAGING: RawFd = 1000;
    static DEV_NULL: &std::ffi::CStr = c"/dev/null";
    let sources: [RawFd; N] = fds.map(|fd| fd.as_raw_fd());
    // SAFETY: fork(2) itself is safe to call; the child runs only async-signal-safe calls
    // (setpgid, signal, open, dup2, fcntl, close_range, _exit) before `f`, whose contract
    // (above) forbids what is not safe after a fork in a multi-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid > 0 {
        return Ok(pid);
    }
    // The child.
    // SAFETY: async-signal-safe system calls on descriptors this process owns; on any failure
    // the child exits at once with status 127 before running `f`.
    let fail = || -> ! { unsafe { libc::_exit(127) } };
    unsafe {
        libc::setpgid(0, 0);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut staged = [0 as RawFd; N];
        for (i, src) in sources.iter().enumerate() {
            staged[i] = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, STAGING);
            if staged[i] < 0 {
                fail();
            }
        }
        let null = libc::open(DEV_NULL.as_ptr(), libc::O_RDWR);
        if null < 0 {
            fail();
        }
        for std in 0..3 {
            if libc::dup2(null, std) < 0 {
                fail();
            }
        }
        for (i, s) in staged.iter().enumerate() {
            // dup2 clears close-on-exec on the new descriptor; nothing is exec'd anyway.
            if libc::dup2(*s, FIRST + i as RawFd) < 0 {
                fail();
            }
        }
        if libc::syscall(libc::SYS_close_range, FIRST + N as RawFd, u32::MAX, 0) < 0 {
            fail();
        }
    }
    // SAFETY: descriptor FIRST + i was just made a copy of the caller's i-th descriptor, and
    // nothing else in this process refers to it.
    let owned: [OwnedFd; N] =
        std::array::from_fn(|i| unsafe { OwnedFd::from_raw_fd(FIRST + i as RawFd) });
    let code = f(owned);
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
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

//! The destination's page server: it answers a `criu lazy-pages` daemon's page requests from the
//! page store, so that no `pages-*.img` file holding all of memory is rebuilt before a lazy
//! restore.
//!
//! The daemon speaks CRIU's page-server protocol (`criu/page-xfer.c`) when started with
//! `--page-server --ps-socket FD`: it sends a request per range of pages it needs (a fault, or
//! its background fill in runs of up to 4 MiB), and expects the answers in the order it asked:
//!
//! ```text
//!   daemon                                   tether
//!     │ PS_IOV_GET {nr_pages, vaddr, pid}  ──▶ │  look every page up in the store
//!     │ ◀── PS_IOV_ADD_F|PE_PRESENT {nr_pages, vaddr, pid}, then nr_pages × 4096 bytes
//!     │  ...                                   │
//!     │ PS_IOV_FORCE_CLOSE (all memory in) ──▶ │
//!     │ ◀── i32 status 0                       │  done: the server exits
//! ```
//!
//! A header is CRIU's `struct page_server_iov` in host byte order: `u32 cmd` (command in the
//! low 16 bits, flags above), 4 bytes of padding, `u64 nr_pages`, `u64 vaddr`, `u64 dst_id`
//! (for a request, the pid inside the tree's PID namespace whose memory is asked for).
//!
//! The serving loop neither allocates nor formats on the heap: it runs in a forked copy of the
//! agent ([`crate::sys::fork_child`]), where another thread may have held the allocator's lock
//! at the fork. Its outcome is left as a fixed-size [`Outcome`] record.

use std::io::{IoSlice, Read, Write};

use super::pages::{Owner, PAGE_SIZE, PE_PRESENT};

/// Bytes of a request or reply header.
pub const HEADER: usize = 32;
const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_GET: u32 = 7;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;
const PS_CMD_MASK: u32 = (1 << PS_CMD_BITS) - 1;

/// Most pages one request may ask for. CRIU's daemon asks for at most 4 MiB (its
/// `MAX_XFER_LEN`); a larger request is refused rather than served.
pub const MAX_REQUEST_PAGES: u64 = 4096;
/// Pages per `writev` (the kernel's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// One header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The command (low 16 bits of `cmd`).
    pub cmd: u32,
    /// The flags (high 16 bits of `cmd`).
    pub flags: u32,
    /// Pages.
    pub nr_pages: u64,
    /// First page's address.
    pub vaddr: u64,
    /// Whose memory (a pid, for the requests served here).
    pub dst_id: u64,
}

impl Header {
    /// A page request, as the daemon sends it.
    pub fn get(pid: u64, vaddr: u64, nr_pages: u64) -> Header {
        Header {
            cmd: PS_IOV_GET,
            flags: 0,
            nr_pages,
            vaddr,
            dst_id: pid,
        }
    }

    /// The daemon's close, sent once all memory is in place.
    pub fn close() -> Header {
        Header {
            cmd: PS_IOV_FORCE_CLOSE,
            flags: 0,
            nr_pages: 0,
            vaddr: 0,
            dst_id: 0,
        }
    }

    /// The header as CRIU lays it out.
    pub fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..4].copy_from_slice(&(self.flags << PS_CMD_BITS | self.cmd).to_ne_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_ne_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_ne_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_ne_bytes());
        b
    }

    /// A header read off the socket.
    pub fn decode(b: &[u8; HEADER]) -> Header {
        let word = |r: std::ops::Range<usize>| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[r]);
            u64::from_ne_bytes(w)
        };
        let cmd = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        Header {
            cmd: cmd & PS_CMD_MASK,
            flags: cmd >> PS_CMD_BITS,
            nr_pages: word(8..16),
            vaddr: word(16..24),
            dst_id: word(24..32),
        }
    }

    /// Whether this is the reply carrying pages.
    pub fn is_pages_reply(&self) -> bool {
        self.cmd == PS_IOV_ADD_F && self.flags == PE_PRESENT
    }
}

/// What a server did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Requests answered.
    pub requests: u64,
    /// Pages sent.
    pub pages: u64,
}

/// Why a server stopped before the daemon closed the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The daemon went away without its close: it died, or was killed (an undo).
    #[error("the lazy-pages daemon hung up before it had all memory")]
    Hangup,
    /// A command other than a page request or a close.
    #[error("unexpected page-server command {cmd:#x}: expected a page request ({PS_IOV_GET}) or a close")]
    Unexpected {
        /// The command.
        cmd: u32,
    },
    /// A request for more pages than one request may ask for.
    #[error("request for {nr_pages} pages at {vaddr:#x}: at most {MAX_REQUEST_PAGES} at once")]
    TooLarge {
        /// Pages asked for.
        nr_pages: u64,
        /// Where.
        vaddr: u64,
    },
    /// A request for a page nobody sent (not in the dump's page maps), or of an unknown pid.
    #[error("request for page {vaddr:#x} of pid {pid}, which the page store does not hold")]
    Missing {
        /// The requested pid.
        pid: u64,
        /// The first page missing.
        vaddr: u64,
    },
    /// Reading or writing the socket failed.
    #[error("page-server socket: {}", std::io::Error::from_raw_os_error(*errno))]
    Io {
        /// The errno.
        errno: i32,
    },
}

fn io(e: &std::io::Error) -> ServeError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::ConnectionReset => ServeError::Hangup,
        _ => ServeError::Io {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        },
    }
}

/// How a server ended: served until the daemon closed, or the error, with what it had done.
pub type Outcome = Result<ServeStats, (ServeError, ServeStats)>;

/// Bytes of an encoded [`Outcome`].
pub const OUTCOME_LEN: usize = 40;

/// Packs an outcome into a fixed-size record (the file the forked server leaves).
pub fn encode_outcome(o: &Outcome) -> [u8; OUTCOME_LEN] {
    let (kind, a, b, stats) = match o {
        Ok(s) => (0u64, 0, 0, s),
        Err((e, s)) => match *e {
            ServeError::Hangup => (1, 0, 0, s),
            ServeError::Unexpected { cmd } => (2, u64::from(cmd), 0, s),
            ServeError::TooLarge { nr_pages, vaddr } => (3, nr_pages, vaddr, s),
            ServeError::Missing { pid, vaddr } => (4, pid, vaddr, s),
            ServeError::Io { errno } => (5, errno as u64, 0, s),
        },
    };
    let mut out = [0u8; OUTCOME_LEN];
    for (i, w) in [kind, a, b, stats.requests, stats.pages].iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
    }
    out
}

/// Unpacks [`encode_outcome`]'s record; `None` for a record no server writes.
pub fn decode_outcome(b: &[u8; OUTCOME_LEN]) -> Option<Outcome> {
    let w = |i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(x)
    };
    let stats = ServeStats {
        requests: w(3),
        pages: w(4),
    };
    let e = match w(0) {
        0 => return Some(Ok(stats)),
        1 => ServeError::Hangup,
        2 => ServeError::Unexpected {
            cmd: u32::try_from(w(1)).ok()?,
        },
        3 => ServeError::TooLarge {
            nr_pages: w(1),
            vaddr: w(2),
        },
        4 => ServeError::Missing {
            pid: w(1),
            vaddr: w(2),
        },
        5 => ServeError::Io {
            errno: i32::try_from(w(1)).ok()?,
        },
        _ => return None,
    };
    Some(Err((e, stats)))
}

/// Answers the daemon's requests on `sock` from `lookup` (a page's data by owner and address)
/// until it closes the connection. Allocates nothing (it runs in a forked child, see the
/// [module documentation](self)).
pub fn serve<'s, S, L>(sock: &mut S, lookup: L) -> Outcome
where
    S: Read + Write,
    L: Fn(Owner, u64) -> Option<&'s [u8]>,
{
    let mut stats = ServeStats::default();
    // Every page of a request, looked up once (on the stack, 64 KiB: nothing here allocates).
    let mut pages: [IoSlice<'s>; MAX_REQUEST_PAGES as usize] =
        [IoSlice::new(&[]); MAX_REQUEST_PAGES as usize];
    let mut head = [0u8; HEADER];
    loop {
        if let Err(e) = sock.read_exact(&mut head) {
            return Err((io(&e), stats));
        }
        let req = Header::decode(&head);
        match req.cmd {
            PS_IOV_GET => {}
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                return match sock.write_all(&0i32.to_ne_bytes()) {
                    Ok(()) => Ok(stats),
                    Err(e) => Err((io(&e), stats)),
                };
            }
            cmd => return Err((ServeError::Unexpected { cmd }, stats)),
        }
        if req.nr_pages == 0 || req.nr_pages > MAX_REQUEST_PAGES {
            return Err((
                ServeError::TooLarge {
                    nr_pages: req.nr_pages,
                    vaddr: req.vaddr,
                },
                stats,
            ));
        }
        let owner = i32::try_from(req.dst_id)
            .ok()
            .filter(|p| *p > 0)
            .map(Owner::Pid);
        // Every page is looked up before anything is sent: a reply is whole or not sent.
        let n = req.nr_pages as usize;
        for (i, slot) in pages[..n].iter_mut().enumerate() {
            let vaddr = req.vaddr.wrapping_add(i as u64 * PAGE_SIZE as u64);
            let page = owner
                .filter(|_| vaddr >= req.vaddr)
                .and_then(|o| lookup(o, vaddr))
                .filter(|p| p.len() == PAGE_SIZE);
            let Some(page) = page else {
                return Err((
                    ServeError::Missing {
                        pid: req.dst_id,
                        vaddr,
                    },
                    stats,
                ));
            };
            *slot = IoSlice::new(page);
        }
        let reply = Header {
            cmd: PS_IOV_ADD_F,
            flags: PE_PRESENT,
            ..req
        }
        .encode();
        if let Err(e) = sock.write_all(&reply) {
            return Err((io(&e), stats));
        }
        for chunk in pages[..n].chunks_mut(IOV_MAX) {
            if let Err(e) = write_all_vectored(sock, chunk) {
                return Err((io(&e), stats));
            }
        }
        stats.requests += 1;
        stats.pages += req.nr_pages;
    }
}

/// `write_all` over slices (std's own is unstable).
fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::net::UnixStream;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    /// A daemon's side: sends `req`, reads the reply header and its pages.
    fn ask(sock: &mut UnixStream, req: Header) -> (Header, Vec<u8>) {
        sock.write_all(&req.encode()).expect("send request");
        let mut h = [0u8; HEADER];
        sock.read_exact(&mut h).expect("reply header");
        let h = Header::decode(&h);
        let mut data = vec![0u8; h.nr_pages as usize * PAGE_SIZE];
        sock.read_exact(&mut data).expect("reply pages");
        (h, data)
    }

    fn store() -> HashMap<(Owner, u64), Vec<u8>> {
        let mut m = HashMap::new();
        // 1,500 pages of pid 7 from 0x10000 (more than one writev), each filled with its index.
        for i in 0..1500u64 {
            m.insert((Owner::Pid(7), 0x10000 + i * 4096), page((i % 251) as u8));
        }
        m.insert((Owner::Pid(9), 0x5000), page(0xee));
        m
    }

    fn run(requests: impl FnOnce(&mut UnixStream) + Send + 'static) -> Outcome {
        let (mut ours, mut theirs) = UnixStream::pair().expect("socketpair");
        let daemon = std::thread::spawn(move || requests(&mut theirs));
        let s = store();
        let out = serve(&mut ours, |o, a| s.get(&(o, a)).map(Vec::as_slice));
        drop(ours);
        daemon.join().expect("daemon thread");
        out
    }

    #[test]
    fn headers_are_laid_out_as_criu_does() {
        let h = Header::get(42, 0x7f00_0000_1000, 3);
        let b = h.encode();
        assert_eq!(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]), 7);
        assert_eq!(&b[4..8], &[0; 4], "padding");
        assert_eq!(u64::from_ne_bytes(b[8..16].try_into().expect("8 bytes")), 3);
        assert_eq!(
            u64::from_ne_bytes(b[16..24].try_into().expect("8 bytes")),
            0x7f00_0000_1000
        );
        assert_eq!(
            u64::from_ne_bytes(b[24..32].try_into().expect("8 bytes")),
            42
        );
        assert_eq!(Header::decode(&b), h);
        let reply = Header {
            cmd: PS_IOV_ADD_F,
            flags: PE_PRESENT,
            ..h
        };
        let rb = reply.encode();
        assert_eq!(
            u32::from_ne_bytes([rb[0], rb[1], rb[2], rb[3]]),
            4 << 16 | 6
        );
        assert!(Header::decode(&rb).is_pages_reply());
    }

    #[test]
    fn serves_requests_in_order_then_closes() {
        let out = run(|s| {
            let (h, data) = ask(s, Header::get(7, 0x10000 + 4096, 1200));
            assert!(h.is_pages_reply());
            assert_eq!((h.nr_pages, h.vaddr, h.dst_id), (1200, 0x10000 + 4096, 7));
            for (i, p) in data.chunks(PAGE_SIZE).enumerate() {
                assert!(
                    p.iter().all(|b| *b == ((i as u64 + 1) % 251) as u8),
                    "page {i}"
                );
            }
            let (h, data) = ask(s, Header::get(9, 0x5000, 1));
            assert_eq!((h.nr_pages, h.dst_id), (1, 9));
            assert!(data.iter().all(|b| *b == 0xee));
            s.write_all(&Header::close().encode()).expect("close");
            let mut status = [0u8; 4];
            s.read_exact(&mut status).expect("status");
            assert_eq!(i32::from_ne_bytes(status), 0);
        });
        assert_eq!(
            out,
            Ok(ServeStats {
                requests: 2,
                pages: 1201
            })
        );
    }

    #[test]
    fn a_page_the_store_lacks_fails_without_a_partial_reply() {
        let out = run(|s| {
            s.write_all(&Header::get(7, 0x10000 + 1499 * 4096, 2).encode())
                .expect("send");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).expect("read until closed");
            assert!(
                rest.is_empty(),
                "nothing sent for a request it cannot serve"
            );
        });
        assert_eq!(
            out,
            Err((
                ServeError::Missing {
                    pid: 7,
                    vaddr: 0x10000 + 1500 * 4096
                },
                ServeStats::default()
            ))
        );
    }

    #[test]
    fn hostile_requests_are_refused() {
        let unexpected = run(|s| {
            let mut h = Header::get(7, 0x10000, 1);
            h.cmd = 1; // PS_IOV_ADD: a dump's command, not the daemon's
            s.write_all(&h.encode()).expect("send");
        });
        assert_eq!(
            unexpected,
            Err((ServeError::Unexpected { cmd: 1 }, ServeStats::default()))
        );
        let large = run(|s| {
            s.write_all(&Header::get(7, 0x10000, MAX_REQUEST_PAGES + 1).encode())
                .expect("send");
        });
        assert!(matches!(large, Err((ServeError::TooLarge { .. }, _))));
        let zero = run(|s| {
            s.write_all(&Header::get(7, 0x10000, 0).encode())
                .expect("send");
        });
        assert!(matches!(zero, Err((ServeError::TooLarge { .. }, _))));
        let bad_pid = run(|s| {
            s.write_all(&Header::get(u64::MAX, 0x10000, 1).encode())
                .expect("send");
        });
        assert!(matches!(bad_pid, Err((ServeError::Missing { .. }, _))));
        let wraps = run(|s| {
            s.write_all(&Header::get(7, u64::MAX - 4095, 2).encode())
                .expect("send");
        });
        assert!(matches!(wraps, Err((ServeError::Missing { .. }, _))));
    }

    #[test]
    fn a_daemon_that_goes_away_is_a_hangup() {
        let out = run(|s| {
            let _ = ask(s, Header::get(9, 0x5000, 1));
            // Half a header, then gone.
            s.write_all(&[7, 0, 0]).expect("send");
        });
        assert_eq!(
            out,
            Err((
                ServeError::Hangup,
                ServeStats {
                    requests: 1,
                    pages: 1
                }
            ))
        );
    }

    #[test]
    fn outcomes_survive_their_record() {
        let s = ServeStats {
            requests: 3,
            pages: 77,
        };
        for o in [
            Ok(s),
            Err((ServeError::Hangup, s)),
            Err((ServeError::Unexpected { cmd: 0x1234 }, s)),
            Err((
                ServeError::TooLarge {
                    nr_pages: 9999,
                    vaddr: 0x1000,
                },
                s,
            )),
            Err((
                ServeError::Missing {
                    pid: 5,
                    vaddr: 0x2000,
                },
                s,
            )),
            Err((ServeError::Io { errno: libc::EPIPE }, s)),
        ] {
            assert_eq!(decode_outcome(&encode_outcome(&o)), Some(o));
        }
        let mut junk = [0u8; OUTCOME_LEN];
        junk[0] = 99;
        assert_eq!(decode_outcome(&junk), None);
    }
}

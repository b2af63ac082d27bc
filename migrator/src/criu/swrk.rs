//! A CRIU worker: one `criu swrk` process driven over its RPC socket.
//!
//! CRIU's RPC is a `SOCK_SEQPACKET` socket carrying one protobuf message per packet: tether
//! sends a `criu_req`; CRIU answers with `criu_resp`s, of which `NOTIFY` ones (one per "action
//! script" point: pre-dump, network-lock, post-dump, ...) wait for tether's answer before CRIU
//! goes on. That wait is what lets the source hold a dumped, frozen and locked tree at
//! post-dump until the destination has restored it, and roll back by answering "failed" (CRIU
//! then unlocks the network and thaws the tree). If tether dies while CRIU waits, CRIU reads EOF,
//! takes it as a failed script and rolls back the same way: a crashed migrator leaves the service
//! running.
//!
//! The worker is spawned ahead of the freeze so that CRIU's process start-up stays out of the
//! downtime.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use prost::Message;
use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

use super::rpc::{Opts, Req, ReqType, Resp};
use super::CriuError;

/// CRIU never sends a response near this size; a larger packet is truncated and rejected.
const MAX_MSG: usize = 256 * 1024;
/// The descriptor number the RPC socket has inside the CRIU process.
const CHILD_FD: i32 = 3;

/// One running `criu swrk` and its RPC socket.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    sock: AsyncFd<OwnedFd>,
}

/// What CRIU sent.
#[derive(Debug)]
pub enum Event {
    /// A notification point; CRIU waits for [`Worker::answer_notify`].
    Notify {
        /// The action name, e.g. `pre-dump`, `network-lock`, `post-dump`, `post-restore`.
        script: String,
        /// The pid CRIU reports with some notifications (restore's root).
        pid: Option<i32>,
    },
    /// The final answer to the request.
    Done(Resp),
}

impl Worker {
    /// Starts `criu swrk` from `criu` with its RPC socket.
    pub fn spawn(criu: &Path) -> Result<Worker, CriuError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| CriuError::Spawn(io::Error::from(e)))?;
        let mut std_cmd = std::process::Command::new(criu);
        std_cmd
            .arg("swrk")
            .arg(CHILD_FD.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        crate::sys::pass_fd(&mut std_cmd, theirs.as_fd(), CHILD_FD);
        // Never killed on drop: killing CRIU while it holds a frozen tree would leave its sockets
        // in repair mode and its connections locked. Dropping the worker closes the RPC socket
        // instead, which CRIU takes as a failed notification and rolls back.
        let mut cmd = Command::from(std_cmd);
        let child = cmd.spawn().map_err(CriuError::Spawn)?;
        drop(theirs);
        set_nonblocking(&ours).map_err(CriuError::Spawn)?;
        let sock = crate::sys::async_fd(ours).map_err(CriuError::Spawn)?;
        Ok(Worker { child, sock })
    }

    /// The worker's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a request.
    pub async fn send(&self, req: &Req) -> Result<(), CriuError> {
        let buf = req.encode_to_vec();
        loop {
            let mut guard = self.sock.writable().await.map_err(CriuError::Rpc)?;
            match guard.try_io(|fd| {
                send(fd.get_ref().as_raw_fd(), &buf, MsgFlags::MSG_NOSIGNAL)
                    .map_err(io::Error::from)
            }) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(CriuError::Rpc(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Waits for CRIU's next message.
    pub async fn next(&self) -> Result<Event, CriuError> {
        let mut buf = vec![0u8; MAX_MSG];
        let n = loop {
            let mut guard = self.sock.readable().await.map_err(CriuError::Rpc)?;
            match guard.try_io(|fd| {
                recv(fd.get_ref().as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC)
                    .map_err(io::Error::from)
            }) {
                Ok(Ok(n)) => break n,
                Ok(Err(e)) => return Err(CriuError::Rpc(e)),
                Err(_would_block) => continue,
            }
        };
        if n == 0 {
            return Err(CriuError::WorkerExited);
        }
        if n > MAX_MSG {
            return Err(CriuError::Protocol(format!("message of {n} bytes")));
        }
        let resp = Resp::decode(&buf[..n]).map_err(|e| CriuError::Protocol(e.to_string()))?;
        if resp.r#type == ReqType::Notify as i32 {
            let notify = resp.notify.unwrap_or_default();
            return Ok(Event::Notify {
                script: notify.script.unwrap_or_default(),
                pid: notify.pid,
            });
        }
        Ok(Event::Done(resp))
    }

    /// Answers the pending notification: `ok = false` makes CRIU treat it as a failed action
    /// script (at post-dump: unlock the network and thaw the tree).
    pub async fn answer_notify(&self, ok: bool) -> Result<(), CriuError> {
        self.send(&Req {
            r#type: ReqType::Notify as i32,
            notify_success: Some(ok),
            ..Default::default()
        })
        .await
    }

    /// Sends a request and collects the final response, answering every notification with
    /// success.
    pub async fn call(&self, req: &Req) -> Result<Resp, CriuError> {
        self.send(req).await?;
        loop {
            match self.next().await? {
                Event::Notify { .. } => self.answer_notify(true).await?,
                Event::Done(resp) => return Ok(resp),
            }
        }
    }

    /// Closes the RPC socket without an answer and waits (bounded) for the worker to exit:
    /// CRIU takes the EOF as a failed notification at its next point and rolls back (unlocks
    /// and thaws the tree) before it exits.
    pub async fn hang_up(self) {
        let Worker { child, sock } = self;
        drop(sock);
        Worker::reap(child, Duration::from_secs(10)).await;
    }

    async fn reap(mut child: Child, within: Duration) {
        if tokio::time::timeout(within, child.wait()).await.is_err() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Waits (bounded) for the worker to exit, killing it if it does not.
    pub async fn finish(self) {
        Worker::reap(self.child, Duration::from_secs(5)).await;
    }
}

/// Default-filled options with the images directory given by path.
pub fn opts_for(images: &Path) -> Opts {
    Opts {
        images_dir_fd: -1,
        images_dir: Some(images.display().to_string()),
        ..Default::default()
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

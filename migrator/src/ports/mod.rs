//! The ports of a migration: what varies between deployments, as small traits that the drivers
//! (`driver`) call to carry out the machines' actions. The machines know none of them.
//!
//! | port | what it does | real adapter today | fake |
//! | --- | --- | --- | --- |
//! | [`Checkpointer`] | dump a unit with a hold point, end or thaw it; restore it stopped, resume or kill it | `criu::tree::CriuTree` (a process tree, CRIU RPC); on the source also `container::unit::ContainerSource` (a Podman container; its destination side is Podman's restore, in the agent's driver) | [`fake::FakeCheckpointer`] |
//! | [`AddressMover`] | the service address on a host: check, claim (block, add), go live (unblock, announce), give up | `hostnet::HostAddressMover` (netlink, nftables, raw ARP); `container::unit::ContainerNet` (in a container's namespace) | [`fake::FakeNet`] |
//! | [`TrafficGate`] | the proxy in front of the service: pause, redirect, resume, undo | `gate::ProxyGate` (tether-proxy's control socket) | [`fake::FakeGate`] |
//! | [`Journal`] | durable records of migrations in flight, and outcomes | `journal::FileJournal` (one JSON file per migration) | [`fake::MemoryJournal`] |
//!
//! Every method reports failures as [`PortError`]s (code and message, with the underlying
//! error as its source), which the drivers feed back to the machines.

pub mod fake;

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::machine::agent::RestoreInfo;
use crate::machine::source::{DumpEnd, PauseInfo, ResumeInfo};
use crate::machine::PortError;
use crate::protocol::{MigrationId, ServiceAddr};

pub use crate::machine::PortError as Error;

/// Where a dump stopped and waits for the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DumpPoint {
    /// Set up, the unit still runs (`pre-dump`).
    PreFreeze,
    /// The unit is frozen; nothing of it is dumped yet (its sockets are locked by the caller
    /// before it goes on).
    Frozen,
    /// The images are complete; the unit is held frozen (`post-dump`).
    Held,
}

/// A dump in progress, held at its points until the driver lets it go on.
pub trait Dump: Send + 'static {
    /// Lets the dump go on from the point it waits at, and returns at the next point. Must be
    /// cancel-safe: dropping the future leaves the dump at a consistent point, so that
    /// [`rollback`](Dump::rollback) can follow.
    fn proceed(&mut self) -> impl Future<Output = Result<DumpPoint, PortError>> + Send;
    /// Tells the dump, held at [`DumpPoint::Held`], to end the unit (the commit point). Once
    /// this returns `Ok` the unit cannot come back (it stays locked until it is gone).
    fn answer_commit(&mut self) -> impl Future<Output = Result<(), PortError>> + Send;
    /// After [`answer_commit`](Dump::answer_commit): waits until the unit is gone (killing it
    /// if the dump failed to). `Ok` means it is gone.
    fn commit(self) -> impl Future<Output = Result<DumpEnd, PortError>> + Send;
    /// Abandons the dump: the unit is unlocked and thawed (or never frozen) and runs on.
    fn rollback(self) -> impl Future<Output = Result<(), PortError>> + Send;
    /// The dump's helper process (CRIU's worker) and its start time, for the journal: a
    /// recovery waits for it to end before it looks at the unit.
    fn worker(&self) -> Option<(i32, u64)>;
}

/// A server that fills a restored tree's memory after it runs (CRIU's lazy-pages daemon),
/// started as soon as the destination has the image files, before the restore.
pub trait LazyServer: Send + 'static {
    /// Its process and start time, for the journal.
    fn pid(&self) -> Option<(i32, u64)>;
    /// Waits until it serves, at most `within`.
    fn ready(
        &mut self,
        within: std::time::Duration,
    ) -> impl Future<Output = Result<(), PortError>> + Send;
    /// From now on it outlives its handle: the service it fills is committed.
    fn detach(&mut self);
    /// Whether it asks for its pages (to be answered from the page store, see
    /// [`LazyServer::serve`]) rather than reading complete pages files.
    fn asks_for_pages(&self) -> bool;
    /// Answers its page requests from `store` from now on (it was started `from_store`).
    fn serve(&mut self, store: crate::pagestore::PageStore) -> Result<(), PortError>;
    /// Waits until every page is in place; returns how long it ran.
    fn wait(&mut self) -> impl Future<Output = Result<std::time::Duration, PortError>> + Send;
}

/// Checkpoint and restore of the unit a migration moves (a process tree, or on the source a
/// Podman container).
pub trait Checkpointer: Send + Sync + 'static {
    /// A dump in progress.
    type Dump: Dump;
    /// A lazy-pages server.
    type Lazy: LazyServer;

    /// Starts a lazy-pages server for the image set in `images`, if restores here are lazy;
    /// with `from_store` it will ask for its pages from the page store ([`LazyServer::serve`])
    /// instead of reading pages files.
    fn start_lazy(&self, images: &Path, from_store: bool) -> Result<Option<Self::Lazy>, PortError>;

    /// The unit's root process here, for pre-copy's scans of its memory.
    fn root_pid(&self) -> i32;

    /// Starts dumping the unit into `images` and returns once the dump waits at
    /// [`DumpPoint::PreFreeze`].
    fn start_dump(
        &self,
        images: &Path,
    ) -> impl Future<Output = Result<Self::Dump, PortError>> + Send;

    /// Whether the unit's source copy exists, once the dump's helper (`worker`, from the
    /// journal) has ended.
    fn source_copy_exists(
        &self,
        worker: Option<(i32, u64)>,
    ) -> impl Future<Output = Result<bool, PortError>> + Send;

    /// Kills the unit's source copy (after a commit whose dump did not end it).
    fn kill_source_copy(&self) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Restores the unit on this host from `images`, running (the way back when the
    /// destination cannot run its copy). Returns the restored root's pid.
    fn restore_here(&self, images: &Path) -> impl Future<Output = Result<i32, PortError>> + Send;

    /// Restores the unit from `images`, left stopped; `on_pid` is called with its root's pid
    /// as soon as it is known (before it could run).
    fn restore_stopped(
        &self,
        images: &Path,
        lazy: bool,
        on_pid: impl FnOnce(i32) + Send + 'static,
    ) -> impl Future<Output = Result<RestoreInfo, PortError>> + Send;

    /// Lets a tree restored stopped run.
    fn resume(&self, pid: i32) -> Result<(), PortError>;

    /// Kills a restored tree if `pid` is still the process that started at `start`.
    fn kill(&self, pid: i32, start: u64) -> bool;

    /// Whether `pid` is still the process that started at `start`.
    fn alive(&self, pid: i32, start: u64) -> bool;

    /// The start time of process `pid`, which tells it from a later process that reuses the
    /// pid (journaled with the pid); `None` if it does not run.
    fn start_time(&self, pid: i32) -> Option<u64>;

    /// Whether a tree restored stopped (root `pid`, started at `start`) is still whole, for an
    /// agent that finds it after a restart: it exists, and its memory is all in place: its
    /// lazy-pages server (`lazy`, if it had one) still runs, or every page of `images` is in
    /// its memory (the tree has not run since the restore, so nothing else may differ). With
    /// `served` (its lazy pages came from the page store, so `images` holds only the pages the
    /// restore read itself), the page server must have served at least that many pages.
    fn restored_intact(
        &self,
        pid: i32,
        start: u64,
        lazy: Option<(i32, u64)>,
        served: Option<u64>,
        images: &Path,
    ) -> impl Future<Output = bool> + Send;
}

/// The service address on this host.
pub trait AddressMover: Send + Sync + 'static {
    /// Checks that `svc` is not configured here and picks its interface (`explicit`, or the
    /// one whose subnet contains it).
    fn check_free(
        &self,
        svc: ServiceAddr,
        explicit: Option<&str>,
    ) -> impl Future<Output = Result<String, PortError>> + Send;

    /// The interface carrying `addr` here, if any.
    fn interface_of(
        &self,
        addr: Ipv4Addr,
    ) -> impl Future<Output = Result<Option<String>, PortError>> + Send;

    /// Blocks `svc` under table `table` (inbound, outbound and ARP on `dev`), then adds it to
    /// `dev`: this host holds the address without answering for it.
    fn claim(
        &self,
        table: &str,
        svc: ServiceAddr,
        dev: &str,
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Adds `svc` to `dev` (already there is fine).
    fn add(
        &self,
        svc: ServiceAddr,
        dev: &str,
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Removes `svc` from `dev` (absent is fine).
    fn remove(
        &self,
        svc: ServiceAddr,
        dev: &str,
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Deletes table `table` (every family; absent is fine): lifts a block.
    fn delete_table(&self, table: &str) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Locks `addr` here under table `table`: every packet to or from it is dropped, on every
    /// interface, so that no socket of the service answers or is answered for (a frozen copy's
    /// sockets in repair mode, a dead copy's closed ones). With `owned`, the lock is tied to this
    /// process: the kernel lifts it if the process dies.
    fn lock(
        &self,
        table: &str,
        addr: Ipv4Addr,
        owned: bool,
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Lifts the locks `tables` (name, and whether it was taken `owned`) in one step; absent
    /// ones are fine.
    fn unlock(
        &self,
        tables: &[(String, bool)],
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Announces `addr` from `dev` (gratuitous ARP): the LAN sends its packets here.
    fn announce(
        &self,
        addr: Ipv4Addr,
        dev: &str,
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Blocks `svc` on the LAN interface `dev` itself, under table `table`, without adding it
    /// here: for a container, whose address lives in a network namespace of its own behind
    /// `dev` (a macvlan), which the block reaches before that namespace sees anything. Frames
    /// to and from `mac` (the container's static MAC, if it has one) are dropped too, so that
    /// the LAN does not learn it here early. Lifted by [`delete_table`](Self::delete_table).
    fn block_behind(
        &self,
        table: &str,
        svc: ServiceAddr,
        dev: &str,
        mac: Option<[u8; 6]>,
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Announces `addr` from `dev` with `mac` as its hardware address (a container's, behind
    /// `dev`).
    fn announce_as(
        &self,
        addr: Ipv4Addr,
        dev: &str,
        mac: [u8; 6],
    ) -> impl Future<Output = Result<(), PortError>> + Send;
}

/// The proxy in front of the service, as a migration drives it.
pub trait TrafficGate: Send + 'static {
    /// Pauses the service's flows (nothing in flight toward the service when it returns).
    fn pause(&mut self) -> impl Future<Output = Result<PauseInfo, PortError>> + Send;
    /// Points new flows at the new location.
    fn redirect(&mut self) -> impl Future<Output = Result<(), PortError>> + Send;
    /// Resumes the flows; a pause that had ended by itself gets the redirect again.
    fn resume(&mut self) -> impl Future<Output = Result<ResumeInfo, PortError>> + Send;
    /// Points the proxy back at the source and resumes it.
    fn undo(&mut self) -> impl Future<Output = Result<(), PortError>> + Send;
}

/// Durable records of migrations in flight (`R`), and the outcomes of ended ones (`O`).
pub trait Journal<R, O>: Send + Sync + 'static
where
    R: Serialize + DeserializeOwned,
    O: Serialize + DeserializeOwned,
{
    /// Records (replaces) the record of migration `id`, durably before returning.
    fn save(&self, id: &MigrationId, record: &R) -> Result<(), PortError>;
    /// Drops the record of `id`.
    fn forget(&self, id: &MigrationId) -> Result<(), PortError>;
    /// Every record, with its id (unreadable ones are reported and skipped).
    fn records(&self) -> Vec<(MigrationId, R)>;
    /// Records the outcome of `id` and drops its record.
    fn end(&self, id: &MigrationId, outcome: &O) -> Result<(), PortError>;
    /// The recorded outcome of `id`, if it ended.
    fn outcome(&self, id: &MigrationId) -> Option<O>;
}

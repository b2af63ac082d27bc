//! Fakes of the ports, for tests that must run without root, CRIU or network namespaces: they
//! keep the state the real adapters would change (copies of the service, addresses, blocks,
//! the proxy, journal records) in one shared [`FakeWorld`], and can be told to fail.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{AddressMover, Checkpointer, Dump, DumpPoint, Journal, LazyServer, TrafficGate};
use crate::machine::agent::RestoreInfo;
use crate::machine::source::{DumpEnd, PauseInfo, ResumeInfo};
use crate::machine::PortError;
use crate::protocol::{ErrorCode, MigrationId, ServiceAddr};

/// A copy of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FakeCopy {
    /// No such copy.
    #[default]
    None,
    /// Running.
    Running,
    /// Frozen by a dump.
    Frozen,
    /// Restored and stopped.
    Stopped,
    /// Killed.
    Dead,
}

/// What the fakes change, shared between them (one per simulated host, or one for both).
#[derive(Debug, Default)]
pub struct WorldState {
    /// The source copy.
    pub source: FakeCopy,
    /// The restored copy.
    pub restored: FakeCopy,
    /// Addresses configured, with their interface.
    pub addresses: HashSet<(ServiceAddr, String)>,
    /// Tables (blocks and locks).
    pub tables: HashSet<String>,
    /// Announcements made, in order.
    pub announced: Vec<Ipv4Addr>,
    /// The proxy holds the clients.
    pub paused: bool,
    /// The proxy points at the new location.
    pub redirected: bool,
    /// Operations that fail (by name, e.g. `"commit"`, `"claim"`, `"pause"`).
    pub fail: HashSet<&'static str>,
    /// Every operation, in order.
    pub log: Vec<String>,
}

/// A handle on a [`WorldState`].
#[derive(Debug, Clone, Default)]
pub struct FakeWorld(pub Arc<Mutex<WorldState>>);

impl FakeWorld {
    /// A world with the service running on the source and its address there.
    pub fn new() -> FakeWorld {
        let w = FakeWorld::default();
        w.with(|s| s.source = FakeCopy::Running);
        w
    }

    /// Runs `f` on the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut WorldState) -> T) -> T {
        let mut s = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut s)
    }

    /// Makes operation `op` fail from now on.
    pub fn fail(&self, op: &'static str) {
        self.with(|s| {
            s.fail.insert(op);
        });
    }

    fn op(&self, op: &'static str) -> Result<(), PortError> {
        self.with(|s| {
            s.log.push(op.to_string());
            if s.fail.contains(op) {
                Err(PortError::new(
                    ErrorCode::Internal,
                    format!("{op} fails (fake)"),
                ))
            } else {
                Ok(())
            }
        })
    }
}

/// A checkpointer whose dumps and restores only change the [`FakeWorld`]; the images
/// directory gets one small file.
#[derive(Debug, Clone)]
pub struct FakeCheckpointer {
    /// The world.
    pub world: FakeWorld,
    /// The root pid it reports.
    pub root: i32,
}

/// A dump of [`FakeCheckpointer`].
#[derive(Debug)]
pub struct FakeDump {
    world: FakeWorld,
    step: u8,
}

impl Dump for FakeDump {
    async fn proceed(&mut self) -> Result<DumpPoint, PortError> {
        self.world.op("proceed")?;
        self.step += 1;
        Ok(match self.step {
            1 => {
                self.world.with(|s| s.source = FakeCopy::Frozen);
                DumpPoint::Frozen
            }
            _ => DumpPoint::Held,
        })
    }

    async fn answer_commit(&mut self) -> Result<(), PortError> {
        self.world.op("answer-commit")
    }

    async fn commit(self) -> Result<DumpEnd, PortError> {
        self.world.op("commit")?;
        self.world.with(|s| s.source = FakeCopy::Dead);
        Ok(DumpEnd::default())
    }

    async fn rollback(self) -> Result<(), PortError> {
        self.world.with(|s| s.source = FakeCopy::Running);
        self.world.op("rollback")
    }

    fn worker(&self) -> Option<(i32, u64)> {
        None
    }
}

/// A lazy-pages server that serves at once.
#[derive(Debug)]
pub struct FakeLazy;

impl LazyServer for FakeLazy {
    fn pid(&self) -> Option<(i32, u64)> {
        None
    }

    async fn ready(&mut self, _within: Duration) -> Result<(), PortError> {
        Ok(())
    }

    fn detach(&mut self) {}

    fn asks_for_pages(&self) -> bool {
        false
    }

    fn serve(&mut self, _store: crate::pagestore::PageStore) -> Result<(), PortError> {
        Ok(())
    }

    async fn wait(&mut self) -> Result<Duration, PortError> {
        Ok(Duration::ZERO)
    }
}

impl Checkpointer for FakeCheckpointer {
    type Dump = FakeDump;
    type Lazy = FakeLazy;

    fn start_lazy(&self, _images: &Path, _from_store: bool) -> Result<Option<FakeLazy>, PortError> {
        Ok(None)
    }

    fn root_pid(&self) -> i32 {
        self.root
    }

    async fn start_dump(&self, images: &Path) -> Result<FakeDump, PortError> {
        self.world.op("dump")?;
        std::fs::write(images.join("inventory.img"), b"fake")
            .map_err(|e| PortError::caused(ErrorCode::Storage, "fake image", e))?;
        Ok(FakeDump {
            world: self.world.clone(),
            step: 0,
        })
    }

    async fn source_copy_exists(&self, _worker: Option<(i32, u64)>) -> Result<bool, PortError> {
        self.world.op("check")?;
        Ok(self
            .world
            .with(|s| matches!(s.source, FakeCopy::Running | FakeCopy::Frozen)))
    }

    async fn kill_source_copy(&self) -> Result<(), PortError> {
        self.world.op("kill-source")?;
        self.world.with(|s| s.source = FakeCopy::Dead);
        Ok(())
    }

    async fn restore_here(&self, _images: &Path) -> Result<i32, PortError> {
        self.world.op("restore-here")?;
        self.world.with(|s| s.source = FakeCopy::Running);
        Ok(self.root)
    }

    async fn restore_stopped(
        &self,
        _images: &Path,
        _lazy: bool,
        on_pid: impl FnOnce(i32) + Send + 'static,
    ) -> Result<RestoreInfo, PortError> {
        self.world.op("restore")?;
        on_pid(4242);
        self.world.with(|s| s.restored = FakeCopy::Stopped);
        Ok(RestoreInfo {
            pid: 4242,
            criu_restore_ms: 1.0,
            stats: None,
            held_bytes: None,
        })
    }

    fn resume(&self, _pid: i32) -> Result<(), PortError> {
        self.world.op("resume")?;
        self.world.with(|s| s.restored = FakeCopy::Running);
        Ok(())
    }

    fn kill(&self, _pid: i32, _start: u64) -> bool {
        self.world.with(|s| {
            let alive = matches!(s.restored, FakeCopy::Running | FakeCopy::Stopped);
            s.restored = FakeCopy::Dead;
            alive
        })
    }

    fn alive(&self, _pid: i32, _start: u64) -> bool {
        self.world
            .with(|s| matches!(s.restored, FakeCopy::Running | FakeCopy::Stopped))
    }

    fn start_time(&self, _pid: i32) -> Option<u64> {
        Some(1)
    }

    async fn restored_intact(
        &self,
        pid: i32,
        start: u64,
        _lazy: Option<(i32, u64)>,
        _served: Option<u64>,
        _images: &Path,
    ) -> bool {
        self.alive(pid, start)
    }
}

/// A host network that only changes the [`FakeWorld`].
#[derive(Debug, Clone)]
pub struct FakeNet {
    /// The world.
    pub world: FakeWorld,
    /// The interface it offers.
    pub dev: String,
}

impl AddressMover for FakeNet {
    async fn check_free(
        &self,
        svc: ServiceAddr,
        explicit: Option<&str>,
    ) -> Result<String, PortError> {
        self.world.op("check-free")?;
        if self
            .world
            .with(|s| s.addresses.iter().any(|(a, _)| *a == svc))
        {
            return Err(PortError::new(
                ErrorCode::AddressInUse,
                format!("address {svc} is already in use here"),
            ));
        }
        Ok(explicit.unwrap_or(&self.dev).to_string())
    }

    async fn interface_of(&self, addr: Ipv4Addr) -> Result<Option<String>, PortError> {
        Ok(self.world.with(|s| {
            s.addresses
                .iter()
                .find(|(a, _)| a.addr() == addr)
                .map(|(_, d)| d.clone())
        }))
    }

    async fn claim(&self, table: &str, svc: ServiceAddr, dev: &str) -> Result<(), PortError> {
        self.world.op("claim")?;
        self.world.with(|s| {
            s.tables.insert(table.to_string());
            s.addresses.insert((svc, dev.to_string()));
        });
        Ok(())
    }

    async fn add(&self, svc: ServiceAddr, dev: &str) -> Result<(), PortError> {
        self.world.op("add")?;
        self.world.with(|s| {
            s.addresses.insert((svc, dev.to_string()));
        });
        Ok(())
    }

    async fn remove(&self, svc: ServiceAddr, dev: &str) -> Result<(), PortError> {
        self.world.op("remove")?;
        self.world.with(|s| {
            s.addresses.remove(&(svc, dev.to_string()));
        });
        Ok(())
    }

    async fn delete_table(&self, table: &str) -> Result<(), PortError> {
        self.world.op("delete-table")?;
        self.world.with(|s| {
            s.tables.remove(table);
        });
        Ok(())
    }

    async fn lock(&self, table: &str, _addr: Ipv4Addr, _owned: bool) -> Result<(), PortError> {
        self.world.op("lock")?;
        self.world.with(|s| {
            s.tables.insert(table.to_string());
        });
        Ok(())
    }

    async fn unlock(&self, tables: &[(String, bool)]) -> Result<(), PortError> {
        self.world.op("unlock")?;
        self.world.with(|s| {
            for (t, _) in tables {
                s.tables.remove(t);
            }
        });
        Ok(())
    }

    async fn announce(&self, addr: Ipv4Addr, _dev: &str) -> Result<(), PortError> {
        self.world.op("announce")?;
        self.world.with(|s| s.announced.push(addr));
        Ok(())
    }

    async fn block_behind(
        &self,
        table: &str,
        _svc: ServiceAddr,
        _dev: &str,
        _mac: Option<[u8; 6]>,
    ) -> Result<(), PortError> {
        self.world.op("block_behind")?;
        self.world.with(|s| {
            s.tables.insert(table.to_string());
        });
        Ok(())
    }

    async fn announce_as(
        &self,
        addr: Ipv4Addr,
        _dev: &str,
        _mac: [u8; 6],
    ) -> Result<(), PortError> {
        self.world.op("announce")?;
        self.world.with(|s| s.announced.push(addr));
        Ok(())
    }
}

/// A proxy that only changes the [`FakeWorld`].
#[derive(Debug, Clone)]
pub struct FakeGate {
    /// The world.
    pub world: FakeWorld,
    /// Whether a redirect is configured.
    pub redirect: bool,
    /// What a pause reports as the hold left.
    pub hold: Duration,
}

impl TrafficGate for FakeGate {
    async fn pause(&mut self) -> Result<PauseInfo, PortError> {
        self.world.op("pause")?;
        self.world.with(|s| s.paused = true);
        Ok(PauseInfo {
            quiesce_ms: 0.1,
            tcp_flows: 1,
            udp_flows: 0,
            hold_left: self.hold,
        })
    }

    async fn redirect(&mut self) -> Result<(), PortError> {
        self.world.op("redirect")?;
        if self.redirect {
            self.world.with(|s| s.redirected = true);
        }
        Ok(())
    }

    async fn resume(&mut self) -> Result<ResumeInfo, PortError> {
        self.world.op("proxy-resume")?;
        let expired = self.world.with(|s| {
            let was = s.paused;
            s.paused = false;
            s.redirected = self.redirect;
            !was
        });
        Ok(ResumeInfo {
            held_ms: 1.0,
            released_datagrams: 0,
            expired,
        })
    }

    async fn undo(&mut self) -> Result<(), PortError> {
        self.world.op("undo")?;
        self.world.with(|s| {
            s.paused = false;
            s.redirected = false;
        });
        Ok(())
    }
}

/// A journal in memory (survives what a test calls a restart if the test keeps it).
#[derive(Debug)]
pub struct MemoryJournal<R, O> {
    records: Mutex<HashMap<MigrationId, String>>,
    outcomes: Mutex<HashMap<MigrationId, String>>,
    _types: std::marker::PhantomData<fn() -> (R, O)>,
}

impl<R, O> Default for MemoryJournal<R, O> {
    fn default() -> Self {
        MemoryJournal {
            records: Mutex::new(HashMap::new()),
            outcomes: Mutex::new(HashMap::new()),
            _types: std::marker::PhantomData,
        }
    }
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<R, O> Journal<R, O> for MemoryJournal<R, O>
where
    R: Serialize + DeserializeOwned + 'static,
    O: Serialize + DeserializeOwned + 'static,
{
    fn save(&self, id: &MigrationId, record: &R) -> Result<(), PortError> {
        let s = serde_json::to_string(record)
            .map_err(|e| PortError::caused(ErrorCode::Internal, "encoding", e))?;
        guard(&self.records).insert(id.clone(), s);
        Ok(())
    }

    fn forget(&self, id: &MigrationId) -> Result<(), PortError> {
        guard(&self.records).remove(id);
        Ok(())
    }

    fn records(&self) -> Vec<(MigrationId, R)> {
        guard(&self.records)
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), serde_json::from_str(v).ok()?)))
            .collect()
    }

    fn end(&self, id: &MigrationId, outcome: &O) -> Result<(), PortError> {
        let s = serde_json::to_string(outcome)
            .map_err(|e| PortError::caused(ErrorCode::Internal, "encoding", e))?;
        guard(&self.outcomes).insert(id.clone(), s);
        self.forget(id)
    }

    fn outcome(&self, id: &MigrationId) -> Option<O> {
        guard(&self.outcomes)
            .get(id)
            .and_then(|s| serde_json::from_str(s).ok())
    }
}

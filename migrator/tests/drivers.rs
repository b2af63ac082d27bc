//! Both real drivers, `tether migrate`'s and `tether agent`'s, over real QUIC with mutual TLS on
//! loopback, with the fakes of the ports (no root, no CRIU, no namespaces): the drivers' own
//! plumbing (stream framing, the tasks per resource, connection ends, resolve routing, the
//! agent's data plane) under a migration that commits and one whose destination cannot run its
//! copy.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_migrator::authz::Authorization;
use tether_migrator::driver::agent::{self, AgentConfig, AgentPorts, LazyRestore, LazySource};
use tether_migrator::driver::source::{self, Ctx, SourceRecord};
use tether_migrator::machine::agent::AgentOutcome;
use tether_migrator::machine::source::{
    GateConfig, SourceConfig, SourceMachine, SourcePhase, Timeouts,
};
use tether_migrator::metrics::AgentMetrics;
use tether_migrator::ports::fake::{
    FakeCheckpointer, FakeCopy, FakeGate, FakeNet, FakeWorld, MemoryJournal,
};
use tether_migrator::precopy::Tracker;
use tether_migrator::protocol::{MigrationId, ServiceAddr};
use tether_migrator::report::Outcome;
use tether_migrator::tls::{self, Identity};
use tether_migrator::transport;

const SVC: &str = "10.77.0.100/24";

struct Agent {
    world: FakeWorld,
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Stops the agent and waits for it (it must not panic).
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("agent stops");
    }
}

async fn start_agent(certs: &Path, work: &Path) -> Agent {
    start_agent_with(
        certs,
        work,
        FakeWorld::default(),
        MemoryJournal::default(),
        allow_src(),
    )
    .await
}

/// Source `src` may move services of 10.77.0.0/24 here, four at a time.
fn allow_src() -> Authorization {
    Authorization {
        sources: vec!["src".into()],
        services: vec!["10.77.0.0/24".parse().expect("block")],
        max_migrations: 4,
    }
}

/// An agent on `world` whose journal starts as `journal` (what an earlier agent left).
async fn start_agent_with(
    certs: &Path,
    work: &Path,
    world: FakeWorld,
    journal: MemoryJournal<agent::AgentRecord, AgentOutcome>,
    authorization: Authorization,
) -> Agent {
    let identity = Identity::load(&certs.join("dst")).expect("dst certs");
    let endpoint =
        transport::server(&identity, "127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let addr = endpoint.local_addr().expect("local addr");
    let cfg = AgentConfig {
        listen: addr,
        certs: certs.join("dst"),
        interface: None,
        work_dir: work.join("agent"),
        state_dir: work.join("agent-state"),
        max_image_bytes: 1 << 30,
        criu_log_level: 2,
        metrics: None,
        lazy_restore: LazyRestore::Never,
        in_doubt_timeout: Duration::from_secs(60),
        authorization,
        max_memory_bytes: 1 << 30,
        hot_first_pages: 0,
        lazy_pages_from: LazySource::Files,
    };
    let ports = AgentPorts {
        podman: None,
        ckpt: Arc::new(FakeCheckpointer {
            world: world.clone(),
            root: 0,
        }),
        net: Arc::new(FakeNet {
            world: world.clone(),
            dev: "eth0".into(),
        }),
        journal: Arc::new(journal),
        metrics: Arc::new(AgentMetrics::default()),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        agent::serve(cfg, ports, endpoint, async {
            let _ = stopped.await;
        })
        .await
        .expect("agent serves");
    });
    Agent {
        world,
        addr,
        stop,
        task,
    }
}

/// Runs the source driver (stop-and-copy, through a fake proxy) against `agent`.
async fn migrate(certs: &Path, work: &Path, agent: SocketAddr) -> (FakeWorld, Outcome, String) {
    migrate_svc(certs, work, agent, SVC).await
}

/// Like [`migrate`], of the service at `svc`.
async fn migrate_svc(
    certs: &Path,
    work: &Path,
    agent: SocketAddr,
    svc: &str,
) -> (FakeWorld, Outcome, String) {
    let world = FakeWorld::new();
    let svc: ServiceAddr = svc.parse().expect("addr");
    world.with(|s| {
        s.addresses.insert((svc, "eth0".into()));
    });
    let id = MigrationId::random();
    let images = work.join(format!("images-{id}"));
    tether_migrator::dirs::private_dir(&images).expect("images dir");
    let cfg = SourceConfig {
        id: id.clone(),
        service_addr: svc,
        source_pid: 100,
        destination: agent.to_string(),
        precopy: None,
        gate: Some(GateConfig { redirect: false }),
        max_frozen: Duration::from_secs(4),
        container: None,
        timeouts: Timeouts {
            resolve: Duration::from_secs(5),
            ..Default::default()
        },
    };
    let machine = SourceMachine::new(cfg, Instant::now()).expect("machine");
    let record = SourceRecord {
        phase: SourcePhase::Frozen,
        lock_table: None,
        pid: 100,
        pid_start: 1,
        criu_worker: None,
        service_addr: svc,
        dev: "eth0".into(),
        agent,
        agent_name: "dst".into(),
        certs: certs.join("src"),
        images,
        proxy: None,
        criu_log_level: 2,
        container: None,
    };
    let journal = Arc::new(MemoryJournal::<SourceRecord, ()>::default());
    let ctx = Ctx {
        id,
        ckpt: Arc::new(FakeCheckpointer {
            world: world.clone(),
            root: std::process::id() as i32,
        }),
        net: Arc::new(FakeNet {
            world: world.clone(),
            dev: "eth0".into(),
        }),
        journal: journal.clone(),
        identity: Arc::new(Identity::load(&certs.join("src")).expect("src certs")),
        record: Arc::new(Mutex::new(record)),
        limit: None,
    };
    let gate = FakeGate {
        world: world.clone(),
        redirect: false,
        hold: Duration::from_secs(5),
    };
    let r = source::drive(
        machine,
        ctx,
        Some(gate),
        Some(Tracker::default()),
        std::future::pending::<()>(),
    )
    .await;
    use tether_migrator::ports::Journal;
    assert!(
        journal.records().is_empty(),
        "the source's journal is emptied"
    );
    let why = r.failure.map(|f| f.to_string()).unwrap_or_default();
    (world, r.outcome, why)
}

/// The image sets left in the agent's work directory (which must exist: the agent received one).
fn agent_image_sets(work: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(work.join("agent"))
        .expect("the agent's work directory")
        .map(|e| e.expect("entry").path())
        .collect()
}

/// What an earlier agent journaled about a copy it restored (pid 77) and never heard the
/// commit of: the copy waits in doubt.
fn in_doubt(work: &Path, id: &MigrationId, svc: &str) -> agent::AgentRecord {
    agent::AgentRecord {
        phase: tether_migrator::machine::agent::AgentPhase::Prepared { pid: 77 },
        service_addr: svc.parse().expect("addr"),
        dev: "eth0".into(),
        block_table: format!("tether-{id}"),
        claimed: true,
        images: work.join("agent").join(id.as_str()),
        restored: Some((77, 1)),
        lazy_daemon: None,
        source: "src".into(),
        container: None,
        container_id: None,
        served_pages: None,
    }
}

/// An agent whose journal holds a migration of `svc` in doubt (see [`in_doubt`]), its stopped
/// copy in the fake world: the agent resumes it at start.
async fn start_agent_in_doubt(dir: &Path, svc: &str, authorization: Authorization) -> Agent {
    use tether_migrator::ports::Journal;
    let world = FakeWorld::default();
    world.with(|s| s.restored = FakeCopy::Stopped);
    let journal = MemoryJournal::<agent::AgentRecord, AgentOutcome>::default();
    let left = MigrationId::random();
    journal
        .save(&left, &in_doubt(dir, &left, svc))
        .expect("journal");
    start_agent_with(dir, dir, world, journal, authorization).await
}

fn certs(dir: &Path) {
    tls::generate(dir, &["src".into(), "dst".into()]).expect("certificates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_commits_through_both_drivers() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let agent = start_agent(dir.path(), dir.path()).await;
    let (src, outcome, why) = migrate(dir.path(), dir.path(), agent.addr).await;
    assert_eq!(outcome, Outcome::Committed, "{why}");
    src.with(|s| {
        assert_eq!(s.source, FakeCopy::Dead, "the source copy was ended");
        assert!(s.addresses.is_empty(), "the source gave up the address");
        assert!(!s.paused, "the proxy was resumed");
        assert!(s.tables.is_empty(), "CRIU's lock table is gone");
        let log = s.log.join(" ");
        let (answered, resumed) = (
            log.find("answer-commit").expect("commit answered"),
            log.find("proxy-resume").expect("proxy resumed"),
        );
        assert!(
            answered < resumed,
            "the proxy resumes after the commit: {log}"
        );
    });
    agent.world.with(|s| {
        assert_eq!(s.restored, FakeCopy::Running, "the destination runs it");
        assert!(s.tables.is_empty(), "its block is lifted");
        assert_eq!(s.addresses.len(), 1, "it holds the address");
        assert_eq!(s.announced.len(), 1, "and announced it");
        let log = s.log.join(" ");
        let resumed = log.find("resume").expect("resumed");
        assert!(
            log.find("delete-table").expect("unblocked") < resumed
                && log.find("announce").expect("announced") < resumed,
            "the block is lifted and the address announced before the tree runs, so that its \
             first output is not dropped: {log}"
        );
    });
    // The image set goes off the commit's path, shortly after `Committed`.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent_image_sets(dir.path()).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        agent_image_sets(dir.path()),
        Vec::<std::path::PathBuf>::new(),
        "the agent removes the image set after the commit"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_cannot_run_its_copy_has_the_source_restore_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let agent = start_agent(dir.path(), dir.path()).await;
    // SIGCONT fails on the destination: its copy cannot run after the commit point.
    agent.world.fail("resume");
    let (src, outcome, why) = migrate(dir.path(), dir.path(), agent.addr).await;
    assert_eq!(outcome, Outcome::RestoredOnSource, "{why}");
    assert!(why.contains("commit"), "{why}");
    src.with(|s| {
        assert_eq!(s.source, FakeCopy::Running, "restored from the image set");
        assert!(!s.paused, "the proxy was resumed");
        assert_eq!(s.addresses.len(), 1, "the source keeps the address");
    });
    agent.world.with(|s| {
        assert_eq!(s.restored, FakeCopy::Dead, "the destination undid its copy");
        assert!(
            s.tables.is_empty() && s.addresses.is_empty(),
            "and everything else"
        );
    });
    // Undone before the source was told: its image set is gone by now.
    assert_eq!(
        agent_image_sets(dir.path()),
        Vec::<std::path::PathBuf>::new(),
        "the agent removes the image set of a copy that could not go live"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_resumed_from_the_journal_keeps_its_address_claimed() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    // An earlier agent restored a copy and stopped before the commit: the copy waits in doubt
    // (for the source's word, or the 60 s in-doubt timeout), holding the service's address.
    let agent = start_agent_in_doubt(dir.path(), SVC, allow_src()).await;
    let (_src, outcome, why) = migrate(dir.path(), dir.path(), agent.addr).await;
    assert_eq!(outcome, Outcome::NotStarted, "{why}");
    assert!(why.contains("already in progress"), "{why}");
    agent.world.with(|s| {
        assert_eq!(
            s.restored,
            FakeCopy::Stopped,
            "the copy in doubt is untouched"
        );
    });
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_the_agent_does_not_allow_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let agent = start_agent_with(
        dir.path(),
        dir.path(),
        FakeWorld::default(),
        MemoryJournal::default(),
        Authorization {
            sources: vec!["another".into()],
            ..allow_src()
        },
    )
    .await;
    let (src, outcome, why) = migrate(dir.path(), dir.path(), agent.addr).await;
    assert_eq!(outcome, Outcome::NotStarted, "{why}");
    assert!(why.contains("`src` may not migrate"), "{why}");
    src.with(|s| assert_eq!(s.source, FakeCopy::Running, "the service runs on"));
    agent.world.with(|s| {
        assert!(
            s.log.is_empty(),
            "nothing happened on the agent: {:?}",
            s.log
        );
    });
    assert!(
        !dir.path().join("agent").exists() || agent_image_sets(dir.path()).is_empty(),
        "no image set was accepted"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_addresses_outside_the_allowed_block_or_prefix_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let agent = start_agent(dir.path(), dir.path()).await;
    for (svc, said) in [
        ("10.77.0.100/1", "prefix length"),
        ("10.77.0.100/32", "prefix length"),
        ("10.78.0.100/24", "outside the address space"),
        ("10.77.0.255/24", "broadcast"),
    ] {
        let (_src, outcome, why) = migrate_svc(dir.path(), dir.path(), agent.addr, svc).await;
        assert_eq!(outcome, Outcome::NotStarted, "{svc}: {why}");
        assert!(why.contains(said), "{svc}: {why}");
    }
    agent
        .world
        .with(|s| assert!(s.log.is_empty(), "{:?}", s.log));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_beyond_the_limit_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    // One migration, resumed from the journal, is in progress (a copy in doubt).
    let agent = start_agent_in_doubt(
        dir.path(),
        "10.77.0.50/24",
        Authorization {
            max_migrations: 1,
            ..allow_src()
        },
    )
    .await;
    let (_src, outcome, why) = migrate(dir.path(), dir.path(), agent.addr).await;
    assert_eq!(outcome, Outcome::NotStarted, "{why}");
    assert!(why.contains("1 migrations are in progress"), "{why}");
    agent.stop().await;
}

/// A page map (CRIU's image format) with one present entry of `pages` pages.
fn pagemap_declaring(pages: u64) -> Vec<u8> {
    use tether_migrator::criu::pages::{pagemap_image, PagemapEntry};
    pagemap_image(
        1,
        &[PagemapEntry {
            vaddr: 0x1000,
            compat_nr_pages: 0,
            in_parent: None,
            flags: None,
            nr_pages: Some(pages),
        }],
    )
}

/// A source that follows the protocol up to the final pages, with a page map declaring 2^40
/// pages: what the agent answers, and then to a second `Hello` with the same id.
async fn hostile_source(
    certs: &Path,
    agent: SocketAddr,
) -> (
    tether_migrator::protocol::FromAgent,
    tether_migrator::protocol::FromAgent,
) {
    use tether_migrator::protocol::{FromAgent, ToAgent, PROTOCOL};
    use tether_migrator::transport::{FrameReceiver, FrameSender};
    let identity = Identity::load(&certs.join("src")).expect("src certs");
    let id = MigrationId::random();
    let hello = ToAgent::Hello {
        protocol: PROTOCOL,
        migration_id: id.clone(),
        service_addr: "10.77.0.101/24".parse().expect("addr"),
        container: None,
    };
    let (_endpoint, conn) = transport::connect(&identity, agent, "dst", Duration::from_secs(5))
        .await
        .expect("connect");
    let (send, recv) = conn.open_bi().await.expect("stream");
    let (mut tx, mut rx) = (FrameSender(send), FrameReceiver(recv));
    tx.send(&hello).await.expect("hello");
    let ready: FromAgent = rx.message().await.expect("ready");
    assert!(matches!(ready, FromAgent::Ready { .. }), "{ready:?}");
    tx.send(&ToAgent::Frozen).await.expect("frozen");
    let body = pagemap_declaring(1 << 40);
    tx.send(&ToAgent::File {
        name: "pagemap-1.img".into(),
        size: body.len() as u64,
    })
    .await
    .expect("file");
    tx.send_data(&body).await.expect("data");
    tx.send(&ToAgent::FinalPages).await.expect("final pages");
    let failed = loop {
        let m: FromAgent = rx
            .message_within(Duration::from_secs(20), "failed")
            .await
            .expect("an answer");
        if matches!(m, FromAgent::Failed { .. }) {
            break m;
        }
    };
    // The same id again, on a new connection.
    let (_endpoint, conn) = transport::connect(&identity, agent, "dst", Duration::from_secs(5))
        .await
        .expect("connect");
    let (send, recv) = conn.open_bi().await.expect("stream");
    let (mut tx, mut rx) = (FrameSender(send), FrameReceiver(recv));
    tx.send(&hello).await.expect("hello");
    let again: FromAgent = rx.message().await.expect("answer");
    (failed, again)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_page_map_fails_its_migration_while_another_commits() {
    use tether_migrator::protocol::{ErrorCode, FromAgent};
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let agent = start_agent(dir.path(), dir.path()).await;
    let ((failed, again), (_src, outcome, why)) = tokio::join!(
        hostile_source(dir.path(), agent.addr),
        migrate(dir.path(), dir.path(), agent.addr)
    );
    match failed {
        FromAgent::Failed { code, reason, .. } => {
            assert_eq!(code, ErrorCode::Limit, "{reason}");
            assert!(reason.contains("--max-image-mib"), "{reason}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    match again {
        FromAgent::Refused { code, reason } => {
            assert_eq!(code, ErrorCode::Refused, "{reason}");
            assert!(reason.contains("never reused"), "{reason}");
        }
        other => panic!("a reused id must be refused, got {other:?}"),
    }
    assert_eq!(outcome, Outcome::Committed, "the other migration: {why}");
    agent.stop().await;
}

/// A source that sends an image file named `name` with CRIU options in it: what the agent
/// answers.
async fn source_sending_file(
    certs: &Path,
    agent: SocketAddr,
    name: &str,
) -> tether_migrator::protocol::FromAgent {
    use tether_migrator::protocol::{FromAgent, ToAgent, PROTOCOL};
    use tether_migrator::transport::{FrameReceiver, FrameSender};
    let identity = Identity::load(&certs.join("src")).expect("src certs");
    let (_endpoint, conn) = transport::connect(&identity, agent, "dst", Duration::from_secs(5))
        .await
        .expect("connect");
    let (send, recv) = conn.open_bi().await.expect("stream");
    let (mut tx, mut rx) = (FrameSender(send), FrameReceiver(recv));
    tx.send(&ToAgent::Hello {
        protocol: PROTOCOL,
        migration_id: MigrationId::random(),
        service_addr: "10.77.0.102/24".parse().expect("addr"),
        container: None,
    })
    .await
    .expect("hello");
    let ready: FromAgent = rx.message().await.expect("ready");
    assert!(matches!(ready, FromAgent::Ready { .. }), "{ready:?}");
    tx.send(&ToAgent::Frozen).await.expect("frozen");
    let body = b"action-script /tmp/x\n";
    tx.send(&ToAgent::File {
        name: name.into(),
        size: body.len() as u64,
    })
    .await
    .expect("file");
    tx.send_data(body).await.expect("data");
    loop {
        let m: FromAgent = rx
            .message_within(Duration::from_secs(20), "failed")
            .await
            .expect("an answer");
        if matches!(m, FromAgent::Failed { .. }) {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_cannot_hand_the_restore_a_criu_configuration() {
    use tether_migrator::protocol::FromAgent;
    let dir = tempfile::tempdir().expect("tempdir");
    certs(dir.path());
    let agent = start_agent(dir.path(), dir.path()).await;
    let name = tether_migrator::container::podman::CRIU_CONFIG_FILE;
    match source_sending_file(dir.path(), agent.addr, name).await {
        FromAgent::Failed { reason, .. } => {
            assert!(reason.contains("CRIU configuration"), "{reason}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    agent.stop().await;
}

//! Both real drivers, `tether migrate`'s and `tether agent`'s, over real QUIC with mutual TLS on
//! loopback, with the fakes of the ports (no root, no CRIU, no namespaces): the drivers' own
//! plumbing (stream framing, the tasks per resource, connection ends, resolve routing, the
//! agent's data plane) under a migration that commits and one whose destination cannot run its
//! copy.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_migrator::driver::agent::{self, AgentConfig, AgentPorts, LazyRestore};
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

async fn start_agent(certs: &Path, work: &Path) -> Agent {
    let world = FakeWorld::default();
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
    };
    let ports = AgentPorts {
        ckpt: Arc::new(FakeCheckpointer {
            world: world.clone(),
            root: 0,
        }),
        net: Arc::new(FakeNet {
            world: world.clone(),
            dev: "eth0".into(),
        }),
        journal: Arc::new(MemoryJournal::<agent::AgentRecord, AgentOutcome>::default()),
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
    let world = FakeWorld::new();
    let svc: ServiceAddr = SVC.parse().expect("addr");
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
        agent_name: Some("dst".into()),
        certs: certs.join("src"),
        images,
        proxy: None,
        criu_log_level: 2,
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
    let _ = agent.stop.send(());
    agent.task.await.expect("agent stops");
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
    let _ = agent.stop.send(());
    agent.task.await.expect("agent stops");
}

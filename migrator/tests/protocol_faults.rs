//! The migration protocol under every single fault at every step, in memory (no root, no
//! sockets): a simulated pair of the real source and agent machines (see `sim/mod.rs`).

mod sim;

use std::time::Duration;

use sim::{Fault, Setup, Sim};
use tether_migrator::report::Outcome;

fn clean_run(setup: &Setup) -> Sim {
    let mut s = Sim::new(setup.clone());
    s.run();
    s.final_check();
    assert!(
        s.violations.is_empty(),
        "fault-free run: {:#?}\n{}",
        s.violations,
        s.log.join("\n")
    );
    s
}

#[test]
fn a_fault_free_migration_commits_and_leaves_nothing_behind() {
    for setup in setups() {
        let s = clean_run(&setup);
        assert_eq!(s.results, vec![Outcome::Committed], "{setup:?}");
        assert_eq!(s.leftovers(), Vec::<String>::new(), "{setup:?}");
        println!("{setup:?}: {} steps", s.steps);
    }
}

fn setups() -> Vec<Setup> {
    vec![
        Setup::default(),
        Setup {
            precopy: false,
            ..Setup::default()
        },
        Setup {
            proxy: false,
            ..Setup::default()
        },
        Setup {
            redirect: true,
            ..Setup::default()
        },
    ]
}

/// A fault's kind, for the table (the delays and indices left out).
fn kind(f: Fault) -> &'static str {
    match f {
        Fault::KillSource(d) if d < Duration::from_secs(1) => "migrate killed",
        Fault::KillSource(_) => "migrate killed, late restart",
        Fault::KillAgent(d) if d < Duration::from_secs(1) => "agent killed",
        Fault::KillAgent(_) => "agent killed, late restart",
        Fault::KillBoth(_) => "both killed",
        Fault::LinkCut(d) if d < Duration::from_secs(3) => "link cut 2 s",
        Fault::LinkCut(_) => "link cut 8 s",
        Fault::LinkStall(_) => "link stalled",
        Fault::DropMessage | Fault::DropMessageAt(_) => "message lost",
        Fault::DuplicateMessage | Fault::DuplicateMessageAt(_) => "message duplicated",
        Fault::FailPort | Fault::FailPortAt(_) => "a port fails",
    }
}

/// The phase the source was in (its machine's state; `-` once it had ended or died).
fn phase(s: &Sim) -> String {
    s.fault_at.clone().map_or("-".into(), |(src, _)| src)
}

#[test]
fn every_single_fault_at_every_step_keeps_the_invariants() {
    let mut cases = 0;
    let mut failures = Vec::new();
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    // (source phase, fault kind) -> outcomes seen (after recovery).
    let mut table =
        std::collections::BTreeMap::<(String, &str), std::collections::BTreeSet<String>>::new();
    let mut run = |setup: &Setup, step: usize, fault: Fault| {
        let mut s = Sim::new(setup.clone()).with_fault(step, fault);
        s.run();
        // An operator (or the next `tether migrate`) resolves what is left in doubt.
        s.recover_source();
        s.final_check();
        cases += 1;
        *outcomes.entry(format!("{:?}", s.results)).or_default() += 1;
        let end = match s.serving() {
            Some(sim::Host::Src) => "runs on src",
            Some(sim::Host::Dst) => "runs on dst",
            None => "NONE",
        };
        let how = s
            .results
            .iter()
            .map(|o| format!("{o:?}"))
            .collect::<Vec<_>>()
            .join("+");
        let how = if how.is_empty() { "-".into() } else { how };
        table
            .entry((phase(&s), kind(fault)))
            .or_default()
            .insert(format!("{end} ({how})"));
        if !s.violations.is_empty() {
            failures.push(format!(
                "{setup:?}, {fault:?} before step {step}: {:#?}\n{}",
                s.violations,
                s.log.join("\n")
            ));
        }
    };
    for setup in setups() {
        let clean = clean_run(&setup);
        for step in 0..=clean.steps {
            for fault in Fault::all() {
                run(&setup, step, fault);
            }
        }
        // Every port action and every message on the wire, by its own index (several happen
        // within one step).
        let indexed = (0..clean.port_actions)
            .map(Fault::FailPortAt)
            .chain((0..clean.messages).map(Fault::DropMessageAt))
            .chain((0..clean.messages).map(Fault::DuplicateMessageAt));
        for fault in indexed {
            run(&setup, 0, fault);
        }
    }
    println!("{cases} (step x fault) cases; outcomes: {outcomes:#?}");
    println!("source phase | fault | outcomes (after recovery), every case keeping the invariants");
    for ((p, k), o) in &table {
        println!(
            "| {p} | {k} | {} |",
            o.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases broke an invariant; the first:\n{}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn max_frozen_rolls_back_a_transfer_that_cannot_finish() {
    let mut s = Sim::new(Setup {
        precopy: false,
        transfer: Duration::from_secs(10),
        ..Setup::default()
    });
    s.run();
    s.final_check();
    assert!(s.violations.is_empty(), "{:#?}", s.violations);
    assert_eq!(s.results, vec![Outcome::RolledBack]);
}

#[test]
fn an_in_doubt_migration_resolves_the_same_way_whichever_side_restarts_first() {
    let mut compared = 0;
    for setup in setups() {
        let steps = clean_run(&setup).steps;
        for step in 0..=steps {
            let run = |first| {
                let mut s = Sim::new(setup.clone()).with_fault(step, Fault::KillBoth(first));
                s.run();
                s.recover_source();
                s.final_check();
                assert!(
                    s.violations.is_empty(),
                    "{setup:?} step {step} {first:?} first: {:#?}\n{}",
                    s.violations,
                    s.log.join("\n")
                );
                s.serving()
            };
            let a = run(sim::Host::Src);
            let b = run(sim::Host::Dst);
            assert_eq!(a, b, "{setup:?}: both killed before step {step}");
            compared += 1;
        }
    }
    println!("{compared} steps compared");
}

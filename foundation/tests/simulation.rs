//! The deterministic simulation of a pool (`ring::simulation`): seeded runs of kills, pauses, cuts, heals and
//! joins, each checked for lost acknowledged writes, two tables of one version, and a pool that does not settle.
//! `benches/simulation.sh` runs many more seeds, and pools of 100.

use std::time::Duration;

use thingport_foundation::ring::simulation::{self, Fault, Params, Report};

fn assert_sound(report: &Report) {
    assert!(
        report.acknowledged > 1_000,
        "seed {}: only {} writes acknowledged",
        report.seed,
        report.acknowledged
    );
    assert!(
        report.safe(),
        "seed {}: {} acknowledged writes lost (first {:?}), violations {:?}; faults {:?}",
        report.seed,
        report.lost.len(),
        report.lost.first(),
        report.violations,
        report.faults
    );
    assert!(
        report.unsettled.is_empty(),
        "seed {}: {:?}; faults {:?}",
        report.seed,
        report.unsettled,
        report.faults
    );
}

#[test]
fn seeded_schedules_of_faults_lose_no_acknowledged_write() {
    for seed in 1..=4 {
        let report = simulation::run(Params::short(seed));
        assert!(!report.faults.is_empty(), "seed {seed}: no fault was injected");
        assert!(!report.changes.is_empty(), "seed {seed}: no table changed");
        assert_sound(&report);
    }
}

#[test]
fn a_run_is_the_same_for_the_same_seed() {
    let a = simulation::run(Params::short(42));
    let b = simulation::run(Params::short(42));
    assert_eq!(a.acknowledged, b.acknowledged);
    assert_eq!(a.events, b.events);
    assert_eq!(a.final_version, b.final_version);
    assert_eq!(a.faults, b.faults);
}

#[test]
fn a_minority_of_two_cut_off_again_and_again_loses_nothing() {
    for seed in 100..103 {
        let params =
            Params { kinds: vec![Fault::Minority, Fault::IsolateLeader], ..Params::short(seed) };
        let report = simulation::run(params);
        assert_sound(&report);
    }
}

#[test]
fn a_pool_of_three_with_three_copies_survives_kills_and_pauses() {
    let params = Params {
        workers: 3,
        voters: 3,
        replicas: 3,
        joins: 0,
        kinds: vec![Fault::Kill, Fault::Pause],
        faults: Duration::from_secs(30),
        ..Params::short(7)
    };
    assert_sound(&simulation::run(params));
}

#[test]
fn the_checks_find_the_writes_a_pool_without_its_fences_against_stale_primaries_loses() {
    let broken = |seed| Params {
        accept_stale_copies: true,
        ignore_lease_table: true,
        ..Params::short(seed)
    };
    let lost: usize =
        [11, 19, 30].into_iter().map(|seed| simulation::run(broken(seed)).lost.len()).sum();
    assert!(lost > 0, "a pool without either fence lost nothing in these seeds");
    // either fence alone keeps them
    for seed in [11, 19, 30] {
        assert_sound(&simulation::run(Params { accept_stale_copies: true, ..Params::short(seed) }));
        assert_sound(&simulation::run(Params { ignore_lease_table: true, ..Params::short(seed) }));
    }
}

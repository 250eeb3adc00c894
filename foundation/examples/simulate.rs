//! Runs the deterministic simulation of a pool (`ring::simulation`) over many seeds, and prints for each what it
//! found; exits 1 if any run lost an acknowledged write, saw another safety violation or did not settle.
//!
//! `cargo run --release -p thingport-foundation --example simulate -- [--seeds 1..20] [--workers 5] [--joins 2]
//! [--voters 5] [--replicas 2] [--seconds 40] [--writes 1000] [--faults kill,pause,halves,minority,leader,join]
//! [--accept-stale-copies] [--ignore-lease-table] [--verbose]`
//!
//! `--seeds N` is `1..N`. The last two options break the pool on purpose, to show what the checks find: backups
//! accept copies from a primary with an older table, and workers lead under a table older than the one their lease
//! grant names.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use thingport_foundation::ring::simulation::{self, Fault, Params};

fn value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn number(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    value(args, name)
        .map_or(Ok(default), |v| v.parse().map_err(|_| format!("{name}: not a number: {v}")))
}

fn faults(list: &str) -> Result<Vec<Fault>, String> {
    list.split(',')
        .map(|f| match f {
            "kill" => Ok(Fault::Kill),
            "pause" => Ok(Fault::Pause),
            "halves" => Ok(Fault::Halves),
            "minority" => Ok(Fault::Minority),
            "leader" => Ok(Fault::IsolateLeader),
            "join" => Ok(Fault::Join),
            other => Err(format!("--faults: unknown fault {other}")),
        })
        .collect()
}

fn params(args: &[String]) -> Result<(std::ops::RangeInclusive<u64>, Params), String> {
    let seeds = value(args, "--seeds").unwrap_or("1..20");
    let seeds = match seeds.split_once("..") {
        Some((a, b)) => {
            let a = a.parse().map_err(|_| format!("--seeds: {seeds}"))?;
            let b = b.parse().map_err(|_| format!("--seeds: {seeds}"))?;
            a..=b
        }
        None => {
            let n: u64 = seeds.parse().map_err(|_| format!("--seeds: {seeds}"))?;
            1..=n
        }
    };
    let workers = number(args, "--workers", 5)? as usize;
    let params = Params {
        workers,
        joins: number(args, "--joins", 2)? as usize,
        voters: number(args, "--voters", 5)? as usize,
        replicas: number(args, "--replicas", 2)? as usize,
        faults: Duration::from_secs(number(args, "--seconds", 40)?),
        writes_per_second: number(args, "--writes", 1_000)? as u32,
        kinds: faults(value(args, "--faults").unwrap_or("kill,pause,halves,minority,leader,join"))?,
        accept_stale_copies: args.iter().any(|a| a == "--accept-stale-copies"),
        ignore_lease_table: args.iter().any(|a| a == "--ignore-lease-table"),
        ..Params::short(0)
    };
    if workers < 2 || params.voters == 0 || params.replicas == 0 {
        return Err("--workers must be at least 2, --voters and --replicas at least 1".into());
    }
    Ok((seeds, params))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (seeds, base) = match params(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("simulate: {e}");
            return ExitCode::from(64);
        }
    };
    let verbose = args.iter().any(|a| a == "--verbose");
    let (mut runs, mut bad, mut acked, mut lost) = (0, 0, 0, 0);
    let (mut reads, mut stale_reads) = (0, 0);
    let mut took: Vec<Duration> = Vec::new();
    let mut moved: Vec<usize> = Vec::new();
    // from a kill -9 to the next table committed (the one without the killed run), when that came before the next
    // fault
    let mut after_kill: Vec<Duration> = Vec::new();
    let mut kills = 0;
    let started = Instant::now();
    for seed in seeds {
        let report = simulation::run(Params { seed, ..base.clone() });
        runs += 1;
        acked += report.acknowledged;
        lost += report.lost.len();
        reads += report.reads;
        stale_reads += report.stale_reads;
        took.extend(report.changes.iter().map(|c| c.took));
        for (i, (at, fault)) in report.faults.iter().enumerate() {
            let next_fault = report.faults.get(i + 1).map_or(Duration::MAX, |(t, _)| *t);
            if fault.starts_with("kill") {
                kills += 1;
                let change = report.changes.iter().find(|c| c.at > *at && c.at < next_fault);
                after_kill.extend(change.map(|c| c.at - *at));
            }
        }
        moved.extend(report.changes.iter().map(|c| c.moved));
        let sound = report.safe() && report.unsettled.is_empty();
        if !sound {
            bad += 1;
        }
        println!(
            "seed {seed}: {} faults, {} table changes, final version {}, {} writes acknowledged ({} by a primary \
             behind the log), {} lost, {} violations, {}",
            report.faults.len(),
            report.changes.len(),
            report.final_version,
            report.acknowledged,
            report.stale_acks,
            report.lost.len(),
            report.violations.len(),
            if report.unsettled.is_empty() {
                "settled".to_string()
            } else {
                format!("NOT SETTLED: {:?}", report.unsettled)
            }
        );
        if verbose || !sound {
            for (at, fault) in &report.faults {
                println!("  {:>8.3} s  {fault}", at.as_secs_f64());
            }
            for c in &report.changes {
                println!(
                    "  {:>8.3} s  table {} committed, {} slots moved, {} ms after its check",
                    c.at.as_secs_f64(),
                    c.version,
                    c.moved,
                    c.took.as_millis()
                );
            }
            for v in &report.violations {
                println!("  violation: {v}");
            }
            if let Some(first) = report.lost.first() {
                println!("  lost: {} writes, the first {first:?}", report.lost.len());
            }
        }
    }
    took.sort();
    moved.sort();
    after_kill.sort();
    let pct = |v: &[Duration], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q) as usize).map_or(0, |d| d.as_millis())
    };
    println!(
        "{runs} runs, {bad} unsound; {acked} writes acknowledged, {lost} lost; {reads} reads, {stale_reads} stale; \
         {} table changes: time from the \
         check to the commit p50 {} ms, p99 {} ms, max {} ms; slots moved per change median {}, max {}; from a \
         kill -9 to the next table ({} of {kills} kills were followed by one before the next fault) p50 {} ms, max {} ms; {:.1} s",
        took.len(),
        pct(&took, 0.5),
        pct(&took, 0.99),
        took.last().map_or(0, |d| d.as_millis()),
        moved.get(moved.len() / 2).copied().unwrap_or(0),
        moved.last().copied().unwrap_or(0),
        after_kill.len(),
        pct(&after_kill, 0.5),
        after_kill.last().map_or(0, |d| d.as_millis()),
        started.elapsed().as_secs_f64()
    );
    if bad > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

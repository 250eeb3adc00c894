//! The partition table at the sizes of a large pool: for 3 to 100 members, what a join and the loss of one or two
//! members move, how even the load stays, how many partitions lose every copy when k members go at once, and how
//! long computing a table takes. Deterministic: the same output on every run (the times aside).
//!
//! `cargo run --release -p thingport-foundation --example placement_scale [-- --replicas 2]`

use std::time::Instant;

use thingport_foundation::ring::{PARTITIONS, Table};

fn members(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("w{i:03}#1")).collect()
}

/// Partitions none of whose owners is among `alive`.
fn unheld(table: &Table, alive: &[String]) -> usize {
    (0..PARTITIONS as u16)
        .filter(|&p| table.owners(p).all(|o| !alive.iter().any(|a| a == o)))
        .count()
}

/// Replica slots whose holder differs between the tables.
fn moved(a: &Table, b: &Table) -> usize {
    a.moves(b).len()
}

/// The busiest member's slots over the mean.
fn imbalance(table: &Table) -> f64 {
    let load = table.load();
    let max = load.values().copied().max().unwrap_or(0) as f64;
    let mean = load.values().sum::<usize>() as f64 / load.len().max(1) as f64;
    max / mean
}

fn main() {
    let replicas = std::env::args()
        .skip_while(|a| a != "--replicas")
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    println!(
        "{:>7} {:>9} {:>8} {:>10} {:>10} {:>11} {:>8} {:>8} {:>8}",
        "members",
        "initial",
        "max/mean",
        "join moves",
        "leave 1",
        "leave 2",
        "unheld2",
        "unheld3",
        "next µs"
    );
    for n in [3, 5, 10, 30, 100] {
        let all = members(n);
        let started = Instant::now();
        let table = Table::initial(&all, replicas);
        let initial = started.elapsed();

        let mut grown = all.clone();
        grown.push("zjoiner#1".into());
        let started = Instant::now();
        let joined = table.next(&grown);
        let next_time = started.elapsed();

        let one_less: Vec<String> = all[1..].to_vec();
        let left_one = table.next(&one_less);
        let two_less: Vec<String> = all[2..].to_vec();
        let left_two = table.next(&two_less);
        let three_less: Vec<String> = all[3.min(n)..].to_vec();
        println!(
            "{n:>7} {:>7}µs {:>8.3} {:>10} {:>10} {:>11} {:>8} {:>8} {:>8}",
            initial.as_micros(),
            imbalance(&table),
            moved(&table, &joined),
            moved(&table, &left_one),
            moved(&table, &left_two),
            unheld(&table, &two_less),
            unheld(&table, &three_less),
            next_time.as_micros(),
        );
    }
    println!(
        "\n{PARTITIONS} partitions × {replicas} copies. \"join moves\"/\"leave k\": replica slots that change holder when one \
         member joins / k members leave; \"unheld k\": partitions whose every copy was on the k members that left \
         at once (lost with partition_loss = \"reset\", waiting with \"wait\")."
    );
}

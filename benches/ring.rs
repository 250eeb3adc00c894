//! Ring placement: computing a partition table, a membership change, and mapping keys to partitions.
//!
//! Run with `cargo bench -p thingport-foundation --bench ring`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use thingport_foundation::ring::{Table, partition_of};

fn members(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("foundation-{i}")).collect()
}

fn placement(c: &mut Criterion) {
    let mut group = c.benchmark_group("placement");
    for n in [3, 10] {
        group.bench_function(format!("initial_{n}_members_r2"), |b| {
            b.iter(|| Table::initial(black_box(&members(n)), 2))
        });
        let table = Table::initial(&members(n), 2);
        let mut grown = members(n);
        grown.push("joiner".into());
        group.bench_function(format!("join_{n}_to_{}", n + 1), |b| {
            b.iter(|| black_box(&table).next(&grown))
        });
        let shrunk: Vec<String> = members(n).into_iter().skip(1).collect();
        group.bench_function(format!("leave_{n}_to_{}", n - 1), |b| {
            b.iter(|| black_box(&table).next(&shrunk))
        });
    }
    group.finish();

    let keys: Vec<String> = (0..1_000).map(|i| format!("pump-{i:05}")).collect();
    let mut group = c.benchmark_group("partition_of");
    group.throughput(Throughput::Elements(keys.len() as u64));
    group.bench_function("1000_thing_names", |b| {
        b.iter(|| {
            keys.iter().map(|k| u64::from(partition_of(black_box(k.as_bytes())))).sum::<u64>()
        })
    });
    group.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);

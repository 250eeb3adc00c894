//! Primary leases: two workers of five cut off from the other three (paused with SIGSTOP, so that nothing refuses
//! connections and failure detection, set slow, never notices) stop acknowledging writes within one lease, even to
//! partitions whose every copy they hold; and acknowledge again once the others are back.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use support::process::{create_and_locate, get_text, pool_of, signal};
use support::{KEY, http};

/// The default `locks.primary_lease`.
const LEASE: Duration = Duration::from_secs(2);

async fn write(api: SocketAddr, thing: &str, n: u64) -> u16 {
    let path = format!("/v1/things/{thing}/properties/n");
    http(api, "PUT", &path, Some(KEY), Some(json!({ "value": n }))).await.0
}

#[tokio::test]
async fn a_cut_off_minority_of_two_stops_acknowledging_within_one_lease() {
    let dir = tempfile::tempdir().unwrap();
    support::api_keys(dir.path());
    let ids = ["w1", "w2", "w3", "w4", "w5"];
    let workers = pool_of(dir.path(), &ids, |spec| {
        // failure detection far slower than the lease: only the lease can stop the minority
        spec.suspect_timeout = "30s".into();
        spec.write_timeout = "1s".into();
    })
    .await;
    for w in &workers {
        w.ready().await;
    }

    // things whose every copy is on w1 and w2: without leases, these two alone would acknowledge their writes
    let api = workers[0].api;
    let mut minority_things = Vec::new();
    for i in 0.. {
        let thing = format!("probe-{i}");
        let owners = create_and_locate(api, &thing).await;
        if owners.iter().all(|o| o == "w1" || o == "w2") {
            assert_eq!(write(api, &thing, 0).await, 200, "a write before the cut");
            minority_things.push(thing);
            if minority_things.len() == 3 {
                break;
            }
        }
        assert!(i < 2_000, "no partition held by w1 and w2 alone");
    }

    // the cut: the majority stops answering anything
    for w in &workers[2..] {
        signal(&w.child, "-STOP");
    }
    let cut = Instant::now();
    let mut writes = Vec::new();
    let mut n = 1;
    while cut.elapsed() < LEASE * 2 {
        for thing in &minority_things {
            let status = write(workers[n as usize % 2].api, thing, n).await;
            writes.push((cut.elapsed(), status));
            n += 1;
        }
    }
    let last_acknowledged = writes.iter().filter(|(_, s)| *s == 200).map(|(t, _)| *t).max();
    // every answer is counted from when it arrived; a tenth of a lease allows for the answer's way back
    let late: Vec<_> = writes.iter().filter(|(t, s)| *s == 200 && *t > LEASE * 11 / 10).collect();
    assert!(
        late.is_empty(),
        "{} writes acknowledged after one lease, the first {:?}",
        late.len(),
        late.first()
    );
    assert!(writes.iter().any(|(_, s)| *s == 503), "the minority refused writes");
    println!(
        "{} writes in {:?}; the last acknowledgement came {last_acknowledged:?} after the cut",
        writes.len(),
        LEASE * 2
    );
    // failure detection has not noticed: the minority still sees all five, and says why it is not ready
    let (_, view) = http(api, "GET", "/v1/cluster", Some(KEY), None).await;
    assert_eq!(view["members"].as_array().unwrap().len(), 5, "{view}");
    let (status, why) = get_text(workers[0].admin, "/readyz").await;
    assert_eq!(status, 503);
    assert!(why.contains("lease"), "{why}");

    // the others are back: the minority's workers hold leases again and acknowledge
    for w in &workers[2..] {
        signal(&w.child, "-CONT");
    }
    let back = Instant::now();
    let deadline = back + Duration::from_secs(20);
    loop {
        if write(workers[0].api, &minority_things[0], n).await == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "writes never acknowledged again");
    }
    println!("acknowledged again {:?} after the others resumed", back.elapsed());
    workers[0].ready().await;
}

//! Every holder of some partitions gone at once: two of five workers killed together (`replicas = 2`). With the
//! default `partition_loss = "wait"` the table stays until one of them is back, and what they held is still there
//! when it is.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use serde_json::json;
use support::process::{cluster_until, create_and_locate, pool_of, settled_on, table_ids};
use support::{KEY, http};

#[tokio::test]
async fn partitions_whose_every_holder_died_wait_for_one_to_come_back() {
    let dir = tempfile::tempdir().unwrap();
    support::api_keys(dir.path());
    let ids = ["w1", "w2", "w3", "w4", "w5"];
    let mut workers = pool_of(dir.path(), &ids, |spec| spec.write_timeout = "1s".into()).await;
    let api = workers[0].api;

    // a thing whose two copies are on w4 and w5, and one with a copy elsewhere
    let (mut orphan, mut held) = (None, None);
    for i in 0.. {
        let thing = format!("probe-{i}");
        let owners = create_and_locate(api, &thing).await;
        let on_killed = |o: &String| o == "w4" || o == "w5";
        if owners.iter().all(on_killed) {
            orphan.get_or_insert(thing);
        } else if !owners.iter().any(on_killed) {
            held.get_or_insert(thing);
        }
        if orphan.is_some() && held.is_some() {
            break;
        }
        assert!(i < 2_000, "no partition held by w4 and w5 alone");
    }
    let (orphan, held) = (orphan.unwrap(), held.unwrap());
    for thing in [&orphan, &held] {
        let path = format!("/v1/things/{thing}/properties/n");
        let (status, _) = http(api, "PUT", &path, Some(KEY), Some(json!({ "value": 7 }))).await;
        assert_eq!(status, 200, "{thing} before the kill");
    }

    let mut w5 = workers.pop().unwrap();
    let mut w4 = workers.pop().unwrap();
    w4.kill().await;
    w5.kill().await;

    // the three left see the partitions without a holder, and keep the table of five
    let view = cluster_until(api, "the unheld partitions", |v| {
        v["members"].as_array().is_some_and(|m| m.len() == 3)
            && v["unheld_partitions"].as_u64().is_some_and(|n| n > 0)
    })
    .await;
    assert_eq!(table_ids(&view), ids, "the table waits: {view}");
    println!("{} partitions without a holder", view["unheld_partitions"]);
    let orphan_path = format!("/v1/things/{orphan}/properties/n");
    let (status, _) = http(api, "PUT", &orphan_path, Some(KEY), Some(json!({ "value": 8 }))).await;
    assert_eq!(status, 503, "nobody holds {orphan}");
    let held_path = format!("/v1/things/{held}/properties/n");
    let (status, read) = http(api, "GET", &held_path, Some(KEY), None).await;
    assert_eq!((status, read["value"].clone()), (200, json!(7)), "{held} is still readable");

    // w4 comes back with its store: it takes its slots back, the table leaves w5 out, and the value it held is there
    let w4 = w4.restart().await;
    let view = cluster_until(api, "the table without w5", |v| {
        settled_on(v, &["w1", "w2", "w3", "w4"]) && v["unheld_partitions"] == json!(0)
    })
    .await;
    assert_eq!(view["members"].as_array().unwrap().len(), 4);
    for w in workers.iter().chain([&w4]) {
        let (status, read) = http(w.api, "GET", &orphan_path, Some(KEY), None).await;
        assert_eq!((status, read["value"].clone()), (200, json!(7)), "{orphan} read on {}", w.id);
    }
    let (status, _) = http(api, "PUT", &orphan_path, Some(KEY), Some(json!({ "value": 9 }))).await;
    assert_eq!(status, 200, "{orphan} is writable again");
}

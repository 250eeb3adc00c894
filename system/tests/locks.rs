//! `/v1/locks`: named locks committed by the pool's consensus group, over three worker processes, across a
//! `kill -9` of the group's leader and a restart.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};
use support::process::{Spec, WorkerProcess, cluster_until, pool_of, settled_on};
use support::{KEY, http};

/// Whether the view shows a consensus group with these voters and a leader among them.
fn group_of(view: &Json, voters: &[&str]) -> bool {
    let mut seen: Vec<String> = view["consensus"]["voters"]
        .as_array()
        .map(|v| v.iter().map(|n| n.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    seen.sort();
    seen == voters && view["consensus"]["leader"].as_str().is_some_and(|l| voters.contains(&l))
}

async fn acquire(
    api: SocketAddr,
    lock: &str,
    holder: &str,
    ttl_ms: u64,
    wait_ms: u64,
) -> (u16, Json) {
    let body = json!({ "holder": holder, "ttl_ms": ttl_ms, "wait_ms": wait_ms });
    http(api, "POST", &format!("/v1/locks/{lock}"), Some(KEY), Some(body)).await
}

async fn three_workers(dir: &std::path::Path) -> Vec<WorkerProcess> {
    support::api_keys(dir);
    let w1 = Spec::new(dir, "w1", &[], 3).spawn().await;
    let w2 = Spec::new(dir, "w2", &[w1.peer], 3).spawn().await;
    let w3 = Spec::new(dir, "w3", &[w1.peer], 3).spawn().await;
    cluster_until(w1.api, "three members", |v| settled_on(v, &["w1", "w2", "w3"])).await;
    for w in [&w1, &w2, &w3] {
        cluster_until(w.api, "a consensus group of three", |v| group_of(v, &["w1", "w2", "w3"]))
            .await;
    }
    vec![w1, w2, w3]
}

#[tokio::test]
async fn a_lock_has_one_holder_at_a_time_and_each_grant_a_larger_token() {
    let dir = tempfile::tempdir().unwrap();
    let workers = three_workers(dir.path()).await;
    let [a, b, c] = [workers[0].api, workers[1].api, workers[2].api];

    let (status, first) = acquire(a, "report", "alice", 30_000, 0).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!((first["lock"].clone(), first["holder"].clone()), (json!("report"), json!("alice")));
    let token = first["token"].as_u64().unwrap();

    // another holder, through another worker, is refused and told who holds it
    let (status, busy) = acquire(b, "report", "bob", 30_000, 0).await;
    assert_eq!(status, 409, "{busy}");
    assert_eq!((busy["holder"].clone(), busy["token"].clone()), (json!("alice"), json!(token)));
    let (status, read) = http(c, "GET", "/v1/locks/report", Some(KEY), None).await;
    assert_eq!(
        (status, read["holder"].clone(), read["token"].clone()),
        (200, json!("alice"), json!(token))
    );

    // the same holder again keeps its token; a renewal with it extends the lease; a wrong token is refused
    let (status, again) = acquire(c, "report", "alice", 30_000, 0).await;
    assert_eq!((status, again["token"].clone()), (200, json!(token)));
    let renew = json!({ "token": token, "ttl_ms": 30_000 });
    let (status, _) = http(b, "PUT", "/v1/locks/report", Some(KEY), Some(renew)).await;
    assert_eq!(status, 200);
    let wrong = format!("/v1/locks/report?token={}", token + 1000);
    let (status, _) = http(b, "DELETE", &wrong, Some(KEY), None).await;
    assert_eq!(status, 409);

    // released: bob takes it with a larger token
    let (status, _) =
        http(b, "DELETE", &format!("/v1/locks/report?token={token}"), Some(KEY), None).await;
    assert_eq!(status, 204);
    let (status, _) = http(c, "GET", "/v1/locks/report", Some(KEY), None).await;
    assert_eq!(status, 404);
    let (status, bob) = acquire(c, "report", "bob", 500, 0).await;
    assert_eq!(status, 200, "{bob}");
    let bob_token = bob["token"].as_u64().unwrap();
    assert!(bob_token > token, "{bob_token} after {token}");

    // carol waits: she gets the lock once bob's 500 ms lease runs out, with a larger token again
    let started = Instant::now();
    let (status, carol) = acquire(a, "report", "carol", 30_000, 10_000).await;
    assert_eq!(status, 200, "{carol}");
    assert!(carol["token"].as_u64().unwrap() > bob_token);
    assert!(started.elapsed() < Duration::from_secs(5), "waited {:?}", started.elapsed());
    let renew = json!({ "token": bob_token, "ttl_ms": 1_000 });
    let (status, _) = http(b, "PUT", "/v1/locks/report", Some(KEY), Some(renew)).await;
    assert_eq!(status, 409, "bob's lease ran out");

    // bad requests
    for (body, what) in [
        (json!({ "holder": "x", "ttl_ms": 10 }), "a lease too short"),
        (json!({ "holder": "", "ttl_ms": 1_000 }), "no holder"),
        (json!({ "holder": "x", "ttl_ms": 1_000, "extra": 1 }), "an unknown field"),
    ] {
        let (status, _) = http(a, "POST", "/v1/locks/report", Some(KEY), Some(body)).await;
        assert_eq!(status, 400, "{what}");
    }
    let long = "l".repeat(300);
    let (status, _) = acquire(a, &long, "x", 1_000, 0).await;
    assert_eq!(status, 400, "a name too long");
}

#[tokio::test]
async fn locks_survive_a_kill_of_the_leader_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut workers = three_workers(dir.path()).await;
    let (_, view) = http(workers[0].api, "GET", "/v1/cluster", Some(KEY), None).await;
    let leader = view["consensus"]["leader"].as_str().unwrap().to_string();
    let (status, held) = acquire(workers[0].api, "singleton", "alice", 60_000, 0).await;
    assert_eq!(status, 200, "{held}");
    let token = held["token"].as_u64().unwrap();

    let at = workers.iter().position(|w| w.id == leader).unwrap();
    let mut killed = workers.remove(at);
    killed.kill().await;
    let killed_at = Instant::now();
    let other = workers[0].api;
    // the survivors elect a leader that still knows alice's lease, and grant a new lock a larger token
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, busy) = loop {
        let (status, answer) = acquire(other, "singleton", "bob", 60_000, 0).await;
        if status != 503 || Instant::now() > deadline {
            break (status, answer);
        }
    };
    assert_eq!((status, busy["holder"].clone()), (409, json!("alice")), "{busy}");
    let (status, fresh) = acquire(other, "another", "bob", 60_000, 0).await;
    assert_eq!(status, 200, "{fresh}");
    assert!(fresh["token"].as_u64().unwrap() > token);
    println!("first grant {:?} after the leader's kill -9", killed_at.elapsed());

    // the killed worker comes back with its log and sees the same locks
    killed.spec.seeds = vec![workers[0].peer];
    let back = killed.restart().await;
    back.ready().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, read) = http(back.api, "GET", "/v1/locks/another", Some(KEY), None).await;
        if status == 200 {
            assert_eq!(read["token"], fresh["token"]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted worker never read the lock: {status} {read}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The workers that say they hold the singleton role, and whether every view names the same holder and token.
async fn singleton_of(workers: &[WorkerProcess]) -> (Vec<String>, Option<(String, u64)>) {
    let mut holding = Vec::new();
    let mut named = Vec::new();
    for w in workers {
        let (_, view) = http(w.api, "GET", "/v1/cluster", Some(KEY), None).await;
        if view["holds_singleton"] == json!(true) {
            holding.push(w.id.clone());
        }
        let holder = view["singleton"]["holder"].as_str().map(str::to_string);
        named.push(holder.zip(view["singleton"]["token"].as_u64()));
    }
    let agreed = named.windows(2).all(|p| p[0] == p[1]).then(|| named[0].clone()).flatten();
    (holding, agreed)
}

/// Polls until one worker holds the role and every view names it, with a token other than `before`; asserts
/// that no two workers say they hold it at once.
async fn one_holder(workers: &[WorkerProcess], before: u64) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (holding, agreed) = singleton_of(workers).await;
        assert!(holding.len() <= 1, "two workers hold the singleton: {holding:?}");
        if let Some((holder, token)) = agreed
            && holding == [holder.clone()]
            && token != before
        {
            return (holder, token);
        }
        assert!(Instant::now() < deadline, "no single holder of the singleton: {holding:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_worker_holds_the_singleton_and_another_takes_it_when_the_holder_dies_or_stops() {
    let dir = tempfile::tempdir().unwrap();
    support::api_keys(dir.path());
    // asked for every 3 s: a holder that stops without releasing it would be replaced 6 to 9 s later
    let ttl = Duration::from_secs(9);
    let ids = ["w1", "w2", "w3", "w4"];
    let mut workers = pool_of(dir.path(), &ids, |spec| {
        spec.extra = "[locks]\nsingleton_ttl = \"9s\"\n".into();
    })
    .await;
    let (holder, token) = one_holder(&workers, 0).await;

    // the role is a lock anyone may read and no application may take, renew or release
    let api = workers[0].api;
    let (status, read) = http(api, "GET", "/v1/locks/thingport:singleton", Some(KEY), None).await;
    assert_eq!(
        (status, read["holder"].clone(), read["token"].clone()),
        (200, json!(holder), json!(token))
    );
    let (status, _) = acquire(api, "thingport:singleton", "intruder", 1_000, 0).await;
    assert_eq!(status, 400);
    let release = format!("/v1/locks/thingport:singleton?token={token}");
    let (status, _) = http(api, "DELETE", &release, Some(KEY), None).await;
    assert_eq!(status, 400);

    // kill -9: another worker takes the role once the lease runs out, with a larger token
    let at = workers.iter().position(|w| w.id == holder).unwrap();
    workers.remove(at).kill().await;
    let killed_at = Instant::now();
    let (holder, second) = one_holder(&workers, token).await;
    assert!(second > token, "{second} after {token}");
    println!("singleton taken over {:?} after the holder's kill -9", killed_at.elapsed());

    // stopped: the holder releases the role as it leaves, so another takes it well before the lease would end
    let left: Vec<&str> = workers.iter().map(|w| w.id.as_str()).collect();
    for w in &workers {
        cluster_until(w.api, "a consensus group of the three left", |v| group_of(v, &left)).await;
    }
    let at = workers.iter().position(|w| w.id == holder).unwrap();
    let mut stopping = workers.remove(at);
    support::process::signal(&stopping.child, "-TERM");
    let stopped_at = Instant::now();
    let (_, third) = one_holder(&workers, second).await;
    let took = stopped_at.elapsed();
    assert!(third > second);
    println!("singleton taken over {took:?} after the holder's SIGTERM");
    assert!(took < ttl * 2 / 3, "took {took:?}: the stopping holder did not release the role");
    let _ = stopping.child.wait().await;
}

//! `GET /v1/things` pages through the things of a pool of two worker processes in name order, filtered on the
//! workers that lead them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use serde_json::{Value as Json, json};
use std::path::Path;

use support::process::{Spec, WorkerProcess, cluster_until, settled_on};
use support::{KEY, http};

/// Two worker processes with the test keys, settled on one table.
async fn two_workers(dir: &Path) -> (WorkerProcess, WorkerProcess) {
    support::api_keys(dir);
    let first = Spec::new(dir, "w1", &[], 2).spawn().await;
    let second = Spec::new(dir, "w2", &[first.peer], 2).spawn().await;
    cluster_until(second.api, "two members", |v| settled_on(v, &["w1", "w2"])).await;
    (first, second)
}

#[tokio::test]
async fn things_come_a_page_at_a_time_in_name_order_filtered_by_name_tag_and_session() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = two_workers(dir.path()).await;
    let mut names = Vec::new();
    for i in 0..30 {
        let name = format!("{}-{i:02}", if i % 3 == 0 { "valve" } else { "pump" });
        let tags = if i % 2 == 0 { json!(["even"]) } else { json!([]) };
        let path = format!("/v1/things/{name}");
        let (status, _) =
            http(first.api, "PUT", &path, Some(KEY), Some(json!({"tags": tags}))).await;
        assert_eq!(status, 201);
        names.push(name);
    }
    names.sort();

    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
        let (status, page) =
            http(second.api, "GET", &format!("/v1/things?limit=7{query}"), Some(KEY), None).await;
        assert_eq!(status, 200);
        assert_eq!((page["matching"].clone(), page["complete"].clone()), (json!(30), json!(true)));
        let things = page["things"].as_array().unwrap();
        assert!(things.len() <= 7);
        listed.extend(things.iter().map(|t| t["thing"].as_str().unwrap().to_string()));
        match &page["next"] {
            Json::String(next) => after = Some(next.clone()),
            _ => break,
        }
    }
    assert_eq!(listed, names, "every thing once, in name order");

    let count = |query: &'static str| {
        let api = first.api;
        async move {
            let (status, page) =
                http(api, "GET", &format!("/v1/things?{query}"), Some(KEY), None).await;
            assert_eq!(status, 200, "{query}: {page}");
            (page["matching"].as_u64().unwrap(), page["things"].as_array().unwrap().len())
        }
    };
    assert_eq!(count("prefix=valve").await, (10, 10));
    assert_eq!(count("search=-1").await, (10, 10), "the names numbered 10 to 19");
    assert_eq!(count("tag=even").await, (15, 15));
    assert_eq!(count("tag=even&prefix=valve&limit=2").await, (5, 2));
    assert_eq!(count("online=true").await, (0, 0));
    assert_eq!(count("online=false").await, (30, 30));
    let (status, _) = http(first.api, "GET", "/v1/things?limit=0", Some(KEY), None).await;
    assert_eq!(status, 400);
}

/// While a third worker joins and the table moves partitions to it, a page that says `complete` lists every thing
/// once: no partition is missing because one member still lists under the old table, none counted twice.
#[tokio::test]
async fn a_complete_page_lists_every_thing_once_while_a_worker_joins() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _second) = two_workers(dir.path()).await;
    let mut names = Vec::new();
    for i in 0..200 {
        let name = format!("thing-{i:03}");
        let (status, _) =
            http(first.api, "PUT", &format!("/v1/things/{name}"), Some(KEY), None).await;
        assert_eq!(status, 201);
        names.push(name);
    }

    let _third = Spec::new(dir.path(), "w3", &[first.peer], 2).spawn().await;
    let (mut pages, mut complete, mut settled_pages) = (0, 0, 0);
    // list until the table has settled on three members, and a few pages after
    while settled_pages < 3 {
        let (status, page) = http(first.api, "GET", "/v1/things?limit=1000", Some(KEY), None).await;
        assert_eq!(status, 200);
        pages += 1;
        if page["complete"] == json!(true) {
            complete += 1;
            let listed: Vec<&str> = page["things"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["thing"].as_str().unwrap())
                .collect();
            assert_eq!(listed, names, "page {pages} says complete");
            assert_eq!(page["matching"], json!(200), "page {pages} says complete");
        }
        let (_, view) = http(first.api, "GET", "/v1/cluster", Some(KEY), None).await;
        if settled_on(&view, &["w1", "w2", "w3"]) {
            settled_pages += 1;
        }
    }
    assert!(complete >= 3, "{complete} of {pages} pages complete");
    println!("{complete} of {pages} pages complete while w3 joined");
}

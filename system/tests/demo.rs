//! The README's first command: the demo runs a gateway and two workers as processes of their own, each serving its
//! own metrics, and stops them all, the gateway first, when it is told to stop.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::net::SocketAddr;
use std::process::Stdio;

use support::process::{get_text, signal};
use support::within;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_server_of_the_demo_is_a_process_with_its_own_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_thingport-demo"))
        .args(["--port", "0", "--api-port", "0", "--no-device", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let metrics_line = within("the demo's addresses", async {
        loop {
            let line = lines.next_line().await.unwrap().expect("the demo printed its addresses");
            if line.trim_start().starts_with("metrics") {
                return line;
            }
        }
    })
    .await;
    // gateway first, then the two workers
    let admins: Vec<SocketAddr> = metrics_line
        .split("http://")
        .skip(1)
        .map(|rest| rest.split('/').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(admins.len(), 3, "{metrics_line}");
    for (i, admin) in admins.iter().enumerate() {
        let (status, body) = get_text(*admin, "/metrics").await;
        assert_eq!(status, 200);
        let server = if i == 0 { "gateway" } else { "foundation" };
        assert!(
            body.contains(&format!("thingport_build_info{{server=\"{server}\"")),
            "{server} at {admin}"
        );
        let gateway_lines = body.lines().filter(|l| l.starts_with("thingport_gateway_")).count();
        let ring_lines = body.lines().filter(|l| l.starts_with("thingport_ring_")).count();
        if i == 0 {
            assert!(
                gateway_lines > 0 && ring_lines == 0,
                "the gateway serves its own metrics only"
            );
        } else {
            assert!(ring_lines > 0 && gateway_lines == 0, "a worker serves its own metrics only");
        }
    }

    signal(&demo, "-TERM");
    let status = within("the demo's exit", demo.wait()).await.unwrap();
    assert!(status.success(), "{status}");
    for admin in admins {
        assert_eq!(
            get_text(admin, "/metrics").await.0,
            0,
            "{admin} still answers after the demo stopped"
        );
    }
    let gateway_log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap();
    assert!(gateway_log.contains("drained"), "the gateway drained:\n{gateway_log}");
}

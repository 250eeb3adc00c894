//! The `thingport-foundation` binary as an operator uses it: the default configuration, and a bad one reported
//! whole.

#![allow(clippy::unwrap_used, reason = "in tests a panic is a failed assertion")]

use std::process::Command;

use thingport_foundation::Config;

fn foundation() -> Command {
    Command::new(env!("CARGO_BIN_EXE_thingport-foundation"))
}

#[test]
fn the_printed_default_configuration_is_exactly_the_default() {
    let out = foundation().arg("print-default-config").output().unwrap();
    assert!(out.status.success());
    assert_eq!(Config::parse(&String::from_utf8(out.stdout).unwrap()).unwrap(), Config::default());
}

#[test]
fn a_bad_configuration_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foundation.toml");
    std::fs::write(
        &path,
        "id = 7\nreplicas = 9\nmax_frame = \"big\"\nno_such_key = true\n[storage]\nprovider = \"floppy\"\n",
    )
    .unwrap();
    let out = foundation().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for problem in
        ["id:", "replicas:", "max_frame:", "no_such_key: unknown field", "storage.provider:"]
    {
        assert!(stderr.contains(problem), "{problem} not reported in\n{stderr}");
    }
    // a missing file is a configuration problem too
    let out = foundation()
        .args(["check-config", "--config"])
        .arg(dir.path().join("none"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

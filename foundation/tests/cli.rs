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

#[test]
fn internal_ports_off_loopback_need_the_pools_credentials_which_pool_init_makes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, "key-1\n").unwrap();
    let path = dir.path().join("foundation.toml");
    let open = format!(
        "api_keys_file = \"{}\"\nlink_address = \"0.0.0.0:7101\"\nseeds = [\"10.0.0.2:7201\"]\n",
        keys.display()
    );
    std::fs::write(&path, &open).unwrap();
    let out = foundation().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for problem in ["link_address: 0.0.0.0:7101 is not a loopback address", "seeds: 10.0.0.2:7201"]
    {
        assert!(stderr.contains(problem), "{problem} not reported in\n{stderr}");
    }

    let pool = dir.path().join("pool");
    let init = foundation().args(["pool", "init", "--host", "host-1", "--dir"]).arg(&pool).output();
    assert!(init.unwrap().status.success());
    let again = foundation().args(["pool", "init", "--dir"]).arg(&pool).output().unwrap();
    assert!(!again.status.success(), "a second init must not replace the pool");
    std::fs::write(&path, format!("{open}pool_credentials = \"{}\"\n", pool.display())).unwrap();
    let out = foundation().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // what a second host gets: its own certificate, the CA's certificate and the membership key, not the CA's key
    let host2 = dir.path().join("host-2");
    let issue = foundation()
        .args(["pool", "issue", "--host", "host-2", "--dir"])
        .arg(&pool)
        .arg("--out")
        .arg(&host2)
        .output()
        .unwrap();
    assert!(issue.status.success(), "{}", String::from_utf8_lossy(&issue.stderr));
    for file in ["ca.pem", "node.pem", "node.key", "swim.key"] {
        assert!(host2.join(file).is_file(), "{file} issued");
    }
    assert!(!host2.join("ca.key").exists());
}

#[test]
fn api_keys_are_added_listed_and_revoked_from_the_command_line_and_kept_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api-keys");
    std::fs::write(&file, "").unwrap();
    let key = |args: &[&str]| {
        foundation().arg("api-key").args(args).arg("--file").arg(&file).output().unwrap()
    };
    let added = key(&["add", "--role", "operator", "--prefix", "pump-", "--name", "line-3"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let secret = String::from_utf8(added.stdout).unwrap().trim().to_string();
    assert!(secret.len() >= 32, "{secret:?}");
    assert!(
        !std::fs::read_to_string(&file).unwrap().contains(&secret),
        "the file keeps no key in clear"
    );
    let listed = String::from_utf8(key(&["list"]).stdout).unwrap();
    assert!(
        listed.contains("operator") && listed.contains("pump-") && listed.contains("line-3"),
        "{listed}"
    );
    assert!(!key(&["add", "--role", "root"]).status.success());
    assert!(key(&["revoke", "line-3"]).status.success());
    assert!(String::from_utf8(key(&["list"]).stdout).unwrap().trim().is_empty());

    // a keys file broken by hand is a configuration problem, line by line
    std::fs::write(&file, "sha256:12 role=admin\nsha256:0000000000000000000000000000000000000000000000000000000000000000 role=boss\n").unwrap();
    let path = dir.path().join("foundation.toml");
    std::fs::write(&path, format!("api_keys_file = \"{}\"\n", file.display())).unwrap();
    let out = foundation().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("api_keys_file: line 1") && stderr.contains("api_keys_file: line 2"),
        "{stderr}"
    );
}

//! The `thingport-gateway` binary as an operator uses it: configuration checks, secrets, certificates, tokens,
//! and a real process that drains on SIGTERM.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use thingport_gateway::Config;
use thingport_gateway::token::TokenKey;

fn gateway() -> Command {
    Command::new(env!("CARGO_BIN_EXE_thingport-gateway"))
}

#[test]
fn the_default_configuration_is_valid_toml_with_every_key() {
    let out = gateway().arg("print-default-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(Config::parse(&text).unwrap(), Config::default());
}

#[test]
fn a_bad_configuration_lists_every_problem_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        "[limits]\nmax_frame = 10\nmax_sessions = 0\n[upstream]\nfoundations = []\n[tls]\ncert = \"/nonexistent.pem\"\n",
    )
    .unwrap();
    let out = gateway().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for problem in ["limits.max_frame", "limits.max_sessions", "upstream.foundations", "tls.cert"] {
        assert!(stderr.contains(problem), "{problem} not reported in\n{stderr}");
    }
    // a worker off loopback needs the pool's credentials, and those name files that must be there
    std::fs::write(&path, "[upstream]\nfoundations = [\"10.0.0.2:7101\"]\n").unwrap();
    let out = gateway().args(["check-config", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("upstream.foundations: 10.0.0.2:7101 is not a loopback address"),
        "{stderr}"
    );
    std::fs::write(
        &path,
        "[upstream]\nfoundations = [\"10.0.0.2:7101\"]\npool_credentials = \"/nonexistent\"\n",
    )
    .unwrap();
    let out = gateway().args(["check-config", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("upstream.pool_credentials: no ca.pem in /nonexistent"), "{stderr}");
    assert!(!stderr.contains("loopback"), "{stderr}");
    // unknown keys and wrong types are all reported too, each with its key
    std::fs::write(
        &path,
        "[limits]\nmax_frames = 10\nmax_sessions = \"many\"\n[listen]\naddress = 5\n[session]\nwindow = -1\n[tls]\ncert = \"/nonexistent/cert.pem\"\n",
    )
    .unwrap();
    let out = gateway().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for problem in [
        "limits.max_frames: unknown field",
        "limits.max_sessions:",
        "listen.address:",
        "session.window:",
        // ... and then the values of the keys that could be read
        "tls.cert: no file",
    ] {
        assert!(stderr.contains(problem), "{problem} not reported in\n{stderr}");
    }
    // a syntax error names its line
    std::fs::write(&path, "[limits]\nmax_frame = = 10\n").unwrap();
    let out = gateway().args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8(out.stderr).unwrap().contains("line 2"));
    // a certificate that would be refused (what `systemctl reload` checks before it signals the gateway)
    let (cert, key) = support::write_cert(dir.path(), "server");
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, support::SECRET).unwrap();
    std::fs::write(
        &path,
        format!(
            "[tls]\ncert = {cert:?}\nkey = {key:?}\n[auth]\nsecret_file = {secret:?}\n[upstream]\nfoundations = [\"127.0.0.1:1\"]\n"
        ),
    )
    .unwrap();
    let out = gateway().args(["check-config", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("tls.cert, tls.key:"), "{stderr}");
}

#[test]
fn secrets_certificates_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("provisioning.key");
    assert!(gateway().args(["gen-secret", "--out"]).arg(&secret).status().unwrap().success());
    // never overwritten
    assert!(!gateway().args(["gen-secret", "--out"]).arg(&secret).status().unwrap().success());
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let status =
        gateway().args(["gen-cert", "--cert"]).arg(&cert).arg("--key").arg(&key).status().unwrap();
    assert!(status.success());
    thingport_gateway::tls::ReloadableCert::load(&cert, &key).unwrap();
    // named for what it is, and valid for three years from now, not for ever
    let der = support::read_cert(&cert);
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let subject = parsed.subject().to_string();
    assert!(subject.contains("CN=thingport gateway localhost"), "{subject}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let validity = parsed.validity();
    assert!(validity.not_before.timestamp() <= now as i64);
    let days = (validity.not_after.timestamp() - now as i64) / 86_400;
    assert!((1_090..=1_095).contains(&days), "valid for {days} days");
    let out = gateway()
        .args(["token", "issue", "--thing", "pump-1", "--ttl", "30d", "--secret-file"])
        .arg(&secret)
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let key = TokenKey::from_file(&secret).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(key.verify("pump-1", token.trim().as_bytes(), now), Ok(()));
    assert!(key.verify("pump-1", token.trim().as_bytes(), now + 31 * 86_400).is_err());
}

#[tokio::test]
async fn a_running_process_reloads_on_sighup_and_drains_on_sigterm() {
    let worker = thingport_loadtest::worker::AckWorker::start("127.0.0.1:0".parse().unwrap(), "w")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = support::write_cert(dir.path(), "server");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, support::SECRET).unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\naddress = \"127.0.0.1:0\"\n[tls]\ncert = {cert:?}\nkey = {key:?}\n[auth]\nsecret_file = {secret:?}\n\
             [upstream]\nfoundations = [\"{}\"]\n[admin]\naddress = \"127.0.0.1:0\"\n",
            worker.addr()
        ),
    )
    .unwrap();
    let mut child = gateway()
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let wait_line = |needle: &str| loop {
        let line = lines_rx.recv_timeout(Duration::from_secs(10)).expect("log line");
        if line.contains(needle) {
            return line;
        }
    };
    let listening = wait_line("listening");
    assert!(listening.contains("127.0.0.1:"), "{listening}");
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    wait_line("certificate reloaded");
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    wait_line("drained");
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "exit status {status}");
    worker.kill().await;
}

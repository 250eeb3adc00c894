//! Application keys for the REST API: kept hashed in `api_keys_file`, each with a role and, optionally, the
//! thing-name prefixes it is limited to. The file is read again whenever it changes, so a key added or revoked
//! (`thingport-foundation api-key add|list|revoke`) counts from the next request, with no restart.
//!
//! One key per line, `#` starts a comment:
//!
//! ```text
//! sha256:<64 hex digits> role=operator prefixes=pump-,valve- name=line-3
//! ```
//!
//! The hash is SHA-256 of the key as the client sends it. `role` is `viewer` (reads), `operator` (reads, property
//! writes and service calls) or `admin` (everything: things, definitions, deleting). A key with `prefixes` reaches
//! only things whose names start with one of them. A line holding a bare key (the format before hashing) is taken as
//! an `admin` key stored in clear, with a warning at every load.
//!
//! At start a bad line is an error. Read again while running, a bad line is left out (with an error in the log) and
//! the others count; a file that is gone or unreadable accepts no key until it is back.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::ring::rand::{SecureRandom, SystemRandom};
use anyhow::{Context, Result, bail};

/// What a key may do; each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// What a request's key allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub role: Role,
    /// Thing-name prefixes the key is limited to; empty: every thing.
    pub prefixes: Vec<String>,
}

impl Access {
    /// Whether the key reaches the thing `name`.
    pub fn reaches(&self, name: &str) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// One line of the keys file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    pub access: Access,
    pub name: String,
    /// The key was in the file in clear.
    pub clear: bool,
}

/// SHA-256 of a key.
pub fn hash(key: &str) -> [u8; 32] {
    let digest = ::ring::digest::digest(&::ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Parses the keys file; every bad line is reported, with its number.
pub fn parse(text: &str) -> Result<Vec<Entry>, Vec<String>> {
    let (entries, problems) = parse_lines(text);
    if problems.is_empty() { Ok(entries) } else { Err(problems) }
}

/// The good lines' keys, and a problem for each bad line.
fn parse_lines(text: &str) -> (Vec<Entry>, Vec<String>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        let Some(hashed) = first.strip_prefix("sha256:") else {
            if line.contains(char::is_whitespace) {
                problems.push(format!("line {}: a key in clear is the whole line", n + 1));
            } else {
                let access = Access { role: Role::Admin, prefixes: Vec::new() };
                entries.push(Entry { hash: hash(first), access, name: String::new(), clear: true });
            }
            continue;
        };
        let Some(hash) = unhex(hashed) else {
            problems.push(format!("line {}: sha256: must be followed by 64 hex digits", n + 1));
            continue;
        };
        let (mut role, mut prefixes, mut name) = (None, Vec::new(), String::new());
        let mut role_given = false;
        for field in fields {
            match field.split_once('=') {
                Some(("role", r)) => match Role::parse(r) {
                    Some(r) => {
                        role_given = true;
                        role = Some(r)
                    }
                    None => {
                        role_given = true;
                        problems.push(format!(
                            "line {}: role must be viewer, operator or admin, not {r:?}",
                            n + 1
                        ))
                    }
                },
                Some(("prefixes", p)) => {
                    prefixes = p.split(',').filter(|p| !p.is_empty()).map(String::from).collect()
                }
                Some(("name", v)) => name = v.to_string(),
                _ => problems.push(format!("line {}: unknown field {field:?}", n + 1)),
            }
        }
        match role {
            Some(role) => {
                entries.push(Entry { hash, access: Access { role, prefixes }, name, clear: false })
            }
            None if !role_given => problems.push(format!("line {}: no role=", n + 1)),
            None => {}
        }
    }
    (entries, problems)
}

/// The file as last read: what identifies its content (inode, size, modification time), and its keys by hash.
#[derive(Debug)]
struct Loaded {
    /// `None` while the file cannot be read.
    stamp: Option<(u64, u64, i64, i64)>,
    keys: Arc<HashMap<[u8; 32], Access>>,
}

fn stamp(path: &Path) -> std::io::Result<(u64, u64, i64, i64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The keys file, read again when it changes.
#[derive(Debug)]
pub struct Keys {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl Keys {
    /// Reads the file; an error names each bad line.
    pub fn load(path: &Path) -> Result<Keys> {
        let stamp = stamp(path).with_context(|| format!("reading {}", path.display()))?;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let entries = parse(&text)
            .map_err(|problems| anyhow::anyhow!("{}: {}", path.display(), problems.join("; ")))?;
        let loaded = Loaded { stamp: Some(stamp), keys: Arc::new(by_hash(path, entries)) };
        Ok(Keys { path: path.to_path_buf(), loaded: Mutex::new(loaded) })
    }

    /// What `key` allows, or `None` for an unknown key. The file is checked for a change first (one `stat`).
    pub fn check(&self, key: &str) -> Option<Access> {
        let keys = {
            let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
            let now = stamp(&self.path).ok();
            if now != loaded.stamp {
                *loaded = self.reread(now);
            }
            loaded.keys.clone()
        };
        keys.get(&hash(key)).cloned()
    }

    /// The file read again after a change: its good lines, or no key while it cannot be read.
    fn reread(&self, stamp: Option<(u64, u64, i64, i64)>) -> Loaded {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) if stamp.is_some() => text,
            Ok(_) | Err(_) => {
                tracing::error!(file = %self.path.display(), "the API keys file cannot be read; no key is accepted until it can");
                return Loaded { stamp, keys: Arc::default() };
            }
        };
        let (entries, problems) = parse_lines(&text);
        for problem in &problems {
            tracing::error!(file = %self.path.display(), problem = %problem, "a line of the API keys file is left out");
        }
        Loaded { stamp, keys: Arc::new(by_hash(&self.path, entries)) }
    }
}

fn by_hash(path: &Path, entries: Vec<Entry>) -> HashMap<[u8; 32], Access> {
    if entries.iter().any(|e| e.clear) {
        tracing::warn!(file = %path.display(), "the API keys file holds keys in clear; replace them with `thingport-foundation api-key add` and revoke these");
    }
    entries.into_iter().map(|e| (e.hash, e.access)).collect()
}

/// Held while the keys file is read, changed and replaced, so that two commands do not undo each other's change.
fn lock(path: &Path) -> Result<std::fs::File> {
    let name =
        path.file_name().map_or_else(|| "api-keys".into(), |n| n.to_string_lossy().into_owned());
    let lock = path.with_file_name(format!(".{name}.lock"));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock)
        .with_context(|| format!("opening {}", lock.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .with_context(|| format!("locking {}", lock.display()))?;
    Ok(file)
}

/// The keys file's text; an empty one if there is no file yet.
fn read_for_change(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Adds a new random key with `role`, limited to `prefixes` if any, and returns it: this is the only time it is
/// shown, since the file keeps only its hash.
pub fn add(path: &Path, role: Role, prefixes: &[String], name: &str) -> Result<String> {
    if name.contains(char::is_whitespace) || name.contains('#') {
        bail!("a key's name has no spaces and no '#'");
    }
    if prefixes.iter().any(|p| p.is_empty() || p.contains(',') || p.contains(char::is_whitespace)) {
        bail!("a prefix is not empty and has no ',' or spaces");
    }
    let _locked = lock(path)?;
    let existing = read_for_change(path)?;
    let entries =
        parse(&existing).map_err(|p| anyhow::anyhow!("{}: {}", path.display(), p.join("; ")))?;
    if !name.is_empty() && entries.iter().any(|e| e.name == name) {
        bail!("a key named {name:?} exists; revoke it first or choose another name");
    }
    let mut bytes = [0u8; 24];
    SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow::anyhow!("no randomness"))?;
    let key = format!("tpk_{}", hex(&bytes));
    let mut line = format!("sha256:{} role={}", hex(&hash(&key)), role.name());
    if !prefixes.is_empty() {
        line.push_str(&format!(" prefixes={}", prefixes.join(",")));
    }
    if !name.is_empty() {
        line.push_str(&format!(" name={name}"));
    }
    let mut text = existing;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&line);
    text.push('\n');
    replace(path, &text)?;
    Ok(key)
}

/// The file's keys, one line each: id (the first 12 hex digits of the hash), role, prefixes, name.
pub fn list(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let entries =
        parse(&text).map_err(|p| anyhow::anyhow!("{}: {}", path.display(), p.join("; ")))?;
    Ok(entries
        .iter()
        .map(|e| {
            let prefixes = if e.access.prefixes.is_empty() {
                "*".to_string()
            } else {
                e.access.prefixes.join(",")
            };
            let clear = if e.clear { "  (stored in clear)" } else { "" };
            format!(
                "{}  {:<8}  {:<20}  {}{clear}",
                &hex(&e.hash)[..12],
                e.access.role.name(),
                prefixes,
                e.name
            )
        })
        .collect())
}

/// Removes the key whose name is `id`, or whose hash starts with `id` (at least 8 hex digits), and rewrites the
/// file in one rename: the key stops working at the next request.
pub fn revoke(path: &Path, id: &str) -> Result<()> {
    let _locked = lock(path)?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut kept = String::new();
    let mut removed = 0;
    for line in text.lines() {
        let matches = match parse(line) {
            Ok(entries) => entries.iter().any(|e| {
                (!e.name.is_empty() && e.name == id)
                    || (id.len() >= 8 && hex(&e.hash).starts_with(&id.to_ascii_lowercase()))
            }),
            Err(_) => false,
        };
        if matches {
            removed += 1;
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    match removed {
        0 => bail!("no key named {id:?} or with an id starting with it"),
        1 => replace(path, &kept),
        n => bail!("{id:?} names {n} keys; give more of the id"),
    }
}

/// Writes `text` to a new file beside `path` and renames it over `path`, keeping its permissions (0640 if new).
fn replace(path: &Path, text: &str) -> Result<()> {
    let mode = std::fs::metadata(path).map(|m| m.mode() & 0o7777).unwrap_or(0o640);
    let temp = path.with_extension(format!("new-{}", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .with_context(|| format!("creating {}", temp.display()))?;
    // the mode asked for at creation passes through the umask: set it as it was
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", temp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temp.display()))?;
    if let Ok(m) = std::fs::metadata(path) {
        // the group that may read the file (the servers' user) stays; a failure leaves the owner's default
        let _ = std::os::unix::fs::chown(&temp, Some(m.uid()), Some(m.gid()));
    }
    std::fs::rename(&temp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Failed key checks per client address: past [`MAX_FAILURES`] in [`FAILURE_WINDOW`], an address is answered 429
/// until the window ends, whatever key it sends. At most [`MAX_ADDRESSES`] addresses are tracked; when full, the
/// oldest window is forgotten.
#[derive(Debug, Default)]
pub struct Failures {
    by_address: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Failures from one address within [`FAILURE_WINDOW`] before it is slowed down.
pub const MAX_FAILURES: u32 = 10;
/// How long failures count against an address.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once.
pub const MAX_ADDRESSES: usize = 4096;

impl Failures {
    /// How long `addr` must wait before it may try again, if it has failed too often.
    pub fn blocked(&self, addr: IpAddr) -> Option<Duration> {
        let map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        let (count, since) = map.get(&addr)?;
        let left = FAILURE_WINDOW.checked_sub(since.elapsed())?;
        (*count >= MAX_FAILURES).then_some(left)
    }

    /// Counts a failed check from `addr`.
    pub fn failed(&self, addr: IpAddr) {
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&addr) && map.len() >= MAX_ADDRESSES {
            map.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
            if map.len() >= MAX_ADDRESSES
                && let Some(oldest) =
                    map.iter().min_by_key(|(_, (_, since))| *since).map(|(a, _)| *a)
            {
                map.remove(&oldest);
            }
        }
        let entry = map.entry(addr).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "in tests a panic is a failed assertion")]

    use super::*;

    #[test]
    fn lines_parse_into_roles_and_prefixes_and_bad_ones_are_all_named() {
        let h = hex(&hash("k"));
        let text = format!(
            "# keys\nsha256:{h} role=operator prefixes=pump-,valve- name=line-3\nlegacy-key\n\nsha256:{h} role=admin # x\n"
        );
        let entries = parse(&text).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(
            entries[0].access,
            Access { role: Role::Operator, prefixes: vec!["pump-".into(), "valve-".into()] }
        );
        assert_eq!(entries[0].name, "line-3");
        assert!(entries[1].clear && entries[1].access.role == Role::Admin);
        assert!(entries[0].access.reaches("pump-7") && !entries[0].access.reaches("boiler-1"));
        let bad = parse("sha256:12 role=admin\nsha256:".to_string().as_str()).unwrap_err();
        assert_eq!(bad.len(), 2, "{bad:?}");
        let bad =
            parse(&format!("sha256:{h} role=root\nsha256:{h}\nsha256:{h} role=admin colour=red\n"))
                .unwrap_err();
        assert_eq!(bad.len(), 3, "{bad:?}");
    }

    #[test]
    fn added_keys_are_kept_hashed_and_a_revoked_key_stops_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api-keys");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let keys = Keys::load(&path).unwrap();
        let viewer = add(&path, Role::Viewer, &["pump-".into()], "dash").unwrap();
        let admin = add(&path, Role::Admin, &[], "ops").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&viewer) && !text.contains(&admin), "keys are not stored in clear");
        assert_eq!(
            keys.check(&viewer),
            Some(Access { role: Role::Viewer, prefixes: vec!["pump-".into()] })
        );
        assert_eq!(keys.check(&admin).map(|a| a.role), Some(Role::Admin));
        assert_eq!(keys.check("tpk_guess"), None);
        assert!(add(&path, Role::Viewer, &[], "ops").is_err(), "names are unique");
        assert_eq!(list(&path).unwrap().len(), 2);
        revoke(&path, "dash").unwrap();
        assert_eq!(keys.check(&viewer), None, "revoked: refused at the next check");
        assert!(keys.check(&admin).is_some());
        let id = &hex(&hash(&admin))[..10];
        revoke(&path, id).unwrap();
        assert_eq!(keys.check(&admin), None);
        assert!(revoke(&path, "ops").is_err());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "a rewrite keeps the file's mode");
        // a line broken by hand is left out and the others count; a file that is gone accepts no key
        let third = add(&path, Role::Operator, &[], "third").unwrap();
        let good = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("sha256:zz role=admin\n{good}")).unwrap();
        assert!(keys.check(&third).is_some());
        std::fs::remove_file(&path).unwrap();
        assert_eq!(keys.check(&third), None);
        std::fs::write(&path, good).unwrap();
        assert!(keys.check(&third).is_some(), "back once the file is");
    }

    #[test]
    fn an_address_that_keeps_failing_waits_out_the_window() {
        let failures = Failures::default();
        let addr: IpAddr = "192.0.2.7".parse().unwrap();
        for _ in 0..MAX_FAILURES - 1 {
            failures.failed(addr);
        }
        assert_eq!(failures.blocked(addr), None);
        failures.failed(addr);
        assert!(failures.blocked(addr).is_some_and(|d| d <= FAILURE_WINDOW));
        assert_eq!(failures.blocked("192.0.2.8".parse().unwrap()), None, "others are not slowed");
    }
}

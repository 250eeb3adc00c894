//! Locks taken and released as applications take them: concurrent clients on workers' APIs, each in a loop of
//! `POST /v1/locks/{name}` and `DELETE /v1/locks/{name}?token=T` (docs/API.md, locks), with the latency of each,
//! and a check of the fencing tokens: no token is granted twice, and each client's tokens grow.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::http;

/// What the clients did.
#[derive(Debug, Serialize)]
pub struct LocksReport {
    pub clients: usize,
    pub seconds: f64,
    pub acquired: u64,
    pub released: u64,
    /// Acquires answered 409: another client held the lock.
    pub busy: u64,
    /// Answers other than 200, 204 and 409, and failed requests.
    pub errors: u64,
    /// Acquires and releases answered, per second.
    pub operations_per_second: f64,
    pub acquire_p50_ms: f64,
    pub acquire_p99_ms: f64,
    pub release_p99_ms: f64,
    /// No token granted twice, and each client's tokens grew.
    pub tokens_ok: bool,
}

impl LocksReport {
    pub fn table(&self) -> String {
        format!(
            "clients {}  {:.1} s  acquired {}  released {}  busy {}  errors {}\n\
             {:.0} operations/s  acquire p50 {:.2} ms  p99 {:.2} ms  release p99 {:.2} ms  tokens {}\n",
            self.clients,
            self.seconds,
            self.acquired,
            self.released,
            self.busy,
            self.errors,
            self.operations_per_second,
            self.acquire_p50_ms,
            self.acquire_p99_ms,
            self.release_p99_ms,
            if self.tokens_ok { "ok" } else { "NOT OK" },
        )
    }
}

struct Client {
    acquired: u64,
    released: u64,
    busy: u64,
    errors: u64,
    acquire: Histogram<u64>,
    release: Histogram<u64>,
    tokens: Vec<u64>,
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram")
}

/// The token of a lease the API answered.
fn token_of(body: &[u8]) -> Result<u64> {
    let lease: serde_json::Value = serde_json::from_slice(body)?;
    lease["token"].as_u64().context("no token in the lease")
}

/// One client: lock `name` as `holder` and release it, until `until`.
async fn client(
    api: SocketAddr,
    key: String,
    name: String,
    holder: String,
    until: Instant,
) -> Result<Client> {
    let mut c = Client {
        acquired: 0,
        released: 0,
        busy: 0,
        errors: 0,
        acquire: histogram()?,
        release: histogram()?,
        tokens: Vec::new(),
    };
    let mut conn = None;
    let path = format!("/v1/locks/{name}");
    let body = format!("{{\"holder\":\"{holder}\",\"ttl_ms\":10000}}");
    while Instant::now() < until {
        let started = Instant::now();
        let (status, answer) =
            match http::request(&mut conn, api, "POST", &path, &key, Some(&body)).await {
                Ok(a) => a,
                Err(_) => {
                    c.errors += 1;
                    conn = None;
                    continue;
                }
            };
        c.acquire.saturating_record(started.elapsed().as_micros() as u64);
        match status {
            200 => c.acquired += 1,
            409 => {
                c.busy += 1;
                continue;
            }
            _ => {
                c.errors += 1;
                continue;
            }
        }
        let token = token_of(&answer)?;
        c.tokens.push(token);
        let started = Instant::now();
        let release = format!("{path}?token={token}");
        match http::request(&mut conn, api, "DELETE", &release, &key, None).await {
            Ok((204, _)) => {
                c.release.saturating_record(started.elapsed().as_micros() as u64);
                c.released += 1;
            }
            Ok(_) => c.errors += 1,
            Err(_) => {
                c.errors += 1;
                conn = None;
            }
        }
    }
    Ok(c)
}

/// Runs `clients` clients for `duration`, spread over `apis`; `names` distinct locks shared among them (client
/// `i` takes lock `i % names`, so fewer names than clients means contention).
pub async fn run(
    apis: &[SocketAddr],
    key: &str,
    clients: usize,
    names: usize,
    duration: Duration,
) -> Result<LocksReport> {
    if apis.is_empty() || clients == 0 || names == 0 {
        bail!("needs an API address, a client and a lock name");
    }
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let api = apis[i % apis.len()];
            tokio::spawn(client(
                api,
                key.to_string(),
                format!("bench-{}", i % names),
                format!("client-{i}"),
                until,
            ))
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.push(task.await.context("a client task")??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut acquire = histogram()?;
    let mut release = histogram()?;
    let mut tokens: Vec<u64> = Vec::new();
    let mut growing = true;
    for c in &all {
        acquire.add(&c.acquire)?;
        release.add(&c.release)?;
        growing &= c.tokens.windows(2).all(|w| w[0] < w[1]);
        tokens.extend(&c.tokens);
    }
    let granted = tokens.len();
    tokens.sort_unstable();
    tokens.dedup();
    let sum = |f: fn(&Client) -> u64| all.iter().map(f).sum::<u64>();
    let (acquired, released) = (sum(|c| c.acquired), sum(|c| c.released));
    let busy = sum(|c| c.busy);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(LocksReport {
        clients,
        seconds,
        acquired,
        released,
        busy,
        errors: sum(|c| c.errors),
        operations_per_second: (acquired + released + busy) as f64 / seconds,
        acquire_p50_ms: ms(&acquire, 0.5),
        acquire_p99_ms: ms(&acquire, 0.99),
        release_p99_ms: ms(&release, 0.99),
        tokens_ok: growing && tokens.len() == granted,
    })
}

//! `/v1/locks/{name}`: named locks with leases and fencing tokens, committed by the pool's consensus group
//! ([`crate::coord`]; documented in `docs/API.md`, locks).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use thingport_protocol::peer::{Lease, LockCommand, LockOutcome};

use crate::Shared;
use crate::api::{Refusal, body, error, part, path, query, refusal};
use crate::coord::CoordError;
use crate::coord::singleton::RESERVED;

/// Longest name of a lock or of a holder, in bytes.
pub const MAX_NAME: usize = 256;
/// The shortest lease.
pub const MIN_TTL: Duration = Duration::from_millis(100);
/// The longest an acquire waits for a lock to come free.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireBody {
    holder: String,
    ttl_ms: u64,
    #[serde(default)]
    wait_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewBody {
    token: u64,
    ttl_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseQuery {
    token: u64,
}

fn check_name(what: &str, name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            format!("{what} must be 1 to {MAX_NAME} bytes"),
        ));
    }
    Ok(())
}

/// Names the pool keeps for itself can be read, not taken, renewed or released.
fn check_own(name: &str) -> Result<(), Refusal> {
    if name.starts_with(RESERVED) {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            format!(
                "lock names beginning with {RESERVED} are the pool's own; they can only be read"
            ),
        ));
    }
    Ok(())
}

fn check_ttl(shared: &Shared, ttl_ms: u64) -> Result<(), Refusal> {
    let max = shared.config.locks.max_ttl;
    if !(MIN_TTL..=max).contains(&Duration::from_millis(ttl_ms)) {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            format!("ttl_ms must be {} to {}", MIN_TTL.as_millis(), max.as_millis()),
        ));
    }
    Ok(())
}

fn lease_json(lease: &Lease) -> serde_json::Value {
    json!({ "lock": lease.name, "holder": lease.holder, "token": lease.token, "expires_in_ms": lease.expires_in_ms })
}

/// The answer for an outcome.
fn answer(outcome: Result<LockOutcome, CoordError>, shared: &Shared) -> Response {
    match outcome {
        Ok(LockOutcome::Held(lease)) => Json(lease_json(&lease)).into_response(),
        Ok(LockOutcome::Busy { holder, token, expires_in_ms }) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": "the lock is held", "holder": holder, "token": token, "expires_in_ms": expires_in_ms })),
        )
            .into_response(),
        Ok(LockOutcome::Lost) => error(
            StatusCode::CONFLICT,
            "this token no longer holds the lock (its lease ran out, it was released, or another holder took it)",
        ),
        Ok(LockOutcome::Released) => StatusCode::NO_CONTENT.into_response(),
        Ok(LockOutcome::Free) => error(StatusCode::NOT_FOUND, "the lock is free"),
        Ok(LockOutcome::Full) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            format!("the pool holds locks.max_locks ({}) locks", shared.config.locks.max_locks),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `POST /v1/locks/{name}`: takes the lock, waiting up to `wait_ms` for it to come free.
pub async fn acquire(
    State(shared): State<Arc<Shared>>,
    name: Result<Path<String>, PathRejection>,
    request: Result<Json<AcquireBody>, JsonRejection>,
) -> Response {
    let name = part!(path(name));
    let request = part!(body(request));
    part!(check_name("the lock's name", &name));
    part!(check_own(&name));
    part!(check_name("holder", &request.holder));
    part!(check_ttl(&shared, request.ttl_ms));
    let deadline = Instant::now() + Duration::from_millis(request.wait_ms).min(MAX_WAIT);
    let command = LockCommand::Acquire { name, holder: request.holder, ttl_ms: request.ttl_ms };
    let mut applied = shared.coord.applied();
    loop {
        applied.borrow_and_update();
        let outcome = shared.coord.submit(command.clone()).await;
        let Ok(LockOutcome::Busy { expires_in_ms, .. }) = &outcome else {
            return answer(outcome, &shared);
        };
        let now = Instant::now();
        if now >= deadline {
            return answer(outcome, &shared);
        }
        // try again when an entry is applied (a release, perhaps) or the holder's lease runs out
        let until = (now + Duration::from_millis(*expires_in_ms)).min(deadline);
        let _ = tokio::time::timeout_at(until.into(), applied.changed()).await;
    }
}

/// `PUT /v1/locks/{name}`: extends the lease the token names.
pub async fn renew(
    State(shared): State<Arc<Shared>>,
    name: Result<Path<String>, PathRejection>,
    request: Result<Json<RenewBody>, JsonRejection>,
) -> Response {
    let name = part!(path(name));
    let request = part!(body(request));
    part!(check_name("the lock's name", &name));
    part!(check_own(&name));
    part!(check_ttl(&shared, request.ttl_ms));
    let command = LockCommand::Renew { name, token: request.token, ttl_ms: request.ttl_ms };
    answer(shared.coord.submit(command).await, &shared)
}

/// `DELETE /v1/locks/{name}?token=T`: frees the lock if the token still holds it.
pub async fn release(
    State(shared): State<Arc<Shared>>,
    name: Result<Path<String>, PathRejection>,
    token: Result<Query<ReleaseQuery>, QueryRejection>,
) -> Response {
    let name = part!(path(name));
    let token = part!(query(token)).token;
    part!(check_name("the lock's name", &name));
    part!(check_own(&name));
    answer(shared.coord.submit(LockCommand::Release { name, token }).await, &shared)
}

/// `GET /v1/locks/{name}`: the lock's holder and lease, as the leader knows them.
pub async fn read(
    State(shared): State<Arc<Shared>>,
    name: Result<Path<String>, PathRejection>,
) -> Response {
    let name = part!(path(name));
    part!(check_name("the lock's name", &name));
    answer(shared.coord.read(&name).await, &shared)
}

//! The REST API for people and applications (documented in `docs/API.md`). Every request carries an application
//! key in `x-api-key`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};
use thingport_protocol::{
    ByteString, Frame, Properties, PropertyUpdate, Quality, ServiceRequest, ServiceResult,
};

use thingport_protocol::peer::Op;

use crate::Shared;
use crate::calls::CallOutcome;
use crate::json::{from_json, to_json};
use crate::links::now_ms;
use crate::model::{PropertyState, ThingState};
use crate::ring::{RingError, membership};

/// Application keys read from the keys file: one per line, `#` comments.
pub fn parse_keys(text: &str) -> HashSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/things", get(list_things))
        .route("/v1/things/{thing}", get(get_thing).put(create_thing))
        .route("/v1/things/{thing}/properties/{name}", get(get_property).put(put_property))
        .route("/v1/things/{thing}/services/{service}", post(call_service))
        .route("/v1/cluster", get(cluster))
        .layer(middleware::from_fn_with_state(shared.clone(), authenticate))
        .with_state(shared)
}

/// Refuses a frame for a device that the device could not decode (an over-long name or string, too deep a value,
/// too large a frame), so that a bad API request never ends a device's session. Leaves room for the sequence
/// number the gateway stamps (`docs/PROTOCOL.md` §8).
fn undeliverable(frame: &Frame) -> Option<Response> {
    let limits = thingport_protocol::Limits {
        max_frame: thingport_protocol::Limits::DEFAULT.max_frame
            - thingport_protocol::varint::MAX_LEN,
        ..thingport_protocol::Limits::DEFAULT
    };
    Frame::decode(frame.to_bytes(), &limits)
        .err()
        .map(|e| error(StatusCode::BAD_REQUEST, format!("a device could not accept this: {e}")))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn authenticate(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let key = request.headers().get("x-api-key").and_then(|v| v.to_str().ok());
    match key {
        Some(key) if shared.api_keys.contains(key) => next.run(request).await,
        Some(_) => error(StatusCode::UNAUTHORIZED, "unknown application key"),
        None => error(StatusCode::UNAUTHORIZED, "send an application key in the x-api-key header"),
    }
}

fn property_json(p: &PropertyState) -> JsonValue {
    let quality = match p.quality {
        Quality::Good => "good",
        Quality::Uncertain => "uncertain",
        Quality::Bad => "bad",
    };
    json!({
        "value": to_json(&p.value),
        "quality": quality,
        "timestamp_ms": p.version.timestamp_ms,
        "received_ms": p.received_ms,
    })
}

fn thing_summary(name: &str, t: &ThingState) -> JsonValue {
    json!({
        "thing": name,
        "online": t.binding.is_some(),
        "gateway": t.binding.as_ref().map(|b| b.gateway.to_string()),
        "properties": t.properties.len(),
        "created_ms": t.created_ms,
    })
}

fn unavailable(e: RingError) -> Response {
    let status = match e {
        RingError::UnknownThing => StatusCode::NOT_FOUND,
        RingError::Invalid => StatusCode::BAD_REQUEST,
        RingError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}

/// A thing's state from the ring: the response to send instead if it does not exist or cannot be read.
async fn read_thing(shared: &Shared, thing: &str) -> Result<ThingState, Response> {
    match shared.cluster.read(thing).await {
        Ok(Some(t)) => Ok(t),
        Ok(None) => Err(error(StatusCode::NOT_FOUND, format!("no thing {thing}"))),
        Err(e) => Err(unavailable(e)),
    }
}

async fn list_things(State(shared): State<Arc<Shared>>) -> Json<JsonValue> {
    let (things, complete) = shared.cluster.list().await;
    let things: Vec<JsonValue> = things
        .iter()
        .map(|t| {
            json!({
                "thing": t.name,
                "online": t.gateway.is_some(),
                "gateway": t.gateway,
                "properties": t.properties,
                "created_ms": t.created_ms,
            })
        })
        .collect();
    Json(json!({ "things": things, "complete": complete }))
}

async fn get_thing(State(shared): State<Arc<Shared>>, Path(thing): Path<String>) -> Response {
    let t = match read_thing(&shared, &thing).await {
        Ok(t) => t,
        Err(response) => return response,
    };
    let properties: BTreeMap<String, JsonValue> =
        t.properties.iter().map(|(k, v)| (k.to_string(), property_json(v))).collect();
    let events: Vec<JsonValue> = t
        .events
        .iter()
        .rev()
        .map(|e| json!({"name": e.name.to_string(), "payload": to_json(&e.payload), "timestamp_ms": e.version.timestamp_ms}))
        .collect();
    let mut summary = thing_summary(&thing, &t);
    summary["properties"] = json!(properties);
    summary["events"] = json!(events);
    summary["session_id"] = json!(t.binding.as_ref().map(|b| b.session_id));
    // where the thing lives in the ring: its partition and the partition's holders, primary first
    let partition = crate::ring::partition_of(thing.as_bytes());
    summary["partition"] = json!(partition);
    summary["owners"] = json!(
        shared.cluster.table().map(|t| t.owners(partition).map(String::from).collect::<Vec<_>>())
    );
    Json(summary).into_response()
}

async fn create_thing(State(shared): State<Arc<Shared>>, Path(thing): Path<String>) -> Response {
    if thing.is_empty() || thing.len() > thingport_protocol::Limits::DEFAULT.max_name {
        return error(StatusCode::BAD_REQUEST, "a thing name is 1 to 256 bytes");
    }
    let existed = match shared.cluster.read(&thing).await {
        Ok(t) => t.is_some(),
        Err(e) => return unavailable(e),
    };
    if let Err(e) =
        shared.cluster.write(Op::Create { thing: thing.clone().into(), now_ms: now_ms() }).await
    {
        return unavailable(e);
    }
    let status = if existed { StatusCode::OK } else { StatusCode::CREATED };
    (status, Json(json!({ "thing": thing }))).into_response()
}

async fn get_property(
    State(shared): State<Arc<Shared>>,
    Path((thing, name)): Path<(String, String)>,
) -> Response {
    match read_thing(&shared, &thing).await {
        Err(response) => response,
        Ok(t) => match t.properties.get(name.as_str()) {
            None => error(StatusCode::NOT_FOUND, format!("thing {thing} has no property {name}")),
            Some(p) => Json(property_json(p)).into_response(),
        },
    }
}

#[derive(Debug, Deserialize)]
struct PropertyWrite {
    value: JsonValue,
}

/// Stores a value written by an application and delivers it to the device if it is connected.
async fn put_property(
    State(shared): State<Arc<Shared>>,
    Path((thing, name)): Path<(String, String)>,
    Json(body): Json<PropertyWrite>,
) -> Response {
    let value = match from_json(&body.value) {
        Ok(value) => value,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let now = now_ms();
    let prop = ByteString::from(name.clone());
    let write = Frame::Properties(Properties {
        seq: 0,
        updates: vec![PropertyUpdate {
            name: prop.clone(),
            timestamp_ms: now,
            quality: Quality::Good,
            value: value.clone(),
        }],
    });
    if let Some(refused) = undeliverable(&write) {
        return refused;
    }
    let mut encoded = bytes::BytesMut::new();
    value.encode(&mut encoded);
    let op = Op::Write {
        thing: thing.clone().into(),
        property: prop.clone(),
        value: encoded.freeze(),
        now_ms: now,
    };
    if let Err(e) = shared.cluster.write(op).await {
        return unavailable(e);
    }
    let binding = match read_thing(&shared, &thing).await {
        Ok(t) => t.binding,
        Err(response) => return response,
    };
    let delivered =
        binding.is_some_and(|b| shared.links.downstream(&b.gateway, b.session_id, 0, &write));
    Json(json!({ "stored": true, "delivered": delivered })).into_response()
}

#[derive(Debug, Deserialize)]
struct CallQuery {
    timeout_ms: Option<u64>,
}

/// Calls a service the device implements and waits for its answer.
async fn call_service(
    State(shared): State<Arc<Shared>>,
    Path((thing, service)): Path<(String, String)>,
    Query(query): Query<CallQuery>,
    body: Option<Json<JsonValue>>,
) -> Response {
    let params = match body.map(|Json(b)| from_json(&b)).transpose() {
        Ok(params) => params.unwrap_or_default(),
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let timeout = Duration::from_millis(query.timeout_ms.unwrap_or(10_000).clamp(1, 300_000));
    let t = match read_thing(&shared, &thing).await {
        Ok(t) => t,
        Err(response) => return response,
    };
    let Some(binding) = t.binding else {
        return error(StatusCode::CONFLICT, format!("thing {thing} is not connected"));
    };
    let (call_id, answer) = shared.cluster.calls.start();
    // forgets the call however this handler ends: answered, timed out, refused, or the HTTP client gone
    let _waiting = Waiting { calls: &shared.cluster.calls, id: call_id };
    let request = Frame::ServiceRequest(ServiceRequest {
        seq: 0,
        call_id,
        timeout_ms: timeout.as_millis() as u32,
        service: ByteString::from(service.clone()),
        params,
    });
    if let Some(refused) = undeliverable(&request) {
        return refused;
    }
    if !shared.links.downstream(&binding.gateway, binding.session_id, call_id, &request) {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no link to the thing's gateway");
    }
    match tokio::time::timeout(timeout, answer).await {
        Ok(Ok(CallOutcome::Answered(ServiceResult::Ok(value)))) => Json(json!({ "result": to_json(&value) })).into_response(),
        Ok(Ok(CallOutcome::Answered(ServiceResult::Err { code, message }))) => (
            StatusCode::BAD_GATEWAY,
            Json(json!({ "error": message.to_string(), "code": code.name().unwrap_or("UNKNOWN"), "code_value": code.0 })),
        )
            .into_response(),
        Ok(Ok(CallOutcome::Undeliverable(code))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, format!("the gateway could not deliver the call: {code}"))
        }
        Ok(Err(_)) | Err(_) => {
            error(StatusCode::GATEWAY_TIMEOUT, format!("no answer from {thing} within {} ms", timeout.as_millis()))
        }
    }
}

/// A call the API waits for; dropping it forgets the call.
struct Waiting<'a> {
    calls: &'a crate::calls::Calls,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.calls.abandon(self.id);
    }
}

async fn cluster(State(shared): State<Arc<Shared>>) -> Json<JsonValue> {
    let cluster = &shared.cluster;
    let table = cluster.table();
    let members = cluster.members();
    let stats = cluster.stats().await;
    let member_json: Vec<JsonValue> = stats
        .iter()
        .map(|(key, counts)| {
            let node = members.get(key);
            json!({
                "member": key,
                "id": membership::name_of(key),
                "peer_address": node.map(|n| n.addr.to_string()),
                "in_table": table.as_ref().is_some_and(|t| t.members.contains(key)),
                "partitions_held": counts.map(|c| c.1),
                "primaries": counts.map(|c| c.2),
                "keys": counts.map(|c| c.0),
            })
        })
        .collect();
    Json(json!({
        "this_member": cluster.me,
        "members": member_json,
        "table": table.as_ref().map(|t| json!({
            "version": t.version,
            "members": t.members,
            "replicas": t.replicas,
            "partitions": crate::ring::PARTITIONS,
            "replica_slots": t.load(),
            "primaries": t.primaries(),
        })),
        "changing": cluster.changing(),
        "replication": shared.config.replicas,
        "gateways_linked": shared.links.gateways(),
    }))
}

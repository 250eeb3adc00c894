//! The REST API for people and applications (documented in `docs/API.md`). Every request carries an application
//! key in `x-api-key`, whose role and thing-name prefixes ([`crate::keys`]) decide what it may do; every error is a
//! JSON object `{"error": ...}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Extension, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};
use thingport_protocol::peer::{
    HistoryQuery, ListQuery, LockOutcome, Op, PropertyDefinition, StreamPosition,
};
use thingport_protocol::{
    ByteString, Frame, Limits, Properties, PropertyUpdate, Quality, ServiceRequest, ServiceResult,
    Value,
};

use crate::Shared;
use crate::calls::CallOutcome;
use crate::json::{from_json, to_json};
use crate::keys::{Access, Role};
use crate::links::now_ms;
use crate::model::{PropertyState, ThingState};
use crate::ring::{RingError, membership};

/// Most values or events in one page of history.
pub const MAX_PAGE: u32 = 10_000;
/// Values or events in a page of history when the request does not say.
pub const DEFAULT_PAGE: u32 = 1_000;
/// Recent events shown with a thing.
pub const RECENT_EVENTS: u32 = 100;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/things", get(list_things))
        .route("/v1/things/{thing}", get(get_thing).put(put_thing).delete(delete_thing))
        .route(
            "/v1/things/{thing}/properties/{name}",
            get(get_property).put(put_property).delete(delete_property),
        )
        .route(
            "/v1/things/{thing}/properties/{name}/definition",
            get(get_definition).put(put_definition),
        )
        .route("/v1/things/{thing}/properties/{name}/history", get(property_history))
        .route("/v1/things/{thing}/events", get(event_history))
        .route("/v1/things/{thing}/services/{service}", post(call_service))
        .route("/v1/things/{thing}/stream", get(crate::sse::thing_stream))
        .route("/v1/stream", get(crate::sse::set_stream))
        .route("/v1/cluster", get(cluster))
        .route("/v1/key", get(key_info))
        .route(
            "/v1/locks/{name}",
            get(crate::locks::read)
                .post(crate::locks::acquire)
                .put(crate::locks::renew)
                .delete(crate::locks::release),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such resource") })
        .method_not_allowed_fallback(|| async {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this resource")
        })
        .layer(middleware::from_fn_with_state(shared.clone(), authenticate))
        .with_state(shared)
        .merge(crate::console::router())
}

/// A request's path, query and body, or the JSON error to answer instead.
pub(crate) fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, Refusal> {
    p.map(|Path(p)| p).map_err(|e| refusal(StatusCode::BAD_REQUEST, e.body_text()))
}

pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, Refusal> {
    q.map(|Query(q)| q).map_err(|e| refusal(StatusCode::BAD_REQUEST, e.body_text()))
}

/// A JSON body; one that does not parse or does not fit the request's fields is 400 (as every other bad request),
/// one without its content type 415.
pub(crate) fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, Refusal> {
    b.map(|Json(b)| b).map_err(|e| {
        let status = match e.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            other => other,
        };
        refusal(status, e.body_text())
    })
}

/// A JSON body that may be absent (empty): `None` then.
fn optional_body<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<Option<T>, Refusal> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(raw)
        .map(Some)
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, format!("the body is not valid: {e}")))
}

/// Unwraps a request part or returns its error response.
macro_rules! part {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(refused) => return refused.into_response(),
        }
    };
}
pub(crate) use part;

/// Refuses a frame for a device that the device could not decode (an over-long name or string, too deep a value,
/// too large a frame), so that a bad API request never ends a device's session. Leaves room for the sequence
/// number the gateway stamps (`docs/PROTOCOL.md` §8).
fn undeliverable(frame: &Frame) -> Option<Response> {
    crate::services::device_can_decode(frame)
        .err()
        .map(|e| error(StatusCode::BAD_REQUEST, format!("a device could not accept this: {e}")))
}

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A request refused before anything was done: the status and what is wrong.
#[derive(Debug)]
pub(crate) struct Refusal(StatusCode, String);

pub(crate) fn refusal(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal(status, message.into())
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// Checks the request's key (401), its role and thing prefixes for the route (403), and slows down an address
/// that keeps sending unknown keys (429); the request then carries its [`Access`].
async fn authenticate(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
    next: Next,
) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<thingport_shell::https::ClientAddr>>()
        .map(|c| c.0.0.ip());
    if let Some(wait) = client.and_then(|addr| shared.failures.blocked(addr)) {
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many unknown keys from this address; retry in {} s", wait.as_secs() + 1),
        );
        if let Ok(value) = HeaderValue::from_str(&(wait.as_secs() + 1).to_string()) {
            response.headers_mut().insert("retry-after", value);
        }
        return response;
    }
    let Some(key) = request.headers().get("x-api-key").and_then(|v| v.to_str().ok()) else {
        return error(StatusCode::UNAUTHORIZED, "send an application key in the x-api-key header");
    };
    let Some(access) = shared.keys.check(key) else {
        if let Some(addr) = client {
            shared.failures.failed(addr);
        }
        return error(StatusCode::UNAUTHORIZED, "unknown application key");
    };
    let route = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    if let Some(route) = route {
        let needed = required_role(request.method(), &route);
        if access.role < needed {
            return error(
                StatusCode::FORBIDDEN,
                format!(
                    "this key's role is {}; this request needs {}",
                    access.role.name(),
                    needed.name()
                ),
            );
        }
        match thing_of(request.uri().path()) {
            Ok(Some(thing)) if !access.reaches(&thing) => {
                return error(
                    StatusCode::FORBIDDEN,
                    "this key does not reach that thing (its prefixes)",
                );
            }
            Ok(_) => {}
            Err(()) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the thing's name is not valid percent-encoded UTF-8",
                );
            }
        }
    }
    request.extensions_mut().insert(access);
    next.run(request).await
}

/// The least role a route and method need: reads are for every key, property writes and service calls for
/// operators, the rest (things, definitions, deleting) for admins.
fn required_role(method: &Method, route: &str) -> Role {
    match (method, route) {
        (&Method::GET | &Method::HEAD, _) => Role::Viewer,
        (&Method::PUT, "/v1/things/{thing}/properties/{name}")
        | (&Method::POST, "/v1/things/{thing}/services/{service}") => Role::Operator,
        _ => Role::Admin,
    }
}

/// The thing a `/v1/things/{thing}…` path names, percent-decoded; an error when it does not decode (refused, so
/// that no name escapes the prefix check).
fn thing_of(path: &str) -> Result<Option<String>, ()> {
    let Some(rest) = path.strip_prefix("/v1/things/") else { return Ok(None) };
    let Some(segment) = rest.split('/').next().filter(|s| !s.is_empty()) else { return Ok(None) };
    percent_decode(segment).map(Some).ok_or(())
}

fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let high = (hex[0] as char).to_digit(16)?;
            let low = (hex[1] as char).to_digit(16)?;
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A quality as the API names it.
pub(crate) fn quality_name(quality: Quality) -> &'static str {
    match quality {
        Quality::Good => "good",
        Quality::Uncertain => "uncertain",
        Quality::Bad => "bad",
    }
}

fn property_json(p: &PropertyState) -> JsonValue {
    json!({
        "value": to_json(&p.value),
        "quality": quality_name(p.quality),
        "timestamp_ms": p.version.timestamp_ms,
        "received_ms": p.received_ms,
    })
}

/// A transport byte (as `OPEN` carries it) as the API names it: `wss`, `quic`, or `null` for none.
pub(crate) fn transport_name(byte: u8) -> Option<&'static str> {
    thingport_protocol::link::Transport::from_u8(byte).map(|t| t.name())
}

fn thing_summary(name: &str, t: &ThingState) -> JsonValue {
    json!({
        "thing": name,
        "online": t.binding.is_some(),
        "gateway": t.binding.as_ref().map(|b| b.gateway.to_string()),
        "transport": t.binding.as_ref().and_then(|b| transport_name(b.transport)),
        "properties": t.properties.len(),
        "created_ms": t.created_ms,
        "description": t.description,
        "tags": t.tags,
    })
}

/// Value types a definition may name, as `Value`s are.
const KINDS: [&str; 7] = ["bool", "int", "float", "string", "bytes", "list", "map"];

fn definition_json(d: &PropertyDefinition) -> JsonValue {
    json!({
        "type": d.kind,
        "unit": d.unit,
        "persisted": d.persisted,
        "logged": d.logged,
        "max_age_ms": d.max_age_ms,
        "max_values": d.max_count,
    })
}

/// A property definition in a request body; omitted fields take their defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionBody {
    #[serde(rename = "type")]
    kind: Option<String>,
    unit: Option<String>,
    #[serde(default = "yes")]
    persisted: bool,
    #[serde(default = "yes")]
    logged: bool,
    max_age_ms: Option<u64>,
    max_values: Option<u64>,
}

fn yes() -> bool {
    true
}

impl DefinitionBody {
    fn into_definition(self) -> Result<PropertyDefinition, Refusal> {
        if let Some(kind) = &self.kind
            && !KINDS.contains(&kind.as_str())
        {
            return Err(refusal(
                StatusCode::BAD_REQUEST,
                format!("type: one of {} (or null for any)", KINDS.join(", ")),
            ));
        }
        if self.unit.as_ref().is_some_and(|u| u.len() > Limits::DEFAULT.max_name) {
            return Err(refusal(StatusCode::BAD_REQUEST, "unit: at most 256 bytes"));
        }
        Ok(PropertyDefinition {
            kind: self.kind,
            unit: self.unit,
            persisted: self.persisted,
            logged: self.logged,
            max_age_ms: self.max_age_ms,
            max_count: self.max_values,
        })
    }
}

/// Orders an application's writes of one millisecond: this worker's clock in nanoseconds, never the same twice.
fn write_seq() -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(
            last,
            next,
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        ) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// A value written by an application, converted to the property's declared type (an integer to a float), or the
/// reason it does not fit.
fn typed(value: Value, definition: &PropertyDefinition) -> Result<Value, String> {
    let Some(kind) = definition.kind.as_deref() else { return Ok(value) };
    let fits = match (&value, kind) {
        (Value::Null, _) => true,
        (Value::Int(i), "float") => return Ok(Value::Float(*i as f64)),
        (Value::Bool(_), "bool") | (Value::Int(_), "int") | (Value::Float(_), "float") => true,
        (Value::String(_), "string") | (Value::Bytes(_), "bytes") => true,
        (Value::List(_), "list") | (Value::Map(_), "map") => true,
        _ => false,
    };
    if fits { Ok(value) } else { Err(format!("the property holds values of type {kind}")) }
}

fn valid_name(what: &str, name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.len() > Limits::DEFAULT.max_name {
        return Err(refusal(StatusCode::BAD_REQUEST, format!("a {what} name is 1 to 256 bytes")));
    }
    Ok(())
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

/// The query of `GET /v1/things`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    after: Option<String>,
    limit: Option<u32>,
    prefix: Option<String>,
    search: Option<String>,
    tag: Option<String>,
    online: Option<bool>,
}

/// One page of things in name order, filtered by the query and the key's prefixes.
async fn list_things(
    State(shared): State<Arc<Shared>>,
    Extension(access): Extension<Access>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Response {
    let params = part!(query(params));
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return error(StatusCode::BAD_REQUEST, format!("limit: 1 to {MAX_PAGE}"));
    }
    let query = ListQuery {
        after: params.after,
        limit,
        prefix: params.prefix,
        prefixes: access.prefixes.clone(),
        search: params.search.filter(|s| !s.is_empty()),
        tag: params.tag.filter(|t| !t.is_empty()),
        online: params.online,
    };
    let (things, matching, complete) = shared.cluster.list(query).await;
    let next = (things.len() == limit as usize).then(|| things.last().map(|t| t.name.clone()));
    let things: Vec<JsonValue> = things
        .iter()
        .map(|t| {
            json!({
                "thing": t.name,
                "online": t.gateway.is_some(),
                "gateway": t.gateway,
                "transport": transport_name(t.transport),
                "properties": t.properties,
                "created_ms": t.created_ms,
                "tags": t.tags,
                "last_seen_ms": t.last_seen_ms,
            })
        })
        .collect();
    Json(json!({ "things": things, "matching": matching, "next": next.flatten(), "complete": complete }))
        .into_response()
}

async fn get_thing(
    State(shared): State<Arc<Shared>>,
    thing: Result<Path<String>, PathRejection>,
) -> Response {
    let thing = part!(path(thing));
    match thing_json(&shared, &thing).await {
        Ok(t) => Json(t).into_response(),
        Err(response) => response,
    }
}

/// A thing as `GET /v1/things/{thing}` shows it: its state, definitions, recent events and place in the ring.
pub(crate) async fn thing_json(shared: &Shared, thing: &str) -> Result<JsonValue, Response> {
    let t = read_thing(shared, thing).await?;
    let properties: BTreeMap<String, JsonValue> =
        t.properties.iter().map(|(k, v)| (k.to_string(), property_json(v))).collect();
    let definitions: BTreeMap<String, JsonValue> = t
        .definitions
        .iter()
        .map(|(k, d)| (k.to_string(), definition_json(&d.definition)))
        .collect();
    let recent = HistoryQuery {
        thing: thing.to_string(),
        property: None,
        from_ms: 0,
        to_ms: u64::MAX,
        limit: RECENT_EVENTS,
        newest_first: true,
        after: None,
    };
    let (events, _) = shared.cluster.events(recent).await;
    let events: Vec<JsonValue> = events.iter().map(event_json).collect();
    let mut summary = thing_summary(thing, &t);
    summary["properties"] = json!(properties);
    summary["definitions"] = json!(definitions);
    summary["events"] = json!(events);
    summary["session_id"] = json!(t.binding.as_ref().map(|b| b.session_id));
    // where the thing lives in the ring: its partition and the partition's holders, primary first
    let partition = crate::ring::partition_of(thing.as_bytes());
    summary["partition"] = json!(partition);
    summary["owners"] = json!(
        shared.cluster.table().map(|t| t.owners(partition).map(String::from).collect::<Vec<_>>())
    );
    Ok(summary)
}

fn event_json(e: &thingport_protocol::peer::EventRecord) -> JsonValue {
    let payload = Value::decode(e.payload.clone(), &Limits::DEFAULT).unwrap_or_default();
    json!({
        "name": e.name,
        "payload": to_json(&payload),
        "timestamp_ms": e.timestamp_ms,
        "received_ms": e.received_ms,
        "seq": e.seq,
    })
}

/// A thing's description, tags and property definitions, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThingBody {
    description: Option<String>,
    tags: Option<Vec<String>>,
    #[serde(default)]
    properties: BTreeMap<String, DefinitionBody>,
}

/// Creates a thing (201) or updates the description, tags and definitions it names (200).
async fn put_thing(
    State(shared): State<Arc<Shared>>,
    thing: Result<Path<String>, PathRejection>,
    raw: axum::body::Bytes,
) -> Response {
    let thing = part!(path(thing));
    part!(valid_name("thing", &thing));
    let body: ThingBody = part!(optional_body(&raw)).unwrap_or_default();
    let limits = Limits::DEFAULT;
    if body.description.as_ref().is_some_and(|d| d.len() > limits.max_string) {
        return error(StatusCode::BAD_REQUEST, "description: at most 16384 bytes");
    }
    if let Some(tags) = &body.tags
        && (tags.len() > 64 || tags.iter().any(|t| t.is_empty() || t.len() > limits.max_name))
    {
        return error(StatusCode::BAD_REQUEST, "tags: at most 64, each 1 to 256 bytes");
    }
    let mut definitions = Vec::new();
    for (name, d) in body.properties {
        part!(valid_name("property", &name));
        definitions.push((name, part!(d.into_definition())));
    }
    let existing = match shared.cluster.read(&thing).await {
        Ok(t) => t,
        Err(e) => return unavailable(e),
    };
    let now = now_ms();
    let name = ByteString::from(thing.clone());
    let op = match (&existing, body.description, body.tags) {
        (_, None, None) => Op::Create { thing: name.clone(), now_ms: now },
        (existing, description, tags) => Op::Describe {
            thing: name.clone(),
            create: true,
            now_ms: now,
            description: description
                .or_else(|| existing.as_ref().map(|t| t.description.clone()))
                .unwrap_or_default(),
            tags: tags.or_else(|| existing.as_ref().map(|t| t.tags.clone())).unwrap_or_default(),
        },
    };
    if let Err(e) = shared.cluster.write(op).await {
        return unavailable(e);
    }
    for (property, definition) in definitions {
        let op =
            Op::Define { thing: name.clone(), property: property.into(), now_ms: now, definition };
        if let Err(e) = shared.cluster.write(op).await {
            return unavailable(e);
        }
    }
    let status = if existing.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    (status, Json(json!({ "thing": thing }))).into_response()
}

/// Removes a thing with its history from the ring and from every worker's store.
async fn delete_thing(
    State(shared): State<Arc<Shared>>,
    thing: Result<Path<String>, PathRejection>,
) -> Response {
    let thing = part!(path(thing));
    let op = Op::Remove { thing: thing.clone().into(), property: None, now_ms: now_ms() };
    if let Err(e) = shared.cluster.write(op).await {
        return match e {
            RingError::UnknownThing => error(StatusCode::NOT_FOUND, format!("no thing {thing}")),
            e => unavailable(e),
        };
    }
    shared.cluster.purge(&thing, None).await;
    StatusCode::NO_CONTENT.into_response()
}

/// Removes a property: its value, its definition and its value stream.
async fn delete_property(
    State(shared): State<Arc<Shared>>,
    names: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let (thing, name) = part!(path(names));
    let t = part!(read_thing(&shared, &thing).await);
    if !t.properties.contains_key(name.as_str()) && !t.definitions.contains_key(name.as_str()) {
        return error(StatusCode::NOT_FOUND, format!("thing {thing} has no property {name}"));
    }
    let op = Op::Remove {
        thing: thing.clone().into(),
        property: Some(name.clone().into()),
        now_ms: now_ms(),
    };
    if let Err(e) = shared.cluster.write(op).await {
        return unavailable(e);
    }
    shared.cluster.purge(&thing, Some(&name)).await;
    StatusCode::NO_CONTENT.into_response()
}

async fn get_definition(
    State(shared): State<Arc<Shared>>,
    names: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let (thing, name) = part!(path(names));
    let t = part!(read_thing(&shared, &thing).await);
    Json(definition_json(&t.definition(&name))).into_response()
}

async fn put_definition(
    State(shared): State<Arc<Shared>>,
    names: Result<Path<(String, String)>, PathRejection>,
    definition: Result<Json<DefinitionBody>, JsonRejection>,
) -> Response {
    let (thing, name) = part!(path(names));
    part!(valid_name("property", &name));
    let definition = part!(part!(body(definition)).into_definition());
    let op = Op::Define {
        thing: thing.clone().into(),
        property: name.into(),
        now_ms: now_ms(),
        definition: definition.clone(),
    };
    match shared.cluster.write(op).await {
        Ok(()) => Json(definition_json(&definition)).into_response(),
        Err(RingError::UnknownThing) => error(StatusCode::NOT_FOUND, format!("no thing {thing}")),
        Err(e) => unavailable(e),
    }
}

/// A page of history as the query string asks for it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    /// Oldest device timestamp: ms since the Unix epoch, or RFC 3339.
    from: Option<String>,
    /// Newest device timestamp, inclusive.
    to: Option<String>,
    limit: Option<u32>,
    /// `newest` (the default) or `oldest` first.
    order: Option<String>,
    /// The `next` of the previous page.
    after: Option<String>,
}

fn timestamp(what: &str, text: Option<&str>, default: u64) -> Result<u64, Refusal> {
    let Some(text) = text else { return Ok(default) };
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| {
            refusal(
                StatusCode::BAD_REQUEST,
                format!("{what}: ms since the Unix epoch or an RFC 3339 time"),
            )
        })
}

fn history_query(
    thing: String,
    property: Option<String>,
    params: HistoryParams,
) -> Result<HistoryQuery, Refusal> {
    let from_ms = timestamp("from", params.from.as_deref(), 0)?;
    let to_ms = timestamp("to", params.to.as_deref(), i64::MAX as u64)?;
    let limit = params.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(refusal(StatusCode::BAD_REQUEST, format!("limit: 1 to {MAX_PAGE}")));
    }
    let newest_first = match params.order.as_deref() {
        None | Some("newest") => true,
        Some("oldest") => false,
        Some(_) => return Err(refusal(StatusCode::BAD_REQUEST, "order: newest or oldest")),
    };
    let after = match params.after.as_deref() {
        None => None,
        Some(cursor) => {
            let parts: Vec<u64> = cursor.split('-').filter_map(|p| p.parse().ok()).collect();
            match parts[..] {
                [a, b, c] => Some(StreamPosition(a, b, c)),
                _ => return Err(refusal(StatusCode::BAD_REQUEST, "after: the next of a page")),
            }
        }
    };
    Ok(HistoryQuery { thing, property, from_ms, to_ms, limit, newest_first, after })
}

fn cursor(p: StreamPosition) -> String {
    format!("{}-{}-{}", p.0, p.1, p.2)
}

/// A quality byte of the peer format as the API names it (an unknown one as `bad`).
pub(crate) fn quality_byte_name(quality: u8) -> &'static str {
    quality_name(Quality::from_u8(quality).unwrap_or(Quality::Bad))
}

/// A page of a property's value stream.
async fn property_history(
    State(shared): State<Arc<Shared>>,
    names: Result<Path<(String, String)>, PathRejection>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Response {
    let (thing, name) = part!(path(names));
    let params = part!(query(params));
    let q = part!(history_query(thing.clone(), Some(name), params));
    part!(read_thing(&shared, &thing).await);
    let limit = q.limit as usize;
    let (values, complete) = shared.cluster.values(q).await;
    let next = (values.len() == limit)
        .then(|| {
            values.last().map(|v| cursor(StreamPosition(v.timestamp_ms, v.incarnation, v.seq)))
        })
        .flatten();
    let values: Vec<JsonValue> = values
        .iter()
        .map(|v| {
            let value = Value::decode(v.value.clone(), &Limits::DEFAULT).unwrap_or_default();
            json!({
                "value": to_json(&value),
                "quality": quality_byte_name(v.quality),
                "timestamp_ms": v.timestamp_ms,
                "received_ms": v.received_ms,
            })
        })
        .collect();
    Json(json!({ "values": values, "next": next, "complete": complete })).into_response()
}

/// A page of a thing's event stream, in device order.
async fn event_history(
    State(shared): State<Arc<Shared>>,
    thing: Result<Path<String>, PathRejection>,
    params: Result<Query<HistoryParams>, QueryRejection>,
) -> Response {
    let thing = part!(path(thing));
    let params = part!(query(params));
    let q = part!(history_query(thing.clone(), None, params));
    part!(read_thing(&shared, &thing).await);
    let limit = q.limit as usize;
    let (events, complete) = shared.cluster.events(q).await;
    let next = (events.len() == limit)
        .then(|| events.last().map(|e| cursor(StreamPosition(e.epoch_ms, e.incarnation, e.seq))))
        .flatten();
    let events: Vec<JsonValue> = events.iter().map(event_json).collect();
    Json(json!({ "events": events, "next": next, "complete": complete })).into_response()
}

async fn get_property(
    State(shared): State<Arc<Shared>>,
    names: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let (thing, name) = part!(path(names));
    match read_thing(&shared, &thing).await {
        Err(response) => response,
        Ok(t) => match t.properties.get(name.as_str()) {
            None => error(StatusCode::NOT_FOUND, format!("thing {thing} has no property {name}")),
            Some(p) => Json(property_json(p)).into_response(),
        },
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PropertyWrite {
    value: JsonValue,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteQuery {
    /// How long to wait for the device to acknowledge the write, ms.
    wait_ms: Option<u64>,
}

/// How long a property write waits for the device's acknowledgement unless `wait_ms` says otherwise.
const WRITE_WAIT: Duration = Duration::from_secs(2);

/// Stores a value written by an application and delivers it to the device if it is connected.
async fn put_property(
    State(shared): State<Arc<Shared>>,
    names: Result<Path<(String, String)>, PathRejection>,
    wait: Result<Query<WriteQuery>, QueryRejection>,
    write: Result<Json<PropertyWrite>, JsonRejection>,
) -> Response {
    let (thing, name) = part!(path(names));
    let wait = part!(query(wait)).wait_ms.map_or(WRITE_WAIT, Duration::from_millis);
    let wait = wait.min(Duration::from_secs(60));
    let write = part!(body(write));
    let value = match from_json(&write.value) {
        Ok(value) => value,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let now = now_ms();
    let prop = ByteString::from(name.clone());
    let frame = |value: Value| {
        Frame::Properties(Properties {
            seq: 0,
            updates: vec![PropertyUpdate {
                name: prop.clone(),
                timestamp_ms: now,
                quality: Quality::Good,
                value,
            }],
        })
    };
    if let Some(refused) = undeliverable(&frame(value.clone())) {
        return refused;
    }
    let t = part!(read_thing(&shared, &thing).await);
    let value = match typed(value, &t.definition(&name)) {
        Ok(value) => value,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let write = frame(value.clone());
    let mut encoded = bytes::BytesMut::new();
    value.encode(&mut encoded);
    let op = Op::Write {
        thing: thing.clone().into(),
        property: prop.clone(),
        value: encoded.freeze(),
        now_ms: now,
        seq: write_seq(),
    };
    if let Err(e) = shared.cluster.write(op).await {
        return unavailable(e);
    }
    let binding = match read_thing(&shared, &thing).await {
        Ok(t) => t.binding,
        Err(response) => return response,
    };
    let delivered = match binding {
        // not waiting: sent without a reference, so the gateway reports nothing back
        Some(b) if wait.is_zero() => {
            shared.links.downstream(&b.gateway, b.session_id, 0, &write);
            false
        }
        Some(b) => {
            // the reference asks the gateway to say whether the device acknowledged the write
            let (reference, outcome) = shared.cluster.calls.start();
            let _waiting = Waiting { calls: &shared.cluster.calls, id: reference };
            shared.links.downstream(&b.gateway, b.session_id, reference, &write)
                && matches!(
                    tokio::time::timeout(wait, outcome).await,
                    Ok(Ok(CallOutcome::Delivered))
                )
        }
        None => false,
    };
    Json(json!({ "stored": true, "delivered": delivered })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CallQuery {
    timeout_ms: Option<u64>,
}

/// Calls a service the device implements and waits for its answer.
async fn call_service(
    State(shared): State<Arc<Shared>>,
    names: Result<Path<(String, String)>, PathRejection>,
    call: Result<Query<CallQuery>, QueryRejection>,
    raw: axum::body::Bytes,
) -> Response {
    let (thing, service) = part!(path(names));
    let query = part!(self::query(call));
    let params: Option<JsonValue> = part!(optional_body(&raw));
    let params = match params.map(|b| from_json(&b)).transpose() {
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
        // a delivery report belongs to a property write, never to a call
        Ok(Ok(CallOutcome::Delivered)) | Ok(Err(_)) | Err(_) => {
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

/// What the request's key may do: its role and thing prefixes (the console shows only what the key allows).
async fn key_info(Extension(access): Extension<Access>) -> Json<JsonValue> {
    Json(json!({ "role": access.role.name(), "prefixes": access.prefixes }))
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
                "link_address": node.map(|n| n.link.to_string()),
                "in_table": table.as_ref().is_some_and(|t| t.members.contains(key)),
                "partitions_held": counts.as_ref().map(|c| c.partitions_held),
                "primaries": counts.as_ref().map(|c| c.primaries),
                "keys": counts.as_ref().map(|c| c.things),
                "gateways": counts.as_ref().map(|c| c.gateways.clone()),
            })
        })
        .collect();
    let (voters, learners, applied) = shared.coord.view();
    let singleton = match shared.coord.peek(crate::coord::singleton::NAME) {
        LockOutcome::Held(lease) => {
            json!({ "holder": lease.holder, "token": lease.token, "expires_in_ms": lease.expires_in_ms })
        }
        _ => json!({ "holder": null }),
    };
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
        "unheld_partitions": cluster.unheld(),
        "replication": shared.config.replicas,
        "gateways_linked": shared.links.gateways(),
        "consensus": {
            "leader": shared.coord.leader(),
            "voters": voters,
            "learners": learners,
            "applied": applied,
            "table_version": shared.coord.table_version(),
        },
        "singleton": singleton,
        "holds_singleton": shared.singleton.holds(),
    }))
}

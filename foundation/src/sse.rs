//! Streams of changes over HTTP as Server-Sent Events (`docs/API.md`, "Streams"): `GET /v1/things/{thing}/stream`
//! and `GET /v1/stream?things=a,b` or `?tag=t`. Each event's id is the stream's place; a client that reconnects
//! with it in `Last-Event-ID` resumes after the last event it received.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value as JsonValue, json};
use thingport_protocol::peer::{ChangeRecord, UpdateRecord};
use thingport_protocol::{Limits, Value};

use crate::Shared;
use crate::api::{
    Refusal, error, part, path, quality_byte_name, query, refusal, thing_json, transport_name,
};
use crate::json::to_json;
use crate::keys::Access;
use crate::streams::{Filter, Item, Next, Refused, Subscription};

/// A stream with nothing to send sends its place this often (an event with an id and no data), which also keeps
/// proxies from closing it.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// The place a client resumes from: its `Last-Event-ID`, or the error to answer.
fn resume(headers: &HeaderMap) -> Result<Option<BTreeMap<String, u64>>, Refusal> {
    let Some(value) = headers.get("last-event-id") else { return Ok(None) };
    let text = value.to_str().unwrap_or_default().trim();
    if text.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(text).map(Some).map_err(|_| {
        refusal(
            StatusCode::BAD_REQUEST,
            "Last-Event-ID: not an id this API sent (a JSON object of numbers)",
        )
    })
}

fn refused(e: Refused) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

/// `GET /v1/things/{thing}/stream`: the thing's changes; a new stream starts with a `snapshot` of the thing.
pub async fn thing_stream(
    State(shared): State<Arc<Shared>>,
    Extension(access): Extension<Access>,
    thing: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let thing = part!(path(thing));
    let resume = part!(resume(&headers));
    let fresh = resume.is_none();
    let subscription =
        match shared.streams.subscribe(Filter::Things(vec![thing.clone()]), access, resume).await {
            Ok(s) => s,
            Err(e) => return refused(e),
        };
    // read after subscribing, so that no change falls between the snapshot and the stream
    let snapshot = if fresh {
        match thing_json(&shared, &thing).await {
            Ok(t) => Some(t),
            Err(response) => return response,
        }
    } else {
        None
    };
    respond(shared, subscription, snapshot)
}

/// The query of `GET /v1/stream`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetQuery {
    /// Thing names, comma-separated.
    things: Option<String>,
    tag: Option<String>,
}

/// `GET /v1/stream`: the changes of the things listed, or of those with a tag, or of every thing the key reaches.
pub async fn set_stream(
    State(shared): State<Arc<Shared>>,
    Extension(access): Extension<Access>,
    params: Result<Query<SetQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let query = part!(query(params));
    let filter = match (query.things, query.tag) {
        (Some(_), Some(_)) => {
            return error(StatusCode::BAD_REQUEST, "name things or a tag, not both");
        }
        (Some(things), None) => {
            let names: Vec<String> =
                things.split(',').filter(|n| !n.is_empty()).map(String::from).collect();
            if names.is_empty() || names.len() > shared.config.streams.max_things {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("things: 1 to {} names", shared.config.streams.max_things),
                );
            }
            if let Some(name) = names.iter().find(|n| !access.reaches(n)) {
                return error(
                    StatusCode::FORBIDDEN,
                    format!("this key does not reach {name} (its prefixes)"),
                );
            }
            Filter::Things(names)
        }
        (None, Some(tag)) if !tag.is_empty() => Filter::Tag(tag),
        (None, Some(_)) => return error(StatusCode::BAD_REQUEST, "tag: must not be empty"),
        (None, None) => Filter::All,
    };
    let resume = part!(resume(&headers));
    match shared.streams.subscribe(filter, access, resume).await {
        Ok(subscription) => respond(shared, subscription, None),
        Err(e) => refused(e),
    }
}

fn respond(
    shared: Arc<Shared>,
    subscription: Subscription,
    snapshot: Option<JsonValue>,
) -> Response {
    let mut response = Sse::new(events(shared, subscription, snapshot)).into_response();
    // nginx and others buffer a response unless told not to
    response.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// The stream's place as an event id.
fn place(subscription: &Subscription) -> String {
    serde_json::to_string(subscription.positions()).unwrap_or_default()
}

enum Step {
    Snapshot(JsonValue),
    Live,
    Done,
}

fn events(
    shared: Arc<Shared>,
    subscription: Subscription,
    snapshot: Option<JsonValue>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let first = match snapshot {
        Some(s) => Step::Snapshot(s),
        None => Step::Live,
    };
    futures_util::stream::unfold((subscription, first), move |(mut subscription, step)| {
        let shared = shared.clone();
        async move {
            let (event, next) = match step {
                Step::Done => return None,
                Step::Snapshot(thing) => {
                    let event = Event::default().event("snapshot").id(place(&subscription));
                    (event.json_data(thing).unwrap_or_default(), Step::Live)
                }
                Step::Live => match subscription.next(HEARTBEAT).await {
                    Next::Item(item) => (item_event(&item).id(place(&subscription)), Step::Live),
                    Next::Idle => (Event::default().id(place(&subscription)), Step::Live),
                    Next::Cut => {
                        let message = format!(
                            "this stream fell behind by more than {} changes and was cut; reconnect with \
                             Last-Event-ID to resume",
                            shared.config.streams.client_buffer
                        );
                        let data = json!({ "error": message }).to_string();
                        (Event::default().event("cut").data(data), Step::Done)
                    }
                    Next::Stopped => return None,
                },
            };
            shared.streams.sent();
            Some((Ok(event), (subscription, next)))
        }
    })
}

fn value_json(bytes: &bytes::Bytes) -> JsonValue {
    to_json(&Value::decode(bytes.clone(), &Limits::DEFAULT).unwrap_or_default())
}

/// An item as an event: its type and its JSON data.
fn item_event(item: &Item) -> Event {
    let (kind, data) = match item {
        Item::Update { update, .. } => update_json(update),
        Item::Gap { member, reason } => (
            "gap",
            json!({
                "worker": crate::ring::membership::name_of(member),
                "reason": reason,
            }),
        ),
    };
    Event::default().event(kind).data(data.to_string())
}

fn update_json(update: &UpdateRecord) -> (&'static str, JsonValue) {
    let thing = &update.thing;
    match &update.change {
        ChangeRecord::Property { name, value, quality, timestamp_ms, received_ms } => (
            "property",
            json!({
                "thing": thing,
                "property": name,
                "value": value_json(value),
                "quality": quality_byte_name(*quality),
                "timestamp_ms": timestamp_ms,
                "received_ms": received_ms,
            }),
        ),
        ChangeRecord::Event { name, payload, timestamp_ms, received_ms } => (
            "event",
            json!({
                "thing": thing,
                "event": name,
                "payload": value_json(payload),
                "timestamp_ms": timestamp_ms,
                "received_ms": received_ms,
            }),
        ),
        ChangeRecord::Online { gateway, at_ms, transport } => (
            "online",
            json!({
                "thing": thing,
                "gateway": gateway,
                "transport": transport_name(*transport),
                "at_ms": at_ms,
            }),
        ),
        ChangeRecord::Offline { at_ms } => ("offline", json!({ "thing": thing, "at_ms": at_ms })),
        ChangeRecord::Removed { property, at_ms } => {
            ("removed", json!({ "thing": thing, "property": property, "at_ms": at_ms }))
        }
    }
}

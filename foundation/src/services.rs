//! Services the server implements for devices (docs/PROTOCOL.md §5.5.1): what a device needs after a reboot, before
//! an application tells it anything — the server's clock and its own thing's properties as the server holds them
//! (setpoints and desired state an application wrote while it was away).

use thingport_protocol::{
    ByteString, DecodeError, Frame, Limits, ServiceErrorCode, ServiceRequest, ServiceResponse,
    ServiceResult, Value, varint,
};

use crate::links::now_ms;
use crate::ring::{Cluster, RingError};

/// `thingport.time`: no parameters; the server's time in ms since the Unix epoch, as INT.
pub const TIME: &str = "thingport.time";
/// `thingport.properties`: NULL for every property, or a LIST of STRING names; a MAP of name to value, in name
/// order, of the properties the thing has (a name it does not have is left out).
pub const PROPERTIES: &str = "thingport.properties";

/// The answer to a device's call of a server service on behalf of `thing`.
pub async fn call(cluster: &Cluster, thing: &str, request: &ServiceRequest) -> ServiceResult {
    match &*request.service {
        TIME => match request.params {
            Value::Null => ServiceResult::Ok(Value::Int(now_ms() as i64)),
            _ => invalid(format!("{TIME} takes no parameters")),
        },
        PROPERTIES => {
            let names = match &request.params {
                Value::Null => None,
                Value::List(items) => {
                    let mut names = Vec::with_capacity(items.len());
                    for item in items {
                        match item {
                            Value::String(name) => names.push(name.clone()),
                            _ => {
                                return invalid(format!(
                                    "{PROPERTIES} takes NULL or a LIST of STRING"
                                ));
                            }
                        }
                    }
                    Some(names)
                }
                _ => return invalid(format!("{PROPERTIES} takes NULL or a LIST of STRING")),
            };
            match cluster.read(thing).await {
                Ok(state) => {
                    let properties = state.map(|s| s.properties).unwrap_or_default();
                    let wanted =
                        |name: &ByteString| names.as_ref().is_none_or(|n| n.contains(name));
                    let entries = properties
                        .into_iter()
                        .filter(|(name, _)| wanted(name))
                        .map(|(name, property)| (name, property.value))
                        .collect();
                    ServiceResult::Ok(Value::Map(entries))
                }
                Err(RingError::Unavailable) => ServiceResult::Err {
                    code: ServiceErrorCode::UNAVAILABLE,
                    message: "the thing's partition is unavailable; call again".into(),
                },
                Err(e) => ServiceResult::Err {
                    code: ServiceErrorCode::FAILED,
                    message: e.to_string().into(),
                },
            }
        }
        other => ServiceResult::Err {
            code: ServiceErrorCode::NOT_FOUND,
            message: format!("no server service {other}").into(),
        },
    }
}

/// Whether a device decodes `frame` under the protocol's default limits, with room for the sequence number its
/// gateway stamps on it.
pub fn device_can_decode(frame: &Frame) -> Result<(), DecodeError> {
    let limits =
        Limits { max_frame: Limits::DEFAULT.max_frame - varint::MAX_LEN, ..Limits::DEFAULT };
    Frame::decode(frame.to_bytes(), &limits).map(|_| ())
}

/// The answer to a call, as a frame a device can decode: a result too large for one frame is answered `FAILED`.
pub fn response(call_id: u64, result: ServiceResult) -> Frame {
    let answer = Frame::ServiceResponse(ServiceResponse { seq: 0, call_id, result });
    match device_can_decode(&answer) {
        Ok(()) => answer,
        Err(e) => Frame::ServiceResponse(ServiceResponse {
            seq: 0,
            call_id,
            result: ServiceResult::Err {
                code: ServiceErrorCode::FAILED,
                message: format!(
                    "the result does not fit in a frame ({e}); ask for fewer properties"
                )
                .into(),
            },
        }),
    }
}

fn invalid(message: String) -> ServiceResult {
    ServiceResult::Err { code: ServiceErrorCode::INVALID_PARAMS, message: message.into() }
}

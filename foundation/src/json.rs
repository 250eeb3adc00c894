//! Typed values as JSON for the REST API (`docs/API.md`, values): null, booleans, numbers, strings, arrays and
//! objects map one to one; bytes are `{"$bytes": "<base64>"}`; integers that fit `i64` stay integers; a map keeps its
//! entry order both ways (serde_json's `preserve_order`); NaN and infinities, which JSON cannot carry, are answered
//! as the strings `"NaN"`, `"inf"` and `"-inf"`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Number, Value as Json};
use thingport_protocol::{ByteString, Bytes, Value};

pub fn to_json(value: &Value) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(n) => Json::Number((*n).into()),
        Value::Float(x) => {
            Number::from_f64(*x).map_or_else(|| Json::String(x.to_string()), Json::Number)
        }
        Value::String(s) => Json::String(s.to_string()),
        Value::Bytes(b) => {
            let mut object = Map::new();
            object.insert("$bytes".into(), Json::String(STANDARD.encode(b)));
            Json::Object(object)
        }
        Value::List(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Map(entries) => {
            Json::Object(entries.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect())
        }
    }
}

/// A JSON document as a typed value; errors name what is wrong.
pub fn from_json(json: &Json) -> Result<Value, String> {
    Ok(match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Float(n.as_f64().ok_or("number out of range")?),
        },
        Json::String(s) => Value::String(ByteString::from(s.clone())),
        Json::Array(items) => Value::List(items.iter().map(from_json).collect::<Result<_, _>>()?),
        Json::Object(object) => {
            if let (1, Some(Json::String(b64))) = (object.len(), object.get("$bytes")) {
                let raw = STANDARD.decode(b64).map_err(|e| format!("$bytes is not base64: {e}"))?;
                return Ok(Value::Bytes(Bytes::from(raw)));
            }
            let mut entries = Vec::with_capacity(object.len());
            for (k, v) in object {
                if k.is_empty() {
                    return Err("object keys must not be empty".into());
                }
                entries.push((ByteString::from(k.clone()), from_json(v)?));
            }
            Value::Map(entries)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let json: Json = serde_json::json!({
            "a": [1, 2.5, "x", null, true],
            "raw": {"$bytes": "AQID"},
            "nested": {"k": -7}
        });
        let value = from_json(&json).unwrap();
        assert_eq!(to_json(&value), json);
        assert!(from_json(&serde_json::json!({"": 1})).is_err());
        assert!(from_json(&serde_json::json!({"$bytes": "%%"})).is_err());
    }

    #[test]
    fn a_map_keeps_its_order_both_ways() {
        let map = Value::Map(vec![("zeta".into(), Value::Int(1)), ("alpha".into(), Value::Int(2))]);
        assert_eq!(to_json(&map).to_string(), r#"{"zeta":1,"alpha":2}"#);
        let parsed: Json = serde_json::from_str(r#"{"zeta":1,"alpha":2}"#).unwrap();
        assert_eq!(from_json(&parsed).unwrap(), map);
    }

    #[test]
    fn numbers_and_what_json_cannot_carry() {
        let parsed: Json = serde_json::from_str("[25, 25.0, 2.5e1, 18446744073709551615]").unwrap();
        let Value::List(items) = from_json(&parsed).unwrap() else { panic!("not a list") };
        assert_eq!(items[0], Value::Int(25));
        assert_eq!(items[1..3], [Value::Float(25.0), Value::Float(25.0)]);
        assert!(matches!(items[3], Value::Float(_)), "beyond i64 is a float");
        let answered: Vec<Json> = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY]
            .into_iter()
            .map(|x| to_json(&Value::Float(x)))
            .collect();
        assert_eq!(answered, [Json::from("NaN"), Json::from("inf"), Json::from("-inf")]);
    }
}

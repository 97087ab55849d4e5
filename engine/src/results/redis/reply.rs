//! Reading the replies of the scripts (nested arrays of integers and
//! strings) and mapping client errors onto [`StoreError`].

use std::collections::HashMap;

use redis::{RedisError, Value};

use crate::results::StoreError;

/// A client or server error as a store error: anything that means "could
/// not talk to Redis" becomes [`StoreError::Unavailable`], so callers back
/// off and retry rather than fail the task.
pub(super) fn redis_error(e: RedisError) -> StoreError {
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
    {
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Other(e.to_string())
    }
}

fn unexpected(what: &str, value: &Value) -> StoreError {
    StoreError::Other(format!("unexpected reply to {what}: {value:?}"))
}

/// The elements of an array reply.
pub(super) fn array(what: &str, value: Value) -> Result<Vec<Value>, StoreError> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(unexpected(what, &other)),
    }
}

/// An integer reply.
pub(super) fn int(what: &str, value: &Value) -> Result<i64, StoreError> {
    match value {
        Value::Int(n) => Ok(*n),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| unexpected(what, value)),
        other => Err(unexpected(what, other)),
    }
}

/// A string reply.
pub(super) fn text(what: &str, value: Value) -> Result<String, StoreError> {
    match value {
        Value::BulkString(b) => String::from_utf8(b)
            .map_err(|e| StoreError::Other(format!("reply to {what} is not UTF-8: {e}"))),
        Value::SimpleString(s) => Ok(s),
        Value::VerbatimString { text, .. } => Ok(text),
        other => Err(unexpected(what, &other)),
    }
}

/// A flat `field, value, ...` array (an `HGETALL` inside a script) or a
/// RESP3 map, as a map.
pub(super) fn pairs(what: &str, value: Value) -> Result<HashMap<String, String>, StoreError> {
    let mut map = HashMap::new();
    match value {
        Value::Map(entries) => {
            for (k, v) in entries {
                map.insert(text(what, k)?, text(what, v)?);
            }
        }
        other => {
            let mut items = array(what, other)?.into_iter();
            while let Some(k) = items.next() {
                let v = items
                    .next()
                    .ok_or_else(|| StoreError::Other(format!("odd-length reply to {what}")))?;
                map.insert(text(what, k)?, text(what, v)?);
            }
        }
    }
    Ok(map)
}

/// Whether a script's `{code, ...}` reply carries `code`.
pub(super) fn is_code(value: &Value, code: i64) -> bool {
    matches!(value, Value::Array(items) if matches!(items.first(), Some(Value::Int(c)) if *c == code))
}

/// Splits a script's `{code, ...}` reply into the code and the rest.
pub(super) fn coded(
    what: &str,
    value: Value,
) -> Result<(i64, std::vec::IntoIter<Value>), StoreError> {
    let mut items = array(what, value)?.into_iter();
    let code = items
        .next()
        .ok_or_else(|| StoreError::Other(format!("empty reply to {what}")))?;
    Ok((int(what, &code)?, items))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn flat_pairs_become_a_map() {
        let v = Value::Array(vec![bulk("a"), bulk("1"), bulk("b"), bulk("2")]);
        let m = pairs("t", v).unwrap();
        assert_eq!(m.get("a").map(String::as_str), Some("1"));
        assert_eq!(m.len(), 2);
        assert!(pairs("t", Value::Array(vec![bulk("a")])).is_err());
    }

    #[test]
    fn coded_replies_split() {
        let (code, mut rest) =
            coded("t", Value::Array(vec![Value::Int(0), bulk("failed")])).unwrap();
        assert_eq!(code, 0);
        assert_eq!(text("t", rest.next().unwrap()).unwrap(), "failed");
        assert!(coded("t", Value::Okay).is_err());
    }
}

//! Request extractors that fail with [`ApiError`] instead of axum's plain-text
//! rejections: a JSON body with a size limit and field-precise errors, and
//! the parsing of path and query parameters.

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, header};
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// A JSON object request body of type `T`.
///
/// Checks, in order: the content type (415), the size against
/// `server.max_body_bytes` (413), the syntax (400 with line and column), and
/// the shape (422 naming the field by its JSON path, e.g.
/// `tasks[3].priority`, or the unknown field).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T> FromRequest<AppState> for ApiJson<T>
where
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = state.settings().server.max_body_bytes;
        // A declared length over the limit is refused before reading a byte.
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(body_too_large(limit));
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| {
                if is_length_limit(&e) {
                    body_too_large(limit)
                } else {
                    // The client went away or sent a broken chunked body.
                    ApiError::InvalidJson {
                        line: 0,
                        column: 0,
                        message: "the request body could not be read".into(),
                    }
                }
            })?;
        parse_json::<Object<T>>(&bytes).map(|Object(value)| ApiJson(value))
    }
}

/// A `T` that must be written as a JSON object.
///
/// serde's derived structs also accept a JSON array of the field values in
/// order (`["hello", 5]`), which the public contract does not allow; this
/// wrapper only lets a map through to `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapOnly<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for MapOnly<T> {
            type Value = T;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(MapOnly(PhantomData))
            .map(Object)
    }
}

fn body_too_large(limit: usize) -> ApiError {
    ApiError::PayloadTooLarge {
        field: None,
        message: format!("the request body is larger than {limit} bytes"),
    }
}

fn is_length_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// `application/json`, with or without parameters, or any `+json` type.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype.len() > 5
                && subtype.is_char_boundary(subtype.len() - 5)
                && subtype[subtype.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// Parses a JSON document into `T`, mapping failures to the API's errors.
///
/// The fast path is plain `serde_json`; only a document that fails is parsed
/// a second time with path tracking, so valid requests pay nothing for the
/// precise error messages.
///
/// # Errors
/// [`ApiError::InvalidJson`], [`ApiError::InvalidField`] or
/// [`ApiError::UnknownField`].
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match serde_json::from_slice(bytes) {
        Ok(value) => Ok(value),
        Err(_) => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            match serde_path_to_error::deserialize::<_, T>(&mut de) {
                // Unreachable in practice: the same input just failed.
                Ok(value) => Ok(value),
                Err(err) => Err(json_error(&err)),
            }
        }
    }
}

fn json_error(err: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let inner = err.inner();
    let message = strip_position(&inner.to_string());
    match inner.classify() {
        serde_json::error::Category::Syntax
        | serde_json::error::Category::Eof
        | serde_json::error::Category::Io => ApiError::InvalidJson {
            line: inner.line(),
            column: inner.column(),
            message,
        },
        serde_json::error::Category::Data => {
            let path = err.path().to_string();
            let parent = if path == "." { None } else { Some(path) };
            if let Some(name) = quoted_after(&message, "unknown field `") {
                // The path already ends at the unknown key.
                ApiError::UnknownField {
                    field: parent.unwrap_or_else(|| name.to_owned()),
                }
            } else if let Some(name) = quoted_after(&message, "missing field `") {
                ApiError::InvalidField {
                    field: Some(join(parent.as_deref(), name)),
                    message: "this field is required".into(),
                }
            } else {
                ApiError::InvalidField {
                    field: parent,
                    message,
                }
            }
        }
    }
}

/// serde_json appends " at line L column C" to its messages; the API reports
/// the position separately (or, for shape errors, names the field instead).
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The name between `prefix` and the next backtick.
fn quoted_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split('`').next()
}

fn join(parent: Option<&str>, name: &str) -> String {
    match parent {
        Some(p) => format!("{p}.{name}"),
        None => name.to_owned(),
    }
}

/// Parses a task id from a path segment.
///
/// # Errors
/// A 400 naming the parameter when it is not a UUID.
pub fn task_id(field: &str, raw: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(raw).map_err(|_| ApiError::parameter(field, "must be a task id (a UUID)"))
}

/// Parses a query or path number.
///
/// # Errors
/// A 400 naming the parameter when it is not a number in `min..=max`.
pub fn number_in(field: &str, raw: &str, min: u64, max: u64) -> Result<u64, ApiError> {
    raw.parse::<u64>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| ApiError::parameter(field, format!("must be a number from {min} to {max}")))
}

#[cfg(test)]
mod tests {
    use claudecluster_engine::task::NewTask;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch {
        #[allow(dead_code)]
        tasks: Vec<Object<NewTask>>,
    }

    fn field_of(err: &ApiError) -> Option<&str> {
        err.field()
    }

    #[test]
    fn syntax_errors_report_line_and_column() {
        let err = parse_json::<NewTask>(b"{\n  \"prompt\": \"a\",,\n}").unwrap_err();
        match err {
            ApiError::InvalidJson { line, column, .. } => assert_eq!((line, column), (2, 17)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_json::<NewTask>(b"").unwrap_err(),
            ApiError::InvalidJson { .. }
        ));
    }

    #[test]
    fn wrong_types_name_the_path() {
        let err =
            parse_json::<Batch>(br#"{"tasks":[{"prompt":"a"},{"prompt":"b","priority":"high"}]}"#)
                .unwrap_err();
        assert_eq!(err.code(), "invalid_field");
        assert_eq!(field_of(&err), Some("tasks[1].priority"));
        assert!(!err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn unknown_and_missing_fields_are_named() {
        let err = parse_json::<Batch>(br#"{"tasks":[{"prompt":"a","prio":3}]}"#).unwrap_err();
        assert_eq!(err.code(), "unknown_field");
        assert_eq!(field_of(&err), Some("tasks[0].prio"));
        let err = parse_json::<NewTask>(br#"{"prio":3}"#).unwrap_err();
        assert_eq!(field_of(&err), Some("prio"));
        let err = parse_json::<NewTask>(br#"{"priority":3}"#).unwrap_err();
        assert_eq!(err.code(), "invalid_field");
        assert_eq!(field_of(&err), Some("prompt"));
    }

    #[test]
    fn out_of_range_integers_are_field_errors() {
        let err = parse_json::<NewTask>(br#"{"prompt":"a","priority":300}"#).unwrap_err();
        assert_eq!(err.code(), "invalid_field");
        assert_eq!(field_of(&err), Some("priority"));
        let err = parse_json::<Object<NewTask>>(br#"["a"]"#).unwrap_err();
        assert_eq!(err.code(), "invalid_field");
        assert_eq!(field_of(&err), None);
        let err = parse_json::<Batch>(br#"{"tasks":[{"prompt":"a"},["b"]]}"#).unwrap_err();
        assert_eq!(field_of(&err), Some("tasks[1]"));
    }

    #[test]
    fn json_content_types() {
        let check = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            is_json(&h)
        };
        assert!(check("application/json"));
        assert!(check("Application/JSON; charset=utf-8"));
        assert!(check("application/merge-patch+json"));
        assert!(!check("text/plain"));
        assert!(!check("application/x-www-form-urlencoded"));
        assert!(!check("application/jsonx"));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn parameters() {
        assert!(task_id("id", "nope").is_err());
        assert!(task_id("id", "0190b3a6-2f6e-7cc3-a2c1-4a3f6e0c9d11").is_ok());
        assert_eq!(number_in("limit", "50", 1, 500).unwrap(), 50);
        assert_eq!(
            number_in("limit", "0", 1, 500).unwrap_err().field(),
            Some("limit")
        );
        assert!(number_in("limit", "-1", 1, 500).is_err());
    }
}

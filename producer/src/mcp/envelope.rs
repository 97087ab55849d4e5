//! Checks the JSON-RPC envelope of a POST to `/mcp` before the MCP
//! transport sees it, so a malformed message gets a JSON-RPC error that
//! says what is wrong.
//!
//! Left alone, the transport answers any body it cannot decode with
//! `415 Unsupported Media Type` and a line of plain text, and a `tools/call`
//! whose `arguments` is not an object as "method not found". Here:
//!
//! - a body that is not JSON: HTTP 400, `-32700` parse error, with the line
//!   and column;
//! - JSON that is not one JSON-RPC 2.0 message (a batch, a wrong `jsonrpc`,
//!   no `method`): HTTP 400, `-32600` invalid request;
//! - a `tools/call` whose `params`, `params.name` or `params.arguments`
//!   has the wrong type: HTTP 400, `-32602` invalid params naming the member;
//! - a body over `server.max_body_bytes`: HTTP 413, `-32600`.
//!
//! Everything else passes through unchanged.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// JSON-RPC: the body is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC: not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC: the method's parameters are wrong.
pub const INVALID_PARAMS: i64 = -32602;

/// A rejected envelope: the HTTP status and the JSON-RPC error.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// The request id, when the message had a usable one.
    pub id: Value,
    /// JSON-RPC error code.
    pub code: i64,
    /// What is wrong.
    pub message: String,
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let body = json!({
            "jsonrpc": "2.0",
            "id": self.id,
            "error": { "code": self.code, "message": self.message },
        });
        (self.status, axum::Json(body)).into_response()
    }
}

/// The middleware: buffers a JSON POST body up to `limit` bytes, checks
/// it with [`check`], and hands it on.
pub async fn guard(State(limit): State<usize>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST || !is_json(&request) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(_) => {
            // Over the limit, or the client went away mid-body.
            return Rejection {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                id: Value::Null,
                code: INVALID_REQUEST,
                message: format!(
                    "the request body is larger than {limit} bytes, or could not be read"
                ),
            }
            .into_response();
        }
    };
    if let Err(rejection) = check(&bytes) {
        return rejection.into_response();
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Checks that `bytes` is one JSON-RPC 2.0 message MCP can carry.
///
/// # Errors
/// A [`Rejection`] saying what is wrong.
pub fn check(bytes: &[u8]) -> Result<(), Rejection> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| Rejection {
        status: StatusCode::BAD_REQUEST,
        id: Value::Null,
        code: PARSE_ERROR,
        message: format!(
            "parse error: the body is not JSON ({}) at line {} column {}",
            e.to_string().split(" at line ").next().unwrap_or_default(),
            e.line(),
            e.column()
        ),
    })?;
    let Value::Object(message) = value else {
        let what = if value.is_array() {
            "a JSON-RPC batch; MCP carries one message per request"
        } else {
            "not a JSON-RPC message object"
        };
        return Err(invalid_request(
            Value::Null,
            format!("invalid request: {what}"),
        ));
    };
    // An id that is not a string or a number cannot be echoed back.
    let id = match message.get("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        _ => Value::Null,
    };
    if message.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(invalid_request(
            id,
            "invalid request: `jsonrpc` must be \"2.0\"".into(),
        ));
    }
    if let Some(bad) = message
        .get("id")
        .filter(|v| !(v.is_string() || v.is_number()))
    {
        return Err(invalid_request(
            Value::Null,
            format!("invalid request: `id` must be a string or a number, not {bad}"),
        ));
    }
    let is_response = message.contains_key("result") || message.contains_key("error");
    let method = match message.get("method") {
        Some(Value::String(method)) => method.as_str(),
        None if is_response => return Ok(()),
        None => {
            return Err(invalid_request(
                id,
                "invalid request: `method` is missing".into(),
            ));
        }
        Some(other) => {
            return Err(invalid_request(
                id,
                format!("invalid request: `method` must be a string, not {other}"),
            ));
        }
    };
    match message.get("params") {
        None | Some(Value::Object(_)) => {}
        Some(other) => {
            return Err(invalid_params(
                id,
                format!("`params` must be an object, not {}", kind(other)),
            ));
        }
    }
    if method == "tools/call" {
        let params = message.get("params");
        match params.and_then(|p| p.get("name")) {
            Some(Value::String(_)) => {}
            None => return Err(invalid_params(id, "`params.name` is missing".into())),
            Some(other) => {
                return Err(invalid_params(
                    id,
                    format!("`params.name` must be a string, not {}", kind(other)),
                ));
            }
        }
        match params.and_then(|p| p.get("arguments")) {
            None | Some(Value::Object(_) | Value::Null) => {}
            Some(other) => {
                return Err(invalid_params(
                    id,
                    format!("`params.arguments` must be an object, not {}", kind(other)),
                ));
            }
        }
    }
    Ok(())
}

fn invalid_request(id: Value, message: String) -> Rejection {
    Rejection {
        status: StatusCode::BAD_REQUEST,
        id,
        code: INVALID_REQUEST,
        message,
    }
}

fn invalid_params(id: Value, message: String) -> Rejection {
    Rejection {
        status: StatusCode::BAD_REQUEST,
        id,
        code: INVALID_PARAMS,
        message: format!("invalid params: {message}"),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn is_json(request: &Request) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(body: &str) -> Rejection {
        check(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn well_formed_messages_pass() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x","arguments":{}}}"#,
            r#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":3,"result":{}}"#,
        ] {
            assert_eq!(check(body.as_bytes()), Ok(()), "{body}");
        }
    }

    #[test]
    fn broken_json_is_a_parse_error_with_its_position() {
        let r = rejected("{\"jsonrpc\":\"2.0\",\n\"id\":1,,}");
        assert_eq!((r.status, r.code), (StatusCode::BAD_REQUEST, PARSE_ERROR));
        assert!(r.message.contains("line 2 column 8"), "{}", r.message);
        assert_eq!(r.id, Value::Null);
    }

    #[test]
    fn envelopes_that_are_not_one_request_are_invalid() {
        for (body, says) in [
            (r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#, "batch"),
            (r#""hello""#, "not a JSON-RPC message"),
            (r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#, "jsonrpc"),
            (r#"{"jsonrpc":"2.0","id":1}"#, "method"),
            (r#"{"jsonrpc":"2.0","id":1,"method":7}"#, "method"),
            (r#"{"jsonrpc":"2.0","id":[1],"method":"ping"}"#, "id"),
        ] {
            let r = rejected(body);
            assert_eq!(r.code, INVALID_REQUEST, "{body}");
            assert!(r.message.contains(says), "{body}: {}", r.message);
        }
        assert_eq!(
            rejected(r#"{"jsonrpc":"1.0","id":9,"method":"ping"}"#).id,
            9
        );
    }

    #[test]
    fn tool_call_params_name_the_member() {
        for (body, member) in [
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":[1]}"#,
                "`params`",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#,
                "`params.name`",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":1}}"#,
                "`params.name`",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":"abc"}}"#,
                "`params.arguments` must be an object, not a string",
            ),
        ] {
            let r = rejected(body);
            assert_eq!(
                (r.code, r.id.clone()),
                (INVALID_PARAMS, Value::from(1)),
                "{body}"
            );
            assert!(r.message.contains(member), "{body}: {}", r.message);
        }
    }
}

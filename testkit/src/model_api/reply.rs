//! The stand-in's replies in the Messages API's shapes: a message as plain
//! JSON or as the server-sent event sequence, and errors.

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// One answer's content block.
pub(super) enum Content {
    Text(String),
    Tool {
        id: String,
        name: &'static str,
        input: Value,
    },
}

impl Content {
    fn stop_reason(&self) -> &'static str {
        match self {
            Content::Text(_) => "end_turn",
            Content::Tool { .. } => "tool_use",
        }
    }
}

#[derive(Clone, Copy)]
pub(super) struct Usage {
    pub(super) input: u64,
    pub(super) output: u64,
}

/// A rough token count: about four characters a token, at least one.
pub(super) fn tokens(text: &str) -> u64 {
    (text.chars().count() as u64 / 4).max(1)
}

fn message_id() -> String {
    format!("msg_standin{}", uuid::Uuid::new_v4().simple())
}

pub(super) fn plain(model: &str, content: &Content, usage: Usage) -> Response {
    let block = match content {
        Content::Text(text) => json!({ "type": "text", "text": text }),
        Content::Tool { id, name, input } => {
            json!({ "type": "tool_use", "id": id, "name": name, "input": input })
        }
    };
    let body = json!({
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [block],
        "stop_reason": content.stop_reason(),
        "stop_sequence": null,
        "usage": { "input_tokens": usage.input, "output_tokens": usage.output },
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

pub(super) fn streamed(model: &str, content: &Content, usage: Usage) -> Response {
    let (start_block, delta) = match content {
        Content::Text(text) => (
            json!({ "type": "text", "text": "" }),
            json!({ "type": "text_delta", "text": text }),
        ),
        Content::Tool { id, name, input } => (
            json!({ "type": "tool_use", "id": id, "name": name, "input": {} }),
            json!({ "type": "input_json_delta", "partial_json": input.to_string() }),
        ),
    };
    let events = [
        (
            "message_start",
            json!({ "type": "message_start", "message": {
                "id": message_id(), "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": usage.input, "output_tokens": 1 },
            }}),
        ),
        (
            "content_block_start",
            json!({ "type": "content_block_start", "index": 0, "content_block": start_block }),
        ),
        (
            "content_block_delta",
            json!({ "type": "content_block_delta", "index": 0, "delta": delta }),
        ),
        (
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": 0 }),
        ),
        (
            "message_delta",
            json!({ "type": "message_delta",
                "delta": { "stop_reason": content.stop_reason(), "stop_sequence": null },
                "usage": { "output_tokens": usage.output } }),
        ),
        ("message_stop", json!({ "type": "message_stop" })),
    ];
    let body: String = events
        .iter()
        .map(|(event, data)| format!("event: {event}\ndata: {data}\n\n"))
        .collect();
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from(body),
    )
        .into_response()
}

/// An error in the Anthropic API's shape, marked not worth retrying for
/// clients that honour `x-should-retry`.
pub(super) fn api_error(status: u16, message: &str) -> Response {
    let kind = match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    let body = json!({ "type": "error", "error": { "type": kind, "message": message } });
    (status, [("x-should-retry", "false")], axum::Json(body)).into_response()
}

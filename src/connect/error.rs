//! A gRPC status in Connect's error form: `{"code": "invalid_argument",
//! "message": "...", "details": [{"type", "value", "debug"}]}`, with the
//! HTTP status Connect gives each code. The details are the same
//! `google.rpc` messages a gRPC caller gets; `debug` shows them as JSON for
//! people reading with curl.

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use prost::Message;
use serde_json::{Map, Value, json};
use tonic::{Code, Status};

use super::schema::Schema;

/// Connect's name of a code.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status of a unary error, from the Connect protocol's table.
pub(crate) fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::DeadlineExceeded => 504,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::PermissionDenied => 403,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::Unauthenticated => 401,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    }
}

/// The error's JSON object.
pub(crate) fn error_json(status: &Status, schema: &Schema) -> Value {
    let mut error = Map::new();
    error.insert("code".into(), json!(code_name(status.code())));
    if !status.message().is_empty() {
        error.insert("message".into(), json!(status.message()));
    }
    let details = details(status, schema);
    if !details.is_empty() {
        error.insert("details".into(), Value::Array(details));
    }
    Value::Object(error)
}

fn details(status: &Status, schema: &Schema) -> Vec<Value> {
    if status.details().is_empty() {
        return Vec::new();
    }
    let Ok(rpc) = tonic_types::pb::Status::decode(status.details()) else {
        return Vec::new();
    };
    rpc.details
        .iter()
        .map(|any| {
            let type_name = any.type_url.rsplit('/').next().unwrap_or(&any.type_url);
            let mut detail = Map::new();
            detail.insert("type".into(), json!(type_name));
            detail.insert("value".into(), json!(STANDARD_NO_PAD.encode(&any.value)));
            if let Some(debug) = schema.detail_json(type_name, &any.value) {
                detail.insert("debug".into(), debug);
            }
            Value::Object(detail)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;

    #[test]
    fn details_keep_their_type_and_bytes_and_show_as_json() {
        let schema = Schema::load().unwrap();
        let status = Status::with_error_details(
            Code::InvalidArgument,
            "invalid request",
            ErrorDetails::with_bad_request_violation("amount_fen", "must be positive"),
        );
        let json = error_json(&status, &schema);
        assert_eq!(json["code"], "invalid_argument");
        assert_eq!(json["message"], "invalid request");
        let detail = &json["details"][0];
        assert_eq!(detail["type"], "google.rpc.BadRequest");
        assert_eq!(detail["debug"]["fieldViolations"][0]["field"], "amount_fen");
        let bytes = STANDARD_NO_PAD
            .decode(detail["value"].as_str().unwrap())
            .unwrap();
        let decoded = tonic_types::pb::BadRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.field_violations[0].description, "must be positive");
    }

    #[test]
    fn every_code_has_connects_name_and_status() {
        assert_eq!(code_name(Code::Cancelled), "canceled");
        assert_eq!(http_status(Code::Unauthenticated), 401);
        assert_eq!(http_status(Code::FailedPrecondition), 400);
        assert_eq!(http_status(Code::ResourceExhausted), 429);
    }
}

//! The one error type of the HTTP edge: every failure becomes a JSON `{"error": ...}` with a fitting status,
//! and nothing internal (SQL text, paths, driver messages) reaches the client.

use axum::extract::rejection::{FormRejection, JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed, but the fields are not what was expected (missing, wrong type).
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body too large (limit {} bytes)", crate::http::BODY_LIMIT)]
    TooLarge,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("database unavailable, try again shortly")]
    Unavailable,
    /// The disk is nearly full: writes wait until space is freed; reads go on.
    #[error("the server's disk is nearly full: writes are refused until space is freed")]
    DiskFull,
    /// Logged in full, answered as a bare "internal error".
    #[error("internal error")]
    Internal(#[source] sqlx::Error),
    /// A page that could not be made (logged where it happened), answered as a bare "internal error".
    #[error("internal error")]
    Page,
}

/// Seconds a client is asked to wait before retrying a 503.
pub const RETRY_AFTER: u64 = 2;

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::DiskFull => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) | ApiError::Page => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(err) = &self {
            tracing::error!(error = %err, "request failed");
        }
        let mut response = (self.status(), Json(serde_json::json!({ "error": self.to_string() }))).into_response();
        if matches!(self, ApiError::Unavailable) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_AFTER),
            );
        }
        response
    }
}

pub use crate::db::summary as db_summary;

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        if crate::db::is_transient(&err) {
            tracing::warn!(error = %db_summary(&err), "database unavailable or busy; answered 503");
            ApiError::Unavailable
        } else {
            ApiError::Internal(err)
        }
    }
}

/// Maps an extractor's rejection to our JSON error, keeping its status (400, 413, 415, 422).
fn rejection(status: StatusCode, text: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(text),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::Unprocessable(text),
        _ => ApiError::BadRequest(text),
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::MissingJsonContentType(_) => {
                ApiError::UnsupportedMediaType("expected Content-Type: application/json".to_string())
            }
            other => rejection(other.status(), other.body_text()),
        }
    }
}

impl From<FormRejection> for ApiError {
    fn from(r: FormRejection) -> Self {
        match r {
            FormRejection::InvalidFormContentType(_) => {
                ApiError::UnsupportedMediaType("expected Content-Type: application/x-www-form-urlencoded".to_string())
            }
            other => rejection(other.status(), other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

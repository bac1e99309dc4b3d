//! The HTTP layer's error type and its one mapping to status and contract code.

use std::time::Duration;

use hyper::header::{HeaderValue, CONNECTION, RETRY_AFTER};
use hyper::{Response, StatusCode};

use super::admission::RETRY_AFTER_SECS;
use super::{json, Body};
use crate::auth::AuthError;
use crate::gateway::TooManyConnections;
use crate::protocol::http::ErrorResponse;
use crate::protocol::server::ErrorBody;
use crate::protocol::ErrorCode;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(#[from] AuthError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Invalid(String),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    NotFound(String),
    #[error("not a member of this conversation")]
    Forbidden,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the database is unavailable; retry shortly")]
    Unavailable,
    #[error("{0}")]
    TooManyConnections(#[from] TooManyConnections),
    #[error("the request was not completed within {} ms", .0.as_millis())]
    TimedOut(Duration),
    #[error("the server is at its connection limit; retry after {RETRY_AFTER_SECS} s")]
    AtCapacity,
    #[error("requests from origin {0:?} are not allowed")]
    OriginNotAllowed(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::NotFound("conversation not found".into()),
            StoreError::Forbidden => ApiError::Forbidden,
            other => {
                tracing::warn!(error = %other, "store error in the HTTP API");
                ApiError::Unavailable
            }
        }
    }
}

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::Invalid),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed)
            }
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            ApiError::TooManyConnections(_) => {
                (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited)
            }
            ApiError::TimedOut(_) => (StatusCode::REQUEST_TIMEOUT, ErrorCode::Unavailable),
            ApiError::AtCapacity => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            ApiError::OriginNotAllowed(_) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
        }
    }

    /// The JSON body of this error, as every error response carries it.
    pub(super) fn body(&self) -> Vec<u8> {
        let message = self.to_string();
        let body = ErrorResponse {
            error: ErrorBody {
                code: self.status_and_code().1,
                message: &message,
            },
        };
        serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec())
    }

    pub fn into_response(self) -> Response<Body> {
        let (status, code) = self.status_and_code();
        let message = self.to_string();
        let mut res = json(
            status,
            &ErrorResponse {
                error: ErrorBody {
                    code,
                    message: &message,
                },
            },
        );
        match self {
            ApiError::AtCapacity => {
                res.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            // The body may be half read: the connection cannot be reused.
            ApiError::TimedOut(_) => {
                res.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        res
    }
}

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
    #[error("the operator token is not configured: set POSTLINE_OPERATOR_TOKEN (or run --dev)")]
    OperatorTokenNotConfigured,
    #[error("this needs the operator token: Authorization: Bearer <POSTLINE_OPERATOR_TOKEN>")]
    NotOperator,
    #[error("the service API is not configured: set POSTLINE_SERVICE_KEYS")]
    ServiceNotConfigured,
    #[error("this needs a service key: Authorization: Bearer <a secret of POSTLINE_SERVICE_KEYS>")]
    NotService,
    #[error("{what}: retry after {} ms", retry_after.as_millis())]
    RateLimited {
        what: &'static str,
        retry_after: Duration,
    },
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
            ApiError::OperatorTokenNotConfigured => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            ApiError::NotOperator => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            ApiError::ServiceNotConfigured => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            ApiError::NotService => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited),
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
            ApiError::NotOperator => {
                res.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"postline-operator\""),
                );
            }
            ApiError::RateLimited { retry_after, .. } => {
                res.headers_mut().insert(
                    RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(retry_after)),
                );
            }
            _ => {}
        }
        res
    }
}

/// Retry-After in whole seconds (RFC 9110 has no finer unit), rounded up so
/// a client that waits that long is let through, and at least 1.
fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_is_a_429_with_retry_after_in_whole_seconds() {
        let e = ApiError::RateLimited {
            what: "too many requests from you",
            retry_after: Duration::from_millis(1200),
        };
        let r = e.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[hyper::header::RETRY_AFTER], "2");
        assert_eq!(retry_after_secs(Duration::from_millis(20)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}

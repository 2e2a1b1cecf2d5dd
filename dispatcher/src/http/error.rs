//! The API's one error type: every refusal on a request's way (authentication, limits, a bad
//! field, an answer of the core) becomes an [`ApiError`], and leaves as an HTTP
//! status with a JSON body naming the condition and, where there is one, the field.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use spine_protocol::{Condition, SpineError};

use super::openapi::ErrorBody;

/// An API error: HTTP status and a JSON body ([`ErrorBody`]) naming the condition and the field.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) condition: &'static str,
    pub(super) message: String,
    pub(super) field: Option<String>,
    /// Seconds until a retry may succeed (429, 503): `Retry-After`.
    pub(super) retry_after: Option<u64>,
    /// For `standby`: the leader's base URL.
    pub(super) leader: Option<String>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        condition: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            condition,
            message: message.into(),
            field: None,
            retry_after: None,
            leader: None,
        }
    }
    pub(super) fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.to_owned()),
            ..Self::new(StatusCode::BAD_REQUEST, "bad-request", message)
        }
    }
    /// The job store cannot be reached: nothing new can be stored until it is back.
    pub(super) fn store_down() -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the job store (PostgreSQL) cannot be reached: nothing can be stored until it is back; retry",
            )
        }
    }
    /// A standby among several dispatchers: only the leader serves jobs. The body names the
    /// leader's base URL (`leader`) when it is known.
    pub(crate) fn standby(leader: Option<&str>) -> Self {
        let message = match leader {
            Some(url) => format!("this dispatcher is a standby; the leader is {url}: send it there, or retry"),
            None => "this dispatcher is a standby and no leader is known yet (an election is under way): retry".to_owned(),
        };
        ApiError {
            retry_after: Some(1),
            leader: leader.map(str::to_owned),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "standby", message)
        }
    }
    /// A standby could not pass a request on to the leader at `leader` ([`super::forward`]).
    pub(super) fn standby_unreachable(leader: &str, why: &str) -> Self {
        ApiError {
            message: format!(
                "this dispatcher is a standby and could not pass the request on to the leader at {leader} ({why}): send it there, or retry"
            ),
            ..Self::standby(Some(leader))
        }
    }
    pub(super) fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the dispatcher is shutting down",
        )
    }
}

impl From<SpineError> for ApiError {
    fn from(e: SpineError) -> Self {
        let status = match e.condition {
            Condition::QueueFull | Condition::Busy | Condition::RateLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Condition::UnknownJob | Condition::NoAgent => StatusCode::NOT_FOUND,
            // The request is well formed and the endpoint exists, but it names a capability
            // this dispatcher has never seen: 404 would read as "no such endpoint".
            Condition::UnknownCapability => StatusCode::UNPROCESSABLE_ENTITY,
            Condition::NotAuthorized => StatusCode::FORBIDDEN,
            Condition::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Condition::BadArguments | Condition::Malformed => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            condition: e.condition.as_str(),
            message: e.text.unwrap_or_else(|| e.condition.to_string()),
            field: e.field,
            retry_after: e.retry_after,
            leader: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut r = (status, Json(ErrorBody::from(&self))).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            // A rate limit says when it has room; a full queue drains, a stream slot frees, a
            // restarting dispatcher returns: a client (and a proxy) retries after a second
            // rather than at once.
            let secs = self.retry_after.unwrap_or(1).max(1);
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_capability_is_422_not_404() {
        let e =
            ApiError::from(SpineError::new(Condition::UnknownCapability).with_field("capability"));
        assert_eq!(
            (e.status, e.condition, e.field.as_deref()),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown-capability",
                Some("capability")
            )
        );
    }

    #[test]
    fn a_full_queue_says_when_to_retry() {
        let r =
            ApiError::from(SpineError::new(Condition::QueueFull).with_text("full")).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[axum::http::header::RETRY_AFTER], "1");
        let r = ApiError::field("wait", "bad").into_response();
        assert!(r.headers().get(axum::http::header::RETRY_AFTER).is_none());
    }
}

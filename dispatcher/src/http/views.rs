//! The JSON views of what the core answers, as HTTP shows them: a job in a listing (without
//! its output, arguments and timeline). A whole job is the core's [`job_json`], which its events
//! carry rendered ([`crate::core::Rendered`], answered as it is); the
//! other answers' types are in [`super::openapi`]. Handlers in `routes.rs` send these.

pub use crate::core::job_json;
use crate::core::JobView;
use crate::jobs::JobRecord;

/// A job as a listing shows it: [`JobView`] without the output, arguments, input and timeline (listings carry no payloads;
/// `GET /v1/jobs/{id}` does).
pub(super) fn job_listed(j: &JobRecord) -> JobView {
    let mut v = JobView::of(j);
    if let Some(r) = &mut v.result {
        r.output = None;
    }
    v.args = None;
    v.input = None;
    v.history = Vec::new();
    v
}

/// A rendered view answers as it is: `200`, `application/json`, no tree built or walked.
impl axum::response::IntoResponse for crate::core::Rendered {
    fn into_response(self) -> axum::response::Response {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            )],
            self.get().to_owned(),
        )
            .into_response()
    }
}

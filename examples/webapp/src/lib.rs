//! Example web app on a Spine farm: a page where a user uploads an image; the app submits an
//! `image.thumbnail` job to the dispatcher's HTTP API, the page shows its progress and then
//! the thumbnail.
//!
//! Routes (the browser talks to this app only; the app holds the dispatcher's token):
//!
//! - `GET /`: the page;
//! - `POST /thumbnails?size=N`: the image as the body (its type as `Content-Type`); answers
//!   `{"id": job}`;
//! - `GET /thumbnails/{id}`: `{"state", "percent", "error"?, "width"?, "height"?}`;
//! - `GET /thumbnails/{id}/image`: the thumbnail, once the job succeeded.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// Largest image accepted.
pub const MAX_UPLOAD: usize = 20 * 1024 * 1024;

const PAGE: &str = include_str!("page.html");

/// The app's routes, talking to the dispatcher through `api`.
pub fn router(api: spine_client::Client) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/thumbnails", post(upload))
        .route("/thumbnails/{id}", get(status))
        .route("/thumbnails/{id}/image", get(image))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD))
        .with_state(api)
}

/// An error for the page: status and `{"error": message}`.
struct AppError(StatusCode, String);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<spine_client::ClientError> for AppError {
    fn from(e: spine_client::ClientError) -> Self {
        let status = match &e {
            spine_client::ClientError::Api { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            _ => StatusCode::BAD_GATEWAY,
        };
        AppError(status, e.to_string())
    }
}

#[derive(serde::Deserialize)]
struct UploadQuery {
    size: Option<u32>,
}

async fn upload(
    State(api): State<spine_client::Client>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, AppError> {
    if body.is_empty() {
        return Err(AppError(
            StatusCode::BAD_REQUEST,
            "choose an image first".into(),
        ));
    }
    let size = q.size.unwrap_or(128);
    if !(16..=1024).contains(&size) {
        return Err(AppError(
            StatusCode::BAD_REQUEST,
            "size must be 16 to 1024".into(),
        ));
    }
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream");
    let id = api
        .submit(&json!({
            "capability": "image.thumbnail",
            "args": { "size": size },
            "input": spine_client::base64(&body),
            "input_type": mime,
            "progress": true,
            "deadline": "60s",
        }))
        .await?;
    tracing::info!(job = %id, bytes = body.len(), "thumbnail job submitted");
    Ok(Json(json!({ "id": id })))
}

async fn status(
    State(api): State<spine_client::Client>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    let job = api.job(&id).await?;
    let mut v = json!({ "state": job["state"], "percent": job["percent"] });
    if let Some(e) = job["error"]["message"].as_str() {
        v["error"] = json!(e);
    }
    let meta = &job["result"]["meta"];
    if !meta.is_null() {
        v["width"] = meta["width"].clone();
        v["height"] = meta["height"].clone();
    }
    Ok(Json(v))
}

async fn image(
    State(api): State<spine_client::Client>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let job = api.job(&id).await?;
    let bytes =
        spine_client::output(&job).map_err(|e| AppError(StatusCode::CONFLICT, e.to_string()))?;
    let mime = job["result"]["type"]
        .as_str()
        .unwrap_or("application/octet-stream")
        .to_owned();
    Ok(([(header::CONTENT_TYPE, mime)], bytes).into_response())
}

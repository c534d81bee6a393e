//! What agents (and the dashboard) read: jobs, image files, status.

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::{AppState, error};
use crate::image::{manifest, torrent};
use crate::protocol::StatusReport;
use crate::server::http::Conn;
use crate::server::state::{JobError, ReportError};

pub async fn job(
    State(s): State<AppState>,
    Extension(c): Extension<Conn>,
    Path(mac): Path<String>,
) -> Response {
    match s.job_for(&mac, c.local.ip(), c.remote.ip()).await {
        Ok(j) => Json(j).into_response(),
        Err(JobError::BadRequest(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(JobError::NoJob(e)) => error(StatusCode::NOT_FOUND, e),
        Err(JobError::NotStarted(e) | JobError::Unavailable(e)) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e)
        }
    }
}

/// Only the two files of a known image are served; names are looked up,
/// never joined into a path.
pub async fn image_file(
    State(s): State<AppState>,
    Path((name, file)): Path<(String, String)>,
) -> Response {
    let images = s.images.read().await;
    let Some(img) = images.get(&name) else {
        return error(StatusCode::NOT_FOUND, format!("no image {name:?}"));
    };
    match file.as_str() {
        manifest::MANIFEST_FILE => match std::fs::read(img.image.dir.join(manifest::MANIFEST_FILE))
        {
            Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        manifest::TORRENT_FILE => {
            match torrent::with_trackers(&img.image.torrent, &[s.config.announce_url()]) {
                Ok(b) => ([(header::CONTENT_TYPE, "application/x-bittorrent")], b).into_response(),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no file {file:?} in image {name:?}"),
        ),
    }
}

pub async fn status(State(s): State<AppState>, Json(r): Json<StatusReport>) -> Response {
    match s.report(r).await {
        Ok(ack) => Json(ack).into_response(),
        Err(ReportError::BadRequest(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(ReportError::Refused(e)) => error(StatusCode::FORBIDDEN, e),
        Err(ReportError::Internal(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Debug, serde::Deserialize)]
pub struct ViewQuery {
    id: Option<u64>,
    offset: Option<usize>,
    limit: Option<usize>,
}

/// The newest running deployment (or `?id=`), with a page of its hosts.
pub async fn deployment(State(s): State<AppState>, Query(q): Query<ViewQuery>) -> Response {
    let limit = q.limit.unwrap_or(crate::server::MAX_HOSTS);
    Json(s.view(q.id, q.offset.unwrap_or(0), limit).await).into_response()
}

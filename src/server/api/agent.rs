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
    let origin = s.captures.origin(&name);
    let image = match (images.get(&name), &origin) {
        (_, Some(o)) => &o.image,
        (Some(img), None) => &img.image,
        (None, None) => return error(StatusCode::NOT_FOUND, format!("no image {name:?}")),
    };
    match file.as_str() {
        manifest::MANIFEST_FILE => {
            let b = match &origin {
                Some(o) => serde_json::to_vec(&o.image.manifest).map_err(|e| e.to_string()),
                None => std::fs::read(image.dir.join(manifest::MANIFEST_FILE))
                    .map_err(|e| e.to_string()),
            };
            match b {
                Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        manifest::TORRENT_FILE => {
            match torrent::with_trackers(&image.torrent, &[s.config.announce_url()]) {
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

/// A post-deploy hook from `<state_dir>/hooks/`: the name is checked to be a
/// plain file name before it is joined, and the file is bounded.
pub async fn hook(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    if let Err(e) = crate::protocol::check_hook_name(&name) {
        return error(StatusCode::BAD_REQUEST, format!("{e:#}"));
    }
    let path = s
        .config
        .state_dir
        .join(crate::protocol::HOOKS_DIR)
        .join(&name);
    let read = tokio::task::spawn_blocking(move || read_hook(&path)).await;
    match read {
        Ok(Ok(Some(b))) => ([(header::CONTENT_TYPE, "text/x-shellscript")], b).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, format!("no hook {name:?}")),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("hook {name:?}: {e:#}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn read_hook(path: &std::path::Path) -> anyhow::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if !f.metadata()?.is_file() {
        return Ok(None);
    }
    let mut b = Vec::new();
    f.take(crate::protocol::MAX_HOOK_BYTES + 1)
        .read_to_end(&mut b)?;
    if b.len() as u64 > crate::protocol::MAX_HOOK_BYTES {
        anyhow::bail!("over {} bytes", crate::protocol::MAX_HOOK_BYTES);
    }
    Ok(Some(b))
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

/// A capture task's master uploads its image's manifest and torrent.
pub async fn capture_upload(
    State(s): State<AppState>,
    Extension(c): Extension<Conn>,
    Json(u): Json<crate::protocol::CaptureUpload>,
) -> Response {
    use crate::server::capture::UploadError;
    match s.capture_upload(u, c.remote.ip()).await {
        Ok(msg) => Json(serde_json::json!({ "message": msg })).into_response(),
        Err(UploadError::Bad(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(UploadError::Refused(e)) => {
            s.counters
                .reports_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            error(StatusCode::FORBIDDEN, e)
        }
    }
}

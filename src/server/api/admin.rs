//! The admin API, behind the admin credential (resolved at start:
//! `admin_token.rs`): hosts, groups, deployments, history, logs.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::session::Admin;
use super::{AppState, error};
use crate::protocol::Job;
use crate::protocol::admin::{DeploymentState, GroupInfo, HostLog, HostUpdate, StartRequest};

/// An `anyhow` result as JSON, or 400 with its message.
fn answer<T: serde::Serialize>(r: anyhow::Result<T>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
}

pub async fn images(_: Admin, State(s): State<AppState>) -> Response {
    Json(s.image_views().await).into_response()
}

/// The hosts, unknown ones first (`?offset=&limit=`: a page of them).
pub async fn hosts(_: Admin, State(s): State<AppState>, Query(p): Query<Page>) -> Response {
    let page = s
        .rooms
        .hosts_page(p.offset.unwrap_or(0), p.limit.unwrap_or(usize::MAX));
    answer(page.map(|mut v| {
        for host in &mut v {
            if let Some(t) = host.task.take() {
                host.task = s.live_tasks(vec![t]).pop();
            }
        }
        v
    }))
}

pub async fn update_host(
    _: Admin,
    State(s): State<AppState>,
    Path(mac): Path<String>,
    Json(u): Json<HostUpdate>,
) -> Response {
    let images = s.servable().await;
    answer(
        s.rooms
            .update_host(&mac, &u, |i| images.contains(i))
            .map(|()| serde_json::json!({ "mac": mac })),
    )
}

pub async fn set_job(
    _: Admin,
    State(s): State<AppState>,
    Path(mac): Path<String>,
    Json(job): Json<Job>,
) -> Response {
    let images = s.servable().await;
    let u = HostUpdate {
        job: Some(job),
        ..Default::default()
    };
    match s.rooms.update_host(&mac, &u, |i| images.contains(i)) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
}

/// Re-images one host: a deployment of just that host.
pub async fn reimage(_: Admin, State(s): State<AppState>, Path(mac): Path<String>) -> Response {
    let req = StartRequest {
        hosts: vec![mac],
        ..Default::default()
    };
    answer(s.start(&req).await)
}

/// Marks a host to capture its disk into an image at its next network boot.
pub async fn capture(
    _: Admin,
    State(s): State<AppState>,
    Path(mac): Path<String>,
    Json(req): Json<crate::protocol::admin::CaptureRequest>,
) -> Response {
    answer(s.start_capture(&mac, &req).await)
}

/// Pulls an image given only as its torrent (202: the pull runs on).
pub async fn add_image(
    _: Admin,
    State(s): State<AppState>,
    Json(req): Json<crate::protocol::admin::AddImageRequest>,
) -> Response {
    let r = async {
        let torrent = super::super::token::unhex(&req.torrent)
            .filter(|_| req.torrent.len().is_multiple_of(2))
            .ok_or_else(|| anyhow::anyhow!("the torrent is not hex"))?;
        if req.peers.len() > crate::protocol::admin::AddImageRequest::MAX_PEERS {
            anyhow::bail!("{} peers named (at most 16)", req.peers.len());
        }
        let peers = req
            .peers
            .iter()
            .map(|p| {
                p.parse::<std::net::SocketAddr>()
                    .map_err(|_| anyhow::anyhow!("peer {p:?} is not IP:PORT"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let name = s.start_pull(torrent, peers, None).await?;
        Ok(serde_json::json!({ "image": name, "message": format!("the server pulls image {name} through the swarm") }))
    }
    .await;
    match r {
        Ok(v) => (StatusCode::ACCEPTED, Json(v)).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
}

#[derive(Debug, Deserialize)]
pub struct LogQuery {
    deployment: Option<u64>,
}

pub async fn log(
    _: Admin,
    State(s): State<AppState>,
    Path(mac): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    answer(s.rooms.log(&mac, q.deployment).map(|l| HostLog {
        mac,
        deployment: l.deployment,
        error: l.error,
        lines: l.lines,
    }))
}

pub async fn groups(_: Admin, State(s): State<AppState>) -> Response {
    answer(s.rooms.groups())
}

pub async fn put_group(
    _: Admin,
    State(s): State<AppState>,
    Path(name): Path<String>,
    Json(mut g): Json<GroupInfo>,
) -> Response {
    g.name = name;
    let images = s.servable().await;
    answer(
        s.rooms
            .put_group(&g, |i| images.contains(i))
            .map(|()| serde_json::json!({ "group": g.name })),
    )
}

#[derive(Debug, Deserialize)]
pub struct Page {
    before: Option<u64>,
    limit: Option<usize>,
    offset: Option<usize>,
    /// "running", "done" or "stopped": those only.
    state: Option<String>,
}

/// The history: deployments, newest first, 50 a page (`?before=ID`,
/// `?state=running`).
pub async fn deployments(_: Admin, State(s): State<AppState>, Query(p): Query<Page>) -> Response {
    let state = match p.state.as_deref().map(|t| (t, DeploymentState::parse(t))) {
        None => None,
        Some((_, Some(st))) => Some(st),
        Some((t, None)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("state {t:?}: not running, done or stopped"),
            );
        }
    };
    answer(
        s.rooms
            .deployments(p.limit.unwrap_or(50).min(500), p.before, state),
    )
}

/// One deployment with a page of its hosts (`?offset=&limit=`).
pub async fn deployment(
    _: Admin,
    State(s): State<AppState>,
    Path(id): Path<u64>,
    Query(p): Query<Page>,
) -> Response {
    if !matches!(s.rooms.deployment(id), Ok(Some(_))) {
        return error(StatusCode::NOT_FOUND, format!("no deployment {id}"));
    }
    let v = s
        .view(
            Some(id),
            p.offset.unwrap_or(0),
            p.limit.unwrap_or(super::super::MAX_HOSTS),
        )
        .await;
    Json(v).into_response()
}

/// The room view of one deployment: a short tile per PC.
pub async fn tiles(_: Admin, State(s): State<AppState>, Path(id): Path<u64>) -> Response {
    match s.room(id) {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no deployment {id}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

pub async fn start(_: Admin, State(s): State<AppState>, Json(req): Json<StartRequest>) -> Response {
    answer(s.start(&req).await)
}

pub async fn schedules(_: Admin, State(s): State<AppState>) -> Response {
    answer(s.schedules())
}

pub async fn end_schedule(_: Admin, State(s): State<AppState>, Path(id): Path<u64>) -> Response {
    match s.rooms.end_schedule(id) {
        Ok(()) => Json(serde_json::json!({ "schedule": id, "ended": true })).into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, format!("{e:#}")),
    }
}

pub async fn stop(_: Admin, State(s): State<AppState>, Path(id): Path<u64>) -> Response {
    match s.rooms.stop(id) {
        Ok(()) => Json(serde_json::json!({ "deployment": id, "stopped": true })).into_response(),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

/// Stops the newest running deployment (the API of one deployment at a time).
pub async fn stop_newest(_: Admin, State(s): State<AppState>) -> Response {
    let Some(id) = s.rooms.running().ok().and_then(|v| v.first().copied()) else {
        return error(StatusCode::CONFLICT, "no deployment is running");
    };
    match s.rooms.stop(id) {
        Ok(()) => Json(serde_json::json!({ "deployment": id, "stopped": true })).into_response(),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

//! The admin API, behind the admin credential (resolved at start:
//! `admin_token.rs`): hosts, groups, deployments, history, logs.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{AppState, error};
use crate::protocol::Job;
use crate::protocol::admin::{GroupInfo, HostLog, HostUpdate, StartRequest};

/// Checks `Authorization: Bearer <token>`: `Some(refusal)` unless it matches.
fn deny(s: &AppState, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &s.config.admin_token else {
        return Some(error(
            StatusCode::FORBIDDEN,
            "the admin API is off: the server resolved no admin token",
        ));
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        None
    } else {
        Some(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (the server's log names its file: \"admin token: ...\")",
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An `anyhow` result as JSON, or 400 with its message.
fn answer<T: serde::Serialize>(r: anyhow::Result<T>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
}

macro_rules! admin {
    ($s:expr, $h:expr) => {
        if let Some(r) = deny(&$s, &$h) {
            return r;
        }
    };
}

pub async fn images(State(s): State<AppState>, h: HeaderMap) -> Response {
    admin!(s, h);
    Json(s.image_views().await).into_response()
}

pub async fn hosts(State(s): State<AppState>, h: HeaderMap) -> Response {
    admin!(s, h);
    answer(s.rooms.hosts().map(|mut v| {
        for host in &mut v {
            if let Some(t) = host.task.take() {
                host.task = s.live_tasks(vec![t]).pop();
            }
        }
        v
    }))
}

pub async fn update_host(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(mac): Path<String>,
    Json(u): Json<HostUpdate>,
) -> Response {
    admin!(s, h);
    let images = s.servable().await;
    answer(
        s.rooms
            .update_host(&mac, &u, |i| images.contains(i))
            .map(|()| serde_json::json!({ "mac": mac })),
    )
}

pub async fn set_job(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(mac): Path<String>,
    Json(job): Json<Job>,
) -> Response {
    admin!(s, h);
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
pub async fn reimage(State(s): State<AppState>, h: HeaderMap, Path(mac): Path<String>) -> Response {
    admin!(s, h);
    let req = StartRequest {
        hosts: vec![mac],
        ..Default::default()
    };
    answer(s.start(&req).await)
}

#[derive(Debug, Deserialize)]
pub struct LogQuery {
    deployment: Option<u64>,
}

pub async fn log(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(mac): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    admin!(s, h);
    answer(
        s.rooms
            .log(&mac, q.deployment)
            .map(|(deployment, lines)| HostLog {
                mac,
                deployment,
                lines,
            }),
    )
}

pub async fn groups(State(s): State<AppState>, h: HeaderMap) -> Response {
    admin!(s, h);
    answer(s.rooms.groups())
}

pub async fn put_group(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(mut g): Json<GroupInfo>,
) -> Response {
    admin!(s, h);
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
}

/// The history: deployments, newest first, 50 a page (`?before=ID`).
pub async fn deployments(
    State(s): State<AppState>,
    h: HeaderMap,
    Query(p): Query<Page>,
) -> Response {
    admin!(s, h);
    answer(
        s.rooms
            .deployments(p.limit.unwrap_or(50).min(500), p.before),
    )
}

/// One deployment with a page of its hosts (`?offset=&limit=`).
pub async fn deployment(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<u64>,
    Query(p): Query<Page>,
) -> Response {
    admin!(s, h);
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

pub async fn start(
    State(s): State<AppState>,
    h: HeaderMap,
    Json(req): Json<StartRequest>,
) -> Response {
    admin!(s, h);
    answer(s.start(&req).await)
}

pub async fn schedules(State(s): State<AppState>, h: HeaderMap) -> Response {
    admin!(s, h);
    answer(s.schedules())
}

pub async fn end_schedule(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    admin!(s, h);
    match s.rooms.end_schedule(id) {
        Ok(()) => Json(serde_json::json!({ "schedule": id, "ended": true })).into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, format!("{e:#}")),
    }
}

pub async fn stop(State(s): State<AppState>, h: HeaderMap, Path(id): Path<u64>) -> Response {
    admin!(s, h);
    match s.rooms.stop(id) {
        Ok(()) => Json(serde_json::json!({ "deployment": id, "stopped": true })).into_response(),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

/// Stops the newest running deployment (the API of one deployment at a time).
pub async fn stop_newest(State(s): State<AppState>, h: HeaderMap) -> Response {
    admin!(s, h);
    let Some(id) = s.rooms.running().ok().and_then(|v| v.first().copied()) else {
        return error(StatusCode::CONFLICT, "no deployment is running");
    };
    match s.rooms.stop(id) {
        Ok(()) => Json(serde_json::json!({ "deployment": id, "stopped": true })).into_response(),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

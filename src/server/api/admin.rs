//! The admin API, behind the bearer token resolved at start (`admin_token.rs`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::{AppState, error};
use crate::protocol::Job;
use crate::server::wol;

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

pub async fn images(State(s): State<AppState>, h: HeaderMap) -> Response {
    if let Some(r) = deny(&s, &h) {
        return r;
    }
    Json(s.image_views().await).into_response()
}

pub async fn hosts(State(s): State<AppState>, h: HeaderMap) -> Response {
    if let Some(r) = deny(&s, &h) {
        return r;
    }
    Json(s.view().await.hosts).into_response()
}

pub async fn set_job(
    State(s): State<AppState>,
    h: HeaderMap,
    Path(mac): Path<String>,
    Json(job): Json<Job>,
) -> Response {
    if let Some(r) = deny(&s, &h) {
        return r;
    }
    match s.set_job(&mac, job).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, format!("{e:#}")),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Hosts to wait for before the deployment counts as done.
    pub expect: Option<usize>,
    /// Send Wake-on-LAN packets to every configured host first.
    #[serde(default)]
    pub wake: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StartResponse {
    pub deployment: u64,
    pub woken: usize,
}

pub async fn start(
    State(s): State<AppState>,
    h: HeaderMap,
    Json(req): Json<StartRequest>,
) -> Response {
    if let Some(r) = deny(&s, &h) {
        return r;
    }
    let mut woken = 0;
    if req.wake {
        let macs: Vec<&str> = s.config.hosts.iter().map(|h| h.mac.as_str()).collect();
        match wol::wake(&macs, s.config.wol_broadcast) {
            Ok(n) => woken = n,
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Wake-on-LAN: {e:#}"),
                );
            }
        }
    }
    let id = s.start_deployment(req.expect).await;
    Json(StartResponse {
        deployment: id,
        woken,
    })
    .into_response()
}

pub async fn stop(State(s): State<AppState>, h: HeaderMap) -> Response {
    if let Some(r) = deny(&s, &h) {
        return r;
    }
    match s.stop_deployment().await {
        Ok(id) => Json(serde_json::json!({ "deployment": id, "stopped": true })).into_response(),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

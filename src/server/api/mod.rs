//! HTTP: the agents' read-only API, the admin API, tracker, dashboard, metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Router};

use super::http::Conn;
use super::state::ServerState;
use super::tracker::Vouched;

pub mod admin;
pub mod agent;
pub mod session;

pub type AppState = Arc<ServerState>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(super::dashboard::page))
        .route("/login", post(session::login))
        .route("/logout", post(session::logout))
        .route("/metrics", get(super::metrics::metrics))
        .route("/announce", get(announce))
        .route("/boot.ipxe", get(super::boot::ipxe_script))
        .route("/boot/{file}", get(super::boot::boot_file))
        .route("/images/{name}/{file}", get(agent::image_file))
        .route("/hooks/{name}", get(agent::hook))
        .route("/api/v1/jobs/{mac}", get(agent::job))
        .route("/api/v1/status", post(agent::status))
        .route(
            "/api/v1/capture",
            post(agent::capture_upload).layer(axum::extract::DefaultBodyLimit::max(
                crate::protocol::CaptureUpload::MAX_BODY,
            )),
        )
        .route("/api/v1/deployment", get(agent::deployment))
        .route(
            "/api/v1/admin/images",
            get(admin::images)
                .post(admin::add_image)
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::protocol::admin::AddImageRequest::MAX_BODY,
                )),
        )
        .route("/api/v1/admin/hosts", get(admin::hosts))
        .route("/api/v1/admin/hosts/{mac}", put(admin::update_host))
        .route("/api/v1/admin/hosts/{mac}/job", put(admin::set_job))
        .route("/api/v1/admin/hosts/{mac}/reimage", post(admin::reimage))
        .route("/api/v1/admin/hosts/{mac}/capture", post(admin::capture))
        .route("/api/v1/admin/hosts/{mac}/log", get(admin::log))
        .route("/api/v1/admin/groups", get(admin::groups))
        .route("/api/v1/admin/groups/{name}", put(admin::put_group))
        .route(
            "/api/v1/admin/deployments",
            get(admin::deployments).post(admin::start),
        )
        .route("/api/v1/admin/deployments/{id}", get(admin::deployment))
        .route("/api/v1/admin/deployments/{id}/tiles", get(admin::tiles))
        .route("/api/v1/admin/deployments/{id}/stop", post(admin::stop))
        .route("/api/v1/admin/schedules", get(admin::schedules))
        .route(
            "/api/v1/admin/schedules/{id}",
            axum::routing::delete(admin::end_schedule),
        )
        .route("/api/v1/admin/deployment/start", post(admin::start))
        .route("/api/v1/admin/deployment/stop", post(admin::stop_newest))
        .with_state(state)
}

async fn announce(
    State(s): State<AppState>,
    Extension(c): Extension<Conn>,
    RawQuery(q): RawQuery,
) -> Response {
    let origin = match s.origin_for(c.local.ip()) {
        Some(SocketAddr::V4(a)) => Some(a),
        _ => None,
    };
    let mut host = false;
    let body = s
        .tracker
        .announce(q.as_deref().unwrap_or(""), c.remote.ip(), origin, |t| {
            let mac = s.keys.check(t)?.mac;
            host = true;
            // Its room: its group, if the database can say (else its subnet).
            let group = if s.config.locality {
                s.rooms.group_of(&mac).ok().flatten()
            } else {
                None
            };
            Some(Vouched { host: mac, group })
        });
    if host {
        s.trust.extend([c.remote.ip()]);
    }
    ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

/// A JSON error body: `{"error": "..."}`.
pub fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, axum::Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

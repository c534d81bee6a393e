//! The admin's web page: a login form, then the dashboard (one static
//! page whose script polls the admin API; see `api/session.rs` for how a
//! browser session is checked).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::api::AppState;

const DASHBOARD: &str = include_str!("dashboard.html");
const LOGIN: &str = include_str!("login.html");

/// `GET /`: the dashboard with its session's CSRF token, or the login form.
pub async fn page(State(s): State<AppState>, h: HeaderMap) -> Response {
    if s.config.admin_token.is_none() {
        return login_page(
            StatusCode::OK,
            "The admin API is off: set admin_token in the server config.",
        );
    }
    match s.sessions.csrf_of(&h) {
        // The token is hex: nothing to escape.
        Some(csrf) => html(StatusCode::OK, DASHBOARD.replace("{{csrf}}", &csrf)),
        None => login_page(StatusCode::OK, ""),
    }
}

/// The login form, saying `message` (our own text) above it.
pub fn login_page(code: StatusCode, message: &str) -> Response {
    let escaped = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    html(code, LOGIN.replace("<!--message-->", &escaped))
}

/// A page no other site may frame, and no cache may keep.
fn html(code: StatusCode, body: String) -> Response {
    (
        code,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            // Not "no-referrer": with it a browser sends `Origin: null`.
            (header::REFERRER_POLICY, "same-origin"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

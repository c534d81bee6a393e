//! The admin's web page: it polls `/api/v1/deployment` once a second.

use axum::response::Html;

pub async fn page() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

//! `/metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::api::AppState;

/// Counters kept on the hot paths.
#[derive(Debug, Default)]
pub struct Counters {
    /// Status reports ignored: no valid token for their host.
    pub reports_refused: AtomicU64,
    /// Connections closed at once: too many open, in all or from one address.
    pub connections_refused: AtomicU64,
    pub connections_open: AtomicU64,
}

pub async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let v = s.view(None, 0, super::MAX_HOSTS).await;
    let mut o = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(
            o,
            "# HELP blockswarm_{name} {help}\n# TYPE blockswarm_{name} {kind}"
        );
        for (labels, val) in rows {
            let _ = writeln!(o, "blockswarm_{name}{labels} {val}");
        }
    };
    let host = |h: &super::state::HostView| {
        format!(
            "{{mac=\"{}\",state=\"{}\"}}",
            h.task.mac,
            serde_json::to_value(h.task.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        )
    };
    metric(
        "deployment_running",
        "Whether a deployment is running.",
        "gauge",
        vec![(String::new(), f64::from(u8::from(v.running)))],
    );
    metric(
        "deployment_elapsed_seconds",
        "Time since the deployment started (or its duration, once done).",
        "gauge",
        vec![(String::new(), v.elapsed_s)],
    );
    metric(
        "host_done_bytes",
        "Payload bytes a host has verified.",
        "gauge",
        v.hosts
            .iter()
            .map(|h| (host(h), h.task.done_bytes as f64))
            .collect(),
    );
    metric(
        "host_total_bytes",
        "Payload bytes a host needs.",
        "gauge",
        v.hosts
            .iter()
            .map(|h| (host(h), h.task.total_bytes as f64))
            .collect(),
    );
    metric(
        "host_download_bytes_per_second",
        "A host's download rate.",
        "gauge",
        v.hosts.iter().map(|h| (host(h), h.task.down_bps)).collect(),
    );
    metric(
        "host_upload_bytes_per_second",
        "A host's upload rate.",
        "gauge",
        v.hosts.iter().map(|h| (host(h), h.task.up_bps)).collect(),
    );
    let img =
        |i: &super::state::ImageView| format!("{{image=\"{}\",state=\"{}\"}}", i.name, i.state);
    metric(
        "seed_uploaded_bytes_total",
        "Bytes the server's seed uploaded.",
        "counter",
        v.images
            .iter()
            .map(|i| (img(i), i.uploaded_bytes as f64))
            .collect(),
    );
    metric(
        "image_payload_bytes",
        "An image's payload size.",
        "gauge",
        v.images
            .iter()
            .map(|i| (img(i), i.payload_bytes as f64))
            .collect(),
    );
    metric(
        "tracker_peers",
        "Peers the tracker knows, by completeness.",
        "gauge",
        v.images
            .iter()
            .flat_map(|i| {
                [
                    (
                        format!("{{image=\"{}\",complete=\"true\"}}", i.name),
                        i.seeders as f64,
                    ),
                    (
                        format!("{{image=\"{}\",complete=\"false\"}}", i.name),
                        i.leechers as f64,
                    ),
                ]
            })
            .collect(),
    );
    let c = &s.counters;
    let count = |a: &AtomicU64| vec![(String::new(), a.load(Ordering::Relaxed) as f64)];
    metric(
        "status_reports_refused_total",
        "Status reports ignored for want of a valid host token.",
        "counter",
        count(&c.reports_refused),
    );
    metric(
        "http_connections_refused_total",
        "HTTP connections closed at once: too many open, in all or from one address.",
        "counter",
        count(&c.connections_refused),
    );
    metric(
        "http_connections_open",
        "Open HTTP connections.",
        "gauge",
        count(&c.connections_open),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], o)
}

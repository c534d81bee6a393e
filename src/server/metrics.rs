//! `/metrics`: the server's state in the OpenMetrics text format (or the
//! older Prometheus one, for a scraper that does not ask for OpenMetrics),
//! written by prometheus-client's encoders (units and `_total` in the
//! names, label values escaped).
//!
//! Each scrape encodes a [`Snapshot`] of the state (the rooms in SQLite,
//! the hosts' live progress, the images) through a registry made for that
//! scrape. The state is already owned in one place; long-lived metric
//! families would be a second copy to keep in step, and a series whose
//! removal was forgotten would stay forever. Built per scrape, a host or
//! deployment that is gone has no series left. What a scrape holds is
//! bounded: the running deployments and those done within [`DONE_SHOWN`],
//! each with at most [`MAX_HOSTS`] hosts.
//!
//! Value series carry only what identifies them (`deployment`, `mac`,
//! `image`); a state is a series of its own per possible state, 1 for the
//! current one and 0 for the others.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::MAX_HOSTS;
use super::api::AppState;
use super::state::{ImageView, ServerState};
use super::store::SeedState;
use crate::protocol::AgentState;
use crate::protocol::admin::{DeploymentInfo, DeploymentState, TaskInfo, TaskState};

/// The text formats a scraper may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// What Prometheus asks for: units, `info` and `# EOF`.
    OpenMetrics,
    /// The older Prometheus text format (0.0.4), for anything else.
    Prometheus,
}

impl Format {
    /// The format an `Accept` header asks for.
    pub fn accepted(accept: Option<&str>) -> Self {
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }
}

/// How long a done deployment and its hosts stay, so that scrapes see how
/// it ended (every host's last bytes and state). A stopped one goes at once.
const DONE_SHOWN: Duration = Duration::from_secs(600);
/// The newest deployments looked through for those done within [`DONE_SHOWN`].
const RECENT: usize = 32;

/// Counters kept on the hot paths.
#[derive(Debug, Default)]
pub struct Counters {
    /// Status reports ignored: no valid token for their host.
    pub reports_refused: AtomicU64,
    /// Connections closed at once: too many open, in all or from one address.
    pub connections_refused: AtomicU64,
    pub connections_open: AtomicU64,
}

pub async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::accepted(accept);
    let body = match Snapshot::take(&s).await {
        Ok(snap) => snap.encode(format).map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    match body {
        Ok(b) => (
            [
                (header::CONTENT_TYPE, format.content_type()),
                (header::VARY, "Accept"),
            ],
            b,
        )
            .into_response(),
        Err(e) => super::api::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the server's state: {e:#}"),
        ),
    }
}

/// What one scrape shows.
#[derive(Debug)]
pub struct Snapshot {
    /// The running deployments and those done lately, by id, each with its
    /// tasks (live progress merged in).
    deployments: Vec<(DeploymentInfo, Vec<TaskInfo>)>,
    images: Vec<ImageView>,
    now_ms: i64,
    reports_refused: u64,
    connections_refused: u64,
    connections_open: u64,
}

impl Snapshot {
    pub async fn take(s: &ServerState) -> anyhow::Result<Self> {
        let now_ms = super::db::now_ms();
        let mut shown = BTreeMap::new();
        for id in s.rooms.running()? {
            if let Some(d) = s.rooms.deployment(id)? {
                shown.insert(id, d);
            }
        }
        let since = now_ms - DONE_SHOWN.as_millis() as i64;
        for d in s.rooms.deployments(RECENT, None, None)? {
            if d.state == DeploymentState::Done && d.ended_ms.is_some_and(|e| e >= since) {
                shown.insert(d.id, d);
            }
        }
        let mut deployments = Vec::with_capacity(shown.len());
        for (id, d) in shown {
            deployments.push((d, s.live_tasks(s.rooms.tasks(id, 0, MAX_HOSTS)?)));
        }
        let c = &s.counters;
        Ok(Self {
            deployments,
            images: s.image_views().await,
            now_ms,
            reports_refused: c.reports_refused.load(Ordering::Relaxed),
            connections_refused: c.connections_refused.load(Ordering::Relaxed),
            connections_open: c.connections_open.load(Ordering::Relaxed),
        })
    }

    /// The whole exposition in `format`.
    pub fn encode(self, format: Format) -> Result<String, fmt::Error> {
        use prometheus_client::encoding::{prometheus_text, text};
        let mut registry = Registry::with_prefix("blockswarm");
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        match format {
            Format::OpenMetrics => text::encode(&mut out, &registry)?,
            Format::Prometheus => prometheus_text::encode(&mut out, &registry)?,
        }
        Ok(out)
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: `name` (prefixed, `_unit` appended) with a sample per
/// row; none at all without rows.
fn family<M: EncodeMetric + TypedMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    rows: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut rows = rows.into_iter().peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(name, help, unit.as_ref(), M::TYPE)?;
    for (labels, v) in rows {
        v.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge<N: EncodeGaugeValue>(v: N) -> ConstGauge<N> {
    ConstGauge::new(v)
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

/// An info sample: its labels are the row's.
fn info() -> Info<Labels> {
    Info::new(Vec::new())
}

/// `labels` and then `more`.
fn with<const N: usize>(labels: &Labels, more: [(&'static str, String); N]) -> Labels {
    let mut l = labels.clone();
    l.extend(more);
    l
}

/// A sample per row: its labels, and `f` of its thing.
fn each<'a, T, M>(
    rows: &'a [(Labels, &'a T)],
    f: impl Fn(&T) -> M + 'a,
) -> impl Iterator<Item = (Labels, M)> + 'a {
    rows.iter().map(move |(l, t)| (l.clone(), f(t)))
}

/// `labels` plus `state`, for each of `states`: 1 for `current`, else 0.
fn state_rows<'a>(
    labels: &'a Labels,
    states: impl IntoIterator<Item = &'static str> + 'a,
    current: &'a str,
) -> impl Iterator<Item = (Labels, ConstGauge<u64>)> + 'a {
    states.into_iter().map(move |s| {
        let l = with(labels, [("state", s.to_string())]);
        (l, gauge(u64::from(s == current)))
    })
}

fn bytes() -> Option<Unit> {
    Some(Unit::Bytes)
}

fn bytes_per_second() -> Option<Unit> {
    Some(Unit::Other("bytes_per_second".into()))
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let e = &mut e;
        let version = vec![("version", env!("CARGO_PKG_VERSION").to_string())];
        family(
            e,
            "build",
            "The server's version.",
            None,
            [(version, info())],
        )?;
        self.encode_counters(e)?;
        self.encode_deployments(e)?;
        self.encode_hosts(e)?;
        self.encode_images(e)
    }
}

impl Snapshot {
    fn encode_counters(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        family(
            e,
            "status_reports_refused",
            "Status reports refused: no token issued to that host for that deployment, \
             or no task there.",
            None,
            [(vec![], counter(self.reports_refused))],
        )?;
        family(
            e,
            "http_connections_refused",
            "HTTP connections closed at once: too many open, in all or from one address.",
            None,
            [(vec![], counter(self.connections_refused))],
        )?;
        family(
            e,
            "http_connections_open",
            "Open HTTP connections.",
            None,
            [(vec![], gauge(self.connections_open))],
        )
    }

    fn encode_deployments(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let deps: Vec<(Labels, &DeploymentInfo)> = self
            .deployments
            .iter()
            .map(|(d, _)| (vec![("deployment", d.id.to_string())], d))
            .collect();
        family(
            e,
            "deployment",
            "A running (or lately done) deployment: its group and the image it forces, if any.",
            None,
            deps.iter().map(|(l, d)| {
                let group = d.group.clone().unwrap_or_default();
                let image = d.image.clone().unwrap_or_default();
                (with(l, [("group", group), ("image", image)]), info())
            }),
        )?;
        family(
            e,
            "deployment_done",
            "1 once every host of the deployment is done (or as many as it expects).",
            None,
            each(&deps, |d| {
                gauge(u64::from(d.state == DeploymentState::Done))
            }),
        )?;
        family(
            e,
            "deployment_elapsed",
            "Time since the deployment started, or how long it took once done.",
            Some(Unit::Seconds),
            each(&deps, |d| {
                let end = d.ended_ms.unwrap_or(self.now_ms);
                gauge((end - d.started_ms) as f64 / 1000.0)
            }),
        )?;
        family(
            e,
            "deployment_tasks",
            "The deployment's tasks (one a host) in each state.",
            None,
            deps.iter().flat_map(|(l, d)| {
                TaskState::ALL.into_iter().map(move |s| {
                    let l = with(l, [("state", s.as_str().to_string())]);
                    (l, gauge(d.tasks.get(s) as u64))
                })
            }),
        )
    }

    fn encode_hosts(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let hosts: Vec<(Labels, &TaskInfo)> = self
            .deployments
            .iter()
            .flat_map(|(d, tasks)| tasks.iter().map(move |t| (d.id, t)))
            .map(|(id, t)| {
                let l = vec![("deployment", id.to_string()), ("mac", t.mac.clone())];
                (l, t)
            })
            .collect();
        family(
            e,
            "host",
            "A host with a task in a deployment shown: its name and the image it writes.",
            None,
            hosts.iter().map(|(l, t)| {
                let name = t.name.clone().unwrap_or_default();
                (
                    with(l, [("name", name), ("image", t.image.clone())]),
                    info(),
                )
            }),
        )?;
        family(
            e,
            "host_state",
            "What the host's agent last said it is doing: 1 for that state, 0 for the others.",
            None,
            // None before the agent's first report.
            hosts.iter().flat_map(|(l, t)| {
                let all = AgentState::ALL.map(AgentState::as_str);
                t.state
                    .into_iter()
                    .flat_map(move |s| state_rows(l, all, s.as_str()))
            }),
        )?;
        family(
            e,
            "host_task_state",
            "The host's task: 1 for its state, 0 for the others.",
            None,
            hosts.iter().flat_map(|(l, t)| {
                state_rows(l, TaskState::ALL.map(TaskState::as_str), t.task.as_str())
            }),
        )?;
        family(
            e,
            "host_done",
            "Payload bytes the host has written and verified.",
            bytes(),
            each(&hosts, |t| gauge(t.done_bytes)),
        )?;
        family(
            e,
            "host_total",
            "Payload bytes the host needs.",
            bytes(),
            each(&hosts, |t| gauge(t.total_bytes)),
        )?;
        family(
            e,
            "host_origin",
            "Of the bytes the host wrote, those that came from the server's seed.",
            bytes(),
            each(&hosts, |t| counter(t.origin_bytes)),
        )?;
        family(
            e,
            "host_uploaded",
            "Bytes the host uploaded to its peers.",
            bytes(),
            each(&hosts, |t| counter(t.uploaded_bytes)),
        )?;
        family(
            e,
            "host_download",
            "The host's download rate.",
            bytes_per_second(),
            each(&hosts, |t| gauge(t.down_bps)),
        )?;
        family(
            e,
            "host_upload",
            "The host's upload rate.",
            bytes_per_second(),
            each(&hosts, |t| gauge(t.up_bps)),
        )?;
        family(
            e,
            "host_peers",
            "Peers the host is connected to.",
            None,
            each(&hosts, |t| gauge(t.peers as u64)),
        )
    }

    fn encode_images(&self, e: &mut DescriptorEncoder) -> fmt::Result {
        let images: Vec<(Labels, &ImageView)> = self
            .images
            .iter()
            .map(|i| (vec![("image", i.name.clone())], i))
            .collect();
        family(
            e,
            "image_payload",
            "An image's payload: the used blocks the hosts fetch.",
            bytes(),
            each(&images, |i| gauge(i.payload_bytes)),
        )?;
        family(
            e,
            "image_state",
            "How the server serves an image: 1 for its state, 0 for the others.",
            None,
            images
                .iter()
                .flat_map(|(l, i)| state_rows(l, SeedState::NAMES, &i.state)),
        )?;
        family(
            e,
            "seed_uploaded",
            "Bytes the server's seed uploaded of an image.",
            bytes(),
            each(&images, |i| counter(i.uploaded_bytes)),
        )?;
        family(
            e,
            "seed_upload",
            "The server's seed's upload rate for an image.",
            bytes_per_second(),
            each(&images, |i| gauge(i.up_bps)),
        )?;
        family(
            e,
            "seed_peers",
            "Peers the server's seed is connected to for an image.",
            None,
            each(&images, |i| gauge(i.peers as u64)),
        )?;
        family(
            e,
            "tracker_peers",
            "Peers the tracker knows in an image's swarm, complete (seeders) or not.",
            None,
            images.iter().flat_map(|(l, i)| {
                [("true", i.seeders), ("false", i.leechers)]
                    .map(|(c, n)| (with(l, [("complete", c.to_string())]), gauge(n as u64)))
            }),
        )
    }
}

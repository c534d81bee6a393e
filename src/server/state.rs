//! The server's state, owned in one place: images, the tracker, the rooms
//! (hosts, groups, deployments and tasks, in the database: `rooms.rs`) and
//! the hosts' live progress. HTTP handlers only translate to and from
//! these methods.
//!
//! What outsiders can make it hold is bounded: a host's report is taken
//! only with its token (see `token.rs`) and for a task it has, live
//! progress is forgotten after [`HOST_TTL`] of silence, and a report's
//! strings and log lines are cut to a few hundred bytes.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::sync::RwLock;

use super::api::session::Sessions;
use super::config::{ServerConfig, mac_bytes, normalize_mac};
use super::metrics::Counters;
use super::rooms::{Boot, ClaimError, Rooms, Update};
use super::schedule::{Due, Schedule};
use super::store::{SeedState, StoredImage};
use super::token::HostKeys;
use super::tracker::Tracker;
use super::wol;
use crate::protocol::admin::{
    DeploymentInfo, RoomView, ScheduleInfo, StartRequest, StartResponse, TaskCounts, TaskInfo,
    Tile, TileState,
};
use crate::protocol::{AgentState, JobResponse, StatusAck, StatusReport};
use crate::swarm::SwarmSession;
use crate::swarm::Trust;

/// A host's live progress is dropped after this much silence.
const HOST_TTL: Duration = Duration::from_secs(600);
/// Bounds on a report's strings, in bytes.
const MAX_TEXT: usize = 128;
const MAX_ERROR: usize = 512;

pub struct ServerState {
    pub config: ServerConfig,
    pub images: RwLock<std::collections::BTreeMap<String, StoredImage>>,
    pub tracker: Tracker,
    pub seeds: SwarmSession,
    pub keys: HostKeys,
    /// The hosts the server vouches for (token holders the tracker heard
    /// from), shared with its seeds: strangers get one origin slot.
    pub trust: Arc<Trust>,
    pub counters: Arc<Counters>,
    pub rooms: Rooms,
    /// The dashboard's logins.
    pub sessions: Sessions,
    /// Capture tasks' tokens and pulls, and images served from a master.
    pub captures: super::capture::Captures,
    /// Images being pulled from their torrent alone.
    pub pulls: super::pull::Pulls,
    /// The last report of each host with a task, by MAC: rates and peers,
    /// which the database does not keep.
    live: Mutex<HashMap<String, Live>>,
    /// Hosts that joined an open deployment, by deployment and address.
    joins: Mutex<HashMap<(u64, IpAddr), usize>>,
}

/// Hosts one address may bring into an open deployment: a PC is one
/// address, a student's PC making up MACs is not a room.
pub const MAX_JOINS_PER_ADDRESS: usize = 16;

struct Live {
    report: StatusReport,
    seen: Instant,
    /// Progress not yet in the database.
    dirty: bool,
}

impl Live {
    /// Whether `r` changes only progress: such reports (nearly all of them)
    /// are kept in memory and written in batches ([`ServerState::save_progress`]).
    fn only_progress(&self, r: &StatusReport) -> bool {
        let p = &self.report;
        p.deployment == r.deployment
            && p.state == r.state
            && p.disk == r.disk
            && p.error == r.error
            && r.log.is_empty()
    }
}

/// What the dashboard and `admin status` show of one deployment.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeploymentView {
    pub id: Option<u64>,
    pub group: Option<String>,
    pub running: bool,
    pub done: bool,
    pub elapsed_s: f64,
    pub done_after_s: Option<f64>,
    pub expect: Option<usize>,
    #[serde(default)]
    pub tasks: TaskCounts,
    /// The other running deployments.
    #[serde(default)]
    pub running_ids: Vec<u64>,
    pub hosts: Vec<HostView>,
    pub images: Vec<ImageView>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HostView {
    #[serde(flatten)]
    pub task: TaskInfo,
    pub finished_after_s: Option<f64>,
    pub eta_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ImageView {
    pub name: String,
    pub info_hash: String,
    pub payload_bytes: u64,
    pub disk_bytes: u64,
    pub source: String,
    pub state: String,
    pub error: Option<String>,
    pub uploaded_bytes: u64,
    pub up_bps: f64,
    pub peers: usize,
    pub seeders: usize,
    pub leechers: usize,
}

impl ServerState {
    pub fn new(
        config: ServerConfig,
        rooms: Rooms,
        seeds: SwarmSession,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            tracker: Tracker::new(
                Duration::from_secs(config.announce_interval),
                super::tracker::room::Locality {
                    on: config.locality,
                    prefix: config.room_prefix,
                },
            ),
            keys: HostKeys::load_or_create(&config.images),
            trust: Arc::default(),
            counters,
            config,
            images: RwLock::default(),
            seeds,
            rooms,
            sessions: Sessions::default(),
            captures: Default::default(),
            pulls: Default::default(),
            live: Mutex::default(),
            joins: Mutex::default(),
        }
    }

    /// The server's seed as a host that reached this server at `local`
    /// dials it; none when the server does not seed.
    pub fn origin_for(&self, local: IpAddr) -> Option<SocketAddr> {
        if !self.config.seed {
            return None;
        }
        let seed = self.seeds.listen_addr();
        let ip = if seed.ip().is_unspecified() {
            local
        } else {
            seed.ip()
        };
        Some(SocketAddr::new(ip, seed.port()))
    }

    /// What a network boot of `mac` does; a MAC that is not one boots its
    /// disk, and so does any host when the database fails.
    /// Whether one more host from `ip` may join open deployment `dep`.
    fn may_join(&self, dep: u64, ip: IpAddr) -> bool {
        let mut j = self.joins.lock().unwrap_or_else(|p| p.into_inner());
        if j.len() >= 65536 {
            j.clear();
        }
        let n = j.entry((dep, ip)).or_default();
        *n += 1;
        *n <= MAX_JOINS_PER_ADDRESS
    }

    pub fn boot(&self, mac: &str, remote: IpAddr) -> Boot {
        let fallback = |why: String| Boot::Local {
            exit: self.config.exit,
            why,
        };
        let Ok(mac) = normalize_mac(mac) else {
            return fallback(format!("{mac:?} is not a MAC address"));
        };
        match self.rooms.boot(&mac, &mut |d| self.may_join(d, remote)) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("deciding the boot of {mac}: {e:#}");
                fallback(format!("the server's database failed: {e:#}"))
            }
        }
    }

    /// The job of `mac`'s open task, for a request that reached the server
    /// at `local`.
    pub async fn job_for(
        &self,
        mac: &str,
        local: IpAddr,
        remote: IpAddr,
    ) -> Result<JobResponse, JobError> {
        let claim = match self.rooms.claim(mac, &mut |d| self.may_join(d, remote)) {
            Ok(c) => c,
            Err(ClaimError::BadRequest(e)) => return Err(JobError::BadRequest(e)),
            Err(ClaimError::NoTask(e)) => return Err(JobError::NoJob(e)),
            Err(ClaimError::Full(e)) => return Err(JobError::NotStarted(e)),
        };
        let mac = normalize_mac(mac).map_err(|e| JobError::BadRequest(e.to_string()))?;
        let job = claim.job.clone();
        let id = claim.deployment;
        let token = self.keys.issue(id, &mac);
        if job.capture.is_some() {
            let ticket = self
                .issue_capture(id, &mac, remote)
                .map_err(|e| JobError::Unavailable(format!("{e:#}")))?;
            return Ok(JobResponse {
                host: None,
                slot: claim.group_slot,
                mac,
                manifest_url: String::new(),
                torrent_url: String::new(),
                trackers: Vec::new(),
                deployment: id,
                start_fraction: 0.0,
                origin: None,
                disk: claim.disk.clone(),
                token,
                job,
                capture: Some(ticket),
            });
        }
        // An image served from its master: that PC is the origin.
        if let Some(o) = self.captures.origin(&job.image) {
            let host = host_name(&claim, &mac, &o.image.manifest)?;
            return Ok(self.job_response(claim, mac, job, token, Some(o.origin.into()), host));
        }
        let images = self.images.read().await;
        let seeded = match images.get(&job.image) {
            Some(s) => {
                let hash = &s.image.manifest.payload.info_hash;
                if let Err(e) = self.rooms.set_info_hash(claim.deployment, &mac, hash) {
                    tracing::warn!("recording the torrent of {mac}'s task: {e:#}");
                }
                Some(s)
            }
            None => None,
        };
        let seeded = match seeded {
            None => {
                return Err(JobError::NoJob(format!(
                    "the job's image {:?} is not in the store",
                    job.image
                )));
            }
            Some(s) => match &s.state {
                SeedState::Failed(e) => {
                    return Err(JobError::Unavailable(format!(
                        "the job's image {:?} cannot be served: {e}",
                        job.image
                    )));
                }
                _ => s.torrent.is_some(),
            },
        };
        let host = match images.get(&job.image) {
            Some(s) => host_name(&claim, &mac, &s.image.manifest)?,
            None => None,
        };
        drop(images);
        let origin = if seeded { self.origin_for(local) } else { None };
        Ok(self.job_response(claim, mac, job, token, origin, host))
    }

    fn job_response(
        &self,
        claim: super::rooms::Claim,
        mac: String,
        job: crate::protocol::Job,
        token: String,
        origin: Option<SocketAddr>,
        host: Option<String>,
    ) -> JobResponse {
        let id = claim.deployment;
        let announce = self.config.announce_url();
        let trackers = if self.config.tracker == "builtin" {
            vec![format!("{announce}?token={token}")]
        } else {
            vec![announce]
        };
        let name = &job.image;
        JobResponse {
            host,
            slot: claim.group_slot,
            mac,
            manifest_url: format!("/images/{name}/manifest.json"),
            torrent_url: format!("/images/{name}/image.torrent"),
            trackers,
            deployment: id,
            start_fraction: crate::protocol::spread(claim.slot),
            origin,
            disk: claim.disk,
            token,
            job,
            capture: None,
        }
    }

    /// The names of the images the store can serve.
    pub async fn servable(&self) -> BTreeSet<String> {
        self.images
            .read()
            .await
            .iter()
            .filter(|(_, s)| !matches!(s.state, SeedState::Failed(_)))
            .map(|(n, _)| n.clone())
            .chain(
                self.captures
                    .origins()
                    .into_iter()
                    .map(|o| o.image.manifest.name),
            )
            .collect()
    }

    /// Records a host's report, if its token is the one issued to that host
    /// for that deployment and the host has a task there; reports without
    /// are counted and refused.
    pub async fn report(&self, r: StatusReport) -> Result<StatusAck, ReportError> {
        let mac = normalize_mac(&r.mac).map_err(|e| ReportError::BadRequest(e.to_string()))?;
        let vouched = self
            .keys
            .check(&r.token)
            .is_some_and(|t| t.mac == mac && Some(t.deployment) == r.deployment);
        let refuse = |why: String| {
            self.counters
                .reports_refused
                .fetch_add(1, Ordering::Relaxed);
            ReportError::Refused(why)
        };
        let Some(deployment) = r.deployment.filter(|_| vouched) else {
            return Err(refuse(format!(
                "status report for {mac} refused: it carries no token issued to this host \
                 for deployment {} (fetch the job again)",
                r.deployment.map_or("none".into(), |d| d.to_string())
            )));
        };
        let r = bounded(r, mac).map_err(|e| ReportError::BadRequest(format!("{e:#}")))?;
        let image_failed = match &r.image {
            Some(name) => match self.images.read().await.get(name).map(|s| &s.state) {
                Some(SeedState::Failed(e)) => {
                    Some(format!("the server stopped serving image {name}: {e}"))
                }
                _ => None,
            },
            None => None,
        };
        let quiet = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&r.mac)
            .is_some_and(|l| l.only_progress(&r));
        let outcome = if quiet {
            self.rooms.standing(deployment, &r.mac)
        } else {
            self.rooms.update(&Update {
                deployment,
                mac: &r.mac,
                state: r.state,
                progress: &r.progress,
                error: r.error.as_deref(),
                disk: r.disk.as_ref(),
                log: &r.log,
            })
        };
        let outcome =
            outcome.map_err(|e| ReportError::Internal(format!("recording the report: {e:#}")))?;
        let Some(outcome) = outcome else {
            return Err(refuse(format!(
                "status report for {} refused: it has no task in deployment {deployment}",
                r.mac
            )));
        };
        let capture = self.captures.standing(deployment, &r.mac);
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut r = r;
        r.log = Vec::new();
        live.insert(
            r.mac.clone(),
            Live {
                report: r,
                seen: Instant::now(),
                dirty: quiet,
            },
        );
        Ok(StatusAck {
            deployment_done: outcome.deployment_done,
            stopped: outcome.stopped,
            image_failed: image_failed.or(capture.failed),
            captured: capture.stored,
        })
    }

    /// Writes the progress kept in memory since the last call, in one
    /// transaction.
    pub fn save_progress(&self) {
        let batch: Vec<(u64, String, crate::protocol::Progress)> = {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.values_mut()
                .filter_map(|l| {
                    let dirty = std::mem::take(&mut l.dirty);
                    let d = l.report.deployment.filter(|_| dirty)?;
                    Some((d, l.report.mac.clone(), l.report.progress))
                })
                .collect()
        };
        if let Err(e) = self.rooms.save_progress(&batch) {
            tracing::warn!("saving the hosts' progress: {e:#}");
        }
    }

    /// Forgets live progress of hosts silent for [`HOST_TTL`].
    pub fn prune_hosts(&self) {
        let now = Instant::now();
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, h| now.duration_since(h.seen) < HOST_TTL);
    }

    /// Starts a deployment now (and wakes its hosts if asked); with `at`,
    /// stores a schedule instead.
    pub async fn start(&self, req: &StartRequest) -> Result<StartResponse> {
        if let Some(at) = &req.at {
            let sched = Schedule::parse_now(at, req.every.as_deref()).with_context(|| {
                format!(
                    "--at {at:?}{}",
                    req.every
                        .as_ref()
                        .map_or(String::new(), |e| format!(" --every {e:?}"))
                )
            })?;
            let id = self.rooms.add_schedule(req, &sched.to_string())?;
            let next = sched.next_fire(jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1));
            tracing::info!(
                "schedule {id}: group {} at {sched}",
                req.group.as_deref().unwrap_or("")
            );
            return Ok(StartResponse {
                deployment: None,
                schedule: Some(id),
                next: next.map(|t| t.to_string()),
                woken: 0,
            });
        }
        if req.every.is_some() {
            bail!("--every needs --at: the time of day it starts");
        }
        let images = self.servable().await;
        let id = self.rooms.start(req, |i| images.contains(i))?;
        let woken = if req.wake {
            self.wake(req.group.as_deref(), &req.hosts)?
        } else {
            0
        };
        Ok(StartResponse {
            deployment: Some(id),
            schedule: None,
            next: None,
            woken,
        })
    }

    /// Sends Wake-on-LAN to a group's (or the listed) hosts, each to its
    /// group's subnet broadcast, paced, in the background; returns how many
    /// hosts.
    pub fn wake(&self, group: Option<&str>, hosts: &[String]) -> Result<usize> {
        let targets: Vec<wol::Target> = self
            .rooms
            .wake_targets(group, hosts)?
            .into_iter()
            .filter_map(|(mac, to)| {
                Some(wol::Target {
                    mac: mac_bytes(&mac).ok()?,
                    to: to
                        .and_then(|w| w.parse().ok())
                        .unwrap_or(self.config.wol_broadcast),
                })
            })
            .collect();
        let n = targets.len();
        let pace = wol::Pace {
            rate: self.config.wol_rate,
            repeat: self.config.wol_repeat,
            ..Default::default()
        };
        tokio::spawn(async move {
            match wol::wake_staggered(&targets, pace, std::future::pending()).await {
                Ok(r) => {
                    for d in &r.destinations {
                        tracing::info!("Wake-on-LAN: {} packets to {}", d.sent, d.to);
                        if let Some(f) = d.failures.first() {
                            tracing::warn!(
                                "Wake-on-LAN to {}: {} packets failed, e.g. for {}: {}",
                                d.to,
                                d.failures.len(),
                                f.mac,
                                f.error
                            );
                        }
                    }
                }
                Err(e) => tracing::warn!("Wake-on-LAN: {e:#}"),
            }
        });
        Ok(n)
    }

    /// Starts what the schedules say is due; called every few seconds.
    pub async fn run_schedules(&self) {
        let schedules = match self.rooms.schedules() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("reading the schedules: {e:#}");
                return;
            }
        };
        let now = jiff::Timestamp::now();
        for s in schedules {
            let sched: Schedule = match s.spec.parse() {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!("schedule {}: {e:#}; it is ended", s.id);
                    let _ = self.rooms.end_schedule(s.id);
                    continue;
                }
            };
            let handled = s
                .handled_ms
                .and_then(|m| jiff::Timestamp::from_millisecond(m).ok());
            let group = s.request.group.as_deref().unwrap_or("");
            let r = match sched.due(handled, now) {
                Due::Wait(_) => Ok(()),
                Due::Done => self.rooms.end_schedule(s.id),
                Due::Missed(t) => {
                    tracing::warn!(
                        "schedule {}: the start of group {group} at {t} was missed (the server was down); skipped",
                        s.id
                    );
                    self.rooms.schedule_handled(s.id, t.as_millisecond())
                }
                Due::Fire(t) => {
                    // Handled first: a start that fails is not retried in a loop.
                    let r = self.rooms.schedule_handled(s.id, t.as_millisecond());
                    match self.start(&s.request).await {
                        Ok(a) => tracing::info!(
                            "schedule {}: started deployment {} of group {group}{}",
                            s.id,
                            a.deployment.unwrap_or(0),
                            if s.request.wake {
                                format!(", waking {} hosts", a.woken)
                            } else {
                                String::new()
                            }
                        ),
                        Err(e) => {
                            tracing::error!("schedule {}: starting group {group}: {e:#}", s.id)
                        }
                    }
                    r
                }
            };
            if let Err(e) = r {
                tracing::error!("schedule {}: {e:#}", s.id);
            }
        }
    }

    /// The schedules still to fire, with their next start.
    pub fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        let now = jiff::Timestamp::now();
        Ok(self
            .rooms
            .schedules()?
            .into_iter()
            .map(|s| {
                let sched: Option<Schedule> = s.spec.parse().ok();
                let handled = s
                    .handled_ms
                    .and_then(|m| jiff::Timestamp::from_millisecond(m).ok());
                let next = sched.as_ref().and_then(|x| match x.due(handled, now) {
                    Due::Wait(t) | Due::Fire(t) => Some(t.to_string()),
                    Due::Missed(t) => x.next_fire(t).map(|t| t.to_string()),
                    Due::Done => None,
                });
                ScheduleInfo {
                    id: s.id,
                    group: s.request.group.unwrap_or_default(),
                    image: s.request.image,
                    spec: s.spec,
                    wake: s.request.wake,
                    expect: s.request.expect,
                    last_fired_ms: s.handled_ms,
                    next,
                    enabled: true,
                }
            })
            .collect())
    }

    /// Starts a deployment of every host that asks (`serve --deploy`).
    pub async fn start_open(&self, expect: Option<usize>) -> Result<u64> {
        let req = StartRequest {
            open: true,
            expect,
            ..Default::default()
        };
        // After a restart, the open deployment goes on.
        if let Some(id) = self.rooms.running_open()? {
            tracing::info!("deployment {id} continues");
            return Ok(id);
        }
        // At start the store is still being scanned: a missing image shows
        // when a host asks for its job.
        self.rooms.start(&req, |_| true)
    }

    /// The live fields of a task's host, if it reported since the server
    /// started.
    fn with_live(&self, mut t: TaskInfo, live: &HashMap<String, Live>, now: Instant) -> TaskInfo {
        if let Some(l) = live.get(&t.mac)
            && l.report.deployment == Some(t.deployment)
        {
            let p = &l.report.progress;
            t.state = Some(l.report.state);
            t.done_bytes = p.done_bytes;
            t.total_bytes = p.total_bytes;
            t.uploaded_bytes = p.uploaded_bytes;
            t.origin_bytes = p.origin_bytes;
            t.down_bps = p.down_bps;
            t.up_bps = p.up_bps;
            t.peers = p.peers;
            if l.report.error.is_some() {
                t.error = l.report.error.clone();
            }
            t.seen_s_ago = Some(now.duration_since(l.seen).as_secs_f64());
        }
        t
    }

    /// One deployment (default: the newest running one, else the newest)
    /// with `limit` of its hosts from `offset`.
    pub async fn view(&self, id: Option<u64>, offset: usize, limit: usize) -> DeploymentView {
        let running = self.rooms.running().unwrap_or_default();
        let id = id.or(running.first().copied()).or_else(|| {
            self.rooms
                .deployments(1, None, None)
                .ok()
                .and_then(|v| v.first().map(|d| d.id))
        });
        let d: Option<DeploymentInfo> = id.and_then(|i| self.rooms.deployment(i).ok().flatten());
        let tasks = match &d {
            Some(d) => self.rooms.tasks(d.id, offset, limit).unwrap_or_default(),
            None => Vec::new(),
        };
        let now = Instant::now();
        let wall = super::db::now_ms();
        let secs = |ms: i64| ms as f64 / 1000.0;
        let hosts = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            tasks
                .into_iter()
                .map(|t| {
                    let t = self.with_live(t, &live, now);
                    let started = d.as_ref().map_or(0, |d| d.started_ms);
                    let left = t.total_bytes.saturating_sub(t.done_bytes) as f64;
                    HostView {
                        finished_after_s: (t.task == crate::protocol::admin::TaskState::Done)
                            .then(|| t.ended_ms.map(|e| secs(e - started)))
                            .flatten(),
                        eta_s: (t.state == Some(AgentState::Downloading) && t.down_bps > 0.0)
                            .then(|| left / t.down_bps),
                        task: t,
                    }
                })
                .collect()
        };
        use crate::protocol::admin::DeploymentState as S;
        DeploymentView {
            id: d.as_ref().map(|d| d.id),
            group: d.as_ref().and_then(|d| d.group.clone()),
            running: d.as_ref().is_some_and(|d| d.state == S::Running),
            done: d.as_ref().is_some_and(|d| d.state == S::Done),
            elapsed_s: d
                .as_ref()
                .map_or(0.0, |d| secs(d.ended_ms.unwrap_or(wall) - d.started_ms)),
            done_after_s: d
                .as_ref()
                .filter(|d| d.state == S::Done)
                .and_then(|d| d.ended_ms.map(|e| secs(e - d.started_ms))),
            expect: d.as_ref().and_then(|d| d.expect),
            tasks: d.as_ref().map(|d| d.tasks.clone()).unwrap_or_default(),
            running_ids: running,
            hosts,
            images: self.image_views().await,
        }
    }

    /// The room view of deployment `id`: a tile per PC, the errors shared.
    pub fn room(&self, id: u64) -> Result<Option<RoomView>> {
        let Some(deployment) = self.rooms.deployment(id)? else {
            return Ok(None);
        };
        let tasks = self.live_tasks(self.rooms.tasks(id, 0, super::MAX_HOSTS)?);
        let mut errors = Vec::new();
        let tiles = tasks
            .into_iter()
            .map(|t| {
                let state = TileState::of(t.task, t.state);
                let per_mille = match (t.total_bytes, state) {
                    (0, TileState::Done | TileState::Seeding) => 1000,
                    (0, _) => 0,
                    (total, _) => (t.done_bytes.min(total) * 1000 / total) as u16,
                };
                let rate = if state == TileState::Downloading {
                    t.down_bps
                } else {
                    t.up_bps
                };
                let error = t.error.map(|e| error_index(&mut errors, e));
                Tile(t.mac, t.name, state, per_mille, rate as u64, error)
            })
            .collect();
        Ok(Some(RoomView {
            deployment,
            now_ms: super::db::now_ms(),
            errors,
            tiles,
        }))
    }

    /// Every host's live fields merged into `tasks`.
    pub fn live_tasks(&self, tasks: Vec<TaskInfo>) -> Vec<TaskInfo> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        tasks
            .into_iter()
            .map(|t| self.with_live(t, &live, now))
            .collect()
    }

    pub async fn image_views(&self) -> Vec<ImageView> {
        let images = self.images.read().await;
        images
            .values()
            .map(|s| {
                let m = &s.image.manifest;
                let p = s.torrent.as_ref().map(|t| t.progress()).unwrap_or_default();
                let c = crate::util::parse_hex20(&m.payload.info_hash)
                    .map(|h| self.tracker.counts(&h))
                    .unwrap_or_default();
                let error = match &s.state {
                    SeedState::Failed(e) => Some(e.clone()),
                    _ => None,
                };
                ImageView {
                    name: s.name.clone(),
                    info_hash: m.payload.info_hash.clone(),
                    payload_bytes: m.payload.size,
                    disk_bytes: m.disk.size,
                    source: s.source.display().to_string(),
                    state: s.state.name().into(),
                    error,
                    uploaded_bytes: p.uploaded_bytes,
                    up_bps: p.up_bps,
                    peers: p.peers,
                    seeders: c.complete,
                    leechers: c.incomplete,
                }
            })
            .collect()
    }
}

#[derive(Debug)]
pub enum JobError {
    BadRequest(String),
    NoJob(String),
    NotStarted(String),
    /// The job's image failed on the server.
    Unavailable(String),
}

#[derive(Debug)]
pub enum ReportError {
    BadRequest(String),
    /// No valid token for the host, or no task.
    Refused(String),
    Internal(String),
}

/// A report with its MAC normalized, its token dropped (the deployment
/// view is public), and its strings bounded: free text is cut, and disk
/// identities, which must match exactly, are refused when too long.
fn bounded(mut r: StatusReport, mac: String) -> Result<StatusReport> {
    r.mac = mac;
    r.token = String::new();
    r.image = r.image.map(|s| clip(s, MAX_TEXT));
    r.target = r.target.map(|s| clip(s, MAX_TEXT));
    r.error = r.error.map(|s| clip(s, MAX_ERROR));
    let skip = r.log.len().saturating_sub(StatusReport::MAX_LOG_LINES);
    r.log = r
        .log
        .into_iter()
        .skip(skip)
        .map(|l| clip(l, StatusReport::MAX_LOG_LINE))
        .collect();
    if let Some(d) = &r.disk {
        for (what, v) in [
            ("wwn", &d.wwn),
            ("serial", &d.serial),
            ("by_path", &d.by_path),
        ] {
            if v.as_ref().is_some_and(|v| v.len() > MAX_TEXT) {
                bail!("disk.{what}: over {MAX_TEXT} bytes");
            }
        }
    }
    Ok(r)
}

/// Distinct errors a room view carries at most, each cut to about
/// [`ROOM_ERROR`] bytes: a room failing in 1000 ways still polls small.
const ROOM_ERRORS: usize = 32;
const ROOM_ERROR: usize = 160;

/// Where error `e` is in a room view's `errors`, added if new.
fn error_index(errors: &mut Vec<String>, e: String) -> usize {
    let e = clip(e, ROOM_ERROR);
    if let Some(i) = errors.iter().position(|x| *x == e) {
        return i;
    }
    if errors.len() < ROOM_ERRORS {
        errors.push(e);
        return errors.len() - 1;
    }
    if errors.len() == ROOM_ERRORS {
        errors.push("another error: click the PC to see it".into());
    }
    ROOM_ERRORS
}

/// `s` cut to about `max` bytes, saying how much was cut.
fn clip(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = s.len() - cut;
    s.truncate(cut);
    s.push_str(&format!("… ({dropped} bytes cut)"));
    s
}

/// The name `claim`'s host is given, checked for `image` (at most 15
/// characters when it holds Windows' NTFS): a name that does not fit
/// means no job, with the reason.
fn host_name(
    claim: &super::rooms::Claim,
    mac: &str,
    image: &crate::image::manifest::Manifest,
) -> Result<Option<String>, JobError> {
    match &claim.name {
        Ok(Some(n)) => {
            let windows = image
                .regions
                .iter()
                .any(|r| r.fs == Some(crate::image::fs::FsKind::Ntfs));
            crate::protocol::hostname::check(n, windows).map_err(|e| {
                JobError::NoJob(format!(
                    "{mac}: cannot name it for image {:?}: {e:#}",
                    image.name
                ))
            })?;
            Ok(Some(n.clone()))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(JobError::NoJob(format!("{mac}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_view_keeps_few_errors() {
        let mut errors = Vec::new();
        assert_eq!(error_index(&mut errors, "disk too small".into()), 0);
        assert_eq!(error_index(&mut errors, "x".repeat(1000)), 1);
        assert_eq!(error_index(&mut errors, "disk too small".into()), 0);
        assert!(errors[1].len() < ROOM_ERROR + 30, "{}", errors[1]);
        for i in 0..100 {
            assert!(error_index(&mut errors, format!("error {i}")) <= ROOM_ERRORS);
        }
        assert_eq!(errors.len(), ROOM_ERRORS + 1);
        assert!(errors[ROOM_ERRORS].starts_with("another error"));
    }

    #[test]
    fn clip_cuts_on_a_char_boundary_and_says_so() {
        assert_eq!(clip("short".into(), 10), "short");
        let s = clip("é".repeat(100), 11);
        assert_eq!(s, format!("{}… (190 bytes cut)", "é".repeat(5)));
    }
}

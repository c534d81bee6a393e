//! The server's state, owned in one place: images, hosts, the deployment.
//! HTTP handlers only translate to and from these methods.
//!
//! What outsiders can make it hold is bounded: a host is recorded only from
//! a report carrying its token (see `token.rs`), at most [`MAX_HOSTS`] of
//! them, those silent for [`HOST_TTL`] outside the running deployment are
//! forgotten, and a report's strings are cut to a few hundred bytes.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use tokio::sync::RwLock;

use super::MAX_HOSTS;
use super::config::{ServerConfig, mac_bytes, normalize_mac};
use super::metrics::Counters;
use super::store::{SeedState, StoredImage};
use super::token::HostKeys;
use super::tracker::Tracker;
use crate::protocol::{AgentState, DiskIdentity, Job, JobResponse, StatusAck, StatusReport};
use crate::swarm::SwarmSession;
use crate::swarm::Trust;

/// A host silent this long, outside the running deployment, is forgotten.
const HOST_TTL: Duration = Duration::from_secs(600);
/// Bounds on a report's strings, in bytes: a host's row in the deployment
/// view stays under 2 KB.
const MAX_TEXT: usize = 128;
const MAX_ERROR: usize = 512;

pub struct ServerState {
    pub config: ServerConfig,
    pub images: RwLock<BTreeMap<String, StoredImage>>,
    pub tracker: Tracker,
    pub seeds: SwarmSession,
    pub keys: HostKeys,
    /// The hosts the server vouches for (token holders the tracker heard
    /// from), shared with its seeds: strangers get one origin slot.
    pub trust: Arc<Trust>,
    pub counters: Arc<Counters>,
    /// Jobs by MAC: from the config, changed by the admin API.
    jobs: RwLock<BTreeMap<String, Job>>,
    names: BTreeMap<String, String>,
    hosts: RwLock<BTreeMap<String, Host>>,
    deployment: RwLock<Option<Deployment>>,
}

struct Host {
    report: StatusReport,
    seen: Instant,
    finished_after: Option<Duration>,
}

struct Deployment {
    id: u64,
    /// Hosts that fetched a job or reported, at most [`MAX_HOSTS`].
    seats: HashMap<String, Seat>,
    started: Instant,
    expect: Option<usize>,
    stopped: bool,
    done_after: Option<Duration>,
}

struct Seat {
    /// The order in which the host first asked for its job.
    slot: u32,
    /// The disk it said it writes: a retry is held to it.
    disk: Option<DiskIdentity>,
}

impl Deployment {
    /// The host's seat, taken now if there is room.
    fn seat(&mut self, mac: &str) -> Option<&mut Seat> {
        if !self.seats.contains_key(mac) && self.seats.len() >= MAX_HOSTS {
            return None;
        }
        let slot = self.seats.len() as u32;
        Some(
            self.seats
                .entry(mac.to_string())
                .or_insert(Seat { slot, disk: None }),
        )
    }
}
/// What the dashboard and `admin status` show.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeploymentView {
    pub id: Option<u64>,
    pub running: bool,
    pub done: bool,
    pub elapsed_s: f64,
    pub done_after_s: Option<f64>,
    pub expect: Option<usize>,
    pub hosts: Vec<HostView>,
    pub images: Vec<ImageView>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HostView {
    pub name: Option<String>,
    pub seen_s_ago: f64,
    pub finished_after_s: Option<f64>,
    pub eta_s: Option<f64>,
    #[serde(flatten)]
    pub report: StatusReport,
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
    pub fn new(config: ServerConfig, seeds: SwarmSession, counters: Arc<Counters>) -> Self {
        let mut jobs = BTreeMap::new();
        let mut names = BTreeMap::new();
        for h in &config.hosts {
            if let Some(j) = &h.job {
                jobs.insert(h.mac.clone(), j.clone());
            }
            if let Some(n) = &h.name {
                names.insert(h.mac.clone(), n.clone());
            }
        }
        Self {
            tracker: Tracker::new(Duration::from_secs(config.announce_interval)),
            keys: HostKeys::load_or_create(&config.images),
            trust: Arc::default(),
            counters,
            config,
            images: RwLock::default(),
            seeds,
            jobs: RwLock::new(jobs),
            names,
            hosts: RwLock::default(),
            deployment: RwLock::default(),
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

    /// The job of `mac`, for a request that reached the server at `local`.
    /// Only a host with a job takes a seat in the deployment.
    pub async fn job_for(&self, mac: &str, local: IpAddr) -> Result<JobResponse, JobError> {
        let mac = normalize_mac(mac).map_err(|e| JobError::BadRequest(e.to_string()))?;
        let job = self
            .jobs
            .read()
            .await
            .get(&mac)
            .cloned()
            .or_else(|| self.config.default_job.clone());
        let Some(job) = job else {
            return Err(JobError::NoJob(format!(
                "no job for {mac}, and no default job"
            )));
        };
        if !matches!(&*self.deployment.read().await, Some(d) if !d.stopped) {
            return Err(JobError::NotStarted("no deployment is running".into()));
        }
        let seeded = match self.images.read().await.get(&job.image) {
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
        let (id, slot, disk) = match &mut *self.deployment.write().await {
            Some(d) if !d.stopped => {
                let id = d.id;
                match d.seat(&mac) {
                    Some(seat) => (id, seat.slot, seat.disk.clone()),
                    // No room: a slot from the MAC, with nothing stored.
                    None => {
                        let b = mac_bytes(&mac).unwrap_or_default();
                        (id, u32::from_be_bytes([b[2], b[3], b[4], b[5]]), None)
                    }
                }
            }
            _ => return Err(JobError::NotStarted("no deployment is running".into())),
        };
        let token = self.keys.issue(id, &mac);
        let announce = self.config.announce_url();
        let trackers = if self.config.tracker == "builtin" {
            vec![format!("{announce}?token={token}")]
        } else {
            vec![announce]
        };
        let name = &job.image;
        Ok(JobResponse {
            host: self.names.get(&mac).cloned(),
            mac,
            manifest_url: format!("/images/{name}/manifest.json"),
            torrent_url: format!("/images/{name}/image.torrent"),
            trackers,
            deployment: id,
            start_fraction: crate::protocol::spread(slot),
            origin: if seeded { self.origin_for(local) } else { None },
            disk,
            token,
            job,
        })
    }

    pub async fn set_job(&self, mac: &str, job: Job) -> Result<()> {
        let mac = normalize_mac(mac)?;
        if !self.images.read().await.contains_key(&job.image) {
            bail!("image {:?} is not in the store", job.image);
        }
        self.jobs.write().await.insert(mac, job);
        Ok(())
    }

    /// Records a host's report, if its token is the one issued to that host
    /// for that deployment; reports without are counted and refused.
    pub async fn report(&self, r: StatusReport) -> Result<StatusAck, ReportError> {
        let mac = normalize_mac(&r.mac).map_err(|e| ReportError::BadRequest(e.to_string()))?;
        let vouched = self
            .keys
            .check(&r.token)
            .is_some_and(|t| t.mac == mac && Some(t.deployment) == r.deployment);
        if !vouched {
            self.counters
                .reports_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(ReportError::Refused(format!(
                "status report for {mac} refused: it carries no token issued to this host \
                 for deployment {} (fetch the job again)",
                r.deployment.map_or("none".into(), |d| d.to_string())
            )));
        }
        let r = bounded(r, mac).map_err(|e| ReportError::BadRequest(format!("{e:#}")))?;
        let mac = r.mac.clone();
        let image_failed = match &r.image {
            Some(name) => match self.images.read().await.get(name).map(|s| &s.state) {
                Some(SeedState::Failed(e)) => {
                    Some(format!("the server stopped serving image {name}: {e}"))
                }
                _ => None,
            },
            None => None,
        };
        let now = Instant::now();
        let mut dep = self.deployment.write().await;
        let mut hosts = self.hosts.write().await;
        let mut current = dep.as_mut().filter(|d| r.deployment == Some(d.id));
        if let (Some(d), Some(disk)) = (current.as_deref_mut(), &r.disk)
            && let Some(seat) = d.seat(&mac)
            && seat.disk.is_none()
        {
            seat.disk = Some(disk.clone());
        }
        let was_finished = hosts
            .get(&mac)
            .filter(|h| h.report.deployment == r.deployment)
            .and_then(|h| h.finished_after);
        let finished_after = match (r.state.finished(), was_finished, &current) {
            (false, ..) => None,
            (true, Some(t), _) => Some(t),
            (true, None, Some(d)) => Some(now - d.started),
            (true, None, None) => None,
        };
        if !hosts.contains_key(&mac)
            && hosts.len() >= MAX_HOSTS
            && let Some(old) = hosts
                .iter()
                .min_by_key(|(_, h)| h.seen)
                .map(|(m, _)| m.clone())
        {
            hosts.remove(&old);
        }
        let deployment = r.deployment;
        hosts.insert(
            mac,
            Host {
                report: r,
                seen: now,
                finished_after,
            },
        );
        // Only a host that just finished can complete the deployment.
        if let Some(d) = current
            && finished_after.is_some()
            && was_finished.is_none()
            && d.done_after.is_none()
        {
            let members = hosts.values().filter(|h| h.report.deployment == deployment);
            let (n, finished) = members.fold((0, 0), |(n, f), h| {
                (n + 1, f + usize::from(h.finished_after.is_some()))
            });
            let all = match d.expect {
                Some(want) => finished >= want,
                None => finished == n,
            };
            if all {
                d.done_after = Some(now - d.started);
                tracing::info!(
                    "deployment {} done: {finished} hosts in {:.1?}",
                    d.id,
                    now - d.started
                );
            }
        }
        Ok(match &*dep {
            Some(d) => StatusAck {
                deployment_done: d.done_after.is_some(),
                stopped: d.stopped,
                image_failed,
            },
            None => StatusAck {
                image_failed,
                ..Default::default()
            },
        })
    }

    /// Forgets hosts silent for [`HOST_TTL`] that are not in the current
    /// deployment.
    pub async fn prune_hosts(&self) {
        let current = self.deployment.read().await.as_ref().map(|d| d.id);
        let now = Instant::now();
        self.hosts.write().await.retain(|_, h| {
            h.report.deployment == current && current.is_some()
                || now.duration_since(h.seen) < HOST_TTL
        });
    }

    pub async fn start_deployment(&self, expect: Option<usize>) -> u64 {
        let mut dep = self.deployment.write().await;
        let id = dep.as_ref().map_or(1, |d| d.id + 1);
        *dep = Some(Deployment {
            id,
            seats: HashMap::new(),
            started: Instant::now(),
            expect,
            stopped: false,
            done_after: None,
        });
        tracing::info!(
            "deployment {id} started{}",
            expect.map_or(String::new(), |n| format!(", expecting {n} hosts"))
        );
        id
    }

    pub async fn stop_deployment(&self) -> Result<u64> {
        match self.deployment.write().await.as_mut() {
            Some(d) if !d.stopped => {
                d.stopped = true;
                Ok(d.id)
            }
            _ => bail!("no deployment is running"),
        }
    }

    pub async fn view(&self) -> DeploymentView {
        let now = Instant::now();
        let dep = self.deployment.read().await;
        let hosts = self.hosts.read().await;
        let secs = |d: Duration| d.as_secs_f64();
        let hosts: Vec<HostView> = hosts
            .iter()
            .map(|(mac, h)| {
                let r = &h.report;
                let p = &r.progress;
                let left = p.total_bytes.saturating_sub(p.done_bytes) as f64;
                HostView {
                    name: self.names.get(mac).cloned(),
                    seen_s_ago: secs(now - h.seen),
                    finished_after_s: h.finished_after.map(secs),
                    eta_s: (r.state == AgentState::Downloading && p.down_bps > 0.0)
                        .then(|| left / p.down_bps),
                    report: r.clone(),
                }
            })
            .collect();
        DeploymentView {
            id: dep.as_ref().map(|d| d.id),
            running: dep
                .as_ref()
                .is_some_and(|d| !d.stopped && d.done_after.is_none()),
            done: dep.as_ref().is_some_and(|d| d.done_after.is_some()),
            elapsed_s: dep
                .as_ref()
                .map_or(0.0, |d| secs(d.done_after.unwrap_or(now - d.started))),
            done_after_s: dep.as_ref().and_then(|d| d.done_after.map(secs)),
            expect: dep.as_ref().and_then(|d| d.expect),
            hosts,
            images: self.image_views().await,
        }
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
                let (state, error) = match &s.state {
                    SeedState::External => ("external", None),
                    SeedState::Verifying => ("verifying", None),
                    SeedState::Seeding => ("seeding", None),
                    SeedState::Failed(e) => ("failed", Some(e.clone())),
                };
                ImageView {
                    name: s.name.clone(),
                    info_hash: m.payload.info_hash.clone(),
                    payload_bytes: m.payload.size,
                    disk_bytes: m.disk.size,
                    source: s.source.display().to_string(),
                    state: state.into(),
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
    /// No valid token for the host.
    Refused(String),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_on_a_char_boundary_and_says_so() {
        assert_eq!(clip("short".into(), 10), "short");
        let s = clip("é".repeat(100), 11);
        assert_eq!(s, format!("{}… (190 bytes cut)", "é".repeat(5)));
    }
}

//! The server's state, owned in one place: images, hosts, the deployment.
//! HTTP handlers only translate to and from these methods.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;
use tokio::sync::RwLock;

use super::config::{ServerConfig, normalize_mac};
use super::metrics::Counters;
use super::store::{SeedState, StoredImage};
use super::tracker::Tracker;
use crate::protocol::{AgentState, Job, JobResponse, StatusAck, StatusReport};
use crate::swarm::SwarmSession;

pub struct ServerState {
    pub config: ServerConfig,
    pub images: RwLock<BTreeMap<String, StoredImage>>,
    pub tracker: Tracker,
    pub seeds: SwarmSession,
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
    /// Hosts in the order they first asked for their job.
    slots: BTreeMap<String, u32>,
    started: Instant,
    expect: Option<usize>,
    stopped: bool,
    done_after: Option<Duration>,
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

    pub async fn job_for(&self, mac: &str) -> Result<JobResponse, JobError> {
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
        let (id, slot) = match &mut *self.deployment.write().await {
            Some(d) if !d.stopped => {
                let next = d.slots.len() as u32;
                (d.id, *d.slots.entry(mac.clone()).or_insert(next))
            }
            _ => return Err(JobError::NotStarted("no deployment is running".into())),
        };
        if !self.images.read().await.contains_key(&job.image) {
            return Err(JobError::NoJob(format!(
                "the job's image {:?} is not in the store",
                job.image
            )));
        }
        let name = &job.image;
        Ok(JobResponse {
            host: self.names.get(&mac).cloned(),
            mac,
            manifest_url: format!("/images/{name}/manifest.json"),
            torrent_url: format!("/images/{name}/image.torrent"),
            trackers: vec![self.config.announce_url()],
            deployment: id,
            start_fraction: crate::protocol::spread(slot),
            job,
            token: String::new(),
            origin: None,
            disk: None,
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

    pub async fn report(&self, r: StatusReport) -> Result<StatusAck> {
        let mac = normalize_mac(&r.mac)?;
        let now = Instant::now();
        let mut dep = self.deployment.write().await;
        let mut hosts = self.hosts.write().await;
        let finished_after = match (&*dep, hosts.get(&mac)) {
            (_, Some(h)) if h.finished_after.is_some() && r.state.finished() => h.finished_after,
            (Some(d), _) if r.state.finished() && r.deployment == Some(d.id) => {
                Some(now - d.started)
            }
            _ => None,
        };
        hosts.insert(
            mac.clone(),
            Host {
                report: StatusReport {
                    mac: r.mac.clone(),
                    ..r
                },
                seen: now,
                finished_after,
            },
        );
        let Some(d) = dep.as_mut() else {
            return Ok(StatusAck::default());
        };
        let members: Vec<&Host> = hosts
            .values()
            .filter(|h| h.report.deployment == Some(d.id))
            .collect();
        let finished = members
            .iter()
            .filter(|h| h.finished_after.is_some())
            .count();
        let all = match d.expect {
            Some(n) => finished >= n,
            None => finished > 0 && finished == members.len(),
        };
        if all && d.done_after.is_none() {
            d.done_after = Some(now - d.started);
            tracing::info!(
                "deployment {} done: {finished} hosts in {:.1?}",
                d.id,
                now - d.started
            );
        }
        Ok(StatusAck {
            deployment_done: d.done_after.is_some(),
            stopped: d.stopped,
            image_failed: None,
        })
    }

    pub async fn start_deployment(&self, expect: Option<usize>) -> u64 {
        let mut dep = self.deployment.write().await;
        let id = dep.as_ref().map_or(1, |d| d.id + 1);
        *dep = Some(Deployment {
            id,
            slots: BTreeMap::new(),
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
}

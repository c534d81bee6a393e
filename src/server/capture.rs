//! Capture tasks on the server's side: the admin marks a host "capture into
//! image NAME"; its job carries a single-use capture token; the agent
//! uploads the manifest and torrent of its own disk with it, and seeds the
//! payload from that disk. The server then either pulls the payload into
//! its store through the swarm (every piece hashed, written under a hidden
//! temporary directory renamed into place once whole: an interrupted
//! capture leaves no image), or, with `store = false`, serves the image
//! with the master as its origin for as long as the master's task runs.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Result, bail};
use tracing::{info, warn};

use super::state::ServerState;
use crate::image::Image;
use crate::image::capture::PAYLOAD_FILE;
use crate::protocol::admin::{CaptureRequest, StartResponse};
use crate::protocol::{CaptureSpec, CaptureTicket, CaptureUpload, Job};
use crate::swarm::SwarmConfig;

/// Longest image name taken.
pub const MAX_NAME: usize = 64;

/// A capture task, by deployment and MAC.
type Key = (u64, String);

#[derive(Default)]
pub struct Captures {
    tasks: Mutex<HashMap<Key, Phase>>,
    /// Images served from their master (`store = false`), by name.
    origins: Mutex<BTreeMap<String, OriginImage>>,
}

#[derive(Debug, Clone)]
enum Phase {
    /// A token was issued with this nonce, to a job request from this
    /// address, and not used yet.
    Issued(String, IpAddr),
    Pulling,
    Stored,
    Origin,
    Failed(String),
}

/// An image whose only seed is the master PC it was captured from.
#[derive(Clone)]
pub struct OriginImage {
    pub image: Image,
    pub origin: SocketAddrV4,
    pub deployment: u64,
    pub mac: String,
}

/// What a capture task's master is told with each report.
#[derive(Debug, Default)]
pub struct Standing {
    pub stored: bool,
    pub failed: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Image names are store directory names: short, plain, not hidden.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        bail!(
            "image name {name:?}: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-', \
             not starting with '.'"
        );
    }
    Ok(())
}

impl Captures {
    /// The images served from their master, for the tracker and the jobs.
    pub fn origins(&self) -> Vec<OriginImage> {
        lock(&self.origins).values().cloned().collect()
    }

    pub fn origin(&self, name: &str) -> Option<OriginImage> {
        lock(&self.origins).get(name).cloned()
    }

    /// Forgets the origin images of tasks no longer running.
    pub fn retain_origins(&self, running: impl Fn(u64, &str) -> bool) {
        lock(&self.origins).retain(|name, o| {
            let keep = running(o.deployment, &o.mac);
            if !keep {
                info!("image {name}: its master {} stopped seeding it", o.mac);
            }
            keep
        });
    }

    pub fn standing(&self, deployment: u64, mac: &str) -> Standing {
        match lock(&self.tasks).get(&(deployment, mac.to_string())) {
            Some(Phase::Stored) => Standing {
                stored: true,
                failed: None,
            },
            Some(Phase::Failed(e)) => Standing {
                stored: false,
                failed: Some(e.clone()),
            },
            _ => Standing::default(),
        }
    }

    fn set(&self, key: &Key, p: Phase) {
        lock(&self.tasks).insert(key.clone(), p);
    }
}

impl ServerState {
    /// Marks `mac` to capture its disk into `req.image` at its next network
    /// boot.
    pub async fn start_capture(&self, mac: &str, req: &CaptureRequest) -> Result<StartResponse> {
        check_name(&req.image)?;
        if !req.replace {
            self.refuse_clobber(&req.image).await?;
        }
        let spec = CaptureSpec {
            store: req.store,
            replace: req.replace,
        };
        let id = self.rooms.start_capture(mac, &req.image, spec)?;
        Ok(StartResponse {
            deployment: Some(id),
            schedule: None,
            next: None,
            woken: 0,
        })
    }

    async fn refuse_clobber(&self, name: &str) -> Result<()> {
        if self.images.read().await.contains_key(name)
            || self.config.images.join(name).exists()
            || self.captures.origin(name).is_some()
        {
            bail!("image {name:?} exists already: choose another name, or replace it");
        }
        Ok(())
    }

    /// The ticket handed out with a capture task's job: a new token each
    /// time (a reboot fetches the job again), which voids the last one.
    /// Only an upload from `remote`, which asked for the job, may use it.
    pub fn issue_capture(
        &self,
        deployment: u64,
        mac: &str,
        remote: IpAddr,
    ) -> Result<CaptureTicket> {
        let (token, nonce) = self.keys.issue_capture(deployment, mac)?;
        self.captures
            .set(&(deployment, mac.to_string()), Phase::Issued(nonce, remote));
        Ok(CaptureTicket {
            token,
            upload_url: format!("{}/capture", crate::protocol::API),
        })
    }

    /// Takes a master's upload: checks the token (and uses it up), the
    /// manifest, torrent and name, then starts pulling the payload (or
    /// serves the image from the master).
    pub async fn capture_upload(
        self: &Arc<Self>,
        u: CaptureUpload,
        remote: IpAddr,
    ) -> Result<String, UploadError> {
        let refused = |why: &str| UploadError::Refused(format!("capture upload refused: {why}"));
        let Some((host, nonce)) = self.keys.check_capture(&u.token) else {
            return Err(refused("the capture token is not one this server issued"));
        };
        let mac = crate::server::config::normalize_mac(&u.mac)
            .map_err(|e| UploadError::Bad(e.to_string()))?;
        if host.mac != mac {
            return Err(refused("the capture token was issued to another host"));
        }
        let key = (host.deployment, mac.clone());
        {
            let mut tasks = lock(&self.captures.tasks);
            match tasks.get(&key) {
                Some(Phase::Issued(n, ip)) if n == &nonce && *ip == remote => {}
                Some(Phase::Issued(n, _)) if n == &nonce => {
                    return Err(refused(
                        "the upload comes from another address than the job's request",
                    ));
                }
                Some(Phase::Issued(..)) => {
                    return Err(refused("a newer capture token was issued to this host"));
                }
                _ => return Err(refused("the capture token was used already")),
            }
            // Used up now, whatever the upload holds.
            tasks.insert(key.clone(), Phase::Failed("the upload was refused".into()));
        }
        let spec = self
            .capture_task(host.deployment, &mac)
            .map_err(UploadError::Refused)?;
        let r = self.take_upload(&u, remote, &key, &spec).await;
        if let Err(e) = &r {
            let msg = match e {
                UploadError::Bad(m) | UploadError::Refused(m) => m.clone(),
            };
            self.captures.set(&key, Phase::Failed(msg));
        }
        r
    }

    /// The image name and spec of `mac`'s running capture task.
    fn capture_task(&self, deployment: u64, mac: &str) -> Result<(String, CaptureSpec), String> {
        let claim = self
            .rooms
            .running_job(deployment, mac)
            .map_err(|e| format!("the server's database: {e:#}"))?;
        match claim {
            Some(Job {
                image,
                capture: Some(spec),
                ..
            }) => Ok((image, spec)),
            _ => Err(format!(
                "{mac} has no running capture task in deployment {deployment}"
            )),
        }
    }

    async fn take_upload(
        self: &Arc<Self>,
        u: &CaptureUpload,
        remote: IpAddr,
        key: &Key,
        (name, spec): &(String, CaptureSpec),
    ) -> Result<String, UploadError> {
        let bad = |e: anyhow::Error| UploadError::Bad(format!("{e:#}"));
        let torrent = super::token::unhex(&u.torrent)
            .filter(|_| u.torrent.len().is_multiple_of(2))
            .ok_or_else(|| UploadError::Bad("the torrent is not hex".into()))?;
        let image = Image::from_bytes(
            &format!("{}'s upload", key.1),
            u.manifest.as_bytes(),
            torrent,
        )
        .map_err(bad)?;
        let m = &image.manifest;
        if m.name != *name {
            return Err(UploadError::Bad(format!(
                "the manifest names image {:?}, the task {name:?}",
                m.name
            )));
        }
        if m.payload.file != PAYLOAD_FILE || m.payload.stored {
            return Err(UploadError::Bad(format!(
                "the manifest's payload is {:?}{}: a capture's is {PAYLOAD_FILE:?}, not stored",
                m.payload.file,
                if m.payload.stored { ", stored" } else { "" }
            )));
        }
        if !spec.replace {
            self.refuse_clobber(name)
                .await
                .map_err(|e| UploadError::Refused(format!("{e:#}")))?;
        }
        let IpAddr::V4(ip) = remote else {
            return Err(UploadError::Bad("IPv6 masters are not supported".into()));
        };
        if u.port == 0 {
            return Err(UploadError::Bad("port 0 is not a BitTorrent port".into()));
        }
        let master = SocketAddrV4::new(ip, u.port);
        info!(
            "capture {name} from {} at {master}: {} payload bytes, info hash {}",
            key.1, m.payload.size, m.payload.info_hash
        );
        if !spec.store {
            lock(&self.captures.origins).insert(
                name.clone(),
                OriginImage {
                    image,
                    origin: master,
                    deployment: key.0,
                    mac: key.1.clone(),
                },
            );
            self.captures.set(key, Phase::Origin);
            return Ok(format!(
                "image {name} is served from {master} while it seeds"
            ));
        }
        let free = nix::sys::statvfs::statvfs(&self.config.images)
            .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
            .map_err(|e| UploadError::Refused(format!("the store: {e}")))?;
        if free < m.payload.size {
            return Err(UploadError::Refused(format!(
                "the store has {} free, the image needs {}",
                crate::util::human_bytes(free),
                crate::util::human_bytes(m.payload.size)
            )));
        }
        self.captures.set(key, Phase::Pulling);
        let state = self.clone();
        let (key, replace) = (key.clone(), spec.replace);
        tokio::spawn(async move {
            let t0 = Instant::now();
            let r = state.pull(&key, image, master.into(), replace).await;
            let name = r.as_ref().map_or_else(|_| String::new(), Clone::clone);
            let error = r.err().map(|e| format!("pulling the capture: {e:#}"));
            match &error {
                None => {
                    info!(
                        "capture {name} from {} stored in {:.1} s",
                        key.1,
                        t0.elapsed().as_secs_f64()
                    );
                    state.captures.set(&key, Phase::Stored);
                }
                Some(e) => {
                    warn!("{}: {e}", key.1);
                    state.captures.set(&key, Phase::Failed(e.clone()));
                }
            }
            if let Err(e) = state.rooms.finish_capture(key.0, &key.1, error.as_deref()) {
                warn!("recording the end of {}'s capture: {e:#}", key.1);
            }
        });
        Ok(format!("the server pulls image {name} from {master}"))
    }

    /// Downloads the payload from the master into a hidden directory of the
    /// store, then renames it into place (see [`super::pull`]). Returns the
    /// image name.
    async fn pull(
        &self,
        key: &Key,
        image: Image,
        master: SocketAddr,
        replace: bool,
    ) -> Result<String> {
        let p = super::pull::Pull {
            torrent: &image.torrent,
            known: Some(&image),
            swarm: SwarmConfig {
                peers: vec![master],
                origin: Some(master),
                disable_trackers: true,
                ..Default::default()
            },
            replace,
        };
        let stopped = || match self.rooms.standing(key.0, &key.1)? {
            Some(o) if !o.stopped => Ok(()),
            _ => bail!("the capture was stopped by the admin"),
        };
        super::pull::pull(&self.config.images, p, stopped)
            .await
            .map(|img| img.manifest.name)
    }
}

#[derive(Debug)]
pub enum UploadError {
    /// Malformed: 400.
    Bad(String),
    /// Not authorised, or not now: 403.
    Refused(String),
}

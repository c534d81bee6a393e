//! `server.toml`. Every key has a default, so `serve` runs with no file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::protocol::Job;
use crate::protocol::admin::ExitType;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// HTTP: API, tracker, dashboard, boot files; the same UDP port serves
    /// TFTP to GRUB (the Secure Boot chain, `grub.rs`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL agents reach this server at (default: from `listen`).
    pub public_url: Option<String>,
    /// Image store: one directory per image.
    #[serde(default = "default_images")]
    pub images: PathBuf,
    /// The server's own state, mode 0700: the database (hosts, groups,
    /// deployments, history) and the admin token it made.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// What a network boot does for a host with nothing to do, unless its
    /// group or itself says otherwise: "auto", "sanboot" or "exit".
    #[serde(default)]
    pub exit: ExitType,
    /// Bearer token for the admin API. Without it, the token in
    /// `admin_token_file`, else in `<state_dir>/admin-token` (made on first
    /// start); see `admin_token.rs`.
    pub admin_token: Option<String>,
    /// A file holding the admin token (made on first start if missing).
    pub admin_token_file: Option<PathBuf>,
    /// "builtin", or an external HTTP announce URL (e.g. opentracker's).
    #[serde(default = "default_tracker")]
    pub tracker: String,
    /// Announce interval handed to peers, in seconds.
    #[serde(default = "default_interval")]
    pub announce_interval: u64,
    /// Locality (docs/rooms.md): the tracker lists to each host the origin
    /// and the hosts of its own room only, so that each room draws each
    /// piece over its uplink about once. false: every host learns of every
    /// other, as a topology-blind swarm.
    #[serde(default = "default_true")]
    pub locality: bool,
    /// A host in no group is in the room of its address's subnet of this
    /// prefix length (0 to 32; 0 puts every such host in one room).
    #[serde(default = "default_room_prefix")]
    pub room_prefix: u8,
    /// BitTorrent port of the server's seeds.
    #[serde(default = "default_seed_listen")]
    pub seed_listen: SocketAddr,
    /// Seed the store's images; false leaves seeding to other clients.
    #[serde(default = "default_true")]
    pub seed: bool,
    /// Cap on the seeds' total upload, bytes per second ("100M"); none by default.
    pub seed_upload_limit: Option<crate::protocol::Size>,
    /// Where Wake-on-LAN magic packets go for hosts whose group names no
    /// subnet broadcast of its own.
    #[serde(default = "default_wol")]
    pub wol_broadcast: SocketAddr,
    /// Magic packets per second at most (all subnets together): a room
    /// powering on at once can trip a breaker.
    #[serde(default = "default_wol_rate")]
    pub wol_rate: u32,
    /// Packets per host (Wake-on-LAN is lossy), a second apart.
    #[serde(default = "default_wol_repeat")]
    pub wol_repeat: u32,
    /// Images seeded straight from a raw device instead of a store file.
    #[serde(default, rename = "device_image")]
    pub device_images: Vec<DeviceImage>,
    /// The job of registered hosts with none of their own or of their
    /// group. It never makes an unknown host join: see `open` deployments.
    pub default_job: Option<Job>,
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostConfig>,
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// Network boot: the directory holding `vmlinuz` and `initramfs.img`
    /// (made by initramfs/build), served at /boot/ for the iPXE script.
    #[serde(default = "default_boot_dir")]
    pub boot_dir: PathBuf,
    /// Extra kernel command-line arguments for network-booted PCs,
    /// e.g. "blockswarm.on_fail=shell".
    #[serde(default)]
    pub boot_args: String,
    /// Open HTTP connections at most, and from one address; past either,
    /// a new connection is closed at once. A PC holds two or three.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceImage {
    /// Image directory (manifest and torrent, made by `capture` without --store).
    pub dir: PathBuf,
    /// The captured disk or partition to read blocks from.
    pub from: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub mac: String,
    pub name: Option<String>,
    pub job: Option<Job>,
    pub exit: Option<ExitType>,
}

/// A room: its members, their job, how they boot when idle, where their
/// Wake-on-LAN packets go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    #[serde(default)]
    pub members: Vec<String>,
    pub job: Option<Job>,
    pub exit: Option<ExitType>,
    /// The subnet's directed broadcast, e.g. "10.0.12.255:9".
    pub wake: Option<SocketAddr>,
    /// Names the members that have no `[[host]] name`: "lab12-{slot:02}",
    /// with {slot} (1-based position in `members`), {mac}, {group}.
    pub hostname: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_room_prefix() -> u8 {
    24
}
fn default_listen() -> SocketAddr {
    "0.0.0.0:8080".parse().expect("valid")
}
fn default_images() -> PathBuf {
    "images".into()
}
fn default_state_dir() -> PathBuf {
    "state".into()
}
fn default_tracker() -> String {
    "builtin".into()
}
fn default_interval() -> u64 {
    5
}
fn default_seed_listen() -> SocketAddr {
    "0.0.0.0:6881".parse().expect("valid")
}
fn default_boot_dir() -> PathBuf {
    "boot".into()
}
fn default_max_connections() -> usize {
    2048
}
fn default_max_connections_per_ip() -> usize {
    64
}
fn default_wol_rate() -> u32 {
    20
}
fn default_wol_repeat() -> u32 {
    3
}
fn default_wol() -> SocketAddr {
    "255.255.255.255:9".parse().expect("valid")
}

impl Default for ServerConfig {
    fn default() -> Self {
        toml::from_str("").expect("every key has a default")
    }
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut c: ServerConfig = toml::from_str(text)?;
        for h in &mut c.hosts {
            h.mac = normalize_mac(&h.mac)
                .with_context(|| format!("host {:?}", h.name.as_deref().unwrap_or(&h.mac)))?;
        }
        let mut macs: Vec<&str> = c.hosts.iter().map(|h| h.mac.as_str()).collect();
        macs.sort();
        if let Some(w) = macs.windows(2).find(|w| w[0] == w[1]) {
            bail!("host {} is listed twice", w[0]);
        }
        let mut names = std::collections::BTreeSet::new();
        let mut members = std::collections::BTreeMap::new();
        for g in &mut c.groups {
            if g.name.is_empty() || g.name.len() > 64 {
                bail!("group {:?}: a name is 1 to 64 characters", g.name);
            }
            if !names.insert(g.name.clone()) {
                bail!("group {:?} is listed twice", g.name);
            }
            if let Some(t) = &g.hostname {
                crate::protocol::hostname::check_template(t, &g.name)
                    .with_context(|| format!("group {:?}: hostname", g.name))?;
            }
            for m in &mut g.members {
                *m = normalize_mac(m).with_context(|| format!("group {:?}", g.name))?;
                if let Some(other) = members.insert(m.clone(), g.name.clone()) {
                    bail!("host {m} is a member of both {other:?} and {:?}", g.name);
                }
            }
        }
        if let Some(j) = &c.default_job {
            j.check().context("default_job")?;
        }
        for h in &c.hosts {
            if let Some(j) = &h.job {
                j.check().with_context(|| format!("host {}: job", h.mac))?;
            }
        }
        for g in &c.groups {
            if let Some(j) = &g.job {
                j.check()
                    .with_context(|| format!("group {:?}: job", g.name))?;
            }
        }
        if c.tracker.starts_with("udp://") {
            bail!(
                "tracker: {:?}: UDP trackers (BEP 15) are not supported; use \"builtin\", \
                 or the tracker's http:// announce URL (opentracker answers over HTTP too)",
                c.tracker
            );
        }
        if c.tracker != "builtin" && !c.tracker.starts_with("http://") {
            bail!(
                "tracker: {:?} is neither \"builtin\" nor an http:// announce URL",
                c.tracker
            );
        }
        if c.max_connections == 0 || c.max_connections_per_ip == 0 {
            bail!("max_connections, max_connections_per_ip: must be at least 1");
        }
        super::wol::Pace {
            rate: c.wol_rate,
            repeat: c.wol_repeat,
            ..Default::default()
        }
        .check()
        .context("wol_rate, wol_repeat")?;
        if c.room_prefix > 32 {
            bail!(
                "room_prefix: {} is not a prefix length (0 to 32)",
                c.room_prefix
            );
        }
        if c.announce_interval == 0 {
            bail!("announce_interval: must be at least 1 second");
        }
        let jobs = c.default_job.iter().map(|j| ("default_job".to_string(), j));
        let jobs = jobs
            .chain(
                c.hosts
                    .iter()
                    .filter_map(|h| Some((format!("host {}", h.mac), h.job.as_ref()?))),
            )
            .chain(
                c.groups
                    .iter()
                    .filter_map(|g| Some((format!("group {:?}", g.name), g.job.as_ref()?))),
            );
        for (what, j) in jobs {
            if j.capture.is_some() {
                bail!(
                    "{what}: job.capture is set by `blockswarm admin capture`, not in the config"
                );
            }
        }
        Ok(c)
    }

    /// The URL agents and torrents use for this server.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None if self.listen.ip().is_unspecified() => {
                format!("http://127.0.0.1:{}", self.listen.port())
            }
            None => format!("http://{}", self.listen),
        }
    }

    pub fn announce_url(&self) -> String {
        if self.tracker == "builtin" {
            format!("{}/announce", self.public_url())
        } else {
            self.tracker.clone()
        }
    }
}

/// "52:54:00:AB:cd:01", "52-54-00-ab-cd-01" → "52:54:00:ab:cd:01".
pub fn normalize_mac(s: &str) -> Result<String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || u8::from_str_radix(p, 16).is_err())
    {
        bail!("{s:?} is not a MAC address like 52:54:00:12:34:56");
    }
    Ok(parts.join(":").to_ascii_lowercase())
}

pub fn mac_bytes(mac: &str) -> Result<[u8; 6]> {
    let m = normalize_mac(mac)?;
    let mut out = [0u8; 6];
    for (i, p) in m.split(':').enumerate() {
        out[i] = u8::from_str_radix(p, 16)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_has_defaults() {
        let c = ServerConfig::parse("").unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.announce_url(), "http://127.0.0.1:8080/announce");
        assert!(c.default_job.is_none());
        assert!(c.locality);
        assert_eq!(c.room_prefix, 24);
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../docs/server.example.toml");
        let c = ServerConfig::parse(text).unwrap();
        assert!(!c.hosts.is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let e = format!(
            "{:#}",
            ServerConfig::parse("listen = \"nowhere\"").unwrap_err()
        );
        assert!(e.contains("listen"), "{e}");
        let e = format!("{:#}", ServerConfig::parse("colour = 1").unwrap_err());
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = format!(
            "{:#}",
            ServerConfig::parse("[[host]]\nmac = \"zz\"").unwrap_err()
        );
        assert!(e.contains("not a MAC"), "{e}");
        let e = format!("{:#}", ServerConfig::parse("[[host]]\nmac = \"52:54:00:00:00:01\"\n[host.job]\nimage = \"a\"\nverify = \"twice\"").unwrap_err());
        assert!(e.contains("verify"), "{e}");
        let e = format!("{:#}", ServerConfig::parse("room_prefix = 33").unwrap_err());
        assert!(e.contains("room_prefix"), "{e}");
    }

    #[test]
    fn a_config_job_cannot_be_a_capture() {
        for cfg in [
            "[default_job]\nimage = \"a\"\n[default_job.capture]\nstore = true",
            "[[group]]\nname = \"r\"\n[group.job]\nimage = \"a\"\ncapture = { store = false }",
        ] {
            let e = format!("{:#}", ServerConfig::parse(cfg).unwrap_err());
            assert!(
                e.contains("job.capture is set by `blockswarm admin capture`"),
                "{e}"
            );
        }
    }

    #[test]
    fn udp_trackers_are_refused() {
        let e = format!(
            "{:#}",
            ServerConfig::parse("tracker = \"udp://10.0.0.1:6969/announce\"").unwrap_err()
        );
        assert!(
            e.contains("UDP trackers (BEP 15) are not supported") && e.contains("http://"),
            "{e}"
        );
        let c = ServerConfig::parse("tracker = \"http://10.0.0.1:6969/announce\"").unwrap();
        assert_eq!(c.announce_url(), "http://10.0.0.1:6969/announce");
    }
}

//! What the server and the agent say to each other: the job, and the
//! agent's status reports. Shared by both sides, and by the config file.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod admin;
pub mod hostname;

pub const API: &str = "/api/v1";

/// What one host is to do. Per host in the server config, or the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Image name in the server's store.
    pub image: String,
    #[serde(default)]
    pub target: TargetSelector,
    #[serde(default)]
    pub on_done: PostAction,
    /// "deployment" (until the room is done, capped by `seed_cap_minutes`),
    /// "off", or minutes such as "30m".
    #[serde(default)]
    pub keep_seeding: SeedPolicy,
    #[serde(default = "default_seed_cap")]
    pub seed_cap_minutes: u64,
    #[serde(default)]
    pub verify: Verify,
    /// Hash what the disk already holds and fetch only what differs.
    #[serde(default)]
    pub incremental: bool,
    /// Scripts from the server's `hooks/` folder, run in this order after
    /// the image is written, with the target's partitions mounted.
    #[serde(default)]
    pub hooks: Vec<String>,
    /// Seconds each hook may run before it is killed.
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout: u64,
    /// UEFI: the loader the firmware boot entry starts, as a path on the
    /// image's ESP (`\EFI\debian\shimx64.efi`). Default: the first of
    /// a distribution's shim, its GRUB, Windows' boot manager, and the
    /// fallback `\EFI\BOOT\BOOTX64.EFI` found there.
    #[serde(default)]
    pub efi_loader: Option<String>,
    /// UEFI: the boot entry's label (default "blockswarm"). Earlier entries
    /// with this label, or for the same ESP, are replaced.
    #[serde(default)]
    pub efi_label: Option<String>,
    /// After imaging, grow a partition to the end of a larger disk: "none"
    /// (the default) or "last" (the last partition and its file system).
    #[serde(default)]
    pub grow: Grow,
    /// Set by `admin capture` alone (a config's job with it is refused):
    /// this host is the master, whose disk becomes image `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureSpec>,
}

/// The folder of the server's state directory it serves hooks from.
pub const HOOKS_DIR: &str = "hooks";
/// The largest hook served or fetched.
pub const MAX_HOOK_BYTES: u64 = 1 << 20;
/// Hooks one job may name.
pub const MAX_HOOKS: usize = 16;

/// A hook's name: a plain file name of 1 to 64 letters, digits, '.', '_'
/// and '-', not starting with '.'.
pub fn check_hook_name(name: &str) -> anyhow::Result<()> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        anyhow::bail!(
            "hook name {name:?}: 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        );
    }
    Ok(())
}

/// A capture task: the host maps its own disk, read-only, and seeds it to
/// the server (see `agent::capture`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSpec {
    /// The server pulls the payload into its store; else the image is
    /// served from the master itself, as the origin, while it seeds.
    pub store: bool,
    /// Whether the image may replace a stored image of the same name.
    #[serde(default)]
    pub replace: bool,
}

/// What a capture task's agent gets besides its job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureTicket {
    /// The single-use credential of the upload (see `server::token`).
    pub token: String,
    /// Where the manifest and torrent go, relative to the server URL.
    pub upload_url: String,
}

/// The agent's upload of a captured image: no payload, which the server
/// pulls from the agent's swarm port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureUpload {
    pub mac: String,
    pub token: String,
    /// The agent's BitTorrent port, at the address the upload came from.
    pub port: u16,
    /// The manifest, as JSON text.
    pub manifest: String,
    /// The torrent, in hex.
    pub torrent: String,
}

impl CaptureUpload {
    /// The largest upload body taken, in bytes (a manifest with a million
    /// extents and a torrent of a 2 TB payload fit).
    pub const MAX_BODY: usize = 64 << 20;
}

fn default_seed_cap() -> u64 {
    120
}
fn default_hook_timeout() -> u64 {
    300
}

impl Job {
    /// The longest `hook_timeout` accepted, in seconds.
    pub const MAX_HOOK_TIMEOUT: u64 = 6 * 3600;

    /// Checks what serde cannot: the hooks' names, count and time limit.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.hooks.len() > MAX_HOOKS {
            anyhow::bail!("hooks: {} named; at most {MAX_HOOKS}", self.hooks.len());
        }
        for h in &self.hooks {
            check_hook_name(h)?;
        }
        if !(1..=Self::MAX_HOOK_TIMEOUT).contains(&self.hook_timeout) {
            anyhow::bail!(
                "hook_timeout: {} s; 1 to {} s",
                self.hook_timeout,
                Self::MAX_HOOK_TIMEOUT
            );
        }
        Ok(())
    }

    /// The job that writes `image` with every other setting at its default.
    pub fn for_image(image: &str) -> Self {
        Self {
            image: image.to_string(),
            target: TargetSelector::default(),
            on_done: PostAction::default(),
            keep_seeding: SeedPolicy::default(),
            seed_cap_minutes: default_seed_cap(),
            verify: Verify::default(),
            incremental: false,
            hooks: Vec::new(),
            hook_timeout: default_hook_timeout(),
            efi_loader: None,
            efi_label: None,
            grow: Grow::default(),
            capture: None,
        }
    }
}

/// Which disk to write. With no criteria: the largest internal,
/// non-removable disk. Every criterion given must match, and exactly one
/// disk must be left, or the agent refuses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSelector {
    /// A /dev/disk/by-path name, e.g. "pci-0000:00:1f.2-ata-1".
    pub by_path: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    /// Substring of ID_MODEL.
    pub model: Option<String>,
    pub min_size: Option<Size>,
    pub max_size: Option<Size>,
    /// Allow USB disks (refused by default).
    #[serde(default)]
    pub allow_usb: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostAction {
    #[default]
    Reboot,
    Poweroff,
    Shell,
    Nothing,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// Every piece is checked against its SHA-1 as it arrives.
    #[default]
    Pieces,
    /// And afterwards the whole image is read back from the disk and checked.
    Readback,
}

/// Which partition, if any, the agent grows to the end of a larger disk
/// once the image is written (an enum: other policies may come).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grow {
    /// Every partition keeps the image's size.
    #[default]
    None,
    /// The last partition runs to the end of the disk, and its file system
    /// with it (ext2/3/4, NTFS).
    Last,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SeedPolicy {
    #[default]
    Deployment,
    Off,
    Minutes(u64),
}

impl FromStr for SeedPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "deployment" => Ok(Self::Deployment),
            "off" => Ok(Self::Off),
            _ => s
                .strip_suffix('m')
                .and_then(|n| n.parse().ok())
                .map(Self::Minutes)
                .ok_or_else(|| {
                    format!("{s:?} is not \"deployment\", \"off\" or minutes like \"30m\"")
                }),
        }
    }
}

impl fmt::Display for SeedPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Deployment => f.write_str("deployment"),
            Self::Off => f.write_str("off"),
            Self::Minutes(n) => write!(f, "{n}m"),
        }
    }
}

/// A byte count written as "500G", "1.5T", "512M" or plain bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (num, mult) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let m = match c.to_ascii_uppercase() {
                    'K' => 1u64 << 10,
                    'M' => 1 << 20,
                    'G' => 1 << 30,
                    'T' => 1 << 40,
                    _ => return Err(format!("{s:?}: unknown unit {c:?} (use K, M, G or T)")),
                };
                (&t[..i], m)
            }
            _ => (t, 1),
        };
        let v: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like \"500G\""))?;
        if !(0.0..1e19).contains(&(v * mult as f64)) {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(Size((v * mult as f64) as u64))
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    S(String),
                    N(u64),
                }
                match Raw::deserialize(d)? {
                    Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
                    Raw::N(n) => n.to_string().parse().map_err(serde::de::Error::custom),
                }
            }
        }
    };
}
string_serde!(SeedPolicy);
string_serde!(Size);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl DiskIdentity {
    /// Longest identity string kept (udev's serials and paths are far shorter).
    pub const MAX_FIELD: usize = 96;

    /// Whether both name the same disk: the same size, and the same WWN where
    /// both have one, else the same serial, else the same udev path. Two
    /// disks that share none of these are never taken for one another.
    pub fn same_disk(&self, other: &DiskIdentity) -> bool {
        fn both<'a>(a: &'a Option<String>, b: &'a Option<String>) -> Option<(&'a str, &'a str)> {
            Some((a.as_deref()?, b.as_deref()?))
        }
        self.size == other.size
            && match (
                both(&self.wwn, &other.wwn),
                both(&self.serial, &other.serial),
                both(&self.by_path, &other.by_path),
            ) {
                (Some((a, b)), _, _) | (None, Some((a, b)), _) | (None, None, Some((a, b))) => {
                    a == b
                }
                (None, None, None) => false,
            }
    }

    /// Whether every string is within [`Self::MAX_FIELD`] bytes.
    pub fn is_bounded(&self) -> bool {
        [&self.wwn, &self.serial, &self.by_path]
            .iter()
            .all(|f| f.as_ref().is_none_or(|s| s.len() <= Self::MAX_FIELD))
    }
}

impl fmt::Display for DiskIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.size)?;
        for (k, v) in [
            ("wwn", &self.wwn),
            ("serial", &self.serial),
            ("path", &self.by_path),
        ] {
            if let Some(v) = v {
                write!(f, ", {k} {v}")?;
            }
        }
        Ok(())
    }
}

/// The server's answer to "what is my job?".
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobResponse {
    pub mac: String,
    pub host: Option<String>,
    pub job: Job,
    /// Relative to the server URL.
    pub manifest_url: String,
    pub torrent_url: String,
    /// Announce URLs the agent should use.
    pub trackers: Vec<String>,
    pub deployment: u64,
    /// Where in the payload this host starts fetching, as a fraction of it.
    /// The server spreads the room's hosts over the payload, so that they
    /// hold different pieces early and trade them instead of all asking the
    /// seed for the same ones.
    #[serde(default)]
    pub start_fraction: f64,
    /// This host's credential for this deployment: its status reports and
    /// tracker announces carry it, and the server ignores those without.
    #[serde(default)]
    pub token: String,
    /// The server's own seed, as this host dials it: the only peer the
    /// agent treats as the origin.
    #[serde(default)]
    pub origin: Option<std::net::SocketAddr>,
    /// The disk this host said it was writing in this deployment: a retry
    /// writes to this disk or to none.
    #[serde(default)]
    pub disk: Option<DiskIdentity>,
    /// This host's 1-based position in its group (0: not in a group); the
    /// `{slot}` of the group's host name template. The name itself is
    /// `host`, rendered and checked by the server.
    #[serde(default)]
    pub slot: u32,
    /// Set for a capture task (`job.capture`): the upload's credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureTicket>,
}

/// What identifies a target disk across reboots: its WWN or serial where the
/// disk has them, else its udev path, and always its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    pub size: u64,
    #[serde(default)]
    pub wwn: Option<String>,
    #[serde(default)]
    pub serial: Option<String>,
    #[serde(default)]
    pub by_path: Option<String>,
}

/// The `k`-th term of the base-2 van der Corput sequence: 0, 1/2, 1/4, 3/4,
/// 1/8 … — any first `n` terms are spread evenly over [0, 1).
pub fn spread(k: u32) -> f64 {
    f64::from(k.reverse_bits()) / 2f64.powi(32)
}

/// Where an agent is in its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    WaitingForJob,
    SelectingDisk,
    Checking,
    Downloading,
    Verifying,
    Finishing,
    Seeding,
    /// Imaged and no longer seeding: growing, naming, running hooks, adding
    /// the boot entry (src/agent/fit).
    Fitting,
    Done,
    Failed,
}

impl AgentState {
    /// Every state, in the order of a job.
    pub const ALL: [Self; 10] = [
        Self::WaitingForJob,
        Self::SelectingDisk,
        Self::Checking,
        Self::Downloading,
        Self::Verifying,
        Self::Finishing,
        Self::Seeding,
        Self::Fitting,
        Self::Done,
        Self::Failed,
    ];

    /// Its name, as in reports and views.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WaitingForJob => "waiting_for_job",
            Self::SelectingDisk => "selecting_disk",
            Self::Checking => "checking",
            Self::Downloading => "downloading",
            Self::Verifying => "verifying",
            Self::Finishing => "finishing",
            Self::Seeding => "seeding",
            Self::Fitting => "fitting",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    /// Imaged: every piece passed its hash and the disk was read back. The
    /// room's swarm needs nothing more from this host.
    pub fn finished(self) -> bool {
        matches!(self, Self::Seeding | Self::Fitting | Self::Done)
    }
}

/// Sent by the agent about once a second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub mac: String,
    pub state: AgentState,
    pub deployment: Option<u64>,
    pub image: Option<String>,
    pub target: Option<String>,
    #[serde(flatten)]
    pub progress: Progress,
    pub error: Option<String>,
    /// Seconds since the agent started its job.
    pub elapsed_s: f64,
    /// The token of the job this report is about ([`JobResponse::token`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// The disk this host writes, once chosen.
    #[serde(default)]
    pub disk: Option<DiskIdentity>,
    /// The agent's log lines since its last report, at most
    /// [`StatusReport::MAX_LOG_LINES`] of [`StatusReport::MAX_LOG_LINE`] bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
}

impl StatusReport {
    pub const MAX_LOG_LINES: usize = 64;
    pub const MAX_LOG_LINE: usize = 300;
}

/// A torrent's progress, as the agent reports it and the console shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Payload bytes verified.
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub uploaded_bytes: u64,
    pub down_bps: f64,
    pub up_bps: f64,
    pub peers: usize,
    #[serde(default)]
    pub finished: bool,
    /// Of `done_bytes`, what came from the server's seed.
    #[serde(default)]
    pub origin_bytes: u64,
}

/// The server's answer to a status report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusAck {
    /// Every host of the deployment has its image.
    pub deployment_done: bool,
    /// The deployment was stopped by the admin.
    pub stopped: bool,
    /// The server can no longer serve this host's image (its source changed
    /// or failed): the agent stops, writing nothing more.
    #[serde(default)]
    pub image_failed: Option<String>,
    /// A capture task's image is whole in the server's store: the master
    /// may stop seeding.
    #[serde(default)]
    pub captured: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_state_names_are_serde_s() {
        for s in AgentState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn spread_is_even() {
        assert_eq!(
            (0..4).map(spread).collect::<Vec<_>>(),
            [0.0, 0.5, 0.25, 0.75]
        );
        let mut v: Vec<f64> = (0..32).map(spread).collect();
        v.sort_by(f64::total_cmp);
        assert!(
            v.windows(2)
                .all(|w| (w[1] - w[0] - 1.0 / 32.0).abs() < 1e-9)
        );
    }

    #[test]
    fn disks_are_told_apart_by_the_strongest_name_both_have() {
        let d = |wwn: Option<&str>, serial: Option<&str>, path: Option<&str>| DiskIdentity {
            size: 100,
            wwn: wwn.map(Into::into),
            serial: serial.map(Into::into),
            by_path: path.map(Into::into),
        };
        let a = d(Some("w1"), Some("s1"), Some("p1"));
        assert!(a.same_disk(&a.clone()));
        // A disk moved to another port is the same disk.
        assert!(a.same_disk(&d(Some("w1"), Some("s1"), Some("p2"))));
        assert!(!a.same_disk(&d(Some("w2"), Some("s1"), Some("p1"))));
        assert!(a.same_disk(&d(None, Some("s1"), None)));
        assert!(!a.same_disk(&d(None, Some("s2"), Some("p1"))));
        // Without serial or WWN, the path decides.
        assert!(d(None, None, Some("p1")).same_disk(&d(None, None, Some("p1"))));
        assert!(!d(None, None, Some("p1")).same_disk(&d(None, None, Some("p2"))));
        assert!(!d(None, None, None).same_disk(&d(None, None, None)));
        let mut bigger = a.clone();
        bigger.size += 1;
        assert!(!a.same_disk(&bigger));
    }

    #[test]
    fn job_defaults_and_values() {
        let j: Job =
            toml::from_str("image = \"lab\"\n[target]\nmin_size = \"1.5G\"\nmodel = \"Samsung\"")
                .unwrap();
        assert_eq!(j.on_done, PostAction::Reboot);
        assert_eq!(j.keep_seeding, SeedPolicy::Deployment);
        assert_eq!(j.target.min_size, Some(Size(3 << 29)));
        let j: Job = toml::from_str("image = \"lab\"\nkeep_seeding = \"30m\"\nverify = \"readback\"\non_done = \"poweroff\"").unwrap();
        assert_eq!(j.keep_seeding, SeedPolicy::Minutes(30));
        assert_eq!(j.verify, Verify::Readback);
    }

    #[test]
    fn bad_jobs_name_the_key() {
        let e = toml::from_str::<Job>("image = \"lab\"\nreboot = true")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `reboot`"), "{e}");
        let e = toml::from_str::<Job>("image = \"lab\"\n[target]\nmin_size = \"12Q\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_size") && e.contains("unknown unit"), "{e}");
        let e = toml::from_str::<Job>("image = \"lab\"\nkeep_seeding = \"forever\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keep_seeding") && e.contains("forever"), "{e}");
        let e = toml::from_str::<Job>("image = \"lab\"\non_done = \"explode\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("on_done"), "{e}");
        let e = toml::from_str::<Job>("[target]\nserial = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `image`"), "{e}");
    }
}

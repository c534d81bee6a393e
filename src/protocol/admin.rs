//! What the admin API takes and answers: shared by the server, the admin
//! command and the dashboard (as JSON).

use serde::{Deserialize, Serialize};

use super::{AgentState, DiskIdentity, Job};

/// What a network boot does when the host has no task: FOG's "exit types".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitType {
    /// UEFI: `exit 1` (a failure: the firmware tries its next boot entry);
    /// BIOS: `sanboot` of the first hard disk.
    #[default]
    Auto,
    /// `sanboot --no-describe --drive 0x80`: the first BIOS disk.
    Sanboot,
    /// Hand back to the firmware (`exit 1`), which boots its next entry.
    Exit,
}

/// A one-shot task: one host, one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting for the host to network-boot.
    Pending,
    /// The host fetched its job.
    Running,
    /// The image is on the disk, checked.
    Done,
    /// Failed as many times as it may; an admin must ask again.
    Failed,
    /// The deployment was stopped first.
    Cancelled,
}

impl TaskState {
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Running,
        Self::Done,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Still wants the host to boot the agent.
    pub fn open(self) -> bool {
        matches!(self, Self::Pending | Self::Running)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentState {
    Running,
    /// Every task ended (or `expect` hosts are done).
    Done,
    Stopped,
}

impl DeploymentState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Done => "done",
            Self::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Running, Self::Done, Self::Stopped]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// `POST /api/v1/admin/deployments`: image a group (or listed hosts) now or
/// on a schedule.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The room; none: every registered host with a job.
    #[serde(default)]
    pub group: Option<String>,
    /// Just these hosts (MACs), instead of a group.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Write this image instead of each host's job's image.
    #[serde(default)]
    pub image: Option<String>,
    /// Hosts to wait for before the deployment counts as done.
    #[serde(default)]
    pub expect: Option<usize>,
    /// Unknown hosts that network-boot join (and the group) instead of
    /// booting their disk.
    #[serde(default)]
    pub open: bool,
    /// Send Wake-on-LAN to the members first.
    #[serde(default)]
    pub wake: bool,
    /// Attempts per host before its task fails (default 3).
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Start later: "02:00", "2026-12-24 02:00", "+30m".
    #[serde(default)]
    pub at: Option<String>,
    /// Repeat: "day", "weekday", "mon,wed,fri".
    #[serde(default)]
    pub every: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartResponse {
    /// The deployment started now, if any.
    pub deployment: Option<u64>,
    /// The schedule stored, if `at` was given.
    pub schedule: Option<u64>,
    /// When the schedule fires next (RFC 3339).
    pub next: Option<String>,
    pub woken: usize,
}

/// A host as the server knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostInfo {
    pub mac: String,
    pub name: Option<String>,
    pub group: Option<String>,
    /// False: seen network-booting, never approved; boots its disk.
    pub registered: bool,
    pub job: Option<Job>,
    pub exit: Option<ExitType>,
    pub last_seen_ms: i64,
    /// Its latest task.
    pub task: Option<TaskInfo>,
}

/// A task with its result and, while it runs, the host's live progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskInfo {
    pub deployment: u64,
    pub mac: String,
    pub name: Option<String>,
    pub task: TaskState,
    /// What the agent last said it is doing.
    pub state: Option<AgentState>,
    pub image: String,
    /// The torrent written, once the host fetched its job.
    pub info_hash: Option<String>,
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub origin_bytes: u64,
    pub uploaded_bytes: u64,
    pub down_bps: f64,
    pub up_bps: f64,
    pub peers: usize,
    pub error: Option<String>,
    pub disk: Option<DiskIdentity>,
    pub verify: Option<String>,
    /// Seconds since the host's last report (none: not since the server
    /// started).
    pub seen_s_ago: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskCounts {
    pub pending: usize,
    pub running: usize,
    pub done: usize,
    pub failed: usize,
    pub cancelled: usize,
}

impl TaskCounts {
    pub fn add(&mut self, s: TaskState, n: usize) {
        *match s {
            TaskState::Pending => &mut self.pending,
            TaskState::Running => &mut self.running,
            TaskState::Done => &mut self.done,
            TaskState::Failed => &mut self.failed,
            TaskState::Cancelled => &mut self.cancelled,
        } += n;
    }

    pub fn get(&self, s: TaskState) -> usize {
        match s {
            TaskState::Pending => self.pending,
            TaskState::Running => self.running,
            TaskState::Done => self.done,
            TaskState::Failed => self.failed,
            TaskState::Cancelled => self.cancelled,
        }
    }

    pub fn total(&self) -> usize {
        self.pending + self.running + self.done + self.failed + self.cancelled
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentInfo {
    pub id: u64,
    pub group: Option<String>,
    pub image: Option<String>,
    pub expect: Option<usize>,
    pub open: bool,
    pub state: DeploymentState,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub tasks: TaskCounts,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupInfo {
    pub name: String,
    pub job: Option<Job>,
    pub exit: Option<ExitType>,
    /// Where its Wake-on-LAN packets go: the subnet's directed broadcast.
    pub wake: Option<std::net::SocketAddr>,
    pub members: Vec<String>,
    /// The members' host name template, e.g. "lab12-{slot:02}".
    #[serde(default)]
    pub hostname: Option<String>,
}

/// `PUT /api/v1/admin/hosts/{mac}`: what to change (fields left out stay).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostUpdate {
    pub name: Option<String>,
    pub group: Option<String>,
    pub job: Option<Job>,
    pub exit: Option<ExitType>,
    /// Approve an unknown host with nothing else to change (any update
    /// approves it).
    #[serde(default)]
    pub register: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleInfo {
    pub id: u64,
    pub group: String,
    pub image: Option<String>,
    pub spec: String,
    pub wake: bool,
    pub expect: Option<usize>,
    pub last_fired_ms: Option<i64>,
    pub next: Option<String>,
    pub enabled: bool,
}

/// `GET /api/v1/admin/hosts/{mac}/log`: the lines and the error of the
/// host's latest task (or of one deployment's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostLog {
    pub mac: String,
    pub deployment: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
    pub lines: Vec<LogLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub at_ms: i64,
    pub line: String,
}

/// `GET /api/v1/admin/deployments/{id}/tiles`: the room view of one
/// deployment, small enough to poll once a second with 1000 PCs (about
/// 60 bytes a PC; the full per-host view is ten times that).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoomView {
    pub deployment: DeploymentInfo,
    /// The server's clock, for the elapsed time.
    pub now_ms: i64,
    /// The tasks' distinct errors, each cut short; tiles point into it.
    pub errors: Vec<String>,
    pub tiles: Vec<Tile>,
}

/// One PC of the room view, as a short JSON array:
/// `[mac, name, state, progress in per mille, rate in bytes/s, error]`.
/// The rate is the download rate while downloading, else the upload rate;
/// the error is an index into [`RoomView::errors`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tile(
    pub String,
    pub Option<String>,
    pub TileState,
    pub u16,
    pub u64,
    pub Option<usize>,
);

/// What a tile shows: the task's state, and while it runs what the agent
/// last said it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TileState {
    /// Waiting for the PC to network-boot (again, after a failed attempt).
    Pending,
    /// Booted: fetching its job, choosing and checking its disk.
    Booting,
    Downloading,
    /// Checking what it wrote, writing the partition table; after the
    /// room is done, fitting the disk to the PC (grow, name, hooks).
    Verifying,
    /// Done, and still seeding its peers.
    Seeding,
    Done,
    Failed,
    Cancelled,
}

impl TileState {
    pub fn of(task: TaskState, agent: Option<AgentState>) -> Self {
        match (task, agent) {
            (TaskState::Pending, _) => Self::Pending,
            (TaskState::Done, Some(AgentState::Seeding)) => Self::Seeding,
            (TaskState::Done, Some(AgentState::Fitting)) => Self::Verifying,
            (TaskState::Done, _) => Self::Done,
            (TaskState::Failed, _) => Self::Failed,
            (TaskState::Cancelled, _) => Self::Cancelled,
            (TaskState::Running, Some(AgentState::Downloading)) => Self::Downloading,
            (
                TaskState::Running,
                Some(AgentState::Verifying | AgentState::Finishing | AgentState::Fitting),
            ) => Self::Verifying,
            (TaskState::Running, Some(AgentState::Seeding | AgentState::Done)) => Self::Seeding,
            (TaskState::Running, _) => Self::Booting,
        }
    }
}

/// `POST /api/v1/admin/hosts/{mac}/capture`: the host's next network boot
/// captures its disk into image `image`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    pub image: String,
    /// Pull the payload into the store (default); else serve the image from
    /// the master as the origin while it seeds.
    #[serde(default = "yes")]
    pub store: bool,
    /// Replace a stored image of that name.
    #[serde(default)]
    pub replace: bool,
}

/// `admin images add`: an image given only as its torrent, which the
/// server pulls through the swarm from `peers` and the peers its trackers
/// name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddImageRequest {
    /// The torrent's bytes, in hex.
    pub torrent: String,
    /// Peers that hold the image ("IP:PORT"), besides the trackers'.
    #[serde(default)]
    pub peers: Vec<String>,
}

impl AddImageRequest {
    /// Largest body taken: a 4 MiB torrent in hex, and some peers.
    pub const MAX_BODY: usize = 2 * crate::server::pull::MAX_TORRENT + 64 * 1024;
    /// Peers named at most.
    pub const MAX_PEERS: usize = 16;
}

fn yes() -> bool {
    true
}

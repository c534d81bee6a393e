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
        [
            Self::Pending,
            Self::Running,
            Self::Done,
            Self::Failed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
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

/// `GET /api/v1/admin/hosts/{mac}/log`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostLog {
    pub mac: String,
    pub deployment: Option<u64>,
    pub lines: Vec<LogLine>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub at_ms: i64,
    pub line: String,
}

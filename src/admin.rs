//! `blockswarm admin`: the admin API from the command line.
//!
//! Exit codes: 0 done; 1 the server refused (its reason is printed);
//! 2 a bad command line; 4 the server could not be reached.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use crate::protocol::Job;
use crate::protocol::admin::{
    DeploymentInfo, ExitType, GroupInfo, HostInfo, HostLog, HostUpdate, ScheduleInfo, StartRequest,
    StartResponse,
};
use crate::server::state::DeploymentView;
use crate::util::human_bytes;

#[derive(Args)]
pub struct AdminArgs {
    /// The boot server's URL.
    #[arg(
        long,
        env = "BLOCKSWARM_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// The admin token (the server prints where it keeps it).
    #[arg(long, env = "BLOCKSWARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print what the server answered as JSON (read commands).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: AdminCmd,
}

#[derive(Subcommand)]
pub enum AdminCmd {
    /// List the store's images and how they are served; `images add`
    /// gives the server an image as its torrent alone.
    Images {
        #[command(subcommand)]
        cmd: Option<ImagesCmd>,
    },
    /// List every host the server knows, with its latest task.
    Hosts {
        /// Only the members of this group.
        #[arg(long)]
        group: Option<String>,
    },
    /// A deployment's state and hosts (default: the newest running one).
    Status {
        /// The deployment's id.
        deployment: Option<u64>,
    },
    /// Past and current deployments, newest first.
    History {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// List the groups (rooms).
    Groups,
    /// Create or change a group.
    Group {
        /// The group's name, e.g. room-12.
        name: String,
        /// Members to add, by MAC (comma-separated).
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
        /// The members' job: a TOML file in the [default_job] format.
        #[arg(long)]
        job: Option<PathBuf>,
        /// What idle members' network boot does: auto, sanboot or exit.
        #[arg(long)]
        exit: Option<ExitArg>,
        /// Where Wake-on-LAN packets go: the subnet's directed broadcast,
        /// e.g. 10.0.12.255:9.
        #[arg(long)]
        wake: Option<std::net::SocketAddr>,
        /// Name the members with no name of their own from this template:
        /// {slot} or {slot:02} (1-based position in the group), {mac},
        /// {group}; e.g. "lab12-{slot:02}".
        #[arg(long)]
        hostname: Option<String>,
    },
    /// Start a deployment: a group, listed hosts, or every registered host.
    Start {
        /// The group to image.
        #[arg(long, conflicts_with = "host")]
        group: Option<String>,
        /// A host to image (repeat for more).
        #[arg(long)]
        host: Vec<String>,
        /// Write this image instead of each host's job's image.
        #[arg(long)]
        image: Option<String>,
        /// Done when this many hosts have finished.
        #[arg(long)]
        expect: Option<usize>,
        /// Unknown PCs that network-boot join (they are wiped!).
        #[arg(long)]
        open: bool,
        /// Wake the hosts with Wake-on-LAN first.
        #[arg(long)]
        wake: bool,
        /// Attempts per host before its task fails (default 3).
        #[arg(long)]
        attempts: Option<u32>,
        /// Start later: "02:00", "2026-12-24 02:00", "+30m".
        #[arg(long)]
        at: Option<String>,
        /// Repeat: "day", "weekday", "mon,wed,fri" (with --at).
        #[arg(long, requires = "at")]
        every: Option<String>,
    },
    /// Stop a deployment (default: the newest running one); its hosts'
    /// open tasks are cancelled.
    Stop {
        /// The deployment's id.
        deployment: Option<u64>,
    },
    /// The schedules still to fire, with their next start.
    Schedules,
    /// End a schedule (it does not fire again).
    Unschedule {
        /// The schedule's id.
        id: u64,
    },
    /// Image one host again (a deployment of just that host).
    Reimage {
        /// The host's MAC.
        mac: String,
    },
    /// Capture a host's disk into an image at its next network boot: its
    /// agent maps the used blocks, sends the manifest and torrent, and seeds
    /// them from its disk (read-only) while the server pulls them.
    Capture {
        /// The master's MAC.
        mac: String,
        /// The new image's name in the store.
        #[arg(long)]
        image: String,
        /// Do not pull it into the store: serve it from the master, as the
        /// origin, until its task is stopped.
        #[arg(long)]
        no_store: bool,
        /// Replace a stored image of that name.
        #[arg(long)]
        replace: bool,
    },
    /// Approve a host that network-booted unknown.
    Approve {
        /// The host's MAC.
        mac: String,
        /// Make it a member of this group.
        #[arg(long)]
        group: Option<String>,
        /// Its name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Set a host's job from a TOML file (the [default_job] format).
    SetJob {
        /// The host's MAC.
        mac: String,
        /// The TOML file.
        job: PathBuf,
    },
    /// Set what a host's network boot does when it has no task.
    SetExit {
        /// The host's MAC.
        mac: String,
        /// auto, sanboot or exit.
        exit: ExitArg,
    },
    /// The agent's log lines of a host's latest task.
    Log {
        /// The host's MAC.
        mac: String,
        /// That deployment's task instead of the latest.
        #[arg(long)]
        deployment: Option<u64>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExitArg {
    Auto,
    Sanboot,
    Exit,
}

impl From<ExitArg> for ExitType {
    fn from(e: ExitArg) -> Self {
        match e {
            ExitArg::Auto => ExitType::Auto,
            ExitArg::Sanboot => ExitType::Sanboot,
            ExitArg::Exit => ExitType::Exit,
        }
    }
}

#[derive(Subcommand)]
pub enum ImagesCmd {
    /// Give the server an image as its .torrent (a file or an http(s) URL):
    /// it pulls manifest and payload through the swarm from the peers the
    /// torrent's tracker names (another blockswarm server's, say) and any
    /// --peer, checks every piece and the manifest, then serves the image.
    Add {
        /// The .torrent: a file, or an http(s) URL the admin client fetches.
        torrent: String,
        /// A peer that holds the image (IP:PORT), besides the tracker's.
        #[arg(long)]
        peer: Vec<String>,
    },
}

/// The torrent's bytes from a file or an http(s) URL, bounded.
async fn read_torrent(http: &reqwest::Client, src: &str) -> Result<Vec<u8>> {
    let max = crate::server::pull::MAX_TORRENT;
    if src.starts_with("http://") || src.starts_with("https://") {
        let mut r = http
            .get(src)
            .send()
            .await
            .with_context(|| format!("fetching {src}"))?
            .error_for_status()
            .with_context(|| format!("fetching {src}"))?;
        let mut out = Vec::new();
        while let Some(c) = r.chunk().await.with_context(|| format!("fetching {src}"))? {
            out.extend_from_slice(&c);
            if out.len() > max {
                bail!("{src}: more than {max} bytes: not a torrent");
            }
        }
        return Ok(out);
    }
    let md = std::fs::metadata(src).with_context(|| format!("reading {src}"))?;
    if md.len() > max as u64 {
        bail!("{src}: {} bytes: not a torrent", md.len());
    }
    std::fs::read(src).with_context(|| format!("reading {src}"))
}

/// The server could not be reached: `blockswarm admin` exits with
/// [`Unreachable::EXIT_CODE`].
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the server at {0}: {1}\n\
     hint: is `blockswarm serve` running there? Set --server or BLOCKSWARM_SERVER \
     (e.g. http://10.0.0.1:8080)"
)]
pub struct Unreachable(pub String, pub String);

impl Unreachable {
    pub const EXIT_CODE: u8 = 4;
}

struct Api {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut rb = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb
            .send()
            .await
            .map_err(|e| Unreachable(self.base.clone(), crate::util::root_cause(&e)))?;
        let code = r.status();
        let body: Value = if code == reqwest::StatusCode::NO_CONTENT {
            Value::Null
        } else {
            r.json().await.unwrap_or(Value::Null)
        };
        if !code.is_success() {
            let why = body["error"].as_str().unwrap_or("(no detail)");
            if code == reqwest::StatusCode::UNAUTHORIZED {
                bail!("{code}: {why}\nhint: pass --token or set BLOCKSWARM_TOKEN");
            }
            bail!("{code}: {why}");
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn send<T: serde::Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &T,
    ) -> Result<Value> {
        self.call(method, path, Some(serde_json::to_value(body)?))
            .await
    }
}

fn read_job(path: &PathBuf) -> Result<Job> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let job: Job =
        toml::from_str(&text).with_context(|| format!("the job in {}", path.display()))?;
    job.check()
        .with_context(|| format!("the job in {}", path.display()))?;
    Ok(job)
}

fn when(ms: Option<i64>) -> String {
    ms.and_then(|m| jiff::Timestamp::from_millisecond(m).ok())
        .map_or("-".into(), |t| {
            jiff::ZonedDateTime::new(t, jiff::tz::TimeZone::system())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
}

pub async fn run(a: AdminArgs) -> Result<()> {
    let api = Api {
        base: a.server.trim_end_matches('/').to_string(),
        http: crate::util::http_client()?,
        token: a.token.clone(),
    };
    let json = a.json;
    let show = |v: &Value| -> Result<bool> {
        if json {
            println!("{}", serde_json::to_string_pretty(v)?);
        }
        Ok(json)
    };
    use reqwest::Method;
    match a.cmd {
        AdminCmd::Images {
            cmd: Some(ImagesCmd::Add { torrent, peer }),
        } => {
            let bytes = read_torrent(&api.http, &torrent).await?;
            let req = crate::protocol::admin::AddImageRequest {
                torrent: bytes.iter().map(|b| format!("{b:02x}")).collect(),
                peers: peer,
            };
            let v = api.send(Method::POST, "/api/v1/admin/images", &req).await?;
            if !show(&v)? {
                println!("{}", v["message"].as_str().unwrap_or(""));
            }
        }
        AdminCmd::Images { cmd: None } => {
            let v = api.get("/api/v1/admin/images").await?;
            if !show(&v)? {
                for i in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<10} {:>10} payload  {}",
                        i["name"].as_str().unwrap_or(""),
                        i["state"].as_str().unwrap_or(""),
                        human_bytes(i["payload_bytes"].as_u64().unwrap_or(0)),
                        i["info_hash"].as_str().unwrap_or("")
                    );
                }
            }
        }
        AdminCmd::Hosts { group } => {
            let mut v = api.get("/api/v1/admin/hosts").await?;
            if let (Some(g), Some(a)) = (&group, v.as_array_mut()) {
                a.retain(|h| h["group"].as_str() == Some(g));
            }
            if !show(&v)? {
                let hosts: Vec<HostInfo> = serde_json::from_value(v)?;
                for h in hosts {
                    let t = h.task.as_ref();
                    println!(
                        "{:<17} {:<12} {:<10} {:<10} {:<9} {}",
                        h.mac,
                        h.name.as_deref().unwrap_or("-"),
                        h.group.as_deref().unwrap_or("-"),
                        if h.registered {
                            "registered"
                        } else {
                            "unknown"
                        },
                        t.map_or("-".into(), |t| format!("{:?}", t.task).to_lowercase()),
                        t.map_or(String::new(), |t| format!(
                            "deployment {}, {}{}",
                            t.deployment,
                            t.image,
                            t.error
                                .as_ref()
                                .map_or(String::new(), |e| format!(", error: {e}"))
                        ))
                    );
                }
            }
        }
        AdminCmd::Status { deployment } => {
            let path = match deployment {
                Some(id) => format!("/api/v1/admin/deployments/{id}"),
                None => "/api/v1/deployment".into(),
            };
            let v = api.get(&path).await?;
            if !show(&v)? {
                let v: DeploymentView = serde_json::from_value(v)?;
                let Some(id) = v.id else {
                    println!("no deployment yet");
                    return Ok(());
                };
                let t = &v.tasks;
                println!(
                    "deployment {id}{}: {}, elapsed {:.1} s; {} done, {} running, {} pending, {} failed, {} cancelled",
                    v.group
                        .as_ref()
                        .map_or(String::new(), |g| format!(" (group {g})")),
                    if v.done {
                        "done"
                    } else if v.running {
                        "running"
                    } else {
                        "stopped"
                    },
                    v.elapsed_s,
                    t.done,
                    t.running,
                    t.pending,
                    t.failed,
                    t.cancelled
                );
                for h in &v.hosts {
                    let r = &h.task;
                    println!(
                        "{:<17} {:<10} {:<9} {:<12} {:>5.1}%  {:>10}/s down  {:>10}/s up  {} peers{}",
                        r.mac,
                        r.name.as_deref().unwrap_or(""),
                        format!("{:?}", r.task).to_lowercase(),
                        r.state
                            .and_then(|s| serde_json::to_value(s).ok())
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default(),
                        100.0 * r.done_bytes as f64 / r.total_bytes.max(1) as f64,
                        human_bytes(r.down_bps as u64),
                        human_bytes(r.up_bps as u64),
                        r.peers,
                        r.error
                            .as_ref()
                            .map_or(String::new(), |e| format!("  error: {e}"))
                    );
                }
            }
        }
        AdminCmd::History { limit } => {
            let v = api
                .get(&format!("/api/v1/admin/deployments?limit={limit}"))
                .await?;
            if !show(&v)? {
                let ds: Vec<DeploymentInfo> = serde_json::from_value(v)?;
                for d in ds {
                    println!(
                        "{:>5}  {:<8} {:<12} {:<12} {}  {}  {} done, {} failed, {} other",
                        d.id,
                        format!("{:?}", d.state).to_lowercase(),
                        d.group.as_deref().unwrap_or("-"),
                        d.image.as_deref().unwrap_or("(jobs)"),
                        when(Some(d.started_ms)),
                        when(d.ended_ms),
                        d.tasks.done,
                        d.tasks.failed,
                        d.tasks.pending + d.tasks.running + d.tasks.cancelled
                    );
                }
            }
        }
        AdminCmd::Groups => {
            let v = api.get("/api/v1/admin/groups").await?;
            if !show(&v)? {
                let gs: Vec<GroupInfo> = serde_json::from_value(v)?;
                for g in gs {
                    println!(
                        "{:<14} {:>4} members  image {:<12} exit {:<8} wake {}",
                        g.name,
                        g.members.len(),
                        g.job.as_ref().map_or("-", |j| j.image.as_str()),
                        g.exit
                            .map_or("-".into(), |e| format!("{e:?}").to_lowercase()),
                        g.wake.map_or("-".into(), |w| w.to_string())
                    );
                }
            }
        }
        AdminCmd::Group {
            name,
            members,
            job,
            exit,
            wake,
            hostname,
        } => {
            if let Some(t) = &hostname {
                crate::protocol::hostname::check_template(t, &name)?;
            }
            let current: Vec<GroupInfo> =
                serde_json::from_value(api.get("/api/v1/admin/groups").await?)?;
            let mut g = current
                .into_iter()
                .find(|g| g.name == name)
                .unwrap_or(GroupInfo {
                    name: name.clone(),
                    job: None,
                    exit: None,
                    wake: None,
                    members: Vec::new(),
                    hostname: None,
                });
            g.members = members;
            if let Some(j) = &job {
                g.job = Some(read_job(j)?);
            }
            if let Some(e) = exit {
                g.exit = Some(e.into());
            }
            if wake.is_some() {
                g.wake = wake;
            }
            if hostname.is_some() {
                g.hostname = hostname;
            }
            api.send(Method::PUT, &format!("/api/v1/admin/groups/{name}"), &g)
                .await?;
            println!("group {name} saved");
        }
        AdminCmd::Start {
            group,
            host,
            image,
            expect,
            open,
            wake,
            attempts,
            at,
            every,
        } => {
            let req = StartRequest {
                group,
                hosts: host,
                image,
                expect,
                open,
                wake,
                max_attempts: attempts,
                at,
                every,
            };
            let v = api
                .send(Method::POST, "/api/v1/admin/deployments", &req)
                .await?;
            if !show(&v)? {
                let r: StartResponse = serde_json::from_value(v)?;
                if let Some(d) = r.deployment {
                    println!(
                        "deployment {d} started{}",
                        if req.wake {
                            format!(", {} hosts woken", r.woken)
                        } else {
                            String::new()
                        }
                    );
                }
                if let Some(s) = r.schedule {
                    println!(
                        "schedule {s} stored; next start {}",
                        r.next.as_deref().unwrap_or("never")
                    );
                }
            }
        }
        AdminCmd::Stop { deployment } => {
            let path = match deployment {
                Some(id) => format!("/api/v1/admin/deployments/{id}/stop"),
                None => "/api/v1/admin/deployment/stop".into(),
            };
            let v = api.call(Method::POST, &path, None).await?;
            println!("deployment {} stopped", v["deployment"]);
        }
        AdminCmd::Schedules => {
            let v = api.get("/api/v1/admin/schedules").await?;
            if !show(&v)? {
                let ss: Vec<ScheduleInfo> = serde_json::from_value(v)?;
                for s in ss {
                    println!(
                        "{:>4}  group {:<12} {:<12} next {:<26} {}{}",
                        s.id,
                        s.group,
                        s.image.as_deref().unwrap_or("(jobs)"),
                        s.next.as_deref().unwrap_or("never"),
                        s.spec,
                        if s.wake { ", wake" } else { "" }
                    );
                }
            }
        }
        AdminCmd::Unschedule { id } => {
            api.call(
                Method::DELETE,
                &format!("/api/v1/admin/schedules/{id}"),
                None,
            )
            .await?;
            println!("schedule {id} ended");
        }
        AdminCmd::Reimage { mac } => {
            let v = api
                .call(
                    Method::POST,
                    &format!("/api/v1/admin/hosts/{mac}/reimage"),
                    None,
                )
                .await?;
            println!(
                "{mac} will be imaged at its next network boot (deployment {})",
                v["deployment"]
            );
        }
        AdminCmd::Capture {
            mac,
            image,
            no_store,
            replace,
        } => {
            let req = crate::protocol::admin::CaptureRequest {
                image: image.clone(),
                store: !no_store,
                replace,
            };
            let v = api
                .send(
                    Method::POST,
                    &format!("/api/v1/admin/hosts/{mac}/capture"),
                    &req,
                )
                .await?;
            println!(
                "{mac} will capture its disk into image {image} at its next network boot (deployment {})",
                v["deployment"]
            );
        }
        AdminCmd::Approve { mac, group, name } => {
            let u = HostUpdate {
                name,
                group,
                register: true,
                ..Default::default()
            };
            api.send(Method::PUT, &format!("/api/v1/admin/hosts/{mac}"), &u)
                .await?;
            println!("{mac} approved");
        }
        AdminCmd::SetJob { mac, job } => {
            let job = read_job(&job)?;
            api.send(Method::PUT, &format!("/api/v1/admin/hosts/{mac}/job"), &job)
                .await?;
            println!("job set for {mac}");
        }
        AdminCmd::SetExit { mac, exit } => {
            let u = HostUpdate {
                exit: Some(exit.into()),
                ..Default::default()
            };
            api.send(Method::PUT, &format!("/api/v1/admin/hosts/{mac}"), &u)
                .await?;
            println!("exit type set for {mac}");
        }
        AdminCmd::Log { mac, deployment } => {
            let path = match deployment {
                Some(d) => format!("/api/v1/admin/hosts/{mac}/log?deployment={d}"),
                None => format!("/api/v1/admin/hosts/{mac}/log"),
            };
            let v = api.get(&path).await?;
            if !show(&v)? {
                let l: HostLog = serde_json::from_value(v)?;
                match l.deployment {
                    None => println!("{mac} has no task yet"),
                    Some(d) => {
                        println!("# {mac}, deployment {d}: {} lines", l.lines.len());
                        for line in l.lines {
                            println!("{}  {}", when(Some(line.at_ms)), line.line);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

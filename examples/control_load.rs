//! Control-plane load (issue 19): N simulated agents against one
//! `blockswarm serve`, and one dashboard poller. No BitTorrent data moves.
//!
//! Each agent does on the control plane what `blockswarm agent` does: it
//! fetches its job, then the job's manifest and torrent once, reports its
//! status every second (SelectingDisk, Checking, Downloading with progress
//! growing over `--finish-after` seconds, Finishing, Seeding) and announces
//! to the job's tracker every `interval` the tracker names (`started`, then
//! `completed`, `stopped` when done). Once the server says the deployment is
//! done, it reports Done and stops, as a real agent reboots. The poller
//! fetches GET /api/v1/deployment every second, as the dashboard does.
//!
//! Agent k (from 0) is MAC `--mac-prefix` followed by k in the remaining
//! bytes, big-endian, and sends from 127.0.(1 + k / 250).(1 + k % 250): the
//! server caps connections per source address, and a room's PCs are
//! distinct hosts. Each holds one keep-alive connection, as a real agent's
//! single HTTP client does while its requests do not overlap. The poller
//! sends from 127.0.0.2. Loopback only.
//!
//!   cargo build --release --example control_load
//!   target/release/examples/control_load http://127.0.0.1:8080 --agents 1000 --duration 120
//!
//! scripts/bench-control sets up the server and runs it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::time::sleep_until;

use blockswarm::image::Image;
use blockswarm::protocol::{
    AgentState, DiskIdentity, JobResponse, Progress, StatusAck, StatusReport, spread,
};

#[derive(Parser)]
#[command(about = "Control-plane load: simulated agents and a dashboard poller")]
struct Args {
    /// The server, e.g. http://127.0.0.1:8080 (a loopback address).
    server: String,
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Seconds the run lasts at most (it ends sooner once every agent is done).
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Seconds an agent takes to download, ±10 % per agent
    /// (default: 3/4 of the duration less the ramp).
    #[arg(long)]
    finish_after: Option<f64>,
    /// Seconds over which the agents start, evenly (a room booting).
    #[arg(long, default_value_t = 10.0)]
    ramp: f64,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 10)]
    report_every: u64,
    /// First 1 to 5 bytes of the agents' MACs.
    #[arg(long, default_value = "02:b5:00")]
    mac_prefix: String,
    /// Also write the results as JSON to this file ("-": standard output).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Poll the logged-in dashboard's room view (the running deployment's
    /// tiles) with this admin token, instead of the public deployment view.
    #[arg(long)]
    admin_token: Option<String>,
}

/// A request that takes longer counts as an error ("timeout").
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A real agent asks again this long after the server refuses a job.
const JOB_RETRY: Duration = Duration::from_secs(5);
/// The BitTorrent port the agents claim (nobody dials it).
const PEER_PORT: u16 = 6881;
/// The most agents the source-address scheme names.
const MAX_AGENTS: usize = 254 * 250;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Endpoint {
    Job,
    Manifest,
    Torrent,
    Status,
    Announce,
    Deployment,
}

const ENDPOINTS: [Endpoint; 6] = [
    Endpoint::Job,
    Endpoint::Manifest,
    Endpoint::Torrent,
    Endpoint::Status,
    Endpoint::Announce,
    Endpoint::Deployment,
];

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Self::Job => "job",
            Self::Manifest => "manifest",
            Self::Torrent => "torrent",
            Self::Status => "status",
            Self::Announce => "announce",
            Self::Deployment => "deployment",
        }
    }
}

/// One endpoint's requests: latencies of those answered, errors by kind
/// (an HTTP status, "io", "timeout", or "failure" for a tracker refusal).
#[derive(Default)]
struct Stat {
    requests: u64,
    latency_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
    max_body: usize,
}

impl Stat {
    fn summary(&self, e: Endpoint, secs: f64) -> serde_json::Value {
        let mut l = self.latency_us.clone();
        l.sort_unstable();
        // Nearest rank, in milliseconds.
        let pct = |p: f64| {
            let i = ((p * l.len() as f64).ceil() as usize).clamp(1, l.len().max(1)) - 1;
            l.get(i).map(|&us| f64::from(us) / 1000.0)
        };
        serde_json::json!({
            "endpoint": e.name(),
            "requests": self.requests,
            "per_s": self.requests as f64 / secs.max(1e-9),
            "errors": self.errors,
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "max_ms": l.last().map(|&us| f64::from(us) / 1000.0),
            "max_body_bytes": self.max_body,
        })
    }
}

#[derive(Default)]
struct Stats {
    total: BTreeMap<Endpoint, Stat>,
    /// Since the last progress line.
    window: BTreeMap<Endpoint, Stat>,
    /// Hosts listed in the largest deployment view.
    dashboard_hosts: usize,
}

/// What the agents and the poller share.
struct Ctx {
    server: SocketAddr,
    args: Args,
    mac_prefix: Vec<u8>,
    finish_after: f64,
    start: Instant,
    end: tokio::time::Instant,
    stats: Mutex<Stats>,
    connections: AtomicUsize,
    /// Transport errors so far: the first few are printed.
    io_errors: AtomicUsize,
    running: AtomicUsize,
    finished: AtomicUsize,
    done: AtomicUsize,
}

impl Ctx {
    fn record(&self, e: Endpoint, latency: Duration, outcome: Result<usize, String>) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *s;
        for stat in [
            s.total.entry(e).or_default(),
            s.window.entry(e).or_default(),
        ] {
            stat.requests += 1;
            match &outcome {
                Ok(size) => stat.max_body = stat.max_body.max(*size),
                Err(kind) => *stat.errors.entry(kind.clone()).or_default() += 1,
            }
            if !matches!(&outcome, Err(k) if k == "io" || k == "timeout") {
                stat.latency_us
                    .push(latency.as_micros().min(u128::from(u32::MAX)) as u32);
            }
        }
    }

    fn mac(&self, k: usize) -> String {
        let mut b = self.mac_prefix.clone();
        let rest = 6 - b.len();
        b.extend_from_slice(&(k as u64).to_be_bytes()[8 - rest..]);
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The path of a URL the server handed out: relative, or on this server.
    fn path_of(&self, url: &str) -> Result<String> {
        if url.starts_with('/') {
            return Ok(url.to_string());
        }
        let base = format!("http://{}", self.server);
        match url.strip_prefix(&base) {
            Some(p) if p.starts_with('/') => Ok(p.to_string()),
            _ => bail!("{url:?} is not on the server {base}: this generator talks to one server"),
        }
    }
}

/// One keep-alive HTTP/1.1 connection from a fixed source address,
/// opened again when the server closes it.
struct Conn<'a> {
    ctx: &'a Ctx,
    local: IpAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
    /// `Authorization` header value, for the admin API.
    auth: Option<String>,
}

impl<'a> Conn<'a> {
    fn new(ctx: &'a Ctx, local: IpAddr) -> Self {
        Self {
            ctx,
            local,
            sender: None,
            auth: None,
        }
    }

    async fn connect(&mut self) -> Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(self.local, 0))
                .with_context(|| format!("binding {}", self.local))?;
            let stream = sock.connect(self.ctx.server).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            self.ctx.connections.fetch_add(1, Ordering::Relaxed);
            self.sender = Some(sender);
        }
        let s = self.sender.as_mut().expect("just set");
        s.ready().await?;
        Ok(s)
    }

    /// Sends one request, records it, and returns the answer; `None` when
    /// none came (the connection is dropped then).
    async fn send(
        &mut self,
        e: Endpoint,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Option<(StatusCode, Bytes)> {
        let host = self.ctx.server.to_string();
        let t0 = Instant::now();
        let got = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, host);
            if body.is_some() {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            }
            if let Some(a) = &self.auth {
                req = req.header(hyper::header::AUTHORIZATION, a);
            }
            let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
            let resp = self.connect().await?.send_request(req).await?;
            let code = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((code, bytes))
        })
        .await;
        let latency = t0.elapsed();
        match got {
            Ok(Ok((code, bytes))) => {
                // A tracker's refusal is a 200 whose body names it.
                let outcome = if !code.is_success() {
                    Err(code.as_u16().to_string())
                } else if e == Endpoint::Announce && bytes.starts_with(b"d14:failure reason") {
                    Err("failure".into())
                } else {
                    Ok(bytes.len())
                };
                self.ctx.record(e, latency, outcome);
                Some((code, bytes))
            }
            Ok(Err(err)) => {
                self.sender = None;
                if self.ctx.io_errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("{} from {}: {err:#}", e.name(), self.local);
                }
                self.ctx.record(e, latency, Err("io".into()));
                None
            }
            Err(_) => {
                self.sender = None;
                self.ctx.record(e, latency, Err("timeout".into()));
                None
            }
        }
    }

    async fn get(&mut self, e: Endpoint, path: &str) -> Option<Bytes> {
        match self.send(e, Method::GET, path, None).await {
            Some((code, b)) if code.is_success() => Some(b),
            _ => None,
        }
    }
}

/// One simulated agent, until its job is done or the run ends.
async fn agent(ctx: &Ctx, k: usize) -> Result<()> {
    let n = ctx.args.agents;
    let begin = ctx.start + Duration::from_secs_f64(ctx.args.ramp * k as f64 / n as f64);
    sleep_until(begin.into()).await;
    ctx.running.fetch_add(1, Ordering::Relaxed);
    let local = IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        1 + (k / 250) as u8,
        1 + (k % 250) as u8,
    ));
    let mut c = Conn::new(ctx, local);
    let mac = ctx.mac(k);
    let before_end = |t: tokio::time::Instant| t < ctx.end;

    let job: JobResponse = loop {
        if let Some(b) = c.get(Endpoint::Job, &format!("/api/v1/jobs/{mac}")).await {
            break serde_json::from_slice(&b).context("the job is malformed")?;
        }
        let next = tokio::time::Instant::now() + JOB_RETRY;
        if !before_end(next) {
            return Ok(());
        }
        sleep_until(next).await;
    };
    let (Some(m), Some(t)) = (
        c.get(Endpoint::Manifest, &ctx.path_of(&job.manifest_url)?)
            .await,
        c.get(Endpoint::Torrent, &ctx.path_of(&job.torrent_url)?)
            .await,
    ) else {
        bail!("{mac}: no manifest or torrent");
    };
    let image = Image::from_bytes(&job.manifest_url, &m, t.to_vec())?;
    let total = image.manifest.payload.size;
    let info_hash = blockswarm::util::parse_hex20(&image.manifest.payload.info_hash)
        .context("the manifest's info_hash")?;
    let tracker = match job.trackers.first() {
        Some(t) => ctx.path_of(t)?,
        None => bail!("{mac}: the job names no tracker"),
    };
    let mut peer_id = *b"-BS0100-000000000000";
    peer_id[8..].copy_from_slice(format!("{k:012}").as_bytes());
    let mut rep = StatusReport {
        mac: mac.clone(),
        state: AgentState::SelectingDisk,
        deployment: Some(job.deployment),
        image: Some(job.job.image.clone()),
        target: None,
        progress: Progress::default(),
        error: None,
        elapsed_s: 0.0,
        token: job.token.clone(),
        disk: None,
        log: Vec::new(),
    };
    let t0 = Instant::now();
    report(&mut c, &mut rep, t0, AgentState::SelectingDisk).await;
    rep.target = Some("/dev/sda".into());
    rep.disk = Some(DiskIdentity {
        size: image.manifest.disk.size,
        wwn: None,
        serial: Some(format!("LOAD{k:08}")),
        by_path: Some("pci-0000:00:1f.2-ata-1".into()),
    });
    report(&mut c, &mut rep, t0, AgentState::Checking).await;

    // Download: progress grows linearly, announces as the tracker says.
    let secs = ctx.finish_after * (0.9 + 0.2 * spread(k as u32));
    let down_bps = total as f64 / secs;
    let started = tokio::time::Instant::now();
    let mut tick =
        tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_announce = started;
    let mut event = Some("started");
    let mut finished = false;
    loop {
        let now = tokio::time::Instant::now();
        if !before_end(now) {
            return Ok(());
        }
        let frac = (now - started).as_secs_f64() / secs;
        let done_bytes = ((frac.min(1.0)) * total as f64) as u64;
        let seeding = done_bytes >= total;
        rep.progress = Progress {
            done_bytes,
            total_bytes: total,
            uploaded_bytes: (done_bytes as f64 * 0.9) as u64,
            down_bps: if seeding { 0.0 } else { down_bps },
            up_bps: down_bps * 0.9,
            peers: rep.progress.peers,
            finished: seeding,
            origin_bytes: done_bytes / 10,
        };
        if seeding && !finished {
            finished = true;
            ctx.finished.fetch_add(1, Ordering::Relaxed);
            event = Some("completed");
            next_announce = now;
            report(&mut c, &mut rep, t0, AgentState::Finishing).await;
        }
        if now >= next_announce {
            let p = rep.progress;
            let interval = announce(&mut c, &tracker, &info_hash, &peer_id, p, event).await;
            if let Some((interval, peers)) = interval {
                event = None;
                rep.progress.peers = peers;
                next_announce = now + interval;
            } else {
                next_announce = now + Duration::from_secs(1);
            }
        }
        let state = if seeding {
            AgentState::Seeding
        } else {
            AgentState::Downloading
        };
        let ack = report(&mut c, &mut rep, t0, state).await;
        if ack.as_ref().is_some_and(|a| a.stopped)
            || (seeding && ack.is_some_and(|a| a.deployment_done))
        {
            let p = rep.progress;
            announce(&mut c, &tracker, &info_hash, &peer_id, p, Some("stopped")).await;
            report(&mut c, &mut rep, t0, AgentState::Done).await;
            ctx.done.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = sleep_until(ctx.end) => return Ok(()),
        }
    }
}

/// One status report; the server's answer, when it accepted it.
async fn report(
    c: &mut Conn<'_>,
    rep: &mut StatusReport,
    t0: Instant,
    state: AgentState,
) -> Option<StatusAck> {
    // A real agent logs a few lines when its state changes (and ships them
    // with the next report), otherwise next to nothing.
    rep.log = if rep.state != state {
        vec![format!(
            "INFO blockswarm::agent: {state:?} after {:.1} s, {} of {} bytes",
            rep.elapsed_s, rep.progress.done_bytes, rep.progress.total_bytes
        )]
    } else {
        Vec::new()
    };
    rep.state = state;
    rep.elapsed_s = t0.elapsed().as_secs_f64();
    let body = serde_json::to_vec(rep).expect("a report serializes");
    let (code, b) = c
        .send(Endpoint::Status, Method::POST, "/api/v1/status", Some(body))
        .await?;
    if !code.is_success() {
        return None;
    }
    serde_json::from_slice(&b).ok()
}

/// One announce as the agent's swarm sends it: the tracker's interval and
/// the number of peers it named, when it answered.
async fn announce(
    c: &mut Conn<'_>,
    tracker: &str,
    info_hash: &[u8; 20],
    peer_id: &[u8; 20],
    p: Progress,
    event: Option<&str>,
) -> Option<(Duration, usize)> {
    let enc = |b: &[u8]| b.iter().map(|x| format!("%{x:02X}")).collect::<String>();
    let sep = if tracker.contains('?') { '&' } else { '?' };
    let mut q = format!(
        "{tracker}{sep}info_hash={}&peer_id={}&port={PEER_PORT}&uploaded={}&downloaded={}&left={}&compact=1&numwant=200",
        enc(info_hash),
        enc(peer_id),
        p.uploaded_bytes,
        p.done_bytes,
        p.total_bytes - p.done_bytes,
    );
    if let Some(e) = event {
        q.push_str("&event=");
        q.push_str(e);
    }
    let b = c.get(Endpoint::Announce, &q).await?;
    let r = blockswarm::swarm::parse_tracker_response(&b).ok()?;
    Some((r.interval, r.peers.len()))
}

/// The dashboard: the deployment view every second.
async fn dashboard(ctx: &Ctx) {
    let mut c = Conn::new(ctx, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    c.auth = ctx.args.admin_token.as_ref().map(|t| format!("Bearer {t}"));
    let mut room: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = sleep_until(ctx.end) => return,
        }
        // Logged in, the dashboard polls its room's tiles; else the public view.
        if c.auth.is_some() && room.is_none() {
            let list = c
                .get(
                    Endpoint::Deployment,
                    "/api/v1/admin/deployments?state=running&limit=1",
                )
                .await;
            room = list
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v[0]["id"].as_u64())
                .map(|id| format!("/api/v1/admin/deployments/{id}/tiles"));
        }
        let path = room.as_deref().unwrap_or("/api/v1/deployment");
        let Some(b) = c.get(Endpoint::Deployment, path).await else {
            continue;
        };
        let hosts = serde_json::from_slice::<serde_json::Value>(&b)
            .ok()
            .and_then(|v| {
                v["hosts"]
                    .as_array()
                    .or_else(|| v["tiles"].as_array())
                    .map(Vec::len)
            })
            .unwrap_or(0);
        let mut s = ctx.stats.lock().unwrap_or_else(|p| p.into_inner());
        let max = s.total.get(&Endpoint::Deployment).map_or(0, |x| x.max_body);
        if b.len() >= max {
            s.dashboard_hosts = hosts;
        }
    }
}

fn table(stats: &BTreeMap<Endpoint, Stat>, secs: f64) -> String {
    let mut out = format!(
        "{:<11} {:>9} {:>8} {:>7} {:>8} {:>8} {:>8} {:>8} {:>10}\n",
        "endpoint",
        "requests",
        "req/s",
        "errors",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "max body"
    );
    let ms = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
    for e in ENDPOINTS {
        let Some(st) = stats.get(&e) else { continue };
        let s = st.summary(e, secs);
        out += &format!(
            "{:<11} {:>9} {:>8.1} {:>7} {:>8} {:>8} {:>8} {:>8} {:>10}\n",
            e.name(),
            st.requests,
            s["per_s"].as_f64().unwrap_or(0.0),
            st.errors.values().sum::<u64>(),
            ms(&s["p50_ms"]),
            ms(&s["p95_ms"]),
            ms(&s["p99_ms"]),
            ms(&s["max_ms"]),
            st.max_body,
        );
    }
    for e in ENDPOINTS {
        if let Some(st) = stats.get(&e).filter(|s| !s.errors.is_empty()) {
            let list: Vec<String> = st
                .errors
                .iter()
                .map(|(k, n)| format!("{k} × {n}"))
                .collect();
            out += &format!("errors of {}: {}\n", e.name(), list.join(", "));
        }
    }
    out
}

fn parse_server(url: &str) -> Result<SocketAddr> {
    let hostport = url
        .strip_prefix("http://")
        .map(|s| s.trim_end_matches('/'))
        .with_context(|| format!("{url:?}: give the server as http://IP:PORT"))?;
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("{url:?}: give the server as http://IP:PORT"))?;
    if !addr.ip().is_loopback() {
        bail!("{url:?}: this generator only talks to a loopback address");
    }
    Ok(addr)
}

fn parse_prefix(s: &str, agents: usize) -> Result<Vec<u8>> {
    let b = s
        .split([':', '-'])
        .map(|p| u8::from_str_radix(p, 16).ok().filter(|_| p.len() == 2))
        .collect::<Option<Vec<u8>>>()
        .filter(|b| (1..=5).contains(&b.len()))
        .with_context(|| format!("--mac-prefix {s:?}: give 1 to 5 bytes like 02:b5:00"))?;
    if agents as u64 > 1u64 << (8 * (6 - b.len())) {
        bail!("--mac-prefix {s}: too long to number {agents} agents");
    }
    Ok(b)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let server = parse_server(&args.server)?;
    if args.agents == 0 || args.agents > MAX_AGENTS {
        bail!("--agents: 1 to {MAX_AGENTS}");
    }
    let mac_prefix = parse_prefix(&args.mac_prefix, args.agents)?;
    let finish_after = args
        .finish_after
        .unwrap_or((args.duration as f64 - args.ramp).max(1.0) * 0.75);
    let start = Instant::now();
    let ctx: &'static Ctx = Box::leak(Box::new(Ctx {
        server,
        mac_prefix,
        finish_after,
        start,
        end: (start + Duration::from_secs(args.duration)).into(),
        args,
        stats: Mutex::default(),
        connections: AtomicUsize::new(0),
        io_errors: AtomicUsize::new(0),
        running: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
    }));
    eprintln!(
        "{} agents against {server} for {} s (ramp {} s, download {finish_after:.0} s ± 10 %), MACs {}..{}",
        ctx.args.agents,
        ctx.args.duration,
        ctx.args.ramp,
        ctx.mac(0),
        ctx.mac(ctx.args.agents - 1)
    );
    let mut agents = tokio::task::JoinSet::new();
    for k in 0..ctx.args.agents {
        agents.spawn(async move {
            if let Err(e) = agent(ctx, k).await {
                eprintln!("agent {k}: {e:#}");
            }
        });
    }
    let poller = tokio::spawn(dashboard(ctx));
    let progress = tokio::spawn(async move {
        let every = Duration::from_secs(ctx.args.report_every.max(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            let window =
                std::mem::take(&mut ctx.stats.lock().unwrap_or_else(|p| p.into_inner()).window);
            let per: Vec<String> = ENDPOINTS
                .iter()
                .filter_map(|&e| {
                    let s = window.get(&e)?.summary(e, every.as_secs_f64());
                    Some(format!(
                        "{} {:.0}/s p99 {:.1} ms",
                        e.name(),
                        s["per_s"].as_f64()?,
                        s["p99_ms"].as_f64().unwrap_or(f64::NAN)
                    ))
                })
                .collect();
            eprintln!(
                "[{:>4.0} s] agents {} up, {} finished, {} done; {}",
                ctx.start.elapsed().as_secs_f64(),
                ctx.running.load(Ordering::Relaxed),
                ctx.finished.load(Ordering::Relaxed),
                ctx.done.load(Ordering::Relaxed),
                per.join("; ")
            );
        }
    });
    while agents.join_next().await.is_some() {}
    poller.abort();
    progress.abort();
    let _ = poller.await;
    let secs = ctx.start.elapsed().as_secs_f64();

    let s = ctx.stats.lock().unwrap_or_else(|p| p.into_inner());
    let dash = s.total.get(&Endpoint::Deployment).map_or(0, |x| x.max_body);
    println!(
        "{} agents, {secs:.0} s: {} finished, {} done; {} connections opened\n",
        ctx.args.agents,
        ctx.finished.load(Ordering::Relaxed),
        ctx.done.load(Ordering::Relaxed),
        ctx.connections.load(Ordering::Relaxed)
    );
    print!("{}", table(&s.total, secs));
    println!(
        "dashboard JSON: at most {dash} bytes ({:.0} KiB), listing {} hosts",
        dash as f64 / 1024.0,
        s.dashboard_hosts
    );
    if let Some(path) = &ctx.args.json {
        let v = serde_json::json!({
            "agents": ctx.args.agents,
            "duration_s": secs,
            "finished": ctx.finished.load(Ordering::Relaxed),
            "done": ctx.done.load(Ordering::Relaxed),
            "connections": ctx.connections.load(Ordering::Relaxed),
            "dashboard_max_bytes": dash,
            "dashboard_hosts": s.dashboard_hosts,
            "endpoints": ENDPOINTS
                .iter()
                .filter_map(|&e| Some(s.total.get(&e)?.summary(e, secs)))
                .collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&v)? + "\n";
        if path.as_os_str() == "-" {
            print!("{text}");
        } else {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

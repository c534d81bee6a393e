//! Rooms: hosts, groups, deployments and their one-shot tasks, as stored
//! in the database. This is the one place that decides what a host's
//! network boot does and whether it gets a job.
//!
//! A deployment images a group (or listed hosts, or with no group every
//! registered host with a job). Starting it gives each member one task;
//! a task is pending until the host fetches its job, then running, then
//! done, or back to pending after a failure until it has failed
//! `max_attempts` times. A host with no open task boots its disk. Unknown
//! hosts are registered when they network-boot and boot their disk, unless
//! a running deployment is open to them.

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, Transaction, params};

use super::MAX_HOSTS;
use super::config::{ServerConfig, normalize_mac};
use super::db::{Db, count, json_col, now_ms, one, to_json};
use crate::protocol::admin::{DeploymentState, ExitType, StartRequest, TaskState};
use crate::protocol::{AgentState, CaptureSpec, DiskIdentity, Job, Progress};

/// Hosts seen network-booting but never approved, at most; past this the
/// least recently seen is forgotten.
pub const MAX_UNREGISTERED: i64 = 4096;
/// Attempts per task unless the start request says otherwise.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// The agent's log lines kept per task.
pub const LOG_LINES_KEPT: i64 = 400;

pub struct Rooms {
    db: Db,
    default_job: Option<Job>,
    default_exit: ExitType,
}

/// What a host's network boot does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Boot the agent: the host has an open task in this deployment.
    Agent { deployment: u64 },
    /// Boot the local disk.
    Local { exit: ExitType, why: String },
}

/// A host's open task, handed out with its job.
#[derive(Debug, Clone)]
pub struct Claim {
    pub deployment: u64,
    pub slot: u32,
    pub job: Job,
    /// The host's own name, else its group's template rendered for it:
    /// `Err` when that template does not render (the task cannot run).
    pub name: Result<Option<String>, String>,
    /// 1-based position in its group; 0 when in none.
    pub group_slot: u32,
    pub disk: Option<DiskIdentity>,
}

#[derive(Debug)]
pub enum ClaimError {
    BadRequest(String),
    /// No open task: the reason, for the agent's screen.
    NoTask(String),
    /// Too many hosts in the open deployment.
    Full(String),
}

/// What an agent's report changes.
pub struct Update<'a> {
    pub deployment: u64,
    pub mac: &'a str,
    pub state: AgentState,
    pub progress: &'a Progress,
    pub error: Option<&'a str>,
    pub disk: Option<&'a DiskIdentity>,
    pub log: &'a [String],
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub deployment_done: bool,
    /// The deployment was stopped or the task cancelled.
    pub stopped: bool,
    /// This report ended the task (done, or failed for good).
    pub ended: bool,
}

type Tx<'a> = Transaction<'a>;

impl Rooms {
    /// Opens the database in `cfg.state_dir` and applies the config's hosts
    /// and groups to it.
    pub fn open(cfg: &ServerConfig) -> Result<Self> {
        Self::with(Db::open(&cfg.state_dir)?, cfg)
    }

    pub fn with(db: Db, cfg: &ServerConfig) -> Result<Self> {
        let r = Self {
            db,
            default_job: cfg.default_job.clone(),
            default_exit: cfg.exit,
        };
        r.apply_config(cfg)?;
        Ok(r)
    }

    /// What `mac`'s network boot does. An unknown MAC is registered (seen,
    /// not approved) and boots its disk, unless an open deployment takes it.
    /// `may_join(deployment)` says whether the host may join that open
    /// deployment (the caller bounds joins per address).
    pub fn boot(&self, mac: &str, may_join: &mut dyn FnMut(u64) -> bool) -> Result<Boot> {
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        let now = now_ms();
        let known = upsert_host(&tx, mac, now)?;
        if !known {
            evict_unregistered(&tx)?;
        }
        let decision = match open_task(&tx, mac, self, may_join)? {
            Ok(t) => Boot::Agent {
                deployment: t.deployment,
            },
            Err(why) => Boot::Local {
                exit: exit_for(&tx, mac)?.unwrap_or(self.default_exit),
                why,
            },
        };
        tx.commit()?;
        Ok(decision)
    }

    /// The job of `mac`'s open task, marked running (an attempt, when it
    /// was pending).
    pub fn claim(
        &self,
        mac: &str,
        may_join: &mut dyn FnMut(u64) -> bool,
    ) -> Result<Claim, ClaimError> {
        let mac = normalize_mac(mac).map_err(|e| ClaimError::BadRequest(e.to_string()))?;
        let r = (|| -> Result<Result<Claim, ClaimError>> {
            let mut c = self.db.lock();
            let tx = c.transaction()?;
            let now = now_ms();
            if !upsert_host(&tx, &mac, now)? {
                evict_unregistered(&tx)?;
            }
            let t = match open_task(&tx, &mac, self, may_join)? {
                Ok(t) => t,
                Err(why) => {
                    tx.commit()?;
                    let full = why.starts_with("deployment") && why.contains(" is full");
                    return Ok(Err(if full {
                        ClaimError::Full(why)
                    } else {
                        ClaimError::NoTask(why)
                    }));
                }
            };
            if t.state == TaskState::Pending {
                tx.execute(
                    "UPDATE tasks SET state = 'running', attempts = attempts + 1, \
                     started = coalesce(started, ?2) WHERE id = ?1",
                    params![t.id, now],
                )?;
            }
            let (name, group_slot) = host_name(&tx, &mac)?;
            tx.commit()?;
            Ok(Ok(Claim {
                deployment: t.deployment,
                slot: t.slot,
                job: t.job,
                name,
                group_slot,
                disk: t.disk,
            }))
        })();
        r.unwrap_or_else(|e| Err(ClaimError::NoTask(format!("the server's database: {e:#}"))))
    }

    /// Applies an agent's report to its task. `None`: the host has no task
    /// in that deployment.
    pub fn update(&self, u: &Update) -> Result<Option<Outcome>> {
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        let now = now_ms();
        let Some((id, state, attempts, max, dstate, capture)) = one(
            &tx,
            "SELECT t.id, t.state, t.attempts, t.max_attempts, d.state, \
             json_extract(t.job, '$.capture') IS NOT NULL FROM tasks t \
             JOIN deployments d ON d.id = t.deployment WHERE t.deployment = ?1 AND t.mac = ?2",
            params![u.deployment as i64, u.mac],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, bool>(5)?,
                ))
            },
        )?
        else {
            return Ok(None);
        };
        let state = TaskState::parse(&state).context("a task's state")?;
        let dstate = DeploymentState::parse(&dstate).context("a deployment's state")?;
        tx.execute(
            "UPDATE hosts SET last_seen = ?2 WHERE mac = ?1",
            params![u.mac, now],
        )?;
        if let Some(d) = u.disk {
            tx.execute(
                "UPDATE tasks SET disk = ?2 WHERE id = ?1 AND disk IS NULL",
                params![id, to_json(d)],
            )?;
        }
        append_log(&tx, id, now, u.log)?;
        let p = u.progress;
        tx.execute(
            "UPDATE tasks SET agent_state = ?2, done_bytes = ?3, total_bytes = ?4, \
             uploaded_bytes = ?5, origin_bytes = ?6 WHERE id = ?1",
            params![
                id,
                to_json(&u.state),
                p.done_bytes as i64,
                p.total_bytes as i64,
                p.uploaded_bytes as i64,
                p.origin_bytes as i64
            ],
        )?;
        let mut out = Outcome::default();
        match (state, u.state) {
            // A master seeding its capture is done when the server says
            // (`finish_capture`), not when it starts to seed.
            (TaskState::Pending | TaskState::Running, s) if s.finished() && !capture => {
                // The agent says finished only once every piece passed its
                // hash (and the read-back, with verify = "readback").
                tx.execute(
                    "UPDATE tasks SET state = 'done', ended = ?2, error = NULL, \
                     verify = json_extract(job, '$.verify') || ': passed' WHERE id = ?1",
                    params![id, now],
                )?;
                out.ended = true;
            }
            (TaskState::Running, AgentState::Failed) => {
                let last = attempts >= max;
                tx.execute(
                    "UPDATE tasks SET state = ?2, error = ?3, ended = ?4 WHERE id = ?1",
                    params![
                        id,
                        if last { "failed" } else { "pending" },
                        u.error,
                        last.then_some(now)
                    ],
                )?;
                out.ended = last;
            }
            // Fitting the imaged disk to the PC (grow, name, hooks) failed
            // after the task counted as imaged: the host is not ready.
            (TaskState::Done, AgentState::Failed) => {
                let why = format!("after imaging: {}", u.error.unwrap_or("the agent failed"));
                tx.execute(
                    "UPDATE tasks SET state = 'failed', error = ?2 WHERE id = ?1",
                    params![id, why],
                )?;
            }
            // A host that reports while its task waits (the server restarted
            // from a copy that missed the claim) is running it.
            (TaskState::Pending, _) if dstate == DeploymentState::Running => {
                tx.execute(
                    "UPDATE tasks SET state = 'running', attempts = max(attempts, 1), \
                     started = coalesce(started, ?2) WHERE id = ?1",
                    params![id, now],
                )?;
            }
            _ => {}
        }
        if out.ended {
            settle(&tx, u.deployment, now)?;
        }
        let (dstate, tstate) = one(
            &tx,
            "SELECT d.state, t.state FROM tasks t JOIN deployments d ON d.id = t.deployment \
             WHERE t.id = ?1",
            [id],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )?
        .context("the task just updated")?;
        out.deployment_done = dstate == "done";
        out.stopped = dstate == "stopped" || tstate == "cancelled";
        tx.commit()?;
        Ok(Some(out))
    }

    /// Starts a deployment; `has_image` says whether the store holds an
    /// image (and can serve it). Returns its id.
    pub fn start(&self, req: &StartRequest, has_image: impl Fn(&str) -> bool) -> Result<u64> {
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        let now = now_ms();
        if let Some(img) = &req.image
            && !has_image(img)
        {
            bail!("image {img:?} is not in the store");
        }
        let max_attempts = req.max_attempts.unwrap_or(DEFAULT_ATTEMPTS).clamp(1, 100);
        let members: Vec<String> = if !req.hosts.is_empty() {
            let mut v = Vec::new();
            for m in &req.hosts {
                let m = normalize_mac(m)?;
                upsert_host(&tx, &m, now)?;
                tx.execute("UPDATE hosts SET registered = 1 WHERE mac = ?1", [&m])?;
                v.push(m);
            }
            v
        } else if let Some(g) = &req.group {
            if count(&tx, "SELECT count(*) FROM groups WHERE name = ?1", [g])? == 0 {
                bail!("no group {g:?}");
            }
            if let Some(id) = one(
                &tx,
                "SELECT id FROM deployments WHERE grp = ?1 AND state = 'running'",
                [g],
                |r| r.get::<_, i64>(0),
            )? {
                bail!("group {g:?} is already being deployed (deployment {id}): stop it first");
            }
            strings(
                &tx,
                "SELECT mac FROM hosts WHERE grp = ?1 AND registered = 1 ORDER BY mac",
                [g],
            )?
        } else {
            strings(
                &tx,
                "SELECT mac FROM hosts WHERE registered = 1 ORDER BY mac",
                [],
            )?
            .into_iter()
            .filter(|m| req.image.is_some() || job_of(&tx, m, self, None).ok().flatten().is_some())
            .collect()
        };
        if req.open
            && let Some(id) = one(
                &tx,
                "SELECT id FROM deployments WHERE open = 1 AND state = 'running'",
                [],
                |r| r.get::<_, i64>(0),
            )?
        {
            bail!("deployment {id} is already open to unknown hosts: stop it first");
        }
        if members.is_empty() && !req.open {
            bail!(match &req.group {
                Some(g) => format!("group {g:?} has no members"),
                None => "no registered host has a job: name hosts, or start it --open".into(),
            });
        }
        if members.len() > MAX_HOSTS {
            bail!(
                "{} hosts: more than {MAX_HOSTS} in one deployment",
                members.len()
            );
        }
        let busy: Vec<String> = members
            .iter()
            .filter_map(|m| {
                // As `open_task`: a task left open in a deployment that
                // is over (done once `expect` PCs were) holds nothing.
                one(
                    &tx,
                    "SELECT t.deployment FROM tasks t JOIN deployments d ON d.id = t.deployment \
                     WHERE t.mac = ?1 AND t.state IN ('pending','running') AND d.state = 'running'",
                    [m],
                    |r| r.get::<_, i64>(0),
                )
                .ok()
                .flatten()
                .map(|d| format!("{m} (deployment {d})"))
            })
            .collect();
        if !busy.is_empty() {
            bail!("already being imaged: {}", busy.join(", "));
        }
        let mut jobs = Vec::new();
        let mut jobless = Vec::new();
        for m in &members {
            match job_of(&tx, m, self, req.image.as_deref())? {
                Some(j) => jobs.push((m.clone(), j)),
                None => jobless.push(m.clone()),
            }
        }
        if !jobless.is_empty() {
            bail!(
                "no job for {}: give the host or its group a job, or start with an image",
                jobless.join(", ")
            );
        }
        let mut missing: Vec<&str> = jobs
            .iter()
            .map(|(_, j)| j.image.as_str())
            .filter(|i| !has_image(i))
            .collect();
        missing.dedup();
        if let Some(i) = missing.first() {
            bail!("image {i:?} is not in the store");
        }
        tx.execute(
            "INSERT INTO deployments (grp, image, expect, open, state, started) \
             VALUES (?1, ?2, ?3, ?4, 'running', ?5)",
            params![
                req.group,
                req.image,
                req.expect.map(|n| n as i64),
                req.open,
                now
            ],
        )?;
        let id = tx.last_insert_rowid();
        for (slot, (m, j)) in jobs.iter().enumerate() {
            tx.execute(
                "INSERT INTO tasks (deployment, mac, job, state, max_attempts, slot, created) \
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6)",
                params![id, m, to_json(j), max_attempts, slot as i64, now],
            )?;
        }
        tx.commit()?;
        tracing::info!(
            "deployment {id} started: {}{}{}",
            match (&req.group, req.hosts.is_empty()) {
                (_, false) => format!("{} listed hosts", jobs.len()),
                (Some(g), true) => format!("group {g}, {} hosts", jobs.len()),
                (None, true) => format!("{} hosts", jobs.len()),
            },
            if req.open {
                ", open to unknown hosts"
            } else {
                ""
            },
            req.expect
                .map_or(String::new(), |n| format!(", expecting {n}"))
        );
        Ok(id as u64)
    }

    /// Starts a capture task: a deployment of `mac` alone, whose disk
    /// becomes image `image`.
    /// The job is the host's own (its disk selector, `on_done`...) with
    /// `image` and `spec`.
    pub fn start_capture(&self, mac: &str, image: &str, spec: CaptureSpec) -> Result<u64> {
        let mac = normalize_mac(mac)?;
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        let now = now_ms();
        upsert_host(&tx, &mac, now)?;
        let job = Job {
            capture: Some(spec),
            ..job_of(&tx, &mac, self, Some(image))?.unwrap_or_else(|| Job::for_image(image))
        };
        let job = &job;
        tx.execute("UPDATE hosts SET registered = 1 WHERE mac = ?1", [&mac])?;
        if let Some(d) = one(
            &tx,
            "SELECT t.deployment FROM tasks t JOIN deployments d ON d.id = t.deployment \
             WHERE t.mac = ?1 AND t.state IN ('pending','running') AND d.state = 'running'",
            [&mac],
            |r| r.get::<_, i64>(0),
        )? {
            bail!("{mac} is busy in deployment {d}: stop it first");
        }
        tx.execute(
            "INSERT INTO deployments (grp, image, expect, open, state, started) \
             VALUES (NULL, ?1, NULL, 0, 'running', ?2)",
            params![job.image, now],
        )?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO tasks (deployment, mac, job, state, max_attempts, slot, created) \
             VALUES (?1, ?2, ?3, 'pending', ?4, 0, ?5)",
            params![id, mac, to_json(job), DEFAULT_ATTEMPTS, now],
        )?;
        tx.commit()?;
        tracing::info!(
            "deployment {id}: {mac} will capture its disk into image {}",
            job.image
        );
        Ok(id as u64)
    }

    /// The job of `mac`'s open task in running deployment `deployment`.
    pub fn running_job(&self, deployment: u64, mac: &str) -> Result<Option<Job>> {
        let c = self.db.lock();
        Ok(one(
            &c,
            "SELECT t.job AS job FROM tasks t JOIN deployments d ON d.id = t.deployment \
             WHERE t.deployment = ?1 AND t.mac = ?2 AND t.state IN ('pending','running') \
             AND d.state = 'running'",
            params![deployment as i64, mac],
            |r| json_col::<Job>(r, "job"),
        )?
        .flatten())
    }

    /// Ends a capture task as the server's pull did: done, or failed with
    /// `error`.
    pub fn finish_capture(&self, deployment: u64, mac: &str, error: Option<&str>) -> Result<()> {
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        let now = now_ms();
        tx.execute(
            "UPDATE tasks SET state = ?3, error = ?4, ended = ?5 \
             WHERE deployment = ?1 AND mac = ?2 AND state IN ('pending','running')",
            params![
                deployment as i64,
                mac,
                if error.is_some() { "failed" } else { "done" },
                error,
                now
            ],
        )?;
        settle(&tx, deployment, now)?;
        tx.commit()?;
        Ok(())
    }

    /// What a report that changes nothing but progress is answered: the
    /// task's and its deployment's standing. `None`: no such task.
    pub fn standing(&self, deployment: u64, mac: &str) -> Result<Option<Outcome>> {
        let c = self.db.lock();
        Ok(one(
            &c,
            "SELECT d.state, t.state FROM tasks t JOIN deployments d ON d.id = t.deployment \
             WHERE t.deployment = ?1 AND t.mac = ?2",
            params![deployment as i64, mac],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )?
        .map(|(d, t)| Outcome {
            deployment_done: d == "done",
            stopped: d == "stopped" || t == "cancelled",
            ended: false,
        }))
    }

    /// Writes hosts' progress (deployment, MAC, progress) in one transaction.
    pub fn save_progress(&self, batch: &[(u64, String, Progress)]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare(
                "UPDATE tasks SET done_bytes = ?3, total_bytes = ?4, uploaded_bytes = ?5, \
                 origin_bytes = ?6 WHERE deployment = ?1 AND mac = ?2",
            )?;
            for (d, mac, p) in batch {
                st.execute(params![
                    *d as i64,
                    mac,
                    p.done_bytes as i64,
                    p.total_bytes as i64,
                    p.uploaded_bytes as i64,
                    p.origin_bytes as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records which torrent a host's task is writing.
    pub fn set_info_hash(&self, deployment: u64, mac: &str, info_hash: &str) -> Result<()> {
        self.db.lock().execute(
            "UPDATE tasks SET info_hash = ?3 WHERE deployment = ?1 AND mac = ?2",
            params![deployment as i64, mac, info_hash],
        )?;
        Ok(())
    }

    /// Stops a running deployment: its open tasks are cancelled.
    pub fn stop(&self, id: u64) -> Result<()> {
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        let now = now_ms();
        let n = tx.execute(
            "UPDATE deployments SET state = 'stopped', ended = ?2 WHERE id = ?1 AND state = 'running'",
            params![id as i64, now],
        )?;
        if n == 0 {
            bail!("deployment {id} is not running");
        }
        tx.execute(
            "UPDATE tasks SET state = 'cancelled', ended = ?2 \
             WHERE deployment = ?1 AND state IN ('pending','running')",
            params![id as i64, now],
        )?;
        tx.commit()?;
        tracing::info!("deployment {id} stopped");
        Ok(())
    }

    /// `mac`'s group, if it is in one: its room for the tracker.
    pub fn group_of(&self, mac: &str) -> Result<Option<String>> {
        let c = self.db.lock();
        Ok(one(&c, "SELECT grp FROM hosts WHERE mac = ?1", [mac], |r| {
            r.get::<_, Option<String>>(0)
        })?
        .flatten())
    }

    pub fn db(&self) -> &Db {
        &self.db
    }
}

/// Records that `mac` was seen; true if it was known.
pub(super) fn upsert_host(tx: &Connection, mac: &str, now: i64) -> Result<bool> {
    let n = tx.execute(
        "UPDATE hosts SET last_seen = ?2 WHERE mac = ?1",
        params![mac, now],
    )?;
    if n == 0 {
        tx.execute(
            "INSERT INTO hosts (mac, registered, first_seen, last_seen) VALUES (?1, 0, ?2, ?2)",
            params![mac, now],
        )?;
    }
    Ok(n > 0)
}

/// Keeps unregistered hosts (a hostile LAN can make up MACs) bounded.
fn evict_unregistered(tx: &Tx) -> Result<()> {
    let n = count(tx, "SELECT count(*) FROM hosts WHERE registered = 0", [])?;
    if n > MAX_UNREGISTERED {
        tx.execute(
            "DELETE FROM hosts WHERE mac IN (SELECT mac FROM hosts h WHERE registered = 0 \
             AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.mac = h.mac) \
             ORDER BY last_seen LIMIT ?1)",
            [n - MAX_UNREGISTERED],
        )?;
    }
    Ok(())
}

struct OpenTask {
    id: i64,
    deployment: u64,
    state: TaskState,
    slot: u32,
    job: Job,
    disk: Option<DiskIdentity>,
}

/// `mac`'s open task in a running deployment, made now if an open
/// deployment takes the host; else why not.
fn open_task(
    tx: &Tx,
    mac: &str,
    rooms: &Rooms,
    may_join: &mut dyn FnMut(u64) -> bool,
) -> Result<Result<OpenTask, String>> {
    let row = |r: &rusqlite::Row| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, u32>(3)?,
            json_col::<Job>(r, "job")?,
            json_col::<DiskIdentity>(r, "disk")?,
        ))
    };
    let sql = "SELECT t.id, t.deployment, t.state, t.slot, t.job, t.disk FROM tasks t \
               JOIN deployments d ON d.id = t.deployment \
               WHERE t.mac = ?1 AND t.state IN ('pending','running') AND d.state = 'running' \
               ORDER BY t.id DESC LIMIT 1";
    if let Some((id, dep, state, slot, job, disk)) = one(tx, sql, [mac], row)? {
        return Ok(Ok(OpenTask {
            id,
            deployment: dep as u64,
            state: TaskState::parse(&state).context("a task's state")?,
            slot,
            job: job.context("a task without its job")?,
            disk,
        }));
    }
    let (registered, group) = one(
        tx,
        "SELECT registered, grp FROM hosts WHERE mac = ?1",
        [mac],
        |r| Ok((r.get::<_, bool>(0)?, r.get::<_, Option<String>>(1)?)),
    )?
    .unwrap_or((false, None));
    // An open deployment: with no group any host without a task in it
    // joins; with a group, hosts never approved join that group.
    if let Some((dep, dgroup, image)) = one(
        tx,
        "SELECT id, grp, image FROM deployments WHERE open = 1 AND state = 'running'",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        },
    )? && (dgroup.is_none() || !registered)
        && count(
            tx,
            "SELECT count(*) FROM tasks WHERE deployment = ?1 AND mac = ?2",
            params![dep, mac],
        )? == 0
    {
        let n = count(
            tx,
            "SELECT count(*) FROM tasks WHERE deployment = ?1",
            [dep],
        )?;
        if n >= MAX_HOSTS as i64 {
            return Ok(Err(format!("deployment {dep} is full ({MAX_HOSTS} hosts)")));
        }
        if !may_join(dep as u64) {
            return Ok(Err(format!(
                "deployment {dep} is full for this address: too many hosts joined from it"
            )));
        }
        // Joining is the admin's choice: the host is known from now on.
        tx.execute(
            "UPDATE hosts SET grp = coalesce(?2, grp), registered = 1 WHERE mac = ?1",
            params![mac, dgroup],
        )?;
        if let Some(job) = job_of(tx, mac, rooms, image.as_deref())? {
            tx.execute(
                "INSERT INTO tasks (deployment, mac, job, state, max_attempts, slot, created) \
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6)",
                params![dep, mac, to_json(&job), DEFAULT_ATTEMPTS, n, now_ms()],
            )?;
            tracing::info!("{mac} joined open deployment {dep}");
            return Ok(Ok(OpenTask {
                id: tx.last_insert_rowid(),
                deployment: dep as u64,
                state: TaskState::Pending,
                slot: n as u32,
                job,
                disk: None,
            }));
        }
    }
    // Why not: the latest task says, else the host's standing.
    let last = one(
        tx,
        "SELECT deployment, state, attempts, error, agent_state, id FROM tasks WHERE mac = ?1 \
         ORDER BY id DESC LIMIT 1",
        [mac],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, i64>(5)?,
            ))
        },
    )?;
    // Imaged, then restarted while fitting (grow, name, hooks, boot entry):
    // the disk may not be what the job asked for (a grow in progress leaves
    // it showing no table). Never silently "done": failed, with the reason.
    let fitting = serde_json::to_string(&AgentState::Fitting)?;
    let last = match last {
        Some((d, s, a, _, Some(agent), id)) if s == "done" && agent == fitting => {
            let why = "the PC restarted while fitting its disk after imaging (grow, name, hooks, \
                       boot entry); re-image it";
            tx.execute(
                "UPDATE tasks SET state = 'failed', error = ?2 WHERE id = ?1",
                params![id, why],
            )?;
            tracing::warn!("{mac}: {why}");
            Some((d, "failed".to_string(), a, Some(why.to_string())))
        }
        other => other.map(|(d, s, a, e, _, _)| (d, s, a, e)),
    };
    Ok(Err(match (last, registered) {
        (_, false) => {
            format!("{mac} is not registered: approve it, or open a deployment to unknown hosts")
        }
        (Some((d, s, _, _)), _) if s == "done" => {
            format!("{mac} was imaged by deployment {d}; re-image it to write it again")
        }
        (Some((d, s, a, e)), _) if s == "failed" => format!(
            "{mac} failed {a} times in deployment {d} ({}); re-image it to try again",
            e.as_deref().unwrap_or("no error reported")
        ),
        _ => match group {
            Some(g) => format!("no deployment of group {g} is running"),
            None => format!("no deployment for {mac} is running"),
        },
    }))
}

/// The job a host gets: its own, else its group's, else the default; with
/// `image`, that image instead of the job's.
fn job_of(tx: &Connection, mac: &str, rooms: &Rooms, image: Option<&str>) -> Result<Option<Job>> {
    let own = one(
        tx,
        "SELECT h.job AS job, g.job AS gjob FROM hosts h LEFT JOIN groups g ON g.name = h.grp \
         WHERE h.mac = ?1",
        [mac],
        |r| Ok((json_col::<Job>(r, "job")?, json_col::<Job>(r, "gjob")?)),
    )?;
    // A capture comes from `start_capture` alone, never from a stored job.
    let job = own
        .and_then(|(h, g)| h.or(g))
        .or_else(|| rooms.default_job.clone())
        .map(|j| Job { capture: None, ..j });
    Ok(match (job, image) {
        (Some(j), Some(i)) => Some(Job {
            image: i.to_string(),
            ..j
        }),
        (None, Some(i)) => Some(Job::for_image(i)),
        (j, None) => j,
    })
}

/// `mac`'s name (its own, else its group's template rendered with its slot)
/// and its slot in its group.
fn host_name(tx: &Connection, mac: &str) -> Result<(Result<Option<String>, String>, u32)> {
    let row = one(
        tx,
        "SELECT h.name, h.grp, h.grp_slot, g.hostname FROM hosts h \
         LEFT JOIN groups g ON g.name = h.grp WHERE h.mac = ?1",
        [mac],
        |r| {
            Ok((
                r.get::<_, Option<String>>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        },
    )?;
    let Some((own, grp, slot, template)) = row else {
        return Ok((Ok(None), 0));
    };
    let slot = slot.and_then(|s| u32::try_from(s).ok()).unwrap_or(0);
    // A name that is not a host name (an older label such as "PC 7 (front)")
    // stays the dashboard's label and is not written into the system.
    let own = own.filter(|n| crate::protocol::hostname::check(n, false).is_ok());
    let name = match (own, grp, template) {
        (Some(n), _, _) => Ok(Some(n)),
        (None, Some(g), Some(t)) if slot > 0 => {
            crate::protocol::hostname::render(&t, slot, mac, &g)
                .map(Some)
                .map_err(|e| format!("group {g:?}: {e:#}"))
        }
        _ => Ok(None),
    };
    Ok((name, slot))
}

fn exit_for(tx: &Connection, mac: &str) -> Result<Option<ExitType>> {
    Ok(one(
        tx,
        "SELECT h.exit AS exit, g.exit AS gexit FROM hosts h LEFT JOIN groups g ON g.name = h.grp \
         WHERE h.mac = ?1",
        [mac],
        |r| Ok(json_col::<ExitType>(r, "exit")?.or(json_col::<ExitType>(r, "gexit")?)),
    )?
    .flatten())
}

fn append_log(tx: &Tx, task: i64, now: i64, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    for l in lines {
        tx.execute(
            "INSERT INTO task_log (task, at, line) VALUES (?1, ?2, ?3)",
            params![task, now, l],
        )?;
    }
    tx.execute(
        "DELETE FROM task_log WHERE task = ?1 AND id <= \
         (SELECT id FROM task_log WHERE task = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        params![task, LOG_LINES_KEPT],
    )?;
    Ok(())
}

/// Marks a running deployment done once no task is open, or once
/// `expect` hosts are done.
fn settle(tx: &Tx, deployment: u64, now: i64) -> Result<()> {
    let c = counts(tx, deployment)?;
    let expect = one(
        tx,
        "SELECT expect FROM deployments WHERE id = ?1 AND state = 'running'",
        [deployment as i64],
        |r| r.get::<_, Option<i64>>(0),
    )?;
    let Some(expect) = expect else { return Ok(()) };
    let open = c.pending + c.running;
    let done = match expect {
        Some(n) if n > 0 => c.done >= n as usize || (open == 0 && c.total() >= n as usize),
        _ => open == 0 && c.total() > 0,
    };
    if done {
        tx.execute(
            "UPDATE deployments SET state = 'done', ended = ?2 WHERE id = ?1",
            params![deployment as i64, now],
        )?;
        tracing::info!(
            "deployment {deployment} done: {} hosts imaged, {} failed",
            c.done,
            c.failed
        );
    }
    Ok(())
}

mod edit;
mod view;

pub use edit::StoredSchedule;
pub use view::TaskLog;
use view::{counts, strings};

#[cfg(test)]
mod tests;

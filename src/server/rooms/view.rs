//! Rooms as the admin sees them: deployments, tasks, hosts, groups, logs.

use anyhow::Result;
use rusqlite::{Connection, params};

use super::Rooms;
use crate::protocol::Job;
use crate::protocol::admin::{
    DeploymentInfo, DeploymentState, GroupInfo, HostInfo, LogLine, TaskCounts, TaskInfo, TaskState,
};
use crate::server::config::normalize_mac;
use crate::server::db::{self, json_col, one};

impl Rooms {
    /// The running deployments, newest first.
    pub fn running(&self) -> Result<Vec<u64>> {
        let c = self.db.lock();
        let mut st =
            c.prepare("SELECT id FROM deployments WHERE state = 'running' ORDER BY id DESC")?;
        let v = st
            .query_map([], |r| r.get::<_, i64>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v.into_iter().map(|i| i as u64).collect())
    }

    /// The running deployment open to unknown hosts.
    pub fn running_open(&self) -> Result<Option<u64>> {
        let c = self.db.lock();
        Ok(one(
            &c,
            "SELECT id FROM deployments WHERE open = 1 AND state = 'running'",
            [],
            |r| r.get::<_, i64>(0),
        )?
        .map(|i| i as u64))
    }

    /// The running deployment of `group`.
    pub fn running_of(&self, group: &str) -> Result<Option<u64>> {
        let c = self.db.lock();
        Ok(one(
            &c,
            "SELECT id FROM deployments WHERE grp = ?1 AND state = 'running'",
            [group],
            |r| r.get::<_, i64>(0),
        )?
        .map(|i| i as u64))
    }

    pub fn deployment(&self, id: u64) -> Result<Option<DeploymentInfo>> {
        let c = self.db.lock();
        let Some(mut d) = one(
            &c,
            &format!("{DEPLOYMENT_COLS} WHERE id = ?1"),
            [id as i64],
            deployment_row,
        )?
        else {
            return Ok(None);
        };
        d.tasks = counts(&c, id)?;
        Ok(Some(d))
    }

    /// Deployments, newest first: the history (those in `state` only, if
    /// given).
    pub fn deployments(
        &self,
        limit: usize,
        before: Option<u64>,
        state: Option<DeploymentState>,
    ) -> Result<Vec<DeploymentInfo>> {
        let c = self.db.lock();
        let mut st = c.prepare(&format!(
            "{DEPLOYMENT_COLS} WHERE id < ?1 AND (?3 IS NULL OR state = ?3) \
             ORDER BY id DESC LIMIT ?2"
        ))?;
        let mut v = st
            .query_map(
                params![
                    before.map_or(i64::MAX, |b| b as i64),
                    limit as i64,
                    state.map(|s| s.as_str())
                ],
                deployment_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for d in &mut v {
            d.tasks = counts(&c, d.id)?;
        }
        Ok(v)
    }

    /// The tasks of a deployment, by slot, `offset`/`limit` paged.
    pub fn tasks(&self, deployment: u64, offset: usize, limit: usize) -> Result<Vec<TaskInfo>> {
        let c = self.db.lock();
        let mut st = c.prepare(&format!(
            "{TASK_COLS} WHERE t.deployment = ?1 ORDER BY t.slot LIMIT ?2 OFFSET ?3"
        ))?;
        let v = st
            .query_map(
                params![deployment as i64, limit as i64, offset as i64],
                task_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }

    pub fn hosts(&self) -> Result<Vec<HostInfo>> {
        self.hosts_page(0, usize::MAX)
    }

    /// A page of the hosts: unknown ones first, the latest seen on top,
    /// then the registered ones by MAC.
    pub fn hosts_page(&self, offset: usize, limit: usize) -> Result<Vec<HostInfo>> {
        let c = self.db.lock();
        let mut st = c.prepare(
            "SELECT mac, name, grp, registered, job, exit, last_seen FROM hosts \
             ORDER BY registered, CASE WHEN registered = 0 THEN last_seen END DESC, mac \
             LIMIT ?1 OFFSET ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut v = st
            .query_map(params![limit, offset as i64], |r| {
                Ok(HostInfo {
                    mac: r.get("mac")?,
                    name: r.get("name")?,
                    group: r.get("grp")?,
                    registered: r.get("registered")?,
                    job: json_col(r, "job")?,
                    exit: json_col(r, "exit")?,
                    last_seen_ms: r.get("last_seen")?,
                    task: None,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut latest = c.prepare(&format!(
            "{TASK_COLS} WHERE t.mac = ?1 ORDER BY t.id DESC LIMIT 1"
        ))?;
        for h in &mut v {
            h.task = latest.query_row([&h.mac], task_row).ok();
        }
        Ok(v)
    }

    pub fn groups(&self) -> Result<Vec<GroupInfo>> {
        let c = self.db.lock();
        let mut st =
            c.prepare("SELECT name, job, exit, wake, hostname FROM groups ORDER BY name")?;
        let mut v = st
            .query_map([], |r| {
                Ok(GroupInfo {
                    name: r.get("name")?,
                    job: json_col(r, "job")?,
                    exit: json_col(r, "exit")?,
                    wake: r
                        .get::<_, Option<String>>("wake")?
                        .and_then(|w| w.parse().ok()),
                    members: Vec::new(),
                    hostname: r.get("hostname")?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for g in &mut v {
            g.members = strings(
                &c,
                "SELECT mac FROM hosts WHERE grp = ?1 AND registered = 1 ORDER BY grp_slot, mac",
                [&g.name],
            )?;
        }
        Ok(v)
    }

    /// The last log lines and the error of `mac`'s latest task (or of one
    /// deployment's).
    pub fn log(&self, mac: &str, deployment: Option<u64>) -> Result<TaskLog> {
        let mac = normalize_mac(mac)?;
        let c = self.db.lock();
        let Some((task, dep, error)) = one(
            &c,
            "SELECT id, deployment, error FROM tasks WHERE mac = ?1 \
             AND (?2 IS NULL OR deployment = ?2) ORDER BY id DESC LIMIT 1",
            params![mac, deployment.map(|d| d as i64)],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            },
        )?
        else {
            return Ok(TaskLog::default());
        };
        let mut st = c.prepare("SELECT at, line FROM task_log WHERE task = ?1 ORDER BY id")?;
        let lines = st
            .query_map([task], |r| {
                Ok(LogLine {
                    at_ms: r.get(0)?,
                    line: r.get(1)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(TaskLog {
            deployment: Some(dep as u64),
            error,
            lines,
        })
    }

    /// MACs of a group's members and where their magic packets go.
    pub fn wake_targets(
        &self,
        group: Option<&str>,
        hosts: &[String],
    ) -> Result<Vec<(String, Option<String>)>> {
        let c = self.db.lock();
        let sql = "SELECT h.mac, g.wake FROM hosts h LEFT JOIN groups g ON g.name = h.grp \
                   WHERE h.registered = 1 AND (?1 IS NULL OR h.grp = ?1) ORDER BY h.mac";
        let mut st = c.prepare(sql)?;
        let v = st
            .query_map(params![group], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<(String, Option<String>)>>>()?;
        Ok(if hosts.is_empty() {
            v
        } else {
            v.into_iter().filter(|(m, _)| hosts.contains(m)).collect()
        })
    }
}

/// A task's log lines and error.
#[derive(Debug, Default)]
pub struct TaskLog {
    pub deployment: Option<u64>,
    pub error: Option<String>,
    pub lines: Vec<LogLine>,
}

pub(super) fn counts(c: &Connection, deployment: u64) -> Result<TaskCounts> {
    let mut st =
        c.prepare("SELECT state, count(*) FROM tasks WHERE deployment = ?1 GROUP BY state")?;
    let mut out = TaskCounts::default();
    for r in st.query_map([deployment as i64], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })? {
        let (s, n) = r?;
        if let Some(s) = TaskState::parse(&s) {
            out.add(s, n as usize);
        }
    }
    Ok(out)
}

pub(super) fn strings(c: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<Vec<String>> {
    let mut st = c.prepare(sql)?;
    let v = st
        .query_map(p, |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(v)
}

const DEPLOYMENT_COLS: &str =
    "SELECT id, grp, image, expect, open, state, started, ended FROM deployments";

fn deployment_row(r: &db::Row) -> rusqlite::Result<DeploymentInfo> {
    Ok(DeploymentInfo {
        id: r.get::<_, i64>("id")? as u64,
        group: r.get("grp")?,
        image: r.get("image")?,
        expect: r.get::<_, Option<i64>>("expect")?.map(|n| n as usize),
        open: r.get("open")?,
        state: DeploymentState::parse(&r.get::<_, String>("state")?)
            .unwrap_or(DeploymentState::Stopped),
        started_ms: r.get("started")?,
        ended_ms: r.get("ended")?,
        tasks: TaskCounts::default(),
    })
}

const TASK_COLS: &str = "SELECT t.deployment, t.mac, h.name, t.state, t.agent_state, t.job, \
    t.attempts, t.max_attempts, t.created, t.started, t.ended, t.done_bytes, t.total_bytes, \
    t.origin_bytes, t.uploaded_bytes, t.error, t.disk, t.verify, t.info_hash \
    FROM tasks t LEFT JOIN hosts h ON h.mac = t.mac";

fn task_row(r: &db::Row) -> rusqlite::Result<TaskInfo> {
    let job: Option<Job> = json_col(r, "job")?;
    Ok(TaskInfo {
        deployment: r.get::<_, i64>("deployment")? as u64,
        mac: r.get("mac")?,
        name: r.get("name")?,
        task: TaskState::parse(&r.get::<_, String>("state")?).unwrap_or(TaskState::Cancelled),
        state: json_col(r, "agent_state")?,
        verify: r.get::<_, Option<String>>("verify")?.or_else(|| {
            job.as_ref()
                .and_then(|j| serde_json::to_value(j.verify).ok())
                .and_then(|v| v.as_str().map(String::from))
        }),
        image: job.map(|j| j.image).unwrap_or_default(),
        info_hash: r.get("info_hash")?,
        attempts: r.get("attempts")?,
        max_attempts: r.get("max_attempts")?,
        created_ms: r.get("created")?,
        started_ms: r.get("started")?,
        ended_ms: r.get("ended")?,
        done_bytes: r.get::<_, i64>("done_bytes")? as u64,
        total_bytes: r.get::<_, i64>("total_bytes")? as u64,
        origin_bytes: r.get::<_, i64>("origin_bytes")? as u64,
        uploaded_bytes: r.get::<_, i64>("uploaded_bytes")? as u64,
        down_bps: 0.0,
        up_bps: 0.0,
        peers: 0,
        error: r.get("error")?,
        disk: json_col(r, "disk")?,
        seen_s_ago: None,
    })
}

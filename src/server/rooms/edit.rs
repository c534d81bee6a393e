//! Changing rooms: the config applied at start, hosts and groups edited,
//! schedules stored.

use anyhow::{Result, bail};
use rusqlite::params;

use super::{Rooms, upsert_host};
use crate::protocol::admin::{GroupInfo, HostUpdate, StartRequest};
use crate::server::config::{ServerConfig, normalize_mac};
use crate::server::db::{count, now_ms, to_json};

impl Rooms {
    /// The config declares hosts and groups; what it says wins over what
    /// the API changed, field by field, at every start.
    pub(super) fn apply_config(&self, cfg: &ServerConfig) -> Result<()> {
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        let now = now_ms();
        for g in &cfg.groups {
            tx.execute(
                "INSERT INTO groups (name) VALUES (?1) ON CONFLICT (name) DO NOTHING",
                [&g.name],
            )?;
            if let Some(j) = &g.job {
                tx.execute(
                    "UPDATE groups SET job = ?2 WHERE name = ?1",
                    params![g.name, to_json(j)],
                )?;
            }
            if let Some(e) = g.exit {
                tx.execute(
                    "UPDATE groups SET exit = ?2 WHERE name = ?1",
                    params![g.name, to_json(&e)],
                )?;
            }
            if let Some(w) = g.wake {
                tx.execute(
                    "UPDATE groups SET wake = ?2 WHERE name = ?1",
                    params![g.name, w.to_string()],
                )?;
            }
            if let Some(t) = &g.hostname {
                tx.execute(
                    "UPDATE groups SET hostname = ?2 WHERE name = ?1",
                    params![g.name, t],
                )?;
            }
            // The config's order is the members' slots.
            for (i, m) in g.members.iter().enumerate() {
                upsert_host(&tx, m, now)?;
                tx.execute(
                    "UPDATE hosts SET grp = ?2, grp_slot = ?3, registered = 1 WHERE mac = ?1",
                    params![m, g.name, i as i64 + 1],
                )?;
            }
        }
        for h in &cfg.hosts {
            upsert_host(&tx, &h.mac, now)?;
            tx.execute("UPDATE hosts SET registered = 1 WHERE mac = ?1", [&h.mac])?;
            if let Some(n) = &h.name {
                tx.execute(
                    "UPDATE hosts SET name = ?2 WHERE mac = ?1",
                    params![h.mac, n],
                )?;
            }
            if let Some(j) = &h.job {
                tx.execute(
                    "UPDATE hosts SET job = ?2 WHERE mac = ?1",
                    params![h.mac, to_json(j)],
                )?;
            }
            if let Some(e) = h.exit {
                tx.execute(
                    "UPDATE hosts SET exit = ?2 WHERE mac = ?1",
                    params![h.mac, to_json(&e)],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn update_host(
        &self,
        mac: &str,
        u: &HostUpdate,
        has_image: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let mac = normalize_mac(mac)?;
        if let Some(j) = &u.job {
            j.check()?;
            if !has_image(&j.image) {
                bail!("image {:?} is not in the store", j.image);
            }
        }
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        upsert_host(&tx, &mac, now_ms())?;
        if let Some(g) = &u.group
            && count(&tx, "SELECT count(*) FROM groups WHERE name = ?1", [g])? == 0
        {
            bail!("no group {g:?}");
        }
        // The admin naming a MAC knows it.
        tx.execute("UPDATE hosts SET registered = 1 WHERE mac = ?1", [&mac])?;
        if let Some(g) = &u.group {
            join_group(&tx, &mac, g)?;
        }
        for (col, v) in [
            ("name", u.name.clone()),
            ("grp", u.group.clone()),
            ("job", u.job.as_ref().map(to_json)),
            ("exit", u.exit.as_ref().map(to_json)),
        ] {
            if let Some(v) = v {
                tx.execute(
                    &format!("UPDATE hosts SET {col} = ?2 WHERE mac = ?1"),
                    params![mac, v],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn put_group(&self, g: &GroupInfo, has_image: impl Fn(&str) -> bool) -> Result<()> {
        if g.name.is_empty() || g.name.len() > 64 {
            bail!("a group's name is 1 to 64 characters");
        }
        if let Some(j) = &g.job {
            j.check()?;
            if !has_image(&j.image) {
                bail!("image {:?} is not in the store", j.image);
            }
        }
        if let Some(t) = &g.hostname {
            crate::protocol::hostname::check_template(t, &g.name)?;
        }
        let mut c = self.db.lock();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT INTO groups (name, job, exit, wake, hostname) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (name) DO UPDATE SET job = ?2, exit = ?3, wake = ?4, hostname = ?5",
            params![
                g.name,
                g.job.as_ref().map(to_json),
                g.exit.as_ref().map(to_json),
                g.wake.map(|w| w.to_string()),
                g.hostname
            ],
        )?;
        let now = now_ms();
        for m in &g.members {
            let m = normalize_mac(m)?;
            upsert_host(&tx, &m, now)?;
            tx.execute("UPDATE hosts SET registered = 1 WHERE mac = ?1", [&m])?;
            join_group(&tx, &m, &g.name)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores a schedule for `group`; `spec` is its stored form.
    pub fn add_schedule(&self, req: &StartRequest, spec: &str) -> Result<u64> {
        let Some(g) = &req.group else {
            bail!("a schedule starts a group: give --group");
        };
        if !req.hosts.is_empty() || req.open {
            bail!("a schedule starts a group, without listed hosts or --open");
        }
        let c = self.db.lock();
        if count(&c, "SELECT count(*) FROM groups WHERE name = ?1", [g])? == 0 {
            bail!("no group {g:?}");
        }
        if count(&c, "SELECT count(*) FROM schedules WHERE enabled = 1", [])? >= 1000 {
            bail!("1000 schedules already: remove some first");
        }
        c.execute(
            "INSERT INTO schedules (grp, image, spec, wake, expect, created) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                g,
                req.image,
                spec,
                req.wake,
                req.expect.map(|n| n as i64),
                now_ms()
            ],
        )?;
        Ok(c.last_insert_rowid() as u64)
    }

    /// The schedules still enabled, with the last fire dealt with.
    pub fn schedules(&self) -> Result<Vec<StoredSchedule>> {
        let c = self.db.lock();
        let mut st = c.prepare(
            "SELECT id, grp, image, spec, wake, expect, last_fired, enabled FROM schedules \
             WHERE enabled = 1 ORDER BY id",
        )?;
        let v = st
            .query_map([], |r| {
                Ok(StoredSchedule {
                    id: r.get::<_, i64>(0)? as u64,
                    request: StartRequest {
                        group: Some(r.get(1)?),
                        image: r.get(2)?,
                        wake: r.get(4)?,
                        expect: r.get::<_, Option<i64>>(5)?.map(|n| n as usize),
                        ..Default::default()
                    },
                    spec: r.get(3)?,
                    handled_ms: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(v)
    }

    /// Records that a schedule's fire at `at_ms` was dealt with.
    pub fn schedule_handled(&self, id: u64, at_ms: i64) -> Result<()> {
        self.db.lock().execute(
            "UPDATE schedules SET last_fired = ?2 WHERE id = ?1",
            params![id as i64, at_ms],
        )?;
        Ok(())
    }

    /// Ends a schedule (it will not fire again; it stays in the history).
    pub fn end_schedule(&self, id: u64) -> Result<()> {
        let n = self.db.lock().execute(
            "UPDATE schedules SET enabled = 0 WHERE id = ?1 AND enabled = 1",
            [id as i64],
        )?;
        if n == 0 {
            bail!("no schedule {id}");
        }
        Ok(())
    }
}

/// Makes `mac` a member of `group`; a new member takes the next slot, a
/// member keeps its own.
fn join_group(tx: &rusqlite::Transaction, mac: &str, group: &str) -> Result<()> {
    tx.execute(
        "UPDATE hosts SET grp = ?2, grp_slot = (SELECT coalesce(max(grp_slot), 0) + 1 \
         FROM hosts WHERE grp = ?2) WHERE mac = ?1 AND (grp IS NOT ?2 OR grp_slot IS NULL)",
        params![mac, group],
    )?;
    Ok(())
}

/// A schedule as stored: what it starts, when, and the last fire handled.
#[derive(Debug, Clone)]
pub struct StoredSchedule {
    pub id: u64,
    pub request: StartRequest,
    pub spec: String,
    pub handled_ms: Option<i64>,
}

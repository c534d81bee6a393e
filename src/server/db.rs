//! The server's memory across restarts: one SQLite file in `state_dir`.
//!
//! Hosts, groups, deployments, their one-shot tasks (with results and the
//! agent's last log lines) and schedules live here; `rooms.rs` owns what
//! they mean. Live progress is kept in memory and written here in batches.
//!
//! The schema is versioned with `PRAGMA user_version`: [`MIGRATIONS`] is
//! append-only, and opening a database runs the steps it has not seen, in
//! one transaction each, so a database from any earlier version opens.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension};

pub use rusqlite::Row;

/// Step N brings a database from version N to N + 1. Never edit a step
/// that shipped; add one.
pub const MIGRATIONS: &[&str] = &[
    // 1: hosts, groups, deployments and their tasks.
    "CREATE TABLE hosts (
        mac TEXT PRIMARY KEY,
        name TEXT,
        grp TEXT,
        job TEXT,
        exit TEXT,
        registered INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL
    );
    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        job TEXT,
        exit TEXT,
        wake TEXT
    );
    CREATE TABLE deployments (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        grp TEXT,
        image TEXT,
        expect INTEGER,
        open INTEGER NOT NULL,
        state TEXT NOT NULL,
        started INTEGER NOT NULL,
        ended INTEGER
    );
    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment INTEGER NOT NULL REFERENCES deployments(id),
        mac TEXT NOT NULL,
        job TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        slot INTEGER NOT NULL,
        created INTEGER NOT NULL,
        started INTEGER,
        ended INTEGER,
        disk TEXT,
        agent_state TEXT,
        done_bytes INTEGER NOT NULL DEFAULT 0,
        total_bytes INTEGER NOT NULL DEFAULT 0,
        uploaded_bytes INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        UNIQUE (deployment, mac)
    );
    CREATE INDEX tasks_by_mac ON tasks (mac, state);",
    // 2: results in full (bytes by source, the verify mode), the agents'
    // log lines, and schedules.
    "ALTER TABLE tasks ADD COLUMN origin_bytes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN verify TEXT;
    ALTER TABLE tasks ADD COLUMN info_hash TEXT;
    CREATE TABLE task_log (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        task INTEGER NOT NULL REFERENCES tasks(id),
        at INTEGER NOT NULL,
        line TEXT NOT NULL
    );
    CREATE INDEX task_log_by_task ON task_log (task, id);
    CREATE TABLE schedules (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        grp TEXT NOT NULL,
        image TEXT,
        spec TEXT NOT NULL,
        wake INTEGER NOT NULL,
        expect INTEGER,
        created INTEGER NOT NULL,
        last_fired INTEGER,
        enabled INTEGER NOT NULL DEFAULT 1
    );",
    // 3: host names from a group's template: the template, and each
    // member's 1-based position in its group (the template's {slot}).
    "ALTER TABLE groups ADD COLUMN hostname TEXT;
    ALTER TABLE hosts ADD COLUMN grp_slot INTEGER;",
];

/// One connection behind a lock: every call is a few small statements
/// (well under a millisecond in WAL mode), so callers on the runtime
/// simply take it.
pub struct Db {
    conn: Mutex<Connection>,
}

impl Db {
    /// Opens (creating if needed) `dir/blockswarm.db` and brings its schema
    /// up to date.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
        let path = dir.join("blockswarm.db");
        let conn = Connection::open(&path)
            .with_context(|| format!("opening the database {}", path.display()))?;
        Self::with(conn).with_context(|| format!("in {}", path.display()))
    }

    /// A database in memory, for tests.
    pub fn memory() -> Result<Self> {
        Self::with(Connection::open_in_memory()?)
    }

    fn with(mut conn: Connection) -> Result<Self> {
        // WAL: readers never wait for the writer; NORMAL: a commit survives
        // a crash of the process (not always of the machine: a few seconds of
        // progress, never a task's result, since results are re-reported).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// The connection. A panic while it was held leaves no half-done
    /// transaction behind (rusqlite rolls back on drop), so a poisoned lock
    /// is taken over.
    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The schema version of a database.
pub fn version(conn: &Connection) -> Result<usize> {
    let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    Ok(v as usize)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let from = version(conn)?;
    if from > MIGRATIONS.len() {
        bail!(
            "the database is at schema version {from}, newer than this blockswarm knows \
             ({}): run the newer blockswarm, or restore a backup of the state directory",
            MIGRATIONS.len()
        );
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(from) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)
            .with_context(|| format!("migrating the schema to version {}", i + 1))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        if from > 0 {
            tracing::info!("database schema migrated to version {}", i + 1);
        }
    }
    Ok(())
}

/// Milliseconds since the Unix epoch: every time in the database.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A JSON column as `T`; a value this version cannot read is an error
/// naming the column, never a panic.
pub fn json_col<T: serde::de::DeserializeOwned>(
    row: &Row,
    col: &str,
) -> rusqlite::Result<Option<T>> {
    let Some(s) = row.get::<_, Option<String>>(col)? else {
        return Ok(None);
    };
    serde_json::from_str(&s).map(Some).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

pub fn one<T>(
    conn: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
    f: impl FnOnce(&Row) -> rusqlite::Result<T>,
) -> Result<Option<T>> {
    Ok(conn.query_row(sql, p, f).optional()?)
}

pub fn count(conn: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<i64> {
    Ok(conn.query_row(sql, p, |r| r.get(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    #[test]
    fn a_new_database_is_at_the_latest_version() {
        let db = Db::memory().unwrap();
        assert_eq!(version(&db.lock()).unwrap(), MIGRATIONS.len());
    }

    #[test]
    fn a_database_of_the_first_version_opens_and_keeps_its_rows() {
        let t = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(t.path().join("blockswarm.db")).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO deployments (grp, image, open, state, started) \
                 VALUES ('room-1', 'win', 0, 'running', 5)",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO tasks (deployment, mac, job, state, max_attempts, slot, created) \
                 VALUES (1, '52:54:00:00:00:01', '{}', 'done', 3, 0, 5)",
                params![],
            )
            .unwrap();
        }
        let db = Db::open(t.path()).unwrap();
        let c = db.lock();
        assert_eq!(version(&c).unwrap(), MIGRATIONS.len());
        let (state, origin): (String, i64) = c
            .query_row("SELECT state, origin_bytes FROM tasks", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((state.as_str(), origin), ("done", 0));
        // Ids go on from where they were.
        c.execute(
            "INSERT INTO deployments (open, state, started) VALUES (0, 'running', 6)",
            [],
        )
        .unwrap();
        assert_eq!(c.last_insert_rowid(), 2);
    }

    #[test]
    fn a_database_from_a_newer_version_is_refused_with_a_reason() {
        let t = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(t.path().join("blockswarm.db")).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        let e = format!("{:#}", Db::open(t.path()).err().unwrap());
        assert!(e.contains("schema version 99, newer"), "{e}");
    }
}

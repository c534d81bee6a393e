//! Post-deploy hooks: scripts the server serves from its `hooks/` folder,
//! named by the job, run in order after the identity step with the
//! target's partitions mounted. Each runs in its own process group, is
//! killed (with everything it started) past the job's `hook_timeout`, and
//! its output goes line by line into the log the server receives.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tracing::info;

use super::mount::Mounts;
use crate::agent::client::Client;
use crate::protocol::{JobResponse, MAX_HOOKS, check_hook_name};

/// Longest output line kept; the rest of the line is cut.
const MAX_LINE: usize = 400;

pub struct Script {
    pub name: String,
    pub body: Vec<u8>,
}

/// Fetches every hook the job names, or fails naming the first it cannot.
pub async fn fetch(client: &Client, names: &[String]) -> Result<Vec<Script>> {
    if names.len() > MAX_HOOKS {
        bail!("the job names {} hooks; at most {MAX_HOOKS}", names.len());
    }
    let mut v = Vec::new();
    for name in names {
        check_hook_name(name)?;
        let body = client
            .fetch_hook(name)
            .await
            .with_context(|| format!("fetching hook {name}"))?;
        v.push(Script {
            name: name.clone(),
            body,
        });
    }
    Ok(v)
}

/// Runs the scripts in order; the first that fails (or overruns) fails
/// the task, naming it and its exit.
pub fn run(scripts: &[Script], mounts: &Mounts, job: &JobResponse) -> Result<()> {
    if scripts.is_empty() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let limit = Duration::from_secs(job.job.hook_timeout.max(1));
    for s in scripts {
        let path = dir.path().join(&s.name);
        std::fs::write(&path, &s.body)?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg(&path)
            .current_dir(dir.path())
            .env("HOST", job.host.as_deref().unwrap_or(""))
            .env("MAC", &job.mac)
            .env("IMAGE", &job.job.image)
            .env("SLOT", job.slot.to_string())
            .env("DEPLOYMENT", job.deployment.to_string());
        for m in &mounts.list {
            cmd.env(format!("BLOCKSWARM_MNT_{}", m.number), &m.dir);
        }
        info!("hook {}: running (at most {} s)", s.name, limit.as_secs());
        let t0 = Instant::now();
        match run_one(&mut cmd, &s.name, limit)? {
            Outcome::Exited(0) => {
                info!(
                    "hook {}: done in {:.1} s",
                    s.name,
                    t0.elapsed().as_secs_f64()
                )
            }
            Outcome::Exited(c) => bail!("hook {} failed with exit code {c}", s.name),
            Outcome::Signalled(sig) => bail!("hook {} was killed by signal {sig}", s.name),
            Outcome::TimedOut => bail!(
                "hook {} ran past its time limit of {} s and was killed",
                s.name,
                limit.as_secs()
            ),
        }
    }
    Ok(())
}

enum Outcome {
    Exited(i32),
    Signalled(i32),
    TimedOut,
}

fn run_one(cmd: &mut Command, name: &str, limit: Duration) -> Result<Outcome> {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    use std::os::unix::process::ExitStatusExt;

    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting hook {name}"))?;
    let pgid = Pid::from_raw(child.id() as i32);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut readers = 0;
    let outs = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    ];
    for r in outs.into_iter().flatten() {
        let (name, done) = (name.to_string(), done_tx.clone());
        std::thread::spawn(move || {
            log_lines(r, &name);
            let _ = done.send(());
        });
        readers += 1;
    }
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() > limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Whatever the script left running goes too: it must not hold the
    // mounts, or write after the check.
    let _ = killpg(pgid, Signal::SIGKILL);
    if status.is_none() {
        let _ = child.wait();
    }
    // A process that left the group (setsid) may hold the pipes open: its
    // output is not waited for past a few seconds.
    let until = Instant::now() + Duration::from_secs(5);
    for _ in 0..readers {
        let left = until.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    Ok(match status {
        None => Outcome::TimedOut,
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => Outcome::Exited(c),
            (None, Some(sig)) => Outcome::Signalled(sig),
            (None, None) => Outcome::Signalled(0),
        },
    })
}

fn log_lines(r: Box<dyn Read + Send>, name: &str) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Bounded: a line without an end is cut at MAX_LINE.
        match (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end();
                if !line.is_empty() {
                    info!("hook {name}: {line}");
                }
            }
        }
    }
}

//! Runs saved inputs through the fuzz targets, without the fuzzer.
//!
//!   replay --list                 the targets' names, one per line
//!   replay TARGET PATH...         each file (or each file in a directory)
//!   replay --all DIR              DIR/TARGET/* for every target
//!
//! Prints one line per failing input (a panic, or slower than --slow-ms,
//! default 1000) and a summary per target; exits 1 if any input failed.
//! An input still running after 30 s ends the process as a hang.

use std::path::{Path, PathBuf};
use std::process::exit;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blockswarm_fuzz::{TARGETS, Target, find};

/// The input being run and since when, for the watchdog.
static CURRENT: Mutex<Option<(String, Instant)>> = Mutex::new(None);
const HANG: Duration = Duration::from_secs(30);

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut slow = Duration::from_millis(1000);
    if let Some(i) = args.iter().position(|a| a == "--slow-ms") {
        let ms = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| usage());
        slow = Duration::from_millis(ms);
        args.drain(i..i + 2);
    }
    let jobs: Vec<(&Target, Vec<PathBuf>)> = match args.first().map(String::as_str) {
        Some("--list") => {
            for t in TARGETS {
                println!("{}\t{}", t.name, t.input);
            }
            return;
        }
        Some("--all") if args.len() == 2 => TARGETS
            .iter()
            .map(|t| (t, vec![Path::new(&args[1]).join(t.name)]))
            .collect(),
        Some(name) if args.len() >= 2 => {
            let t = find(name).unwrap_or_else(|| {
                eprintln!("replay: unknown target {name:?}");
                exit(2)
            });
            vec![(t, args[1..].iter().map(PathBuf::from).collect())]
        }
        _ => usage(),
    };
    std::thread::spawn(watchdog);
    // Quiet: third-party parsers' panics that blockswarm catches are not
    // findings; an uncaught one is reported below with its message.
    let msg: &'static Mutex<String> = Box::leak(Box::default());
    std::panic::set_hook(Box::new(|info| {
        *msg.lock().unwrap_or_else(|e| e.into_inner()) = info.to_string();
    }));
    let mut failed = 0;
    for (t, paths) in jobs {
        let files = inputs(&paths);
        let (mut bad, start) = (0, Instant::now());
        for f in &files {
            let data = std::fs::read(f).unwrap_or_else(|e| {
                eprintln!("replay: reading {}: {e}", f.display());
                exit(2)
            });
            let label = format!("{} {}", t.name, f.display());
            *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((label.clone(), Instant::now()));
            let t0 = Instant::now();
            let r = std::panic::catch_unwind(|| (t.run)(&data));
            let took = t0.elapsed();
            *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
            if r.is_err() {
                let m = msg.lock().unwrap_or_else(|e| e.into_inner()).clone();
                println!("CRASH {label}: {m}");
                bad += 1;
            } else if took > slow {
                println!("SLOW  {label}: {took:.2?}");
                bad += 1;
            }
        }
        println!(
            "{:<14} {:>5} inputs  {:>3} failed  {:.2?}",
            t.name,
            files.len(),
            bad,
            start.elapsed()
        );
        failed += bad;
    }
    if failed > 0 {
        exit(1);
    }
}

fn usage() -> ! {
    eprintln!("usage: replay --list | replay [--slow-ms N] (TARGET PATH... | --all DIR)");
    exit(2)
}

/// Files named by `paths`, directories expanded one level, sorted; a
/// missing directory holds nothing.
fn inputs(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .unwrap_or_else(|e| {
                    eprintln!("replay: listing {}: {e}", p.display());
                    exit(2)
                })
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            v.sort();
            out.extend(v);
        } else if p.exists() {
            out.push(p.clone());
        }
    }
    out
}

fn watchdog() {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if let Some((label, since)) = &*CURRENT.lock().unwrap_or_else(|e| e.into_inner())
            && since.elapsed() > HANG
        {
            println!("HANG  {label}: still running after {HANG:?}");
            exit(1);
        }
    }
}

//! The dashboard in headless Chromium: it lists the hosts, and their
//! progress moves without a reload.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// The page's DOM after its scripts ran for a while.
fn render(url: &str, profile: &std::path::Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=3000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .expect("chromium (install it with scripts/install-deps)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Overall percentage of the hosts' progress shown in the page.
fn shown_percent(dom: &str) -> Vec<f64> {
    dom.split("class=\"pct\">")
        .skip(1)
        .filter_map(|s| s.split('%').next()?.parse().ok())
        .collect()
}

#[test]
fn dashboard_shows_hosts_and_live_progress() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "master.img", "gpt", 24);
    let size = std::fs::metadata(&disk).unwrap().len();
    capture(&disk, &t.path().join("images/lab"), true);
    let srv = Server::start(
        t.path(),
        Some(2),
        &format!("seed_upload_limit = \"3M\"\n[default_job]\nimage = \"lab\"\n{TEST_JOB}"),
    );
    srv.wait_seeding("lab");
    let macs = ["52:54:00:00:60:01", "52:54:00:00:60:02"];
    let mut agents: Vec<Agent> = macs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let tgt = t.path().join(format!("pc{i}.img"));
            blank_target(&tgt, size, false);
            Agent::start(&srv.url, m, &tgt)
        })
        .collect();
    srv.wait_for(
        |v| {
            v["hosts"].as_array().is_some_and(|h| {
                h.len() == 2 && h.iter().all(|h| h["done_bytes"].as_u64().unwrap_or(0) > 0)
            })
        },
        "both hosts to start",
    );
    let profile = t.path().join("chromium");
    let first = render(&format!("{}/", srv.url), &profile);
    for m in macs {
        assert!(
            first.contains(m),
            "host {m} missing from the page:\n{first}"
        );
    }
    assert!(first.contains("deployment 1: running"), "{first}");
    // One page load refreshes itself, about once a second.
    let n: u32 = first
        .split("(refresh ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(n >= 2, "the page did not refresh itself: {n}");
    let p1 = shown_percent(&first);
    std::thread::sleep(Duration::from_secs(4));
    let second = render(&format!("{}/", srv.url), &profile);
    let p2 = shown_percent(&second);
    assert_eq!(p1.len(), 2, "{first}");
    assert_eq!(p2.len(), 2, "{second}");
    assert!(
        p2.iter().sum::<f64>() > p1.iter().sum::<f64>(),
        "progress did not move: {p1:?} then {p2:?}"
    );
    for a in &mut agents {
        a.wait_ok(180);
    }
    let done = render(&format!("{}/", srv.url), &profile);
    assert!(
        done.contains("deployment 1: done") && done.contains("2/2 hosts finished"),
        "{done}"
    );
}

//! The swarm lab's small version (issue 4), run in CI: `scripts/lab` builds
//! a switched LAN of network namespaces with 4 hosts on 20 Mbit/s ports and a
//! 24 MiB payload (S/B ≈ 10 s), and runs the real `serve` and 4 real agents
//! on it. Every target must verify, and the server's seed must upload at most
//! twice the payload. The full matrix is a benchmark run by hand
//! (docs/benchmarks.md, "Swarm lab").

use std::path::Path;
use std::process::Command;

/// Runs scripts/lab and returns its results.json runs.
fn lab(dir: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let out_dir = dir.join("out");
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/lab"))
        .args(args)
        .args(["--bin", env!("CARGO_BIN_EXE_blockswarm")])
        .arg("--out")
        .arg(&out_dir)
        .arg("--work")
        .arg(dir.join("work"))
        .output()
        .expect("running scripts/lab (python3)");
    let log = format!(
        "scripts/lab {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(out_dir.join("results.json"))
        .unwrap_or_else(|e| panic!("no results.json ({e}); {log}"));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(out.status.success(), "{log}");
    eprintln!("{log}");
    v["runs"].as_array().unwrap().clone()
}

/// Runs the lab's small version (4 hosts, 20 Mbit/s, 24 MiB) of one
/// scenario with `tools`.
fn small_lab(scenario: &str, tools: &str) -> Vec<serde_json::Value> {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the lab needs root (network namespaces, tc); CI runs as root"
    );
    let t = tempfile::tempdir().unwrap();
    lab(
        t.path(),
        &[
            "--hosts",
            "4",
            "--rate",
            "20mbit",
            "--payload-mib",
            "24",
            "--scenario",
            scenario,
            "--tools",
            tools,
            "--timeout",
            "240",
        ],
    )
}

#[test]
fn lab_four_hosts_ideal() {
    let runs = small_lab("ideal", "blockswarm,udpcast");
    let bs = runs
        .iter()
        .find(|r| r["tool"] == "blockswarm")
        .expect("a blockswarm run");
    let show = serde_json::to_string_pretty(bs).unwrap();
    let sb = bs["sb_s"].as_f64().unwrap();
    assert!((8.0..=12.5).contains(&sb), "S/B = {sb} s, not about 10 s");
    assert_eq!(bs["hosts"], 4);
    assert_room_done(bs);
    let ratio = bs["seed_ratio"].as_f64().unwrap();
    assert!(
        ratio <= 2.0,
        "seed upload ÷ payload = {ratio:.2} > 2.0: {show}"
    );
    let times = bs["host_times_s"].as_array().unwrap();
    assert_eq!(times.len(), 4);
    assert!(
        times.iter().all(|t| t.as_f64().is_some_and(|t| t > 0.0)),
        "{show}"
    );
    // The multicast baseline on the same LAN, so that it keeps working.
    let uc = runs
        .iter()
        .find(|r| r["tool"] == "udpcast")
        .expect("a udpcast run");
    assert_eq!(uc["targets_ok"], 4, "{uc}");
}

/// Every host of the four finished, the deployment ended, and every target
/// verifies.
fn assert_room_done(bs: &serde_json::Value) {
    let show = serde_json::to_string_pretty(bs).unwrap();
    assert_eq!(bs["completed"], true, "not every host finished: {show}");
    assert_eq!(bs["deployment_done"], true, "{show}");
    assert_eq!(bs["targets_ok"], 4, "a target does not verify: {show}");
    assert_eq!(bs["correct"], true, "{show}");
}

/// A host that joins when the others are half done: it saw none of their
/// earlier claims on the origin's pieces, and must still get every piece.
#[test]
fn lab_four_hosts_late_joiner() {
    let runs = small_lab("late", "blockswarm");
    let bs = &runs[0];
    let show = serde_json::to_string_pretty(bs).unwrap();
    assert_eq!(bs["late_host"], 4, "{show}");
    assert!(bs["late_joined_at_s"].as_f64().is_some(), "{show}");
    assert_room_done(bs);
}

/// One host on a port at a tenth of the rate: the others must not wait for
/// the pieces it took, and it must still get every piece.
#[test]
fn lab_four_hosts_one_slow() {
    let runs = small_lab("slow", "blockswarm");
    let bs = &runs[0];
    let show = serde_json::to_string_pretty(bs).unwrap();
    assert_eq!(bs["slow_host"], 4, "{show}");
    assert_room_done(bs);
    // The slow host needs ten times S/B on its own port.
    let (all, fast) = (
        bs["T_s"].as_f64().unwrap(),
        bs["T_fast_s"].as_f64().unwrap(),
    );
    assert!(
        fast < 0.5 * all,
        "the fast hosts took {fast} s, the slow one {all} s: {show}"
    );
}

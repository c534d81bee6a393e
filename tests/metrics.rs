//! `/metrics` parsed as strict OpenMetrics: counters end in `_total`, a
//! state is its own 0/1 series and never a label of a value series,
//! admin-chosen names are escaped, and the series follow the rooms (a
//! stopped deployment's hosts leave none behind).

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::*;
use openmetrics_parser::{MetricsExposition, OpenMetricsType, OpenMetricsValue, Sample};
use serde_json::{Value, json};

/// Names an admin may choose, with what the text format must escape.
const GROUP: &str = "room \"A\" \\ 1\nsecond line";
const IMAGE: &str = "win \"11\" \\ x\ny";
const HOST: &str = "pc\\1 \"front\"\n";

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// What Prometheus asks for.
const OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// curl: (HTTP status, Content-Type, body).
fn curl(method: &str, url: &str, body: Option<&Value>) -> (u16, String, String) {
    curl_accept(method, url, body, "*/*")
}

fn curl_accept(
    method: &str,
    url: &str,
    body: Option<&Value>,
    accept: &str,
) -> (u16, String, String) {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-g",
        "-X",
        method,
        "-w",
        "\n%{content_type}\n%{http_code}",
    ])
    .args(["-H", "Authorization: Bearer t0ken", "-H"])
    .arg(format!("Accept: {accept}"));
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(b.to_string());
    }
    let out = String::from_utf8(c.arg(url).output().expect("curl").stdout).unwrap();
    let mut parts = out.rsplitn(3, '\n');
    let code = parts.next().unwrap().trim().parse().unwrap();
    let ctype = parts.next().unwrap().to_string();
    (code, ctype, parts.next().unwrap_or_default().to_string())
}

fn call(srv: &Server, method: &str, path: &str, body: Value) -> Value {
    let (code, _, out) = curl(method, &format!("{}{path}", srv.url), Some(&body));
    assert_eq!(code, 200, "{method} {path}: {out}");
    serde_json::from_str(&out).unwrap()
}

/// Every byte but [A-Za-z0-9] percent-encoded, for a path segment.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn report(mac: &str, dep: u64, token: &str, state: &str, done: u64) -> Value {
    json!({
        "mac": mac, "state": state, "deployment": dep, "image": IMAGE, "target": null,
        "done_bytes": done, "total_bytes": 5000, "uploaded_bytes": 42, "origin_bytes": 700,
        "down_bps": 123.5, "up_bps": 0.0, "peers": 3, "error": null, "elapsed_s": 1.0,
        "token": token,
    })
}

/// Fetches `mac`'s job and sends one report with its token.
fn host_reports(srv: &Server, mac: &str, state: &str, done: u64) {
    let (code, _, j) = curl("GET", &format!("{}/api/v1/jobs/{mac}", srv.url), None);
    assert_eq!(code, 200, "{j}");
    let j: Value = serde_json::from_str(&j).unwrap();
    let dep = j["deployment"].as_u64().unwrap();
    let tok = j["token"].as_str().unwrap();
    call(
        srv,
        "POST",
        "/api/v1/status",
        report(mac, dep, tok, state, done),
    );
}

/// Scrapes `/metrics`, parses it strictly and checks the conventions every
/// exposition keeps.
fn scrape(srv: &Server) -> (String, Exposition) {
    let url = format!("{}/metrics", srv.url);
    let (code, ctype, text) = curl_accept("GET", &url, None, OPENMETRICS);
    assert_eq!(code, 200, "{text}");
    // What was emitted is what the header says.
    assert_eq!(
        ctype,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let m = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{text}"));
    for (name, f) in &m.families {
        assert!(name.starts_with("blockswarm_"), "{name}");
        if f.family_type == OpenMetricsType::Counter {
            // Counters count bytes or events, and their samples say so.
            let samples: Vec<_> = text
                .lines()
                .filter(|l| l.starts_with(name.as_str()))
                .collect();
            assert!(
                samples
                    .iter()
                    .all(|l| l[name.len()..].starts_with("_total")),
                "{samples:?}"
            );
        }
        let labels = f.get_label_names();
        let statewise = name.ends_with("_state") || name == "blockswarm_deployment_tasks";
        assert_eq!(
            labels.iter().any(|l| l == "state"),
            statewise,
            "{name}: a state label belongs only on per-state series: {labels:?}"
        );
        if name.ends_with("_state") {
            // Exactly one state is current for each thing.
            let mut ones: HashMap<Vec<String>, f64> = HashMap::new();
            for s in f.iter_samples() {
                let v = gauge(s);
                assert!(v == 0.0 || v == 1.0, "{name}: {v}");
                let mut key: Vec<String> = label_map(s)
                    .into_iter()
                    .filter(|(l, _)| l != "state")
                    .map(|(l, v)| format!("{l}={v}"))
                    .collect();
                key.sort();
                *ones.entry(key).or_default() += v;
            }
            assert!(ones.values().all(|&n| n == 1.0), "{name}: {ones:?}");
        }
    }
    let build = value(&m, "blockswarm_build", &[]);
    assert_eq!(build.len(), 1);
    assert_eq!(
        build[0].0["version"],
        env!("CARGO_PKG_VERSION"),
        "{build:?}"
    );
    (text, m)
}

fn label_map(s: &Sample<OpenMetricsValue>) -> HashMap<String, String> {
    let l = s.get_labelset().unwrap();
    l.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn gauge(s: &Sample<OpenMetricsValue>) -> f64 {
    match &s.value {
        OpenMetricsValue::Gauge(n) => n.as_f64(),
        OpenMetricsValue::Counter(c) => c.value.as_f64(),
        OpenMetricsValue::Info => 1.0,
        v => panic!("{v:?}"),
    }
}

/// The samples of family `name` whose labels include `with`, as (labels, value).
fn value(m: &Exposition, name: &str, with: &[(&str, &str)]) -> Vec<(HashMap<String, String>, f64)> {
    let Some(f) = m.families.get(name) else {
        return Vec::new();
    };
    f.iter_samples()
        .map(|s| (label_map(s), gauge(s)))
        .filter(|(l, _)| {
            with.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The one sample of `name` with labels `with`.
fn one(m: &Exposition, name: &str, with: &[(&str, &str)]) -> f64 {
    let v = value(m, name, with);
    assert_eq!(v.len(), 1, "{name} {with:?}: {v:?}");
    v[0].1
}

/// Every sample that has label `key` = `val`, in any family.
fn any_with(m: &Exposition, key: &str, val: &str) -> Vec<String> {
    m.families
        .keys()
        .filter(|n| !value(m, n, &[(key, val)]).is_empty())
        .cloned()
        .collect()
}

#[test]
fn metrics_follow_the_rooms_in_strict_openmetrics() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "master.img", "bare", 16);
    capture(&disk, &t.path().join("images").join(IMAGE), true);
    let srv = Server::start(t.path(), None, "");
    srv.wait_seeding(IMAGE);
    let (a, b) = ("52:54:00:00:33:01", "52:54:00:00:33:02");
    call(
        &srv,
        "PUT",
        &format!("/api/v1/admin/groups/{}", pct(GROUP)),
        json!({ "name": "", "job": { "image": IMAGE }, "members": [a, b] }),
    );
    call(
        &srv,
        "PUT",
        &format!("/api/v1/admin/hosts/{a}"),
        json!({ "name": HOST }),
    );
    let start = || {
        call(
            &srv,
            "POST",
            "/api/v1/admin/deployments",
            json!({ "group": GROUP }),
        )["deployment"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(start(), 1);

    // One host downloading, the other not yet booted.
    host_reports(&srv, a, "downloading", 1000);
    let (text, m) = scrape(&srv);
    // The escaped forms, as the format spells them.
    assert!(
        text.contains(r#"group="room \"A\" \\ 1\nsecond line""#),
        "{text}"
    );
    assert!(text.contains(r#"name="pc\\1 \"front\"\n""#), "{text}");
    let dep = [("deployment", "1")];
    let info = value(&m, "blockswarm_deployment", &dep);
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0].0["group"], GROUP);
    assert_eq!(one(&m, "blockswarm_deployment_done", &dep), 0.0);
    assert!(one(&m, "blockswarm_deployment_elapsed_seconds", &dep) >= 0.0);
    let tasks = |m: &Exposition, s| one(m, "blockswarm_deployment_tasks", &[dep[0], ("state", s)]);
    assert_eq!((tasks(&m, "running"), tasks(&m, "pending")), (1.0, 1.0));
    let ha = [dep[0], ("mac", a)];
    let host = value(&m, "blockswarm_host", &ha);
    assert_eq!(host.len(), 1, "{host:?}");
    assert_eq!(
        (host[0].0["name"].as_str(), host[0].0["image"].as_str()),
        (HOST, IMAGE)
    );
    assert_eq!(one(&m, "blockswarm_host_done_bytes", &ha), 1000.0);
    assert_eq!(one(&m, "blockswarm_host_total_bytes", &ha), 5000.0);
    assert_eq!(one(&m, "blockswarm_host_origin_bytes", &ha), 700.0);
    assert_eq!(one(&m, "blockswarm_host_uploaded_bytes", &ha), 42.0);
    assert_eq!(
        one(&m, "blockswarm_host_download_bytes_per_second", &ha),
        123.5
    );
    assert_eq!(one(&m, "blockswarm_host_peers", &ha), 3.0);
    let st = |m: &Exposition, f, mac, s| one(m, f, &[dep[0], ("mac", mac), ("state", s)]);
    assert_eq!(st(&m, "blockswarm_host_state", a, "downloading"), 1.0);
    assert_eq!(st(&m, "blockswarm_host_task_state", a, "running"), 1.0);
    assert_eq!(st(&m, "blockswarm_host_task_state", b, "pending"), 1.0);
    // No agent state before the host's first report.
    assert!(value(&m, "blockswarm_host_state", &[("mac", b)]).is_empty());
    let img = [("image", IMAGE)];
    assert!(one(&m, "blockswarm_image_payload_bytes", &img) > 0.0);
    assert_eq!(
        one(
            &m,
            "blockswarm_image_state",
            &[img[0], ("state", "seeding")]
        ),
        1.0
    );
    assert!(one(&m, "blockswarm_seed_uploaded_bytes", &img) >= 0.0);
    assert_eq!(
        value(&m, "blockswarm_tracker_peers", &img).len(),
        2,
        "complete and not"
    );
    assert_eq!(one(&m, "blockswarm_status_reports_refused", &[]), 0.0);

    // Asked for anything else, the same samples in the older format.
    let (code, ctype, old) = curl("GET", &format!("{}/metrics", srv.url), None);
    assert_eq!(code, 200, "{old}");
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    openmetrics_parser::prometheus::parse_prometheus(&old)
        .unwrap_or_else(|e| panic!("not the Prometheus text format: {e:?}\n{old}"));
    let samples = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#') && !l.contains("elapsed") && !l.contains("connections"))
            .map(String::from)
            .collect()
    };
    assert_eq!(samples(&old), samples(&text));

    // Done: the deployment and its hosts stay, so that its end is seen.
    host_reports(&srv, a, "done", 5000);
    host_reports(&srv, b, "done", 5000);
    let (_, m) = scrape(&srv);
    assert_eq!(one(&m, "blockswarm_deployment_done", &dep), 1.0);
    assert_eq!(tasks(&m, "done"), 2.0);
    assert_eq!(st(&m, "blockswarm_host_task_state", b, "done"), 1.0);
    assert_eq!(one(&m, "blockswarm_host_done_bytes", &ha), 5000.0);

    // Stopped: its hosts' series go at once.
    assert_eq!(start(), 2);
    let (_, m) = scrape(&srv);
    let a2 = [("deployment", "2"), ("mac", a)];
    assert_eq!(
        one(
            &m,
            "blockswarm_host_task_state",
            &[a2[0], a2[1], ("state", "pending")]
        ),
        1.0
    );
    assert_eq!(one(&m, "blockswarm_host_done_bytes", &a2), 0.0);
    call(&srv, "POST", "/api/v1/admin/deployments/2/stop", json!({}));
    let (text, m) = scrape(&srv);
    let left = any_with(&m, "deployment", "2");
    assert!(
        left.is_empty(),
        "series of a stopped deployment: {left:?}\n{text}"
    );
    // The done one is still there.
    assert_eq!(one(&m, "blockswarm_host_done_bytes", &ha), 5000.0);
}

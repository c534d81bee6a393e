//! `blockswarm serve` as a service: the admin token it makes on first start
//! and keeps, a graceful stop on SIGTERM, and `serve --check`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn config(dir: &Path, port: u16, seed_port: u16) -> String {
    format!(
        "listen = \"127.0.0.1:{port}\"\nseed_listen = \"127.0.0.1:{seed_port}\"\n\
         images = \"{}\"\nstate_dir = \"{}\"\n",
        dir.join("images").display(),
        dir.join("var/state").display()
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// GET with a bearer token: the HTTP status.
fn get_with(url: &str, token: &str) -> u16 {
    let out = sh(Command::new("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("Authorization: Bearer {token}"),
        url,
    ]));
    String::from_utf8_lossy(&out.stdout).parse().unwrap()
}

fn sigterm(p: &Proc) {
    sh(Command::new("kill").args(["-TERM", &p.0.id().to_string()]));
}

/// Waits for the process to exit: its exit code.
fn exit_code(p: &mut Proc, within: Duration, log: &Path) -> i32 {
    let t0 = Instant::now();
    loop {
        if let Some(st) = p.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return st
                .code()
                .unwrap_or_else(|| panic!("killed by a signal: {st}\n{log}"));
        }
        assert!(
            t0.elapsed() < within,
            "still running {within:?} after SIGTERM:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn closed(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_err()
}

#[test]
fn first_start_makes_the_admin_token_and_later_starts_keep_it() {
    let t = tempfile::tempdir().unwrap();
    let (port, seed_port) = (free_port(), free_port());
    let cfg = config(t.path(), port, seed_port);
    let state = t.path().join("var/state");
    let file = state.join("admin-token");
    let mut srv = Server::launch(t.path(), None, &cfg, port, seed_port);

    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&file), 0o600);
    let token = std::fs::read_to_string(&file).unwrap();
    let token = token.strip_suffix('\n').unwrap().to_string();
    assert_eq!(token.len(), 64, "{token}");
    let log = std::fs::read_to_string(&srv.log).unwrap();
    let said = format!(
        "admin token: {} (generated on first start; use it as BLOCKSWARM_TOKEN)",
        file.display()
    );
    assert!(log.contains(&said), "{log}");
    assert!(!log.contains(&token), "the log shows the token:\n{log}");

    let images = format!("{}/api/v1/admin/images", srv.url);
    assert_eq!(get_with(&images, &token), 200);
    assert_eq!(get_with(&images, "wrong"), 401);
    assert_eq!(http_get(&images).0, 401);
    // What the log line tells the admin to do.
    let out = Command::new(bin())
        .args(["admin", "--server", &srv.url, "images"])
        .env("BLOCKSWARM_TOKEN", &token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    sigterm(&srv.proc);
    assert_eq!(
        exit_code(&mut srv.proc, Duration::from_secs(20), &srv.log),
        0
    );
    assert!(closed(port) && closed(seed_port));

    // The next start (a new log) uses the same token, and says where it is.
    let srv = Server::launch(t.path(), None, &cfg, port, seed_port);
    let log = std::fs::read_to_string(&srv.log).unwrap();
    let said = format!(
        "admin token: {} (use it as BLOCKSWARM_TOKEN)",
        file.display()
    );
    assert!(log.contains(&said) && !log.contains("generated"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        format!("{token}\n")
    );
    assert_eq!(get_with(&images, &token), 200);
}

/// Sends a request's head and the first part of its body.
fn half_request(port: u16, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /api/v1/admin/deployment/start HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer t0ken\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..body.len() / 2]
    )
    .unwrap();
    s
}

#[test]
fn sigterm_stops_accepting_finishes_requests_under_way_and_exits_0() {
    let t = tempfile::tempdir().unwrap();
    let mut srv = Server::start(t.path(), None, "");
    let body = r#"{"expect": 3, "open": true}"#;
    let mut finishing = half_request(srv.port, body);
    let _stuck = half_request(srv.port, body);
    // Both requests are with the handler, waiting for their bodies.
    std::thread::sleep(Duration::from_millis(300));
    sigterm(&srv.proc);

    let t0 = Instant::now();
    while !closed(srv.port) {
        assert!(t0.elapsed() < Duration::from_secs(4), "still accepting");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        srv.proc.0.try_wait().unwrap().is_none(),
        "exited before the requests under way were done"
    );
    finishing
        .write_all(&body.as_bytes()[body.len() / 2..])
        .unwrap();
    let mut answer = String::new();
    finishing.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""deployment":1"#), "{answer}");

    // The stuck one is given up on after the grace period.
    assert_eq!(
        exit_code(&mut srv.proc, Duration::from_secs(20), &srv.log),
        0
    );
    assert!(closed(srv.port) && closed(srv.seed_port));
    let log = std::fs::read_to_string(&srv.log).unwrap();
    for said in [
        "SIGTERM: stopping",
        "still under way",
        "blockswarm::server: stopped",
    ] {
        assert!(log.contains(said), "the log lacks {said:?}:\n{log}");
    }
}

fn serve_check(dir: &Path, cfg: &str) -> (bool, String) {
    std::fs::write(dir.join("server.toml"), cfg).unwrap();
    let out = Command::new(bin())
        .args(["serve", "--check", "--config", "server.toml"])
        .current_dir(dir)
        .output()
        .unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

#[test]
fn serve_check_resolves_the_paths_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    std::fs::create_dir(d.join("imgs")).unwrap();
    let (ok, out) = serve_check(d, "images = \"imgs\"\nstate_dir = \"st\"\n");
    assert!(ok, "{out}");
    let line = |k: &str, v: String| format!("{k:<16}{v}\n");
    for want in [
        line("images", d.join("imgs").display().to_string()),
        line("state_dir", format!("{} (missing)", d.join("st").display())),
        line(
            "admin token",
            format!(
                "{} (made on first start)",
                d.join("st/admin-token").display()
            ),
        ),
        line("listen", "0.0.0.0:8080".into()),
    ] {
        assert!(out.contains(&want), "no {want:?} in:\n{out}");
    }
    assert!(!d.join("st").exists(), "--check wrote the state directory");

    // A token file the server would refuse fails the check too.
    std::fs::create_dir(d.join("st")).unwrap();
    std::fs::write(d.join("st/admin-token"), "\n").unwrap();
    let (ok, out) = serve_check(d, "state_dir = \"st\"\n");
    assert!(
        !ok && out.contains("admin-token") && out.contains("empty"),
        "{out}"
    );
    let (ok, out) = serve_check(d, "admin_token = \"a\"\nadmin_token_file = \"f\"\n");
    assert!(!ok && out.contains("set one, not both"), "{out}");
    let (ok, out) = serve_check(d, "colour = 1\n");
    assert!(!ok && out.contains("unknown field `colour`"), "{out}");
}

//! Helpers for tests that drive the built binary on real disk images.
#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blockswarm::image::Image;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blockswarm")
}

/// Runs a command; panics with its output if it fails.
pub fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("running {cmd:?}: {e} (is the tool installed? run scripts/install-deps)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs blockswarm and returns (success, stderr).
pub fn bs(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("running blockswarm");
    let mut s = String::from_utf8_lossy(&out.stderr).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status.success(), s)
}

pub fn bs_ok(args: &[&str]) -> String {
    let (ok, out) = bs(args);
    assert!(ok, "blockswarm {args:?} failed:\n{out}");
    out
}

pub fn bs_err(args: &[&str]) -> String {
    let (ok, out) = bs(args);
    assert!(!ok, "blockswarm {args:?} should have failed:\n{out}");
    assert!(
        !out.contains("panicked"),
        "blockswarm {args:?} panicked:\n{out}"
    );
    out
}

/// Builds a fixture disk (see tests/fixtures/mkdisk).
pub fn mkdisk(dir: &Path, name: &str, layout: &str, scale_mib: u32) -> PathBuf {
    let out = dir.join(name);
    sh(Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/mkdisk"
    ))
    .arg(&out)
    .arg(layout)
    .env("SCALE", scale_mib.to_string()));
    out
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A background blockswarm process, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `blockswarm seed` and waits until it accepts peers.
pub fn seed(image: &Path, from: Option<&Path>) -> (Proc, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("seed")
        .arg(image)
        .arg("--listen")
        .arg(addr.to_string());
    if let Some(f) = from {
        cmd.arg("--from").arg(f);
    }
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut p = Proc(child);
    let t0 = Instant::now();
    loop {
        let mut s = String::new();
        log.reopen().unwrap().read_to_string(&mut s).unwrap();
        if s.contains("seeding ") {
            return (p, addr);
        }
        if let Ok(Some(st)) = p.0.try_wait() {
            panic!("seed exited with {st}:\n{s}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "seed did not start:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub const MARK: u8 = 0xAB;

/// A target file of `size` bytes. With `marked`, it is filled with [`MARK`]
/// so that bytes the receiver did not write stay visible; otherwise sparse.
pub fn blank_target(path: &Path, size: u64, marked: bool) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    if marked {
        let buf = vec![MARK; 1 << 20];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            f.write_all_at(&buf[..n], off).unwrap();
            off += n as u64;
        }
    }
}

/// Asserts that outside the image's extents, the first and the last MiB,
/// every byte of a marked target still holds [`MARK`].
pub fn assert_untouched_outside(image: &Path, tgt: &Path) {
    let img = Image::open(image).unwrap();
    let t = std::fs::File::open(tgt).unwrap();
    let size = t.metadata().unwrap().len();
    let mut used: Vec<(u64, u64)> = img
        .manifest
        .extents()
        .map(|e| (e.start, e.start + e.len))
        .collect();
    used.push((0, 1 << 20));
    used.push((size - (1 << 20), size));
    used.sort();
    let mut pos = 0u64;
    let check = |lo: u64, hi: u64| {
        let mut off = lo;
        while off < hi {
            let n = (hi - off).min(1 << 20) as usize;
            let mut b = vec![0u8; n];
            t.read_exact_at(&mut b, off).unwrap();
            if let Some(i) = b.iter().position(|&x| x != MARK) {
                panic!(
                    "byte {} outside the used extents was written",
                    off + i as u64
                );
            }
            off += n as u64;
        }
    };
    for (lo, hi) in used {
        if lo > pos {
            check(pos, lo);
        }
        pos = pos.max(hi);
    }
    if pos < size {
        check(pos, size);
    }
}

/// Asserts that every used extent of the image is byte-identical on target,
/// except the byte ranges in `allowed` (which the receiver rewrites).
pub fn assert_extents_equal(image: &Path, src: &Path, tgt: &Path, allowed: &[(u64, u64)]) {
    let img = Image::open(image).unwrap();
    let (s, t) = (
        std::fs::File::open(src).unwrap(),
        std::fs::File::open(tgt).unwrap(),
    );
    let mut total = 0u64;
    for e in img.manifest.extents() {
        let mut off = e.start;
        while off < e.start + e.len {
            let n = (e.start + e.len - off).min(1 << 20) as usize;
            let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
            s.read_exact_at(&mut a, off).unwrap();
            t.read_exact_at(&mut b, off).unwrap();
            for i in 0..n {
                if a[i] != b[i] {
                    let at = off + i as u64;
                    assert!(
                        allowed.iter().any(|&(lo, hi)| at >= lo && at < hi),
                        "byte {at} differs: source {:#04x}, target {:#04x}",
                        a[i],
                        b[i]
                    );
                }
            }
            total += n as u64;
            off += n as u64;
        }
    }
    assert_eq!(total, img.manifest.payload.size);
}

/// Copies `len` bytes at `off` of `img` into a new file (one partition).
pub fn extract(img: &Path, off: u64, len: u64, out: &Path) {
    let src = std::fs::File::open(img).unwrap();
    let dst = std::fs::File::create(out).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off + done).unwrap();
        dst.write_all_at(&buf[..n], done).unwrap();
        done += n as u64;
    }
}

/// Reads a `sha256sum` listing made by mkdisk: (name, hash) pairs.
pub fn read_sums(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let (h, n) = l.split_once("  ").unwrap();
            (n.trim_start_matches("./").to_string(), h.to_string())
        })
        .collect()
}

pub fn sha256(path: &Path) -> String {
    let out = sh(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// GET a URL with curl: (HTTP status, body).
pub fn http_get(url: &str) -> (u16, Vec<u8>) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-g",
            "--path-as-is",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .expect("curl");
    let mut body = out.stdout;
    let pos = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&body[pos + 1..])
        .trim()
        .parse()
        .unwrap_or(0);
    body.truncate(pos);
    (code, body)
}

pub fn http_json(url: &str) -> serde_json::Value {
    let (code, body) = http_get(url);
    assert_eq!(code, 200, "GET {url}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// A running `blockswarm serve` on loopback, with its store in `dir`.
pub struct Server {
    pub proc: Proc,
    pub url: String,
    pub port: u16,
    pub seed_port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
}

/// The admin token of every test server (see [`Server::start_on`]).
pub const ADMIN_TOKEN: &str = "t0ken";

impl Server {
    /// `blockswarm admin ARGS` against this server, with its token:
    /// (succeeded, stderr and stdout).
    pub fn admin(&self, args: &[&str]) -> (bool, String) {
        let mut a = vec!["admin", "--server", &self.url, "--token", ADMIN_TOKEN];
        a.extend_from_slice(args);
        bs(&a)
    }

    pub fn admin_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.admin(args);
        assert!(ok, "admin {args:?} failed:\n{out}");
        out
    }

    pub fn admin_err(&self, args: &[&str]) -> String {
        let (ok, out) = self.admin(args);
        assert!(!ok, "admin {args:?} should have failed:\n{out}");
        assert!(!out.contains("panicked"), "admin {args:?} panicked:\n{out}");
        out
    }

    /// `extra` is appended to the generated server.toml.
    pub fn start(dir: &Path, deploy: Option<usize>, extra: &str) -> Server {
        Self::start_on(dir, deploy, extra, free_port(), free_port())
    }

    pub fn start_on(
        dir: &Path,
        deploy: Option<usize>,
        extra: &str,
        port: u16,
        seed_port: u16,
    ) -> Server {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        let cfg = format!(
            "listen = \"127.0.0.1:{port}\"\nseed_listen = \"127.0.0.1:{seed_port}\"\nimages = \"{}\"\nstate_dir = \"{}\"\nadmin_token = \"t0ken\"\nannounce_interval = 2\n{extra}\n",
            dir.join("images").display(),
            dir.join("state").display()
        );
        Self::launch(dir, deploy, &cfg, port, seed_port)
    }

    /// Starts the server on `cfg`, a whole server.toml that listens on
    /// 127.0.0.1:`port` and seeds on `seed_port`.
    pub fn launch(
        dir: &Path,
        deploy: Option<usize>,
        cfg: &str,
        port: u16,
        seed_port: u16,
    ) -> Server {
        std::fs::write(dir.join("server.toml"), cfg).unwrap();
        let log = dir.join(format!("serve-{port}.log"));
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(dir.join("server.toml"));
        if let Some(n) = deploy {
            cmd.arg("--deploy").arg(n.to_string());
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let s = Server {
            proc: Proc(child),
            url: format!("http://127.0.0.1:{port}"),
            port,
            seed_port,
            dir: dir.to_owned(),
            log,
        };
        s.wait_for(
            |v| v["id"].is_number() || deploy.is_none(),
            "the server to answer",
        );
        s
    }

    pub fn view(&self) -> serde_json::Value {
        http_json(&format!("{}/api/v1/deployment", self.url))
    }

    /// Polls the deployment view until `f` holds (60 s at most).
    pub fn wait_for(
        &self,
        f: impl Fn(&serde_json::Value) -> bool,
        what: &str,
    ) -> serde_json::Value {
        let t0 = Instant::now();
        loop {
            let (code, body) = http_get(&format!("{}/api/v1/deployment", self.url));
            if code == 200 {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                if f(&v) {
                    return v;
                }
            }
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            assert!(!log.starts_with("error:"), "the server failed:\n{log}");
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}; server log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `n` hosts are in the deployment, each with more than
    /// `bytes` written.
    pub fn wait_hosts_past(&self, n: usize, bytes: u64) {
        self.wait_for(
            |v| {
                v["hosts"].as_array().is_some_and(|h| {
                    h.len() == n
                        && h.iter()
                            .all(|h| h["done_bytes"].as_u64().unwrap_or(0) > bytes)
                })
            },
            "the hosts to get going",
        );
    }

    /// Waits until image `name` is seeding.
    pub fn wait_seeding(&self, name: &str) {
        self.wait_for(
            |v| {
                v["images"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|i| i["name"] == name && i["state"] == "seeding")
            },
            "the image to be seeding",
        );
    }
}

/// A running agent writing to `target`; its log is kept.
pub struct Agent {
    pub proc: Proc,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(server: &str, mac: &str, target: &Path) -> Agent {
        let log = target.with_extension("agent.log");
        let child = Command::new(bin())
            .args(["agent", "--server", server, "--mac", mac, "--target"])
            .arg(target)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        Agent {
            proc: Proc(child),
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the agent to exit; panics with its log on failure or timeout.
    pub fn wait_ok(&mut self, secs: u64) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.proc.0.try_wait().unwrap() {
                assert!(st.success(), "agent failed ({st}):\n{}", self.log());
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "agent did not finish in {secs} s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the log contains `text`.
    pub fn wait_log(&self, text: &str, secs: u64) {
        let t0 = Instant::now();
        while !self.log().contains(text) {
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "agent never said {text:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The job every test host gets: write, don't reboot, seed until done.
pub const TEST_JOB: &str =
    "on_done = \"nothing\"\nkeep_seeding = \"deployment\"\nseed_cap_minutes = 2\n";

/// `blockswarm capture DISK --out OUT [--store]`, which must succeed.
pub fn capture(disk: &Path, out: &Path, store: bool) {
    let mut args = vec![
        "capture",
        disk.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    if store {
        args.push("--store");
    }
    bs_ok(&args);
}

/// A test disk of `layout` captured with its store file: (disk, its size,
/// the image directory).
pub fn captured(dir: &Path, layout: &str, scale_mib: u32) -> (PathBuf, u64, PathBuf) {
    let disk = mkdisk(dir, "disk.img", layout, scale_mib);
    let size = std::fs::metadata(&disk).unwrap().len();
    let image = dir.join("image");
    capture(&disk, &image, true);
    (disk, size, image)
}

/// Asserts that a half-written target shows nothing: its first sector is
/// the in-progress marker, with no partition entries and no boot
/// signature, and blkid finds no table and no file system.
pub fn assert_shows_nothing(tgt: &Path, what: &str) {
    let head = std::fs::read(tgt).unwrap()[..512].to_vec();
    assert!(
        head.starts_with(b"BLOCKSWARM-IN-PROGRESS"),
        "{what}: sector 0 is not the in-progress marker"
    );
    assert!(
        head[446..].iter().all(|&b| b == 0),
        "{what}: a partition table was written before the end"
    );
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(tgt)
        .output()
        .unwrap();
    let found = String::from_utf8_lossy(&out.stdout);
    assert!(
        !found.contains("PTTYPE") && !found.contains("TYPE="),
        "{what}: a half-written disk looks like something: {found}"
    );
}

//! Fitting each PC to itself: host names written into real ext4 and NTFS
//! (Windows SYSTEM hive) file systems of the deployed image, and
//! post-deploy hooks run with the target's partitions mounted.
//! Needs root (loop devices, mounts), e2fsprogs, ntfs-3g, chntpw (reged)
//! and libhivex-bin (hivexsh, hivexget, to build and read the test hive).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const P1: u64 = MIB; // ext4 root
const P2: u64 = 33 * MIB; // NTFS with Windows
const PART: u64 = 32 * MIB;

fn mac(i: usize) -> String {
    format!("52:54:00:00:20:{i:02x}")
}

fn run(cmd: &mut Command) -> String {
    let o = sh(cmd);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A minimal, empty registry hive (regf header, one hbin holding a root key
/// and its security cell), written from the format's description: the test
/// fills it with hivexsh, which cannot create a hive.
fn empty_hive() -> Vec<u8> {
    let put = |b: &mut [u8], at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    let mut bin = vec![0u8; 4096];
    put(&mut bin, 0, b"hbin");
    put(&mut bin, 8, &4096u32.to_le_bytes());
    const SK: usize = 0x80;
    // The root key ("nk"), flags: hive entry, no delete, ASCII name.
    let mut nk = Vec::new();
    nk.extend_from_slice(&(-0x60i32).to_le_bytes());
    nk.extend_from_slice(b"nk");
    nk.extend_from_slice(&0x2cu16.to_le_bytes());
    nk.extend_from_slice(&[0; 8 + 4 + 4 + 4 + 4]); // time, access, parent, subkeys, volatile
    nk.extend_from_slice(&u32::MAX.to_le_bytes()); // subkey list
    nk.extend_from_slice(&u32::MAX.to_le_bytes()); // volatile list
    nk.extend_from_slice(&0u32.to_le_bytes()); // values
    nk.extend_from_slice(&u32::MAX.to_le_bytes()); // value list
    nk.extend_from_slice(&(SK as u32).to_le_bytes()); // security
    nk.extend_from_slice(&u32::MAX.to_le_bytes()); // class
    nk.extend_from_slice(&[0; 20]); // max lengths, work var
    nk.extend_from_slice(&4u16.to_le_bytes());
    nk.extend_from_slice(&0u16.to_le_bytes());
    nk.extend_from_slice(b"ROOT");
    put(&mut bin, 0x20, &nk);
    // Its security cell ("sk"), a list of one, holding an empty
    // self-relative descriptor.
    let sd = [
        1u8, 0, 0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let self_off = (SK as u32).to_le_bytes();
    let mut sk = Vec::new();
    sk.extend_from_slice(&(-0x30i32).to_le_bytes());
    sk.extend_from_slice(b"sk\0\0");
    sk.extend_from_slice(&self_off);
    sk.extend_from_slice(&self_off);
    sk.extend_from_slice(&1u32.to_le_bytes());
    sk.extend_from_slice(&(sd.len() as u32).to_le_bytes());
    sk.extend_from_slice(&sd);
    put(&mut bin, SK, &sk);
    // The rest of the bin is one free cell.
    put(
        &mut bin,
        SK + 0x30,
        &((4096 - SK - 0x30) as i32).to_le_bytes(),
    );
    let mut head = vec![0u8; 4096];
    put(&mut head, 0, b"regf");
    for (at, v) in [
        (4, 1u32),
        (8, 1),
        (20, 1),
        (24, 3),
        (32, 1),
        (36, 0x20),
        (40, 4096),
        (44, 1),
    ] {
        put(&mut head, at, &v.to_le_bytes());
    }
    let sum = (0..127).fold(0u32, |s, i| {
        s ^ u32::from_le_bytes(head[i * 4..i * 4 + 4].try_into().unwrap())
    });
    put(&mut head, 508, &sum.to_le_bytes());
    head.extend_from_slice(&bin);
    head
}

/// A SYSTEM hive as Windows has it, for what the agent edits: the current
/// control set, the computer names, the TCP/IP host name (and a value the
/// agent must keep).
fn system_hive(path: &Path) {
    std::fs::write(path, empty_hive()).unwrap();
    let script = "\
add Select\ncd Select\nsetval 1\nCurrent\ndword:0x1\ncd \\\n\
add ControlSet001\ncd ControlSet001\nadd Control\nadd Services\ncd Control\n\
add ComputerName\ncd ComputerName\nadd ComputerName\nadd ActiveComputerName\n\
cd ComputerName\nsetval 1\nComputerName\nstring:MASTER\n\
cd \\ControlSet001\\Control\\ComputerName\\ActiveComputerName\nsetval 1\nComputerName\nstring:MASTER\n\
cd \\ControlSet001\\Services\nadd Tcpip\ncd Tcpip\nadd Parameters\ncd Parameters\n\
setval 3\nHostname\nstring:master\nNV Hostname\nstring:master\nDomain\nstring:lab.example\n\
commit\n";
    let mut c = Command::new("hivexsh")
        .args(["-w"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(
        c.wait().unwrap().success(),
        "hivexsh could not build the hive"
    );
    assert_eq!(
        hive_get(
            path,
            r"\ControlSet001\Control\ComputerName\ComputerName",
            "ComputerName"
        ),
        "MASTER"
    );
}

fn hive_get(hive: &Path, key: &str, value: &str) -> String {
    run(Command::new("hivexget").arg(hive).arg(key).arg(value))
        .trim()
        .to_string()
}

/// The master: GPT, p1 an ext4 Debian-like root, p2 an NTFS holding
/// Windows/System32/config/SYSTEM.
fn master(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["etc", "var/lib/dbus"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/os-release"), "ID=debian\n").unwrap();
    std::fs::write(root.join("etc/hostname"), "master\n").unwrap();
    std::fs::write(
        root.join("etc/hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\tmaster\n::1\tlocalhost ip6-localhost\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    std::fs::write(
        root.join("var/lib/dbus/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let p1 = dir.join("p1.img");
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&root)
        .arg(&p1)
        .arg(format!("{}k", PART / 1024)));

    let p2 = dir.join("p2.img");
    std::fs::File::create(&p2).unwrap().set_len(PART).unwrap();
    sh(Command::new("mkntfs")
        .args(["-F", "-Q", "-q", "-L", "win"])
        .arg(&p2));
    let mnt = dir.join("ntfs-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(Command::new("ntfs-3g").arg(&p2).arg(&mnt));
    let cfg = mnt.join("Windows/System32/config");
    std::fs::create_dir_all(&cfg).unwrap();
    system_hive(&cfg.join("SYSTEM"));
    sh(Command::new("umount").arg(&mnt));

    let disk = dir.join("master.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(P2 + PART + MIB)
        .unwrap();
    let mut c = Command::new("sfdisk");
    c.args(["-q", "--no-reread", "--no-tell-kernel"]).arg(&disk);
    c.stdin(std::process::Stdio::piped());
    let mut ch = c.spawn().unwrap();
    use std::io::Write;
    ch.stdin
        .take()
        .unwrap()
        .write_all(
            format!(
                "label: gpt\nstart={}, size={}, type=L\nstart={}, size={}, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n",
                P1 / 512,
                PART / 512,
                P2 / 512,
                PART / 512
            )
            .as_bytes(),
        )
        .unwrap();
    assert!(ch.wait().unwrap().success(), "sfdisk failed");
    for (part, at) in [(&p1, P1), (&p2, P2)] {
        sh(Command::new("dd")
            .arg(format!("if={}", part.display()))
            .arg(format!("of={}", disk.display()))
            .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
            .arg(format!("seek={}", at / MIB)));
    }
    disk
}

/// A file's text in the ext4 partition of `disk` at `off` (debugfs, no mount).
fn ext_cat(dir: &Path, disk: &Path, off: u64, file: &str) -> String {
    let part = dir.join("ext-part.img");
    extract(disk, off, PART, &part);
    let o = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(&part)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fsck_clean(dir: &Path, disk: &Path) {
    let part = dir.join("fsck-part.img");
    extract(disk, P1, PART, &part);
    let o = Command::new("e2fsck")
        .arg("-fn")
        .arg(&part)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    extract(disk, P2, PART, &part);
    let o = Command::new("ntfsfix")
        .arg("-n")
        .arg(&part)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ntfsfix: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// The SYSTEM hive out of the NTFS partition of `disk` (ntfscat, no mount).
fn target_hive(dir: &Path, disk: &Path) -> PathBuf {
    let part = dir.join("ntfs-part.img");
    extract(disk, P2, PART, &part);
    let o = Command::new("ntfscat")
        .arg(&part)
        .arg("Windows/System32/config/SYSTEM")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ntfscat: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let hive = dir.join("SYSTEM.out");
    std::fs::write(&hive, o.stdout).unwrap();
    hive
}

/// No loop device is left attached to `file`.
fn assert_released(file: &Path) {
    let out = run(Command::new("losetup").arg("-j").arg(file));
    assert!(
        out.trim().is_empty(),
        "loop devices left on {}: {out}",
        file.display()
    );
}

fn setup(t: &Path, hooks: &[(&str, &str)], cfg: &str) -> (Server, u64) {
    let disk = master(t);
    let size = std::fs::metadata(&disk).unwrap().len();
    capture(&disk, &t.join("images/lab"), true);
    let hooks_dir = t.join("state/hooks");
    std::fs::create_dir_all(&hooks_dir).unwrap();
    for (name, body) in hooks {
        std::fs::write(hooks_dir.join(name), body).unwrap();
    }
    let srv = Server::start(t, Some(2), cfg);
    srv.wait_seeding("lab");
    (srv, size)
}

#[test]
fn two_pcs_named_from_a_template_with_a_hook() {
    let t = tempfile::tempdir().unwrap();
    let hook = "#!/bin/sh\nset -e\necho \"hook sees $HOST\"\n\
        printf '%s\\n' \"$HOST\" \"$MAC\" \"$IMAGE\" \"$SLOT\" \"$DEPLOYMENT\" > \"$BLOCKSWARM_MNT_1/etc/deployed-by-hook\"\n\
        test -f \"$BLOCKSWARM_MNT_2/Windows/System32/config/SYSTEM\"\n";
    let cfg = format!(
        "[[group]]\nname = \"lab12\"\nmembers = [\"{}\", \"{}\"]\nhostname = \"{{group}}-{{slot:02}}\"\n\
         [group.job]\nimage = \"lab\"\nhooks = [\"mark.sh\"]\n{TEST_JOB}",
        mac(1),
        mac(2)
    );
    let (srv, size) = setup(t.path(), &[("mark.sh", hook)], &cfg);
    let mut agents: Vec<(Agent, PathBuf)> = (1..=2)
        .map(|i| {
            let tgt = t.path().join(format!("pc{i}.img"));
            blank_target(&tgt, size, true);
            (Agent::start(&srv.url, &mac(i), &tgt), tgt)
        })
        .collect();
    for (a, _) in &mut agents {
        a.wait_ok(180);
    }
    let mut ids = Vec::new();
    for (i, (a, tgt)) in agents.iter().enumerate() {
        let slot = i + 1;
        let name = format!("lab12-{slot:02}");
        assert_released(tgt);
        let mnt = format!("/run/blockswarm/mnt-{}", a.proc.0.id());
        assert!(!Path::new(&mnt).exists(), "{mnt} is left behind");
        assert_eq!(
            ext_cat(t.path(), tgt, P1, "/etc/hostname"),
            format!("{name}\n")
        );
        let hosts = ext_cat(t.path(), tgt, P1, "/etc/hosts");
        assert!(
            hosts.contains(&format!("127.0.1.1\t{name}\n")) && !hosts.contains("master"),
            "{hosts}"
        );
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"), "{hosts}");
        let id = ext_cat(t.path(), tgt, P1, "/etc/machine-id");
        assert_eq!(id.trim().len(), 32, "{id:?}");
        assert_ne!(id.trim(), "0123456789abcdef0123456789abcdef");
        ids.push(id);
        assert_eq!(
            ext_cat(t.path(), tgt, P1, "/var/lib/dbus/machine-id"),
            "",
            "the dbus copy is removed"
        );
        assert_eq!(
            ext_cat(t.path(), tgt, P1, "/etc/deployed-by-hook"),
            format!("{name}\n{}\nlab\n{slot}\n1\n", mac(slot))
        );
        let hive = target_hive(t.path(), tgt);
        let upper = name.to_uppercase();
        assert_eq!(
            hive_get(
                &hive,
                r"\ControlSet001\Control\ComputerName\ComputerName",
                "ComputerName"
            ),
            upper
        );
        assert_eq!(
            hive_get(
                &hive,
                r"\ControlSet001\Control\ComputerName\ActiveComputerName",
                "ComputerName"
            ),
            upper
        );
        assert_eq!(
            hive_get(
                &hive,
                r"\ControlSet001\Services\Tcpip\Parameters",
                "Hostname"
            ),
            name
        );
        assert_eq!(
            hive_get(
                &hive,
                r"\ControlSet001\Services\Tcpip\Parameters",
                "NV Hostname"
            ),
            name
        );
        assert_eq!(
            hive_get(&hive, r"\ControlSet001\Services\Tcpip\Parameters", "Domain"),
            "lab.example"
        );
        fsck_clean(t.path(), tgt);
        assert!(
            a.log().contains(&format!("hook mark.sh: hook sees {name}")),
            "{}",
            a.log()
        );
        // The hook's output reached the server.
        let log = srv.admin_ok(&["log", &mac(slot)]);
        assert!(log.contains(&format!("hook sees {name}")), "{log}");
    }
    assert_ne!(ids[0], ids[1], "each PC gets its own machine-id");
}

#[test]
fn failing_and_overrunning_hooks_fail_the_task() {
    let t = tempfile::tempdir().unwrap();
    let fail = "#!/bin/sh\necho about to fail\nexit 3\n";
    let slow = "#!/bin/sh\necho started\nsleep 60\ntouch \"$BLOCKSWARM_MNT_1/etc/late\"\n";
    let cfg = format!(
        "[[host]]\nmac = \"{}\"\nname = \"pc-a\"\n[host.job]\nimage = \"lab\"\nhooks = [\"fail.sh\"]\n{TEST_JOB}\
         [[host]]\nmac = \"{}\"\nname = \"pc-b\"\n[host.job]\nimage = \"lab\"\nhooks = [\"slow.sh\"]\nhook_timeout = 3\n{TEST_JOB}",
        mac(1),
        mac(2)
    );
    let (srv, size) = setup(t.path(), &[("fail.sh", fail), ("slow.sh", slow)], &cfg);
    let run_one = |i: usize| {
        let tgt = t.path().join(format!("pc{i}.img"));
        blank_target(&tgt, size, true);
        let mut a = Agent::start(&srv.url, &mac(i), &tgt);
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = a.proc.0.try_wait().unwrap() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "agent hung:\n{}",
                a.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(!st.success(), "the agent succeeded:\n{}", a.log());
        assert_released(&tgt);
        (a, tgt)
    };
    let (a, _) = run_one(1);
    assert!(
        a.log().contains("hook fail.sh failed with exit code 3"),
        "{}",
        a.log()
    );
    assert!(
        a.log().contains("hook fail.sh: about to fail"),
        "{}",
        a.log()
    );
    let t0 = Instant::now();
    let (b, tgt) = run_one(2);
    assert!(
        t0.elapsed() < Duration::from_secs(50),
        "the slow hook was not cut short"
    );
    assert!(
        b.log()
            .contains("hook slow.sh ran past its time limit of 3 s and was killed"),
        "{}",
        b.log()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        ext_cat(t.path(), &tgt, P1, "/etc/late"),
        "",
        "the killed hook went on"
    );
    let log = srv.admin_ok(&["log", &mac(1)]);
    assert!(log.contains("hook fail.sh: about to fail"), "{log}");
    // The task's error, as the server holds it.
    let hosts = srv.admin_ok(&["--json", "hosts"]);
    assert!(
        hosts.contains("hook fail.sh failed with exit code 3"),
        "{hosts}"
    );
    assert!(
        hosts.contains("hook slow.sh ran past its time limit"),
        "{hosts}"
    );
}

#[test]
fn bad_templates_and_hook_names_are_refused() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("images")).unwrap();
    let cfg = t.path().join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\nimages = \"{}\"\n[[group]]\nname = \"lab\"\nhostname = \"lab_{{slot}}\"\n",
            t.path().join("state").display(),
            t.path().join("images").display()
        ),
    )
    .unwrap();
    let e = bs_err(&["serve", "--config", cfg.to_str().unwrap(), "--check"]);
    assert!(
        e.contains("group \"lab\": hostname") && e.contains("holds '_'"),
        "{e}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    for (job, says) in [
        ("hooks = [\"../x.sh\"]", "hook name \"../x.sh\""),
        ("hooks = [\"a.sh\"]\nhook_timeout = 0", "hook_timeout: 0 s"),
    ] {
        let bad = text.replace("lab_{slot}", "lab-{slot}")
            + &format!("[group.job]\nimage = \"lab\"\n{job}\n");
        std::fs::write(&cfg, bad).unwrap();
        let e = bs_err(&["serve", "--config", cfg.to_str().unwrap(), "--check"]);
        assert!(e.contains("group \"lab\": job") && e.contains(says), "{e}");
    }

    let srv = Server::start(t.path(), None, "");
    let e = srv.admin_err(&["group", "lab", "--hostname", "lab-{host}"]);
    assert!(e.contains("unknown field {host}"), "{e}");
    // The server checks too, whatever the client did.
    let out = Command::new("curl")
        .args(["-s", "-X", "PUT", "-H", "Authorization: Bearer t0ken", "-H", "Content-Type: application/json"])
        .args(["-d", r#"{"name":"lab","job":null,"exit":null,"wake":null,"members":[],"hostname":"lab-{slot:02}-averyveryveryveryveryveryveryveryveryveryveryverylongname"}"#])
        .arg(format!("{}/api/v1/admin/groups/lab", srv.url))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("at most 63"), "{body}");
    let ok = srv.admin_ok(&["group", "lab", "--hostname", "lab12-{slot:02}"]);
    assert!(ok.contains("saved"), "{ok}");
    let v = srv.admin_ok(&["--json", "groups"]);
    assert!(v.contains("lab12-{slot:02}"), "{v}");
    for name in ["..%2Fserver.toml", ".hidden", "a%20b"] {
        let (code, _) = http_get(&format!("{}/hooks/{name}", srv.url));
        assert!(code == 400 || code == 404, "{name}: {code}");
    }
    let (code, body) = http_get(&format!("{}/hooks/none.sh", srv.url));
    assert_eq!(code, 404, "{}", String::from_utf8_lossy(&body));
}

#[test]
fn a_name_too_long_for_windows_gets_no_job() {
    let t = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[[host]]\nmac = \"{}\"\nname = \"classroom-pc-0001\"\n[host.job]\nimage = \"lab\"\n{TEST_JOB}",
        mac(1)
    );
    let (srv, size) = setup(t.path(), &[], &cfg);
    let tgt = t.path().join("pc1.img");
    blank_target(&tgt, size, true);
    let a = Agent::start(&srv.url, &mac(1), &tgt);
    a.wait_log(
        "\"classroom-pc-0001\" has 17 characters; at most 15 for a Windows image",
        60,
    );
    let bytes = std::fs::read(&tgt).unwrap();
    assert!(
        bytes.iter().all(|&b| b == MARK),
        "the target was written to"
    );
}

//! Network boot: the boot decision, its scripts, and the deploy kernel and
//! initramfs.
//!
//! dnsmasq (pxe/) hands PCs iPXE over TFTP; iPXE then chains to
//! `/boot.ipxe?mac=…&platform=…`. Under Secure Boot, UEFI PCs get Debian's
//! signed shim and GRUB instead, which ask `boot.grub/<MAC>` over TFTP
//! (`grub.rs`, `tftp.rs`). The server decides per host, once (`decide`,
//! `rooms.rs`), and a [`Render`] per boot program writes the answer: a host
//! with a task gets the script that loads `/boot/vmlinuz` and
//! `/boot/initramfs.img` (made by initramfs/build, kept in `boot_dir`) with
//! a command line naming the NIC that booted and this server; any other
//! host is sent to its own disk (its exit type).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::api::{AppState, error};
use super::http::Conn;
use super::rooms::Boot;
use super::state::ServerState;
use crate::protocol::admin::ExitType;

#[derive(Debug, serde::Deserialize)]
pub struct BootQuery {
    mac: Option<String>,
    /// iPXE's `${platform}`: "pcbios" or "efi".
    platform: Option<String>,
}

/// The only files served from `boot_dir`.
pub const BOOT_FILES: [&str; 2] = ["vmlinuz", "initramfs.img"];

/// How one boot program is told the decision.
pub trait Render {
    /// Load the deploy kernel and initramfs with `args` (`kernel_args`).
    fn agent(&self, args: &str) -> String;
    /// Boot the local disk as `exit` says; `why` is shown on the screen.
    fn local(&self, exit: ExitType, why: &str) -> String;
    /// The value of the kernel's BOOTIF (the booting NIC) for this program.
    fn bootif(&self) -> String;
}

/// The boot decision for `mac` (as the boot program wrote it), logged, and
/// the answer `r` writes for it.
pub fn answer(s: &ServerState, mac: &str, remote: IpAddr, base: &str, r: &dyn Render) -> String {
    match s.boot(mac, remote) {
        Boot::Agent { deployment } => {
            tracing::info!("{mac} network-boots the agent (deployment {deployment})");
            r.agent(&kernel_args(&r.bootif(), base, &s.config.boot_args))
        }
        Boot::Local { exit, why } => {
            tracing::debug!("{mac} boots its disk: {why}");
            r.local(exit, &why)
        }
    }
}

/// The deploy system's command line, the same for every boot program.
/// BOOTIF tells the initramfs (and the agent) which NIC and MAC to use.
/// The last console= is /dev/console (the screen); the initramfs mirrors
/// its messages to all.
pub fn kernel_args(bootif: &str, base: &str, extra_args: &str) -> String {
    let base = base.trim_end_matches('/');
    let mut args =
        format!("BOOTIF=01-{bootif} blockswarm.server={base} console=ttyS0,115200 console=tty0");
    if !extra_args.trim().is_empty() {
        args.push(' ');
        args.push_str(extra_args.trim());
    }
    args
}

/// What the server prints on a PC's screen: no control characters, nothing
/// a script language could expand or end a string with, at most 160 chars.
pub fn printable(why: &str) -> String {
    why.chars()
        .filter(|c| !c.is_control() && !matches!(c, '$' | '{' | '}' | '#' | '\'' | '"' | '\\'))
        .take(160)
        .collect()
}

/// `GET /boot.ipxe`: what iPXE chains to. Without `mac`, a script that
/// asks again with the booting NIC's MAC and the firmware type.
pub async fn ipxe_script(
    State(s): State<AppState>,
    Extension(c): Extension<Conn>,
    headers: HeaderMap,
    Query(q): Query<BootQuery>,
) -> Response {
    // Without a configured public_url, the address iPXE reached us at.
    let base = match (&s.config.public_url, headers.get(header::HOST)) {
        (None, Some(h)) if h.to_str().is_ok() => format!("http://{}", h.to_str().unwrap_or("")),
        _ => s.config.public_url(),
    };
    let body = match &q.mac {
        None => ask_script(&base),
        Some(mac) => {
            let ipxe = Ipxe {
                base: &base,
                platform: q.platform.as_deref(),
            };
            answer(&s, mac, c.remote.ip(), &base, &ipxe)
        }
    };
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// iPXE's rendering of the decision.
pub struct Ipxe<'a> {
    pub base: &'a str,
    /// iPXE's `${platform}`.
    pub platform: Option<&'a str>,
}

impl Render for Ipxe<'_> {
    fn agent(&self, args: &str) -> String {
        script(self.base, args)
    }
    fn local(&self, exit: ExitType, why: &str) -> String {
        local_script(exit, self.platform, why)
    }
    fn bootif(&self) -> String {
        // The NIC iPXE last opened: the one that booted.
        "${netX/mac:hexhyp}".into()
    }
}

/// The script that asks the server what this PC is to do. Only a failed
/// fetch falls back to the disk here: when the server's script hands back
/// (`exit 1` to boot the disk on UEFI, or a failed `sanboot`), so does
/// this one, at once.
pub fn ask_script(base: &str) -> String {
    let base = base.trim_end_matches('/');
    format!(
        "#!ipxe\n\
         # blockswarm network boot: ask the server what this PC does\n\
         imgfetch --name decision {base}/boot.ipxe?mac=${{netX/mac:hexhyp}}&platform=${{platform}} || goto failed\n\
         imgexec decision\n\
         exit 1\n\
         :failed\n\
         echo blockswarm: the server {base} did not answer; booting the disk in 10 s\n\
         sleep 10\n\
         sanboot --no-describe --drive 0x80 || exit 1\n"
    )
}

/// The script that boots the PC's own disk. `why` is shown on its screen
/// (only what iPXE prints plainly: no `$`, no newline).
///
/// iPXE hands back with `exit 1`, a failure: UEFI firmware then tries its
/// next boot entry (the disk), as the UEFI spec says; on `exit` (success)
/// EDK2 and many vendors' firmware stop at their boot menu instead
/// (OVMF shows its setup screen: scripts/e2e-qemu). BIOS ignores the code.
pub fn local_script(exit: ExitType, platform: Option<&str>, why: &str) -> String {
    let efi = platform.is_some_and(|p| p.eq_ignore_ascii_case("efi"));
    let boot = match exit {
        ExitType::Sanboot => "sanboot --no-describe --drive 0x80 || exit 1",
        ExitType::Exit => "exit 1",
        ExitType::Auto if efi => "exit 1",
        ExitType::Auto => "sanboot --no-describe --drive 0x80 || exit 1",
    };
    let why = printable(why);
    format!(
        "#!ipxe\n\
         # blockswarm: nothing to do for this PC, boot its disk\n\
         echo blockswarm: ${{netX/mac}}: {why}\n\
         echo blockswarm: booting the local disk\n\
         {boot}\n"
    )
}

/// The iPXE script for a server at `base` that boots the deploy system
/// with `args` (`kernel_args`).
pub fn script(base: &str, args: &str) -> String {
    let base = base.trim_end_matches('/');
    // `initrd=` names the initrd for the kernel's EFI stub.
    format!(
        "#!ipxe\n\
         # blockswarm network boot, served by `blockswarm serve`\n\
         echo blockswarm: ${{netX/mac}} (${{netX/ip}}) loading the deploy system from {base}\n\
         :retry\n\
         kernel {base}/boot/vmlinuz initrd=initramfs.img {args} || goto failed\n\
         initrd --name initramfs.img {base}/boot/initramfs.img || goto failed\n\
         boot || goto failed\n\
         :failed\n\
         echo blockswarm: network boot failed, trying again in 10 s\n\
         imgfree\n\
         sleep 10\n\
         goto retry\n"
    )
}

/// `GET /boot/{file}`: the deploy kernel or initramfs from `boot_dir`.
pub async fn boot_file(State(s): State<AppState>, Path(file): Path<String>) -> Response {
    if !BOOT_FILES.contains(&file.as_str()) {
        return error(StatusCode::NOT_FOUND, format!("no boot file {file:?}"));
    }
    match read_boot_file(&s, &file).await {
        Ok(b) => ([(header::CONTENT_TYPE, "application/octet-stream")], b).into_response(),
        Err((StatusCode::NOT_FOUND, e)) => error(StatusCode::NOT_FOUND, e),
        Err((_, e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// One of `BOOT_FILES` (checked by the caller), or what is wrong.
pub async fn read_boot_file(s: &ServerState, file: &str) -> Result<Bytes, (StatusCode, String)> {
    let path = s.config.boot_dir.join(file);
    match cached_read(path.clone()).await {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err((
            StatusCode::NOT_FOUND,
            format!(
                "{} is missing: build it with initramfs/build and set boot_dir",
                path.display()
            ),
        )),
        Err(e) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading {}: {e}", path.display()),
        )),
    }
}

type Cache = HashMap<PathBuf, (SystemTime, u64, Bytes)>;

/// A room of PCs fetches the same two files at once: keep one copy in
/// memory, read again when the file changes (mtime or size).
async fn cached_read(path: PathBuf) -> std::io::Result<Bytes> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let meta = tokio::fs::metadata(&path).await?;
    let stamp = (meta.modified()?, meta.len());
    if let Some((t, n, b)) = cache.lock().expect("cache lock").get(&path)
        && (*t, *n) == stamp
    {
        return Ok(b.clone());
    }
    let b = Bytes::from(tokio::fs::read(&path).await?);
    cache
        .lock()
        .expect("cache lock")
        .insert(path, (stamp.0, stamp.1, b.clone()));
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_hosts_boot_their_disk_as_their_exit_type_says() {
        let bios = local_script(ExitType::Auto, Some("pcbios"), "done");
        assert!(
            bios.contains("\nsanboot --no-describe --drive 0x80 || exit 1\n"),
            "{bios}"
        );
        let efi = local_script(ExitType::Auto, Some("efi"), "done");
        assert!(
            efi.ends_with("\nexit 1\n") && !efi.contains("sanboot"),
            "{efi}"
        );
        let forced = local_script(ExitType::Sanboot, Some("efi"), "x");
        assert!(forced.contains("sanboot"), "{forced}");
        assert!(local_script(ExitType::Exit, None, "x").ends_with("\nexit 1\n"));
        // What the server prints cannot become iPXE commands or settings.
        let s = local_script(ExitType::Exit, None, "a\nkernel http://x/${evil}");
        assert!(!s.contains("\nkernel") && !s.contains("${evil}"), "{s}");
    }

    #[test]
    fn the_first_script_asks_with_the_mac_and_platform() {
        let s = ask_script("http://10.0.0.1:8080/");
        assert!(
            s.contains(
                "imgfetch --name decision \
                 http://10.0.0.1:8080/boot.ipxe?mac=${netX/mac:hexhyp}&platform=${platform} \
                 || goto failed\n"
            ),
            "{s}"
        );
        // The server's answer hands back: so does this script, without
        // falling through to the no-server path (10 s and a wrong message).
        assert!(s.contains("\nimgexec decision\nexit 1\n:failed\n"), "{s}");
        // No server: the disk, handing back with a failure on UEFI.
        assert!(
            s.ends_with("\nsanboot --no-describe --drive 0x80 || exit 1\n"),
            "{s}"
        );
    }

    #[test]
    fn script_boots_the_agent_with_bootif_and_server() {
        let args = kernel_args(
            "${netX/mac:hexhyp}",
            "http://10.0.0.1:8080/",
            "blockswarm.on_fail=shell",
        );
        let s = script("http://10.0.0.1:8080/", &args);
        assert!(s.starts_with("#!ipxe\n"), "{s}");
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        assert!(
            kernel.starts_with("kernel http://10.0.0.1:8080/boot/vmlinuz "),
            "{kernel}"
        );
        for want in [
            "initrd=initramfs.img",
            "BOOTIF=01-${netX/mac:hexhyp}",
            "blockswarm.server=http://10.0.0.1:8080 ",
            "console=ttyS0,115200",
            "blockswarm.on_fail=shell",
        ] {
            assert!(kernel.contains(want), "{want} missing: {kernel}");
        }
        assert!(s.contains("initrd --name initramfs.img http://10.0.0.1:8080/boot/initramfs.img"));
    }
}

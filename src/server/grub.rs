//! The boot decision for Debian's signed network GRUB (the Secure Boot
//! chain: firmware -> shim -> GRUB -> Debian's signed kernel; see
//! docs/secure-boot.md). That GRUB speaks TFTP only: the static grub.cfg
//! pxe/start writes sets `blockswarm_tftp` to `(tftp,SERVER:PORT)` (this
//! server's TFTP, on the HTTP port's number) and sources
//! `$blockswarm_tftp/boot.grub/$net_default_mac`, answered here with the
//! same decision as `/boot.ipxe` (`boot::answer`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;

use super::api::AppState;
use super::boot::{BOOT_FILES, Render, answer, printable, read_boot_file};
use super::config::normalize_mac;
use super::tftp;
use crate::protocol::admin::ExitType;

/// Starts the first EFI loader found on the disks: Windows' boot manager,
/// else the removable-media path. pxe/start's grub.cfg does the same when
/// the server does not answer.
pub const CHAIN_TO_DISK: &str = "\
for f in /EFI/Microsoft/Boot/bootmgfw.efi /EFI/BOOT/BOOTX64.EFI; do
  if search --no-floppy --file --set=esp $f; then
    chainloader ($esp)$f
    boot
  fi
done
echo 'blockswarm: no EFI loader on the disks; handing back to the firmware'
exit
";

/// GRUB's rendering of the decision, for the PC whose GRUB sent `mac`
/// (`$net_default_mac`: "52:54:00:12:34:56").
pub struct Grub<'a> {
    pub mac: &'a str,
}

impl Render for Grub<'_> {
    fn agent(&self, args: &str) -> String {
        let mac = printable(self.mac);
        // A failed load tries again through the static grub.cfg, which
        // asks the server again.
        format!(
            "# blockswarm network boot, served by `blockswarm serve` (GRUB, TFTP)\n\
             echo 'blockswarm: {mac} loading the deploy system'\n\
             linux $blockswarm_tftp/boot/vmlinuz {args}\n\
             initrd $blockswarm_tftp/boot/initramfs.img\n\
             boot\n\
             echo 'blockswarm: network boot failed, trying again in 10 s'\n\
             sleep 10\n\
             configfile $prefix/grub.cfg\n"
        )
    }

    /// GRUB runs on UEFI only, and Debian's (2.06) can only hand back to
    /// the firmware with success, on which EDK2-based firmware stops at its
    /// menu instead of booting its next entry (iPXE's `exit 1`): so it
    /// starts the disk's own loader, the one firmware boots from a disk with
    /// no boot entry (or Windows' boot manager), whatever the exit type.
    /// Under Secure Boot the firmware checks that loader's signature.
    fn local(&self, _exit: ExitType, why: &str) -> String {
        let (mac, why) = (printable(self.mac), printable(why));
        format!(
            "# blockswarm: nothing to do for this PC, boot its disk\n\
             echo 'blockswarm: {mac}: {why}'\n\
             echo 'blockswarm: booting the local disk'\n\
             {CHAIN_TO_DISK}"
        )
    }

    /// The server writes the MAC in (GRUB cannot turn ':' into '-').
    fn bootif(&self) -> String {
        normalize_mac(self.mac)
            .map(|m| m.replace(':', "-"))
            .unwrap_or_default()
    }
}

/// What the TFTP server serves: `boot.grub/<MAC>` (the decision) and
/// `boot/<one of BOOT_FILES>`; `local` is the address the PC reached us at.
pub fn tftp_files(s: AppState) -> tftp::Open {
    Arc::new(move |path: String, peer: SocketAddr, local: IpAddr| {
        let s = s.clone();
        Box::pin(async move {
            let path = path.trim_start_matches('/');
            if let Some(mac) = path.strip_prefix("boot.grub/") {
                let base = match &s.config.public_url {
                    Some(_) => s.config.public_url(),
                    None => format!("http://{}", SocketAddr::new(local, s.config.listen.port())),
                };
                let grub = Grub { mac };
                return Ok(Bytes::from(answer(&s, mac, peer.ip(), &base, &grub)));
            }
            match path.strip_prefix("boot/") {
                Some(f) if BOOT_FILES.contains(&f) => {
                    read_boot_file(&s, f).await.map_err(|(_, e)| e)
                }
                _ => Err(format!("no file {path:?} here")),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::boot::kernel_args;

    #[test]
    fn grub_boots_the_agent_with_the_ipxe_command_line() {
        let g = Grub {
            mac: "52:54:00:AB:cd:01",
        };
        let args = kernel_args(
            &g.bootif(),
            "http://10.0.0.1:8080/",
            "blockswarm.on_fail=shell",
        );
        let s = g.agent(&args);
        let linux = s.lines().find(|l| l.starts_with("linux ")).unwrap();
        assert_eq!(
            linux,
            "linux $blockswarm_tftp/boot/vmlinuz BOOTIF=01-52-54-00-ab-cd-01 \
             blockswarm.server=http://10.0.0.1:8080 console=ttyS0,115200 console=tty0 \
             blockswarm.on_fail=shell"
        );
        assert!(
            s.contains("\ninitrd $blockswarm_tftp/boot/initramfs.img\nboot\n"),
            "{s}"
        );
    }

    #[test]
    fn grub_starts_the_disks_loader_and_prints_nothing_it_could_run() {
        for exit in [ExitType::Auto, ExitType::Sanboot, ExitType::Exit] {
            let s = Grub {
                mac: "52:54:00:ab:cd:01",
            }
            .local(exit, "done");
            assert!(s.ends_with(CHAIN_TO_DISK) && !s.contains("sanboot"), "{s}");
            assert!(s.contains("\n    chainloader ($esp)$f\n    boot\n"), "{s}");
        }
        // A quote would end echo's string; $ would expand; a newline would
        // start a command.
        let s = Grub { mac: "x'\nlinux y" }.local(ExitType::Auto, "a'\nboot ${evil}");
        let s = s
            .strip_suffix(CHAIN_TO_DISK)
            .expect("the chain to the disk ends it");
        assert!(
            !s.contains("\nboot") && !s.contains("\nlinux") && !s.contains("${"),
            "{s}"
        );
        assert_eq!(
            s.lines().filter(|l| l.starts_with("echo ")).count(),
            2,
            "{s}"
        );
        assert!(
            s.lines()
                .all(|l| !l.starts_with("echo") || l.matches('\'').count() == 2),
            "{s}"
        );
    }
}

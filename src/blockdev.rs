//! Opening disks and image files safely: sizes, exclusivity, mounts.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_read_bad!(blksszget, 0x1268, libc_int);
nix::ioctl_none!(blkrrpart, 0x12, 95);
#[allow(non_camel_case_types)]
type libc_int = std::ffi::c_int;

/// An open disk, partition or image file.
#[derive(Debug)]
pub struct Dev {
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    pub sector_size: u64,
    /// `Some(rdev)` for a block device.
    pub rdev: Option<u64>,
    /// (st_dev, st_ino) of the path itself.
    pub id: (u64, u64),
}

impl Dev {
    pub fn is_block(&self) -> bool {
        self.rdev.is_some()
    }

    /// Whether `other` names the same disk or file.
    pub fn same_as(&self, other: &Path) -> bool {
        match std::fs::metadata(other) {
            Ok(md) if md.file_type().is_block_device() => self.rdev == Some(md.rdev()),
            Ok(md) => self.id == (md.dev(), md.ino()),
            Err(_) => false,
        }
    }

    /// Asks the kernel to re-read the partition table (block devices only).
    pub fn reread_partitions(&self) -> Result<()> {
        if self.is_block() {
            use std::os::fd::AsRawFd;
            // SAFETY: BLKRRPART takes no argument; the fd is open for the call.
            unsafe { blkrrpart(self.file.as_raw_fd()) }.with_context(|| {
                format!("re-reading the partition table of {}", self.path.display())
            })?;
        }
        Ok(())
    }
}

fn open(path: &Path, write: bool) -> Result<Dev> {
    let md = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let block = md.file_type().is_block_device();
    if !block && !md.is_file() {
        bail!(
            "{} is neither a block device nor a regular file",
            path.display()
        );
    }
    let mut oo = OpenOptions::new();
    oo.read(true).write(write);
    if write && block {
        // O_EXCL on a block device fails with EBUSY while it is mounted or in use.
        oo.custom_flags(nix::libc::O_EXCL);
    }
    let file = oo.open(path).map_err(|e| {
        if e.raw_os_error() == Some(nix::libc::EBUSY) {
            anyhow::anyhow!("{} is busy (mounted or in use)", path.display())
        } else {
            anyhow::Error::new(e).context(format!("opening {}", path.display()))
        }
    })?;
    let (size, sector_size) = if block {
        use std::os::fd::AsRawFd;
        let mut size = 0u64;
        let mut ss: libc_int = 0;
        // SAFETY: both ioctls write one integer through a valid pointer.
        unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }
            .with_context(|| format!("getting the size of {}", path.display()))?;
        unsafe { blksszget(file.as_raw_fd(), &mut ss) }
            .with_context(|| format!("getting the sector size of {}", path.display()))?;
        (size, ss.max(512) as u64)
    } else {
        (md.len(), 512)
    };
    let lock = if write {
        nix::fcntl::FlockArg::LockExclusiveNonblock
    } else {
        nix::fcntl::FlockArg::LockSharedNonblock
    };
    #[allow(deprecated)]
    nix::fcntl::flock(std::os::fd::AsRawFd::as_raw_fd(&file), lock).map_err(|_| {
        anyhow::anyhow!(
            "{} is in use by another blockswarm process (a seed reading it, or a receiver writing it)",
            path.display()
        )
    })?;
    Ok(Dev {
        path: path.to_owned(),
        file,
        size,
        sector_size,
        rdev: block.then(|| md.rdev()),
        id: (md.dev(), md.ino()),
    })
}

/// Opens a source read-only, with a shared lock.
pub fn open_source(path: &Path) -> Result<Dev> {
    open(path, false)
}

/// Opens a target for writing: exclusive, and never while mounted.
pub fn open_target(path: &Path) -> Result<Dev> {
    let dev = open(path, true)?;
    let m = mounts(&dev)?;
    if let Some(m) = m.first() {
        bail!(
            "{} is mounted at {} ({})",
            dev.path.display(),
            m.mountpoint,
            m.device
        );
    }
    Ok(dev)
}

#[derive(Debug, Clone)]
pub struct Mount {
    pub device: String,
    pub mountpoint: String,
    pub read_write: bool,
}

/// Mounts of the device, of its partitions, or of loop devices over the file.
pub fn mounts(dev: &Dev) -> Result<Vec<Mount>> {
    let mut devnums: Vec<String> = Vec::new();
    let add_block = |majmin: String, devnums: &mut Vec<String>| {
        // The disk's partitions and holders (dm, md) count as the disk.
        let sys = PathBuf::from(format!("/sys/dev/block/{majmin}"));
        for sub in ["", "holders"] {
            if let Ok(rd) = std::fs::read_dir(sys.join(sub)) {
                for e in rd.flatten() {
                    if let Ok(d) = std::fs::read_to_string(e.path().join("dev")) {
                        devnums.push(d.trim().to_string());
                    }
                }
            }
        }
        devnums.push(majmin);
    };
    match dev.rdev {
        Some(rdev) => add_block(majmin(rdev), &mut devnums),
        None => {
            let real = std::fs::canonicalize(&dev.path)?;
            if let Ok(rd) = std::fs::read_dir("/sys/block") {
                for e in rd.flatten() {
                    let bf = e.path().join("loop/backing_file");
                    if let Ok(b) = std::fs::read_to_string(&bf)
                        && Path::new(b.trim()) == real
                        && let Ok(d) = std::fs::read_to_string(e.path().join("dev"))
                    {
                        add_block(d.trim().to_string(), &mut devnums);
                    }
                }
            }
        }
    }
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 5 && devnums.iter().any(|d| d == f[2]) {
            out.push(Mount {
                device: f[2].to_string(),
                mountpoint: f[4].to_string(),
                read_write: f[5].split(',').any(|o| o == "rw"),
            });
        }
    }
    Ok(out)
}

fn majmin(rdev: u64) -> String {
    format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    )
}

/// A loop device over a byte range of an open disk or file, detached when
/// dropped (the kernel clears it on its last close: `LO_FLAGS_AUTOCLEAR`).
/// File-system tools that take a device (resize2fs, ntfsresize) run on it:
/// a partition of a disk image has no node of its own, and one code path
/// serves disks and files alike. No partition scan is asked for.
#[derive(Debug)]
pub struct Loop {
    pub path: PathBuf,
    _file: File,
}

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` of <linux/loop.h>.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LO_FLAGS_AUTOCLEAR: u32 = 4;
nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);

impl Loop {
    /// Attaches bytes `offset..offset + len` of `backing`.
    pub fn attach(backing: &File, offset: u64, len: u64) -> Result<Self> {
        use std::os::fd::AsRawFd;
        if !Path::new("/dev/loop-control").exists() {
            // A modular loop driver is not loaded by udev (no hardware asks
            // for it); the deploy system carries it (initramfs/build).
            let _ = std::process::Command::new("modprobe").arg("loop").status();
        }
        let ctl = File::open("/dev/loop-control")
            .context("opening /dev/loop-control (is the loop module loaded?)")?;
        // Another process may take the free device first: try again.
        for _ in 0..8 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument.
            let n = unsafe { loop_ctl_get_free(ctl.as_raw_fd()) }
                .context("finding a free loop device")?;
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: LoopConfig is plain data; all-zero is its empty value.
            let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
            cfg.fd = backing.as_raw_fd() as u32;
            cfg.info.offset = offset;
            cfg.info.sizelimit = len;
            cfg.info.flags = LO_FLAGS_AUTOCLEAR;
            // SAFETY: the pointer is to a live LoopConfig, which the kernel reads.
            match unsafe { loop_configure(file.as_raw_fd(), &cfg) } {
                Ok(_) => return Ok(Self { path, _file: file }),
                Err(nix::errno::Errno::EBUSY) => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("attaching {} at byte {offset}", path.display()));
                }
            }
        }
        bail!("no free loop device after 8 tries")
    }
}

//! The admin API's bearer token, resolved once at start: `admin_token` from
//! the config, else the token file (`admin_token_file`, by default
//! `<state_dir>/admin-token`), made on first start. So a server installed
//! as is has its admin API on, with a secret only its user (and root) can
//! read, and the log says where it is, never what it is.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tracing::warn;

use super::config::ServerConfig;

/// The token file's name in `state_dir`.
pub const FILE_NAME: &str = "admin-token";
/// A longer file is not a token.
const MAX_LEN: usize = 1024;

pub struct AdminToken {
    pub token: String,
    pub origin: Origin,
}

/// Where the token came from; its `Display` is the line the server logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Config,
    File(PathBuf),
    /// Made by this start.
    Generated(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Config => write!(f, "admin token: admin_token in the server config"),
            Origin::File(p) => write!(
                f,
                "admin token: {} (use it as BLOCKSWARM_TOKEN)",
                p.display()
            ),
            Origin::Generated(p) => write!(
                f,
                "admin token: {} (generated on first start; use it as BLOCKSWARM_TOKEN)",
                p.display()
            ),
        }
    }
}

/// The token file `cfg` names, absolute (for the log); `None` when the
/// config holds the token itself.
pub fn token_file(cfg: &ServerConfig) -> Result<Option<PathBuf>> {
    let path = match (&cfg.admin_token, &cfg.admin_token_file) {
        (Some(_), Some(_)) => bail!("admin_token, admin_token_file: set one, not both"),
        (Some(_), None) => return Ok(None),
        (None, Some(p)) => p.clone(),
        (None, None) => cfg.state_dir.join(FILE_NAME),
    };
    Ok(Some(std::path::absolute(&path).unwrap_or(path)))
}

/// The token, from the config or its file, making the file if missing.
/// Its directory must exist.
pub fn resolve(cfg: &ServerConfig) -> Result<AdminToken> {
    let Some(path) = token_file(cfg)? else {
        let t = cfg.admin_token.as_deref().unwrap_or_default();
        check(t).context("admin_token")?;
        return Ok(AdminToken {
            token: t.to_string(),
            origin: Origin::Config,
        });
    };
    if let Some(token) = read(&path)? {
        return Ok(AdminToken {
            token,
            origin: Origin::File(path),
        });
    }
    let token = generate(&path)?;
    Ok(AdminToken {
        token,
        origin: Origin::Generated(path),
    })
}

/// Reads a token file: `None` if there is none. Surrounding whitespace
/// (an editor's newline) is not part of the token.
pub fn read(path: &Path) -> Result<Option<String>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mode = f.metadata().map(|m| m.permissions().mode()).unwrap_or(0);
    if mode & 0o077 != 0 {
        warn!(
            "{} can be read by others (mode {:o}): chmod 600 it",
            path.display(),
            mode & 0o777
        );
    }
    let mut s = String::new();
    f.take(MAX_LEN as u64 + 1)
        .read_to_string(&mut s)
        .with_context(|| format!("reading {}", path.display()))?;
    let what = || {
        format!(
            "{}: write a token in it, or delete it to have one generated",
            path.display()
        )
    };
    if s.len() > MAX_LEN {
        bail!("{}: over {MAX_LEN} bytes, not a token", path.display());
    }
    check(s.trim()).with_context(what)?;
    Ok(Some(s.trim().to_string()))
}

/// What a token must be to come back in an `Authorization` header intact.
fn check(t: &str) -> Result<()> {
    if t.is_empty() {
        bail!("the token is empty");
    }
    if !t.bytes().all(|b| (b' '..=b'~').contains(&b)) || t.trim() != t {
        bail!(
            "the token may hold printable ASCII only (it is sent in an HTTP header), \
             and no surrounding spaces"
        );
    }
    Ok(())
}

/// Makes the token file: 32 random bytes in hex, mode 0600, whole or not
/// at all (written aside, then linked into place without replacing).
fn generate(path: &Path) -> Result<String> {
    let token = crate::image::torrent::hex(&super::token::random_key()?);
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".admin-token")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(tmp, "{token}")
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(token),
        // Another start made it first: that one counts.
        Err(e) if e.error.kind() == ErrorKind::AlreadyExists => {
            read(path)?.with_context(|| format!("{} vanished as it was made", path.display()))
        }
        Err(e) => Err(e.error).with_context(|| format!("creating {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(state: &Path, extra: &str) -> ServerConfig {
        let mut c = ServerConfig::parse(extra).unwrap();
        c.state_dir = state.to_owned();
        c
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generated_once_then_reused() {
        let t = tempfile::tempdir().unwrap();
        let c = cfg(t.path(), "");
        let first = resolve(&c).unwrap();
        let path = t.path().join(FILE_NAME);
        assert_eq!(first.origin, Origin::Generated(path.clone()));
        assert_eq!(first.token.len(), 64);
        assert!(first.token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", first.token)
        );
        assert_eq!(mode(&path), 0o600);
        let again = resolve(&c).unwrap();
        assert_eq!(again.token, first.token);
        assert_eq!(again.origin, Origin::File(path.clone()));
        // Nothing left aside.
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1);
        // Another state directory, another token.
        let t2 = tempfile::tempdir().unwrap();
        assert_ne!(resolve(&cfg(t2.path(), "")).unwrap().token, first.token);
    }

    #[test]
    fn surrounding_whitespace_is_not_the_token() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(FILE_NAME), "  s3cret token\n\n").unwrap();
        assert_eq!(resolve(&cfg(t.path(), "")).unwrap().token, "s3cret token");
    }

    #[test]
    fn bad_files_are_refused_by_name() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join(FILE_NAME);
        for (content, says) in [
            ("", "the token is empty"),
            (" \n", "the token is empty"),
            ("tok\x07en\n", "printable ASCII"),
            (&"x".repeat(MAX_LEN + 1), "not a token"),
        ] {
            std::fs::write(&path, content).unwrap();
            let e = format!("{:#}", resolve(&cfg(t.path(), "")).err().unwrap());
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains(says), "{e}");
            // The file is left for the admin to look at.
            assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
        }
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let e = format!("{:#}", resolve(&cfg(t.path(), "")).err().unwrap());
        assert!(e.contains("reading") && e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn a_token_file_named_in_the_config() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("etc-token");
        let c = cfg(
            &t.path().join("state"),
            &format!("admin_token_file = {:?}", file.display().to_string()),
        );
        // Made there on first start, like the default one.
        let made = resolve(&c).unwrap();
        assert_eq!(made.origin, Origin::Generated(file.clone()));
        std::fs::write(&file, "from-the-admin\n").unwrap();
        assert_eq!(resolve(&c).unwrap().token, "from-the-admin");
        assert!(!t.path().join("state").exists());
        let both = format!(
            "admin_token_file = {:?}\nadmin_token = \"x\"",
            file.display().to_string()
        );
        let e = format!("{:#}", resolve(&cfg(t.path(), &both)).err().unwrap());
        assert!(e.contains("set one, not both"), "{e}");
    }

    #[test]
    fn a_token_in_the_config_is_checked_and_used() {
        let t = tempfile::tempdir().unwrap();
        let a = resolve(&cfg(t.path(), "admin_token = \"t0ken\"")).unwrap();
        assert_eq!((a.token.as_str(), a.origin), ("t0ken", Origin::Config));
        assert!(!t.path().join(FILE_NAME).exists());
        let e = format!(
            "{:#}",
            resolve(&cfg(t.path(), "admin_token = \"\"")).err().unwrap()
        );
        assert!(e.contains("admin_token") && e.contains("empty"), "{e}");
    }

    #[test]
    fn the_log_line_names_the_file() {
        let p = PathBuf::from("/var/lib/blockswarm/state/admin-token");
        assert_eq!(
            Origin::Generated(p).to_string(),
            "admin token: /var/lib/blockswarm/state/admin-token \
             (generated on first start; use it as BLOCKSWARM_TOKEN)"
        );
    }
}

//! Host tokens: how the server tells its own agents from anyone else on
//! the LAN.
//!
//! A token is `{deployment}.{mac as 12 hex digits}.{HMAC-SHA256 in hex}`
//! over the deployment and the MAC, keyed with a random server secret. It
//! checks itself, so nothing is stored per host; a host that fetches its job
//! again in the same deployment (a reboot) gets the same token; and as the
//! secret is kept in the store folder, tokens outlive a server restart.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tracing::warn;

/// Where the secret lives in the store folder (dot files are not images).
pub const KEY_FILE: &str = ".blockswarm-host-key";
const KEY_LEN: usize = 32;
/// Longer strings are not tokens: refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 128;

pub struct HostKeys {
    key: hmac::Key,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostToken {
    pub deployment: u64,
    /// Normalized, "52:54:00:12:34:56".
    pub mac: String,
}

impl HostKeys {
    /// The secret in `dir`, made on first use. Without a writable store the
    /// server still works, with a secret that dies with the process.
    pub fn load_or_create(dir: &Path) -> Self {
        let path = dir.join(KEY_FILE);
        match read_or_create(&path) {
            Ok(k) => Self::from_bytes(&k),
            Err(e) => {
                warn!(
                    "{}: {e:#}; host tokens will not outlive this process",
                    path.display()
                );
                Self::random()
            }
        }
    }

    pub fn random() -> Self {
        Self::from_bytes(&random_key().expect("the OS random source"))
    }

    fn from_bytes(k: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, k),
        }
    }

    /// `mac` must be normalized.
    pub fn issue(&self, deployment: u64, mac: &str) -> String {
        let tag = hmac::sign(&self.key, &message(deployment, mac));
        format!(
            "{deployment}.{}.{}",
            mac.replace(':', ""),
            hex(tag.as_ref())
        )
    }

    /// The host and deployment a token was issued for, if it is one of ours.
    pub fn check(&self, token: &str) -> Option<HostToken> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let mut parts = token.split('.');
        let (dep, mac, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || tag.len() != 64 {
            return None;
        }
        let (deployment, mac) = parse_host(dep, mac)?;
        let tag = unhex(tag)?;
        hmac::verify(&self.key, &message(deployment, &mac), &tag).ok()?;
        Some(HostToken { deployment, mac })
    }
}

impl HostKeys {
    /// A capture token for `mac`'s capture task in `deployment`:
    /// `cap.{deployment}.{mac}.{nonce}.{tag}`, the tag an HMAC over all
    /// three. The server keeps the nonce of the one it issued last and
    /// takes it back at the first upload ([`super::capture`]), so a token
    /// is good once, for that host and task.
    pub fn issue_capture(&self, deployment: u64, mac: &str) -> Result<(String, String)> {
        let nonce = random_hex()?;
        let tag = hmac::sign(&self.key, &capture_message(deployment, mac, &nonce));
        let token = format!(
            "cap.{deployment}.{}.{nonce}.{}",
            mac.replace(':', ""),
            hex(tag.as_ref())
        );
        Ok((token, nonce))
    }

    /// The task and nonce of a capture token this server issued.
    pub fn check_capture(&self, token: &str) -> Option<(HostToken, String)> {
        if token.len() > MAX_TOKEN_LEN + 64 {
            return None;
        }
        let rest = token.strip_prefix("cap.")?;
        let (host, nonce_tag) = rest.split_at_checked(rest.match_indices('.').nth(1)?.0)?;
        let (nonce, tag) = nonce_tag.strip_prefix('.')?.split_once('.')?;
        if nonce.len() != 64 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let (dep, mac) = host.split_once('.')?;
        if tag.len() != 64 {
            return None;
        }
        let (deployment, mac) = parse_host(dep, mac)?;
        // ring compares the tags in constant time.
        hmac::verify(
            &self.key,
            &capture_message(deployment, &mac, nonce),
            &unhex(tag)?,
        )
        .ok()?;
        Some((HostToken { deployment, mac }, nonce.to_string()))
    }
}

/// The `{deployment}.{mac as 12 hex digits}` part both kinds of token
/// share, the MAC normalized.
fn parse_host(dep: &str, mac: &str) -> Option<(u64, String)> {
    if mac.len() != 12 {
        return None;
    }
    let deployment: u64 = dep.parse().ok()?;
    let mac = (0..6)
        .map(|i| mac.get(2 * i..2 * i + 2))
        .collect::<Option<Vec<_>>>()?
        .join(":");
    let mac = crate::server::config::normalize_mac(&mac).ok()?;
    Some((deployment, mac))
}

fn capture_message(deployment: u64, mac: &str, nonce: &str) -> Vec<u8> {
    format!("blockswarm capture token v1 {deployment} {mac} {nonce}").into_bytes()
}

fn message(deployment: u64, mac: &str) -> Vec<u8> {
    format!("blockswarm host token v1 {deployment} {mac}").into_bytes()
}

/// 32 random bytes in hex: a secret for a cookie or a form.
pub fn random_hex() -> Result<String> {
    Ok(hex(&random_key()?))
}

pub(super) fn random_key() -> Result<[u8; KEY_LEN]> {
    let mut k = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut k)
        .map_err(|_| anyhow::anyhow!("the OS random source failed"))?;
    Ok(k)
}

fn read_or_create(path: &Path) -> Result<[u8; KEY_LEN]> {
    match std::fs::File::open(path) {
        Ok(mut f) => {
            let mut k = Vec::new();
            f.read_to_end(&mut k).context("reading")?;
            match <[u8; KEY_LEN]>::try_from(k.as_slice()) {
                Ok(k) => Ok(k),
                Err(_) => bail!(
                    "{} bytes, not {KEY_LEN}: delete it to make a new one",
                    k.len()
                ),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let k = random_key()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .context("creating")?;
            f.write_all(&k)
                .and_then(|_| f.sync_all())
                .context("writing")?;
            Ok(k)
        }
        Err(e) => Err(e).context("opening"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_check_themselves() {
        let k = HostKeys::random();
        let t = k.issue(7, "52:54:00:ab:cd:01");
        assert_eq!(t, k.issue(7, "52:54:00:ab:cd:01"), "stable per host");
        assert_eq!(
            k.check(&t),
            Some(HostToken {
                deployment: 7,
                mac: "52:54:00:ab:cd:01".into()
            })
        );
        assert_ne!(t, k.issue(8, "52:54:00:ab:cd:01"));
        // Another server's token, a forged MAC or deployment, garbage.
        assert_eq!(HostKeys::random().check(&t), None);
        assert_eq!(
            k.check(&t.replacen("525400abcd01", "525400abcd02", 1)),
            None
        );
        assert_eq!(k.check(&t.replacen("7.", "8.", 1)), None);
        for bad in [
            "",
            "...",
            "7.525400abcd01.zz",
            &"9".repeat(400),
            &(t.clone() + ".x"),
        ] {
            assert_eq!(k.check(bad), None, "{bad}");
        }
    }

    #[test]
    fn capture_tokens_check_themselves() {
        let k = HostKeys::random();
        let (t, nonce) = k.issue_capture(7, "52:54:00:ab:cd:01").unwrap();
        let (t2, nonce2) = k.issue_capture(7, "52:54:00:ab:cd:01").unwrap();
        assert_ne!((&t, &nonce), (&t2, &nonce2), "each token is new");
        let host = HostToken {
            deployment: 7,
            mac: "52:54:00:ab:cd:01".into(),
        };
        assert_eq!(k.check_capture(&t), Some((host, nonce.clone())));
        // A host token is not a capture token, nor the reverse.
        assert_eq!(k.check_capture(&k.issue(7, "52:54:00:ab:cd:01")), None);
        assert_eq!(k.check(&t), None);
        assert_eq!(HostKeys::random().check_capture(&t), None);
        for (from, to) in [("525400abcd01", "525400abcd02"), ("cap.7.", "cap.8.")] {
            assert_eq!(k.check_capture(&t.replacen(from, to, 1)), None, "{to}");
        }
        let other = if nonce.starts_with('0') { "1" } else { "0" };
        let forged = t.replacen(&nonce, &format!("{other}{}", &nonce[1..]), 1);
        assert_eq!(k.check_capture(&forged), None);
        for bad in ["cap.", "cap....", &t[..t.len() - 2], &(t.clone() + "00")] {
            assert_eq!(k.check_capture(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_secret_outlives_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let t = HostKeys::load_or_create(d.path()).issue(1, "52:54:00:00:00:01");
        let again = HostKeys::load_or_create(d.path());
        assert!(again.check(&t).is_some());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

//! `blockswarm serve --check`: the config as the server would run with it,
//! every path resolved, nothing written (`scripts/deb --check` runs it on
//! the packaged config).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::admin_token;
use super::config::ServerConfig;

/// What `serve --check` prints; an error if the server would not start
/// on this config for a reason known without starting it.
pub fn report(cfg: &ServerConfig) -> Result<String> {
    let path = |p: &Path| {
        let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
        let note = if abs.exists() { "" } else { " (missing)" };
        format!("{}{note}", abs.display())
    };
    let token = match admin_token::token_file(cfg)? {
        None => {
            admin_token::resolve(cfg)?;
            "admin_token in the config".to_string()
        }
        Some(p) => match admin_token::read(&p)? {
            Some(_) => p.display().to_string(),
            None => format!("{} (made on first start)", p.display()),
        },
    };
    let mut out = String::new();
    let mut line = |k: &str, v: &str| writeln!(out, "{k:<16}{v}").expect("a String");
    line("listen", &cfg.listen.to_string());
    line("public_url", &cfg.public_url());
    line("tracker", &cfg.announce_url());
    let seed = match cfg.seed {
        true => cfg.seed_listen.to_string(),
        false => "off".into(),
    };
    line("seed", &seed);
    line("images", &path(&cfg.images));
    line("state_dir", &path(&cfg.state_dir));
    line("admin token", &token);
    line("boot_dir", &path(&cfg.boot_dir));
    for d in &cfg.device_images {
        line(
            "device_image",
            &format!("{} from {}", path(&d.dir), path(&d.from)),
        );
    }
    let default_job = cfg.default_job.as_ref().map(|j| j.image.as_str());
    line(
        "jobs",
        &format!(
            "{} hosts listed, default job: {}",
            cfg.hosts.len(),
            default_job.unwrap_or("none")
        ),
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_config_keeps_its_state_under_var_lib() {
        let cfg = ServerConfig::parse(include_str!("../../pxe/debian/server.toml")).unwrap();
        let var = Path::new("/var/lib/blockswarm");
        assert_eq!(cfg.images, var.join("images"));
        assert_eq!(cfg.state_dir, var.join("state"));
        assert_eq!(cfg.boot_dir, var.join("boot"));
        assert_eq!(
            admin_token::token_file(&cfg).unwrap(),
            Some(var.join("state/admin-token"))
        );
    }
}

//! The agent's side of the HTTP API.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use crate::image::Image;
use crate::protocol::{JobResponse, StatusAck, StatusReport};

#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str) -> Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("server URL {base:?} must start with http:// or https://");
        }
        let http = crate::util::http_client()?;
        Ok(Self { base, http })
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// Polls until the server has a job for `mac`, saying why it waits.
    /// `on_wait` is told each reason (for status reports).
    pub async fn wait_for_job(&self, mac: &str, mut on_wait: impl FnMut(&str)) -> JobResponse {
        let mut backoff = Duration::from_secs(1);
        let mut last = String::new();
        loop {
            let why = match self
                .http
                .get(self.url(&format!("/api/v1/jobs/{mac}")))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => match r.json::<JobResponse>().await {
                    Ok(j) => return j,
                    Err(e) => format!("the server's job is malformed: {e}"),
                },
                Ok(r) => {
                    let code = r.status();
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    let msg = body["error"].as_str().unwrap_or("").to_string();
                    backoff = Duration::from_secs(5);
                    if code == reqwest::StatusCode::NOT_FOUND {
                        format!("no job: {msg}")
                    } else {
                        format!("waiting: {msg} ({code})")
                    }
                }
                Err(e) => {
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    format!(
                        "server {} unreachable: {}",
                        self.base,
                        crate::util::root_cause(&e)
                    )
                }
            };
            if why != last {
                warn!("{why}; asking again every {} s", backoff.as_secs());
                last = why.clone();
            }
            on_wait(&why);
            tokio::time::sleep(backoff).await;
        }
    }

    async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let url = self.url(path);
        let r = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !r.status().is_success() {
            bail!("GET {url}: {}", r.status());
        }
        Ok(r.bytes()
            .await
            .with_context(|| format!("GET {url}"))?
            .to_vec())
    }

    /// A post-deploy hook's script, at most [`crate::protocol::MAX_HOOK_BYTES`].
    pub async fn fetch_hook(&self, name: &str) -> Result<Vec<u8>> {
        let url = self.url(&format!("/hooks/{name}"));
        let mut r = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !r.status().is_success() {
            bail!("GET {url}: {}", r.status());
        }
        let mut body = Vec::new();
        while let Some(c) = r.chunk().await.with_context(|| format!("GET {url}"))? {
            body.extend_from_slice(&c);
            if body.len() as u64 > crate::protocol::MAX_HOOK_BYTES {
                bail!("GET {url}: over {} bytes", crate::protocol::MAX_HOOK_BYTES);
            }
        }
        Ok(body)
    }

    /// Fetches and checks the job's manifest and torrent, retrying while the
    /// server is unreachable.
    pub async fn fetch_image(&self, job: &JobResponse) -> Result<Image> {
        let mut tries = 0;
        loop {
            let got = async {
                let m = self.get_bytes(&job.manifest_url).await?;
                let t = self.get_bytes(&job.torrent_url).await?;
                Ok::<_, anyhow::Error>((m, t))
            }
            .await;
            match got {
                Ok((m, t)) => return Image::from_bytes(&self.url(&job.manifest_url), &m, t),
                Err(e) if tries < 10 => {
                    tries += 1;
                    warn!("fetching the image: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a captured image's manifest and torrent; returns the server's
    /// word on it.
    pub async fn upload_capture(
        &self,
        path: &str,
        u: &crate::protocol::CaptureUpload,
    ) -> Result<String> {
        let url = self.url(path);
        let resp = self
            .http
            .post(&url)
            .json(u)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let code = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if !code.is_success() {
            bail!(
                "the server refused the capture ({code}): {}",
                body["error"].as_str().unwrap_or("")
            );
        }
        Ok(body["message"].as_str().unwrap_or("").to_string())
    }

    pub async fn report(&self, r: &StatusReport) -> Result<StatusAck> {
        let url = self.url("/api/v1/status");
        let resp = self
            .http
            .post(&url)
            .json(r)
            .timeout(Duration::from_secs(3))
            .send()
            .await?;
        let code = resp.status();
        if !code.is_success() {
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            bail!(
                "POST {url}: {code}: {}",
                body["error"].as_str().unwrap_or("")
            );
        }
        Ok(resp.json().await?)
    }
}

/// Logs once when the server goes away and once when it returns.
#[derive(Default)]
pub struct Reachability(bool);

impl Reachability {
    pub fn update(&mut self, r: &Result<StatusAck>) {
        match (r, self.0) {
            (Err(e), false) => {
                warn!("server unreachable ({e:#}); carrying on with the peers");
                self.0 = true;
            }
            (Ok(_), true) => {
                info!("server reachable again");
                self.0 = false;
            }
            _ => {}
        }
    }
}

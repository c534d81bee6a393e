//! `blockswarm admin`: the admin API from the command line.

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::server::api::admin::StartRequest;
use crate::server::state::DeploymentView;
use crate::util::human_bytes;

pub enum AdminCmd {
    Images,
    Hosts,
    Status,
    Start(StartRequest),
    Stop,
    SetJob { mac: String, job_toml: String },
}

pub async fn run(server: &str, token: Option<&str>, cmd: AdminCmd) -> Result<()> {
    let base = server.trim_end_matches('/');
    let http = crate::util::http_client()?;
    let auth = |rb: reqwest::RequestBuilder| match token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };
    let check = |r: reqwest::Response| async move {
        let code = r.status();
        let body: Value = if code == reqwest::StatusCode::NO_CONTENT {
            Value::Null
        } else {
            r.json().await.unwrap_or(Value::Null)
        };
        if !code.is_success() {
            bail!(
                "{code}: {}",
                body["error"].as_str().unwrap_or("(no detail)")
            );
        }
        Ok(body)
    };
    let send = |rb: reqwest::RequestBuilder| async move {
        rb.send().await.with_context(|| format!("reaching {base}"))
    };
    match cmd {
        AdminCmd::Images => {
            let v =
                check(send(auth(http.get(format!("{base}/api/v1/admin/images")))).await?).await?;
            for i in v.as_array().into_iter().flatten() {
                println!(
                    "{:<20} {:<10} {:>10} payload  {}",
                    i["name"].as_str().unwrap_or(""),
                    i["state"].as_str().unwrap_or(""),
                    human_bytes(i["payload_bytes"].as_u64().unwrap_or(0)),
                    i["info_hash"].as_str().unwrap_or("")
                );
            }
        }
        AdminCmd::Hosts | AdminCmd::Status => {
            let v: DeploymentView = serde_json::from_value(
                check(send(http.get(format!("{base}/api/v1/deployment"))).await?).await?,
            )?;
            if matches!(cmd, AdminCmd::Status) {
                println!(
                    "deployment {}: {}, elapsed {:.1} s",
                    v.id.map_or("-".into(), |i| i.to_string()),
                    if v.done {
                        "done"
                    } else if v.running {
                        "running"
                    } else {
                        "not running"
                    },
                    v.elapsed_s
                );
            }
            for h in &v.hosts {
                let r = &h.report;
                println!(
                    "{:<17} {:<10} {:<14} {:>5.1}%  {:>10}/s down  {:>10}/s up  {} peers{}",
                    r.mac,
                    h.name.as_deref().unwrap_or(""),
                    serde_json::to_value(r.state)?.as_str().unwrap_or(""),
                    100.0 * r.progress.done_bytes as f64 / r.progress.total_bytes.max(1) as f64,
                    human_bytes(r.progress.down_bps as u64),
                    human_bytes(r.progress.up_bps as u64),
                    r.progress.peers,
                    r.error
                        .as_ref()
                        .map_or(String::new(), |e| format!("  error: {e}"))
                );
            }
        }
        AdminCmd::Start(req) => {
            let v = check(
                send(auth(
                    http.post(format!("{base}/api/v1/admin/deployment/start"))
                        .json(&req),
                ))
                .await?,
            )
            .await?;
            println!(
                "deployment {} started{}",
                v["deployment"],
                if req.wake {
                    format!(", {} hosts woken", v["woken"])
                } else {
                    String::new()
                }
            );
        }
        AdminCmd::Stop => {
            let v = check(
                send(auth(
                    http.post(format!("{base}/api/v1/admin/deployment/stop")),
                ))
                .await?,
            )
            .await?;
            println!("deployment {} stopped", v["deployment"]);
        }
        AdminCmd::SetJob { mac, job_toml } => {
            let job: crate::protocol::Job = toml::from_str(&job_toml).context("the job")?;
            check(
                send(auth(
                    http.put(format!("{base}/api/v1/admin/hosts/{mac}/job"))
                        .json(&job),
                ))
                .await?,
            )
            .await?;
            println!("job set for {mac}");
        }
    }
    Ok(())
}

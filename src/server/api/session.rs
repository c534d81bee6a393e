//! The admin credential, checked in one place: the [`Admin`] extractor
//! guards every admin route. It takes the bearer token (the `admin`
//! command), or a browser session made by logging in with that token.
//!
//! A session is a random 32-byte cookie (`HttpOnly; SameSite=Strict`)
//! kept in memory with its own CSRF token: a request carrying the cookie
//! must come from the dashboard's own origin, and one that changes
//! anything must also carry `X-CSRF-Token`. Sessions are bounded in number
//! and end when idle; failed logins are limited per address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Form};
use serde::Deserialize;

use super::{AppState, error};
use crate::server::config::ServerConfig;
use crate::server::dashboard::login_page;
use crate::server::http::Conn;
use crate::server::token::random_hex;

pub const COOKIE: &str = "blockswarm_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions kept at most; a new one pushes out the least recently used.
pub const MAX_SESSIONS: usize = 256;
/// A session unused this long is over.
pub const IDLE: Duration = Duration::from_secs(12 * 3600);
/// Failed logins one address may make in [`FAILURE_WINDOW`].
pub const MAX_FAILURES: u32 = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses with recent failures remembered at most.
const MAX_ADDRESSES: usize = 4096;

#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, Session>>,
    /// Failed logins by address: since when, how many.
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

struct Session {
    csrf: String,
    used: Instant,
}

impl Sessions {
    /// A new session: its cookie value and CSRF token.
    fn create(&self) -> anyhow::Result<(String, String)> {
        let (id, csrf) = (random_hex()?, random_hex()?);
        let mut live = lock(&self.live);
        live.retain(|_, s| s.used.elapsed() < IDLE);
        if live.len() >= MAX_SESSIONS
            && let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone())
        {
            live.remove(&oldest);
        }
        live.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                used: Instant::now(),
            },
        );
        Ok((id, csrf))
    }

    /// The CSRF token of live session `id`, which counts as used now.
    pub fn csrf(&self, id: &str) -> Option<String> {
        let mut live = lock(&self.live);
        match live.get_mut(id) {
            Some(s) if s.used.elapsed() < IDLE => {
                s.used = Instant::now();
                Some(s.csrf.clone())
            }
            Some(_) => {
                live.remove(id);
                None
            }
            None => None,
        }
    }

    /// The CSRF token of the live session whose cookie `h` carries.
    pub fn csrf_of(&self, h: &HeaderMap) -> Option<String> {
        self.csrf(cookie(h, COOKIE)?)
    }

    /// Whether `ip` failed to log in too often lately. Addresses are
    /// remembered in a bounded table: when it is full of recent failures,
    /// the LAN is guessing and every new address waits.
    fn limited(&self, ip: IpAddr) -> bool {
        let mut f = lock(&self.failures);
        if let Some((since, n)) = f.get(&ip) {
            return since.elapsed() < FAILURE_WINDOW && *n >= MAX_FAILURES;
        }
        if f.len() >= MAX_ADDRESSES {
            f.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
        }
        f.len() >= MAX_ADDRESSES
    }

    fn failed(&self, ip: IpAddr) {
        let mut f = lock(&self.failures);
        let e = f.entry(ip).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= FAILURE_WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
    }

    fn succeeded(&self, ip: IpAddr) {
        lock(&self.failures).remove(&ip);
    }

    fn end(&self, id: &str) {
        lock(&self.live).remove(id);
    }

    /// Checks a request's admin credential: the refusal's status and
    /// reason, if it has none.
    fn check(&self, cfg: &ServerConfig, method: &Method, h: &HeaderMap) -> Result<Admin, Refusal> {
        let Some(token) = &cfg.admin_token else {
            return Err((
                StatusCode::FORBIDDEN,
                "the admin API is off: set admin_token in the server config".into(),
            ));
        };
        if let Some(why) = cross_origin(cfg, h) {
            return Err((StatusCode::FORBIDDEN, why));
        }
        if let Some(auth) = h.get(header::AUTHORIZATION) {
            let given = auth.to_str().ok().and_then(|v| v.strip_prefix("Bearer "));
            return match given {
                Some(g) if same_secret(g, token) => Ok(Admin { session: None }),
                _ => Err((
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token".into(),
                )),
            };
        }
        let Some(id) = cookie(h, COOKIE) else {
            return Err((
                StatusCode::UNAUTHORIZED,
                "log in, or send Authorization: Bearer <admin token>".into(),
            ));
        };
        let Some(csrf) = self.csrf(id) else {
            return Err((
                StatusCode::UNAUTHORIZED,
                "the session is over: log in again".into(),
            ));
        };
        let reads = matches!(*method, Method::GET | Method::HEAD);
        let given = h.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if !reads && !given.is_some_and(|g| same_secret(g, &csrf)) {
            return Err((
                StatusCode::FORBIDDEN,
                "missing or wrong X-CSRF-Token: reload the dashboard".into(),
            ));
        }
        Ok(Admin {
            session: Some(id.to_string()),
        })
    }
}

type Refusal = (StatusCode, String);

/// Proof of the admin credential, for a handler to take as its first
/// argument: the request carried the bearer token, or a live session's
/// cookie (and, unless it only reads, the session's CSRF token).
pub struct Admin {
    /// The session's cookie value, if the request came with one.
    pub session: Option<String>,
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(p: &mut Parts, s: &AppState) -> Result<Self, Response> {
        s.sessions
            .check(&s.config, &p.method, &p.headers)
            .map_err(|(code, why)| error(code, why))
    }
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    token: String,
}

/// `POST /login` (form field `token`): a session cookie, and back to the
/// dashboard.
pub async fn login(
    State(s): State<AppState>,
    Extension(c): Extension<Conn>,
    h: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let Some(token) = &s.config.admin_token else {
        return login_page(
            StatusCode::FORBIDDEN,
            "The admin API is off: set admin_token in the server config.",
        );
    };
    if cross_origin(&s.config, &h).is_some() {
        return login_page(
            StatusCode::FORBIDDEN,
            "Log in from the dashboard's own page.",
        );
    }
    let ip = c.remote.ip();
    if s.sessions.limited(ip) {
        return login_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many failed logins from this address: wait a minute.",
        );
    }
    if !same_secret(&f.token, token) {
        s.sessions.failed(ip);
        tracing::warn!("failed dashboard login from {ip}");
        return login_page(StatusCode::UNAUTHORIZED, "Wrong token.");
    }
    s.sessions.succeeded(ip);
    let (id, _) = match s.sessions.create() {
        Ok(v) => v,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    };
    let secure = if s.config.public_url().starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/{secure}");
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, cookie),
            (header::LOCATION, "/".to_string()),
        ],
    )
        .into_response()
}

/// `POST /logout`: the session ends here and in the browser.
pub async fn logout(a: Admin, State(s): State<AppState>) -> Response {
    if let Some(id) = &a.session {
        s.sessions.end(id);
    }
    let expired = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, expired)]).into_response()
}

/// Why a request is not from the dashboard's own origin, if it is not:
/// browsers name the page that sent a request in `Origin` (on every POST)
/// and say in `Sec-Fetch-Site` whether it is the same origin; tools send
/// neither.
fn cross_origin(cfg: &ServerConfig, h: &HeaderMap) -> Option<String> {
    let text = |v: &HeaderValue| v.to_str().unwrap_or("?").to_string();
    if let Some(site) = h.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return Some(format!("refused a {} request", text(site)));
    }
    let origin = h.get(header::ORIGIN)?;
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    let o = origin.to_str().ok();
    let same_host = o
        .and_then(|o| o.split_once("://"))
        .is_some_and(|(_, rest)| Some(rest) == host);
    let public = cfg.public_url();
    let public_origin = public
        .find("://")
        .and_then(|i| public[i + 3..].find('/').map(|j| &public[..i + 3 + j]))
        .unwrap_or(&public);
    if same_host || o == Some(public_origin) {
        None
    } else {
        Some(format!("refused a request from origin {}", text(origin)))
    }
}

/// The value of cookie `name`.
fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Compares two secrets in constant time (their digests, so that not
/// even the length shows).
fn same_secret(a: &str, b: &str) -> bool {
    use ring::digest::{SHA256, digest};
    let (a, b) = (digest(&SHA256, a.as_bytes()), digest(&SHA256, b.as_bytes()));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_least_recently_used_session_goes_first() {
        let s = Sessions::default();
        let (first, csrf) = s.create().unwrap();
        let (second, _) = s.create().unwrap();
        for _ in 2..MAX_SESSIONS {
            s.create().unwrap();
        }
        let ago =
            |id: &str, secs| lock(&s.live).get_mut(id).unwrap().used -= Duration::from_secs(secs);
        ago(&first, 2);
        ago(&second, 1);
        assert_eq!(s.csrf(&first), Some(csrf), "a used session stays");
        s.create().unwrap();
        assert_eq!(lock(&s.live).len(), MAX_SESSIONS);
        assert!(s.csrf(&first).is_some());
        assert!(s.csrf(&second).is_none(), "the least recently used went");
    }

    #[test]
    fn failures_are_limited_per_address_and_window() {
        let s = Sessions::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..MAX_FAILURES {
            assert!(!s.limited(a));
            s.failed(a);
        }
        assert!(s.limited(a));
        assert!(!s.limited(b));
        lock(&s.failures).get_mut(&a).unwrap().0 -= FAILURE_WINDOW;
        assert!(!s.limited(a), "a minute later it may try again");
    }

    #[test]
    fn cookies_and_origins() {
        let h = headers(&[("cookie", "a=1; blockswarm_session=abc ;b=2")]);
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        let cfg = ServerConfig::parse("public_url = \"http://boot.lan:8080/x\"").unwrap();
        let at = |o: &str| headers(&[("host", "10.0.0.1:8080"), ("origin", o)]);
        assert_eq!(cross_origin(&cfg, &at("http://10.0.0.1:8080")), None);
        assert_eq!(cross_origin(&cfg, &at("http://boot.lan:8080")), None);
        assert!(cross_origin(&cfg, &at("http://evil.example")).is_some());
        assert!(cross_origin(&cfg, &at("null")).is_some());
        let h = headers(&[("sec-fetch-site", "cross-site")]);
        assert!(cross_origin(&cfg, &h).is_some());
        assert_eq!(cross_origin(&cfg, &HeaderMap::new()), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("t0ken", "t0ken"));
        assert!(!same_secret("t0ken", "t0ke"));
        assert!(!same_secret("", "t0ken"));
    }
}

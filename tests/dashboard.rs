//! The dashboard's login and the admin API's credentials, over real HTTP:
//! the session cookie, CSRF, origins, the login rate limit, logout; and
//! the room view's size with 1000 PCs. The page itself is driven in
//! headless Chromium by scripts/dashboard-ui.

mod common;

use std::process::Command;

use common::*;

const MAC: &str = "52:54:00:00:61:01";

/// A response: status, headers (lower-case names), body.
struct Reply {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request with curl: `method url`, then extra curl arguments.
fn request(method: &str, url: &str, args: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args(["-s", "-i", "-g", "-X", method, url])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {url}: no HTTP answer: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        code,
        headers,
        body: body.to_string(),
    }
}

fn login(url: &str, token: &str, from: &str) -> Reply {
    request(
        "POST",
        &format!("{url}/login"),
        &[
            "--interface",
            from,
            "--data-urlencode",
            &format!("token={token}"),
        ],
    )
}

/// The session cookie's value in a login answer.
fn session_of(r: &Reply) -> String {
    let c = r.header("set-cookie").expect("a session cookie");
    let v = c
        .strip_prefix("blockswarm_session=")
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("not our cookie: {c}"));
    assert!(
        v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()),
        "the session is not 32 random bytes in hex: {v}"
    );
    v.to_string()
}

/// The CSRF token the dashboard page carries.
fn csrf_of(page: &str) -> String {
    let v = page
        .split("<meta name=\"csrf\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF token in the page:\n{page}"));
    assert_eq!(v.len(), 64, "{v}");
    v.to_string()
}

/// `PUT /api/v1/admin/hosts/MAC {"name": name}` with these headers.
fn rename(url: &str, headers: &[&str], name: &str) -> Reply {
    let body = format!("{{\"name\":\"{name}\"}}");
    let mut args = vec!["-H", "Content-Type: application/json", "--data", &body];
    for h in headers {
        args.extend(["-H", h]);
    }
    request("PUT", &format!("{url}/api/v1/admin/hosts/{MAC}"), &args)
}

fn host_name(url: &str) -> serde_json::Value {
    let r = request(
        "GET",
        &format!("{url}/api/v1/admin/hosts"),
        &["-H", "Authorization: Bearer t0ken"],
    );
    assert_eq!(r.code, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|h| h["mac"] == MAC)
        .map(|h| h["name"].clone())
        .unwrap_or_default()
}

#[test]
fn login_cookie_csrf_origin_and_logout() {
    let t = tempfile::tempdir().unwrap();
    let srv = Server::start(
        t.path(),
        None,
        &format!("[[group]]\nname = \"room1\"\nmembers = [\"{MAC}\"]\n"),
    );
    let url = &srv.url;

    // No session: the login form, and the admin API refuses.
    let page = request("GET", &format!("{url}/"), &[]);
    assert_eq!(page.code, 200);
    assert!(page.body.contains("name=\"token\""), "{}", page.body);
    assert!(!page.body.contains("name=\"csrf\""), "{}", page.body);
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    let hosts = format!("{url}/api/v1/admin/hosts");
    assert_eq!(request("GET", &hosts, &[]).code, 401);

    // Wrong tokens from one address: refused, then limited even with the
    // right one; another address may still log in.
    for i in 0..5 {
        let r = login(url, &format!("guess{i}"), "127.0.0.2");
        assert_eq!(r.code, 401, "{}", r.body);
        assert!(r.body.contains("Wrong token"), "{}", r.body);
        assert!(r.header("set-cookie").is_none());
    }
    let r = login(url, "t0ken", "127.0.0.2");
    assert_eq!(r.code, 429, "{}", r.body);
    assert!(r.body.contains("Too many failed logins"), "{}", r.body);
    assert!(r.header("set-cookie").is_none());

    // A login from another origin is refused before the token counts.
    let r = request(
        "POST",
        &format!("{url}/login"),
        &[
            "--interface",
            "127.0.0.3",
            "-H",
            "Origin: http://evil.example",
            "--data",
            "token=t0ken",
        ],
    );
    assert_eq!(r.code, 403, "{}", r.body);
    assert!(r.header("set-cookie").is_none());

    let r = login(url, "t0ken", "127.0.0.3");
    assert_eq!(r.code, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/"));
    let cookie_line = r.header("set-cookie").unwrap().to_string();
    let attrs: Vec<&str> = cookie_line.split(';').skip(1).map(str::trim).collect();
    assert_eq!(
        attrs,
        ["HttpOnly", "SameSite=Strict", "Path=/"],
        "{cookie_line}"
    );
    let session = session_of(&r);
    let cookie = format!("Cookie: blockswarm_session={session}");

    // The dashboard, with the session's CSRF token.
    let page = request("GET", &format!("{url}/"), &["-H", &cookie]);
    assert_eq!(page.code, 200);
    assert!(page.body.contains("id=\"view-room\""), "{}", page.body);
    let csrf = csrf_of(&page.body);
    let csrf_h = format!("X-CSRF-Token: {csrf}");

    // Reading needs the cookie only.
    let r = request("GET", &hosts, &["-H", &cookie]);
    assert_eq!(r.code, 200, "{}", r.body);
    assert!(r.body.contains(MAC));

    // Changing needs the CSRF token too, and the same origin.
    let r = rename(url, &[&cookie], "a");
    assert_eq!(r.code, 403, "{}", r.body);
    assert!(r.body.contains("X-CSRF-Token"), "{}", r.body);
    let wrong = format!("X-CSRF-Token: {}", "0".repeat(64));
    assert_eq!(rename(url, &[&cookie, &wrong], "b").code, 403);
    let r = rename(url, &[&cookie, &csrf_h, "Origin: http://evil.example"], "c");
    assert_eq!(r.code, 403, "{}", r.body);
    assert!(r.body.contains("origin http://evil.example"), "{}", r.body);
    let r = rename(url, &[&cookie, &csrf_h, "Sec-Fetch-Site: cross-site"], "d");
    assert_eq!(r.code, 403, "{}", r.body);
    assert_eq!(
        host_name(url),
        serde_json::Value::Null,
        "a refused request changed the host"
    );
    let r = rename(url, &[&cookie, &csrf_h, &format!("Origin: {url}")], "pc-1");
    assert_eq!(r.code, 200, "{}", r.body);
    assert_eq!(host_name(url), "pc-1");

    // The bearer token works as before, without CSRF; a wrong one does not.
    let r = rename(url, &["Authorization: Bearer t0ken"], "pc-2");
    assert_eq!(r.code, 200, "{}", r.body);
    assert_eq!(host_name(url), "pc-2");
    let r = request("GET", &hosts, &["-H", "Authorization: Bearer t0ke"]);
    assert_eq!(r.code, 401, "{}", r.body);
    // A made-up session is no session.
    let fake = format!("Cookie: blockswarm_session={}", "a".repeat(64));
    assert_eq!(request("GET", &hosts, &["-H", &fake]).code, 401);

    // Logout needs the CSRF token, then the session is over.
    let logout = format!("{url}/logout");
    assert_eq!(request("POST", &logout, &["-H", &cookie]).code, 403);
    let r = request("POST", &logout, &["-H", &cookie, "-H", &csrf_h]);
    assert_eq!(r.code, 204, "{}", r.body);
    assert!(
        r.header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0")),
        "{:?}",
        r.headers
    );
    let r = request("GET", &hosts, &["-H", &cookie]);
    assert_eq!(r.code, 401, "{}", r.body);
    let page = request("GET", &format!("{url}/"), &["-H", &cookie]);
    assert!(page.body.contains("name=\"token\""), "{}", page.body);
}

#[test]
fn the_session_cookie_is_secure_behind_https() {
    let t = tempfile::tempdir().unwrap();
    let srv = Server::start(t.path(), None, "public_url = \"https://boot.example\"");
    let r = login(&srv.url, "t0ken", "127.0.0.1");
    assert_eq!(r.code, 303, "{}", r.body);
    let c = r.header("set-cookie").unwrap();
    assert!(c.ends_with("; Secure"), "{c}");
}

/// The room view of 1000 PCs is one small poll; the full per-host view is
/// not (sizes printed, for the record).
#[test]
fn the_room_view_of_1000_pcs_stays_small() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "master.img", "gpt", 4);
    capture(&disk, &t.path().join("images/lab"), true);
    let mut cfg = String::from("[[group]]\nname = \"hall\"\nmembers = [");
    let macs: Vec<String> = (0..1000)
        .map(|i| format!("52:54:00:10:{:02x}:{:02x}", i / 256, i % 256))
        .collect();
    cfg.push_str(
        &macs
            .iter()
            .map(|m| format!("\"{m}\""))
            .collect::<Vec<_>>()
            .join(","),
    );
    cfg.push_str("]\n[group.job]\nimage = \"lab\"\n");
    for (i, m) in macs.iter().enumerate() {
        cfg.push_str(&format!(
            "[[host]]\nmac = \"{m}\"\nname = \"hall-pc-{i:04}\"\n"
        ));
    }
    let srv = Server::start(t.path(), None, &cfg);
    srv.wait_seeding("lab");
    let bearer = ["-H", "Authorization: Bearer t0ken"];
    let r = request(
        "POST",
        &format!("{}/api/v1/admin/deployments", srv.url),
        &[
            bearer[0],
            bearer[1],
            "-H",
            "Content-Type: application/json",
            "--data",
            "{\"group\":\"hall\"}",
        ],
    );
    assert_eq!(r.code, 200, "{}", r.body);
    let id = serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["deployment"]
        .as_u64()
        .unwrap();
    let get = |path: &str| {
        let r = request("GET", &format!("{}{path}", srv.url), &bearer);
        assert_eq!(r.code, 200, "{path}: {}", r.body);
        r.body
    };
    let tiles = get(&format!("/api/v1/admin/deployments/{id}/tiles"));
    let full = get(&format!("/api/v1/admin/deployments/{id}"));
    let hosts = get("/api/v1/admin/hosts?limit=100");
    let all_hosts = get("/api/v1/admin/hosts");
    let history = get("/api/v1/admin/deployments");
    eprintln!(
        "1000 PCs: tiles {} B, full deployment view {} B, a page of 100 hosts {} B \
         (all hosts {} B), history {} B",
        tiles.len(),
        full.len(),
        hosts.len(),
        all_hosts.len(),
        history.len()
    );
    let v: serde_json::Value = serde_json::from_str(&tiles).unwrap();
    assert_eq!(v["deployment"]["id"], id);
    assert_eq!(v["deployment"]["tasks"]["pending"], 1000);
    let tiles_v = v["tiles"].as_array().unwrap();
    assert_eq!(tiles_v.len(), 1000);
    assert_eq!(
        tiles_v[3],
        serde_json::json!([macs[3], "hall-pc-0003", "pending", 0, 0, null])
    );
    assert!(tiles.len() < 64 * 1024, "{} bytes", tiles.len());
    assert!(hosts.len() < 64 * 1024, "{} bytes", hosts.len());
    let r = request(
        "GET",
        &format!("{}/api/v1/admin/deployments/{}/tiles", srv.url, id + 1),
        &bearer,
    );
    assert_eq!(r.code, 404, "{}", r.body);
    assert!(
        request(
            "GET",
            &format!("{}/api/v1/admin/deployments/{id}/tiles", srv.url),
            &[]
        )
        .code
            == 401
    );
}

//! A read-only TFTP server (RFC 1350, with the blksize and tsize options of
//! RFCs 2347-2349) for Debian's signed network GRUB: its image has TFTP but
//! no HTTP, and under Secure Boot it loads no module from outside. It asks
//! the server what a PC does (`boot.grub/<MAC>`, see `grub.rs`) and loads
//! the deploy kernel and initramfs through here.
//!
//! Bounded like the HTTP side: requests at most 512 bytes, transfers at most
//! `Limits::transfers` (and `per_ip` from one address), each with a deadline,
//! a few resends per packet, and nothing but ACKs and errors accepted back.
//! A request repeated while its transfer runs (a lost OACK) is not answered
//! twice, so a boot decision is taken once per request.

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::time::{Instant, timeout_at};

/// What a request's path holds, or an error message for the client; called
/// with the path, the client's address and ours as the client reached it.
pub type OpenFuture = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send>>;
pub type Open = Arc<dyn Fn(String, SocketAddr, IpAddr) -> OpenFuture + Send + Sync>;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Transfers at once, and from one IP address.
    pub transfers: usize,
    pub per_ip: usize,
    /// Wait for each ACK this long, sending the packet again this often.
    pub ack_timeout: Duration,
    pub resends: u32,
    /// A whole transfer (a 64 MiB initramfs at 1 KiB per round trip fits).
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            transfers: 512,
            per_ip: 4,
            ack_timeout: Duration::from_secs(1),
            resends: 5,
            deadline: Duration::from_secs(600),
        }
    }
}

const RRQ: u16 = 1;
const WRQ: u16 = 2;
const DATA: u16 = 3;
const ACK: u16 = 4;
const ERROR: u16 = 5;
const OACK: u16 = 6;
/// Error codes (RFC 1350).
const E_UNDEF: u16 = 0;
const E_NOT_FOUND: u16 = 1;
const E_ACCESS: u16 = 2;
const E_BAD_OP: u16 = 4;
/// The largest request we read, and data block we send: 1432 bytes keep a
/// packet within a 1500-byte MTU (GRUB asks for 1024).
const MAX_REQUEST: usize = 512;
const MAX_BLKSIZE: u16 = 1432;

#[derive(Debug, PartialEq)]
pub struct Request {
    pub path: String,
    pub blksize: Option<u16>,
    pub tsize: bool,
}

/// Parses a read request; the error names what is wrong.
pub fn parse_request(p: &[u8]) -> Result<Request, (u16, String)> {
    let bad = |s: &str| (E_BAD_OP, s.to_string());
    if p.len() < 4 {
        return Err(bad("packet too short"));
    }
    match u16::from_be_bytes([p[0], p[1]]) {
        RRQ => {}
        WRQ => return Err((E_ACCESS, "this server is read-only".into())),
        op => return Err(bad(&format!("opcode {op} is not a read request"))),
    }
    let Some(fields) = p[2..].strip_suffix(&[0]) else {
        return Err(bad("request does not end with a NUL"));
    };
    let mut fields = fields.split(|b| *b == 0).map(std::str::from_utf8);
    let (Some(Ok(path)), Some(Ok(mode))) = (fields.next(), fields.next()) else {
        return Err(bad("request without a UTF-8 file name and mode"));
    };
    if path.is_empty() || path.chars().any(char::is_control) {
        return Err(bad("empty file name, or control characters in it"));
    }
    if !mode.eq_ignore_ascii_case("octet") {
        return Err(bad(&format!("mode {mode:?}: only octet is served")));
    }
    let mut req = Request {
        path: path.to_string(),
        blksize: None,
        tsize: false,
    };
    while let Some(name) = fields.next() {
        let (Ok(name), Some(Ok(value))) = (name, fields.next()) else {
            return Err(bad("option without a value"));
        };
        if name.eq_ignore_ascii_case("blksize") {
            let n: u16 = value
                .parse()
                .ok()
                .filter(|n| *n >= 8)
                .ok_or_else(|| bad(&format!("blksize {value:?}")))?;
            req.blksize = Some(n.min(MAX_BLKSIZE));
        } else if name.eq_ignore_ascii_case("tsize") {
            req.tsize = true;
        } // other options are left out of the OACK, as RFC 2347 says
    }
    Ok(req)
}

fn packet(op: u16, rest: &[&[u8]]) -> Vec<u8> {
    let mut p = op.to_be_bytes().to_vec();
    rest.iter().for_each(|r| p.extend_from_slice(r));
    p
}

fn error_packet(code: u16, msg: &str) -> Vec<u8> {
    let msg: String = msg.chars().filter(|c| !c.is_control()).take(200).collect();
    packet(ERROR, &[&code.to_be_bytes(), msg.as_bytes(), &[0]])
}

/// Serves requests on `sock` until the task is dropped.
pub async fn serve(sock: UdpSocket, open: Open, limits: Limits) {
    let sock = Arc::new(sock);
    let local = sock.local_addr().map(|a| a.ip());
    let local = local.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    // The clients (address and port: their TID) with a transfer running.
    let active: Arc<Mutex<HashSet<SocketAddr>>> = Default::default();
    let mut buf = vec![0u8; MAX_REQUEST + 1];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors of earlier sends surface here: go on.
                tracing::debug!("tftp: receiving: {e}");
                continue;
            }
        };
        if n > MAX_REQUEST {
            let _ = sock
                .send_to(&error_packet(E_BAD_OP, "request too long"), peer)
                .await;
            continue;
        }
        let req = match parse_request(&buf[..n]) {
            Ok(r) => r,
            Err((code, msg)) => {
                tracing::debug!("tftp: bad request from {peer}: {msg}");
                let _ = sock.send_to(&error_packet(code, &msg), peer).await;
                continue;
            }
        };
        let busy = {
            let mut a = active.lock().expect("tftp lock");
            if a.contains(&peer) {
                continue; // a repeated request: its transfer answers it
            }
            let from_ip = a.iter().filter(|p| p.ip() == peer.ip()).count();
            let busy = a.len() >= limits.transfers || from_ip >= limits.per_ip;
            if !busy {
                a.insert(peer);
            }
            busy
        };
        if busy {
            let _ = sock
                .send_to(&error_packet(E_UNDEF, "server busy, try again"), peer)
                .await;
            continue;
        }
        let (open, limits, active) = (open.clone(), limits.clone(), active.clone());
        tokio::spawn(async move {
            let path = req.path.clone();
            let until = Instant::now() + limits.deadline;
            match timeout_at(until, transfer(local, peer, req, open, &limits)).await {
                Ok(Ok(n)) => tracing::debug!("tftp: sent {path} ({n} bytes) to {peer}"),
                Ok(Err(e)) => tracing::info!("tftp: {path} to {peer}: {e}"),
                Err(_) => tracing::info!("tftp: {path} to {peer}: past the deadline"),
            }
            active.lock().expect("tftp lock").remove(&peer);
        });
    }
}

/// One transfer, from a port of its own (the server's TID).
async fn transfer(
    local: IpAddr,
    peer: SocketAddr,
    req: Request,
    open: Open,
    limits: &Limits,
) -> Result<usize, String> {
    let sock = UdpSocket::bind((local, 0))
        .await
        .map_err(|e| format!("binding a transfer port: {e}"))?;
    sock.connect(peer)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    // Bound to any address, the connected socket shows the one routed to.
    let ours = sock.local_addr().map(|a| a.ip()).unwrap_or(local);
    let data = match open(req.path.clone(), peer, ours).await {
        Ok(d) => d,
        Err(msg) => {
            let _ = sock.send(&error_packet(E_NOT_FOUND, &msg)).await;
            return Err(msg);
        }
    };
    let blksize = usize::from(req.blksize.unwrap_or(512));
    if req.blksize.is_some() || req.tsize {
        let mut opts = Vec::new();
        if let Some(b) = req.blksize {
            opts.extend_from_slice(format!("blksize\0{b}\0").as_bytes());
        }
        if req.tsize {
            opts.extend_from_slice(format!("tsize\0{}\0", data.len()).as_bytes());
        }
        exchange(&sock, &packet(OACK, &[&opts]), 0, limits).await?;
    }
    // Full blocks, then one shorter (maybe empty) that ends the transfer.
    // Block numbers wrap after 65535, as most clients expect.
    for i in 0..=data.len() / blksize {
        let chunk = &data[i * blksize..((i + 1) * blksize).min(data.len())];
        let block = ((i + 1) % 65536) as u16;
        exchange(
            &sock,
            &packet(DATA, &[&block.to_be_bytes(), chunk]),
            block,
            limits,
        )
        .await?;
    }
    Ok(data.len())
}

/// Sends `pkt` until the client ACKs `block`.
async fn exchange(sock: &UdpSocket, pkt: &[u8], block: u16, limits: &Limits) -> Result<(), String> {
    let mut buf = [0u8; 516];
    for _ in 0..=limits.resends {
        sock.send(pkt).await.map_err(|e| format!("sending: {e}"))?;
        let until = Instant::now() + limits.ack_timeout;
        loop {
            let n = match timeout_at(until, sock.recv(&mut buf)).await {
                Err(_) => break, // send again
                Ok(Err(e)) => return Err(format!("receiving: {e}")),
                Ok(Ok(n)) => n,
            };
            if n < 4 {
                continue;
            }
            let (op, arg) = (
                u16::from_be_bytes([buf[0], buf[1]]),
                u16::from_be_bytes([buf[2], buf[3]]),
            );
            match op {
                // An earlier block's ACK, repeated: wait on (answering it
                // would double every later packet).
                ACK if arg == block => return Ok(()),
                ERROR => {
                    let msg = String::from_utf8_lossy(&buf[4..n]);
                    return Err(format!(
                        "the client stopped: {}",
                        msg.trim_end_matches('\0')
                    ));
                }
                _ => {}
            }
        }
    }
    Err(format!(
        "no ACK of block {block} after {} sends",
        limits.resends + 1
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn rrq(path: &str, mode: &str, opts: &[(&str, &str)]) -> Vec<u8> {
        let mut p = vec![0, 1];
        for f in [path, mode]
            .into_iter()
            .chain(opts.iter().flat_map(|(a, b)| [*a, *b]))
        {
            p.extend_from_slice(f.as_bytes());
            p.push(0);
        }
        p
    }

    /// A server whose only file is `file` (2500 patterned bytes unless
    /// given), counting the opens.
    async fn server(limits: Limits, len: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let opens = Arc::new(AtomicUsize::new(0));
        let n = opens.clone();
        let open: Open = Arc::new(move |path, _peer, _local| {
            n.fetch_add(1, Ordering::SeqCst);
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            Box::pin(async move {
                if path == "file" {
                    Ok(Bytes::from(data))
                } else {
                    Err(format!("no file {path:?} here"))
                }
            })
        });
        tokio::spawn(serve(sock, open, limits));
        (addr, opens)
    }

    async fn recv(c: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = vec![0u8; 2048];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), c.recv_from(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        buf.truncate(n);
        (buf, from)
    }

    /// Fetches `path` with options, ACKing every packet: the bytes, or the
    /// error packet's code and text.
    async fn fetch(srv: SocketAddr, req: Vec<u8>) -> Result<(Vec<u8>, Vec<u8>), (u16, String)> {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(&req, srv).await.unwrap();
        let (mut oack, mut data, mut next) = (Vec::new(), Vec::new(), 1u16);
        loop {
            let (p, from) = recv(&c).await;
            let op = u16::from_be_bytes([p[0], p[1]]);
            if op != ERROR {
                assert_ne!(from, srv, "transfers run from a port of their own");
            }
            match op {
                OACK => {
                    oack = p[2..].to_vec();
                    c.send_to(&[0, 4, 0, 0], from).await.unwrap();
                }
                DATA => {
                    assert_eq!(u16::from_be_bytes([p[2], p[3]]), next);
                    data.extend_from_slice(&p[4..]);
                    c.send_to(&[0, 4, p[2], p[3]], from).await.unwrap();
                    if p.len() - 4 < 1024 && !oack.is_empty()
                        || p.len() - 4 < 512 && oack.is_empty()
                    {
                        return Ok((oack, data));
                    }
                    next += 1;
                }
                ERROR => {
                    let msg = String::from_utf8_lossy(&p[4..])
                        .trim_end_matches('\0')
                        .to_string();
                    return Err((u16::from_be_bytes([p[2], p[3]]), msg));
                }
                op => panic!("unexpected opcode {op}"),
            }
        }
    }

    #[tokio::test]
    async fn serves_a_file_with_the_options_grub_asks_for() {
        let (srv, _) = server(Limits::default(), 2500).await;
        let (oack, data) = fetch(
            srv,
            rrq("file", "octet", &[("blksize", "1024"), ("tsize", "0")]),
        )
        .await
        .unwrap();
        assert_eq!(oack, b"blksize\x001024\x00tsize\x002500\x00");
        let want: Vec<u8> = (0..2500).map(|i| (i % 251) as u8).collect();
        assert_eq!(data, want);
        // Without options: 512-byte blocks, no OACK; a file of whole blocks
        // ends with an empty one.
        let (srv, _) = server(Limits::default(), 1024).await;
        let (oack, data) = fetch(srv, rrq("/file", "OCTET", &[]))
            .await
            .map(|(o, d)| (o, d.len()))
            .unwrap_or_default();
        assert!(oack.is_empty());
        assert_eq!(data, 0, "leading slash: not the same path");
        let (oack, data) = fetch(srv, rrq("file", "OCTET", &[])).await.unwrap();
        assert!(oack.is_empty());
        assert_eq!(data.len(), 1024);
    }

    #[tokio::test]
    async fn errors_name_what_is_wrong() {
        let (srv, opens) = server(Limits::default(), 10).await;
        let e = fetch(srv, rrq("nothing", "octet", &[])).await.unwrap_err();
        assert_eq!(e, (E_NOT_FOUND, "no file \"nothing\" here".into()));
        let mut wrq = rrq("file", "octet", &[]);
        wrq[1] = 2;
        assert_eq!(
            fetch(srv, wrq).await.unwrap_err(),
            (E_ACCESS, "this server is read-only".into())
        );
        let e = fetch(srv, rrq("file", "netascii", &[])).await.unwrap_err();
        assert_eq!(
            e,
            (E_BAD_OP, "mode \"netascii\": only octet is served".into())
        );
        let mut cut = rrq("file", "octet", &[]);
        cut.pop();
        assert_eq!(
            fetch(srv, cut).await.unwrap_err().1,
            "request does not end with a NUL"
        );
        let e = fetch(srv, rrq("file", "octet", &[("blksize", "4")]))
            .await
            .unwrap_err();
        assert_eq!(e.1, "blksize \"4\"");
        let long = rrq(&"x".repeat(600), "octet", &[]);
        assert_eq!(fetch(srv, long).await.unwrap_err().1, "request too long");
        // Only the one unknown path was looked up.
        assert_eq!(opens.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_repeated_request_is_answered_once() {
        let (srv, opens) = server(Limits::default(), 100).await;
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let req = rrq("file", "octet", &[("blksize", "1024")]);
        c.send_to(&req, srv).await.unwrap();
        let (p, from) = recv(&c).await;
        assert_eq!(&p[..2], &[0, OACK as u8]);
        // The client did not see the OACK and asks again: no second open.
        c.send_to(&req, srv).await.unwrap();
        let (p2, from2) = recv(&c).await;
        assert_eq!(
            (p2, from2),
            (p, from),
            "the OACK again, resent by the same transfer"
        );
        c.send_to(&[0, 4, 0, 0], from).await.unwrap();
        let (d, _) = recv(&c).await;
        assert_eq!((&d[..4], d.len()), (&[0, 3, 0, 1][..], 104));
        c.send_to(&[0, 4, 0, 1], from).await.unwrap();
        assert_eq!(opens.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_silent_client_is_given_up_after_the_resends() {
        let limits = Limits {
            ack_timeout: Duration::from_millis(100),
            resends: 2,
            per_ip: 1,
            ..Default::default()
        };
        let (srv, _) = server(limits, 100).await;
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.send_to(&rrq("file", "octet", &[]), srv).await.unwrap();
        let mut sent = 0;
        let mut buf = [0u8; 600];
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(600), c.recv(&mut buf)).await
        {
            sent += 1;
        }
        assert_eq!(sent, 3, "DATA 1 sent once and resent twice");
        // Its slot is free again (per_ip 1): another client is served.
        assert!(fetch(srv, rrq("file", "octet", &[])).await.is_ok());
    }

    #[tokio::test]
    async fn transfers_per_address_are_bounded() {
        let limits = Limits {
            per_ip: 1,
            ..Default::default()
        };
        let (srv, _) = server(limits, 100).await;
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        a.send_to(&rrq("file", "octet", &[]), srv).await.unwrap();
        recv(&a).await; // DATA 1, not ACKed: the transfer runs on
        let e = fetch(srv, rrq("file", "octet", &[])).await.unwrap_err();
        assert_eq!(e, (E_UNDEF, "server busy, try again".into()));
    }
}

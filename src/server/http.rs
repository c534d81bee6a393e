//! The HTTP front: an accept loop on hyper where everything a client
//! controls has a bound and a deadline.
//!
//! - connections: at most `max_connections`, and `max_connections_per_ip`
//!   from one address; past either, a new one is closed at once;
//! - request headers: whole within [`HEADER_TIMEOUT`] (also the idle
//!   keep-alive limit), at most [`MAX_HEADER_BYTES`];
//! - request bodies: at most [`MAX_BODY`] bytes, whole within
//!   [`BODY_DEADLINE`];
//! - every connection: closed when neither a read nor a write has moved a
//!   byte for [`STALL_TIMEOUT`]. Deadlines are on progress, not on total
//!   time, so a slow PC still gets the 30 MB initramfs.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;
use tracing::{debug, info, warn};

use super::api::error;
use super::metrics::Counters;

pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
pub const MAX_BODY: usize = 64 * 1024;
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for requests under way.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The two ends of a request's connection, for the handlers: the source
/// is the only address a peer is known by, and the local end is the
/// server's address as that peer reaches it.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

pub struct Limits {
    pub total: usize,
    pub per_ip: usize,
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops
/// accepting (the listener is closed) and gives the requests under way
/// [`SHUTDOWN_GRACE`] to finish; idle keep-alive connections close at once.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()>,
) {
    let app = app.layer(axum::middleware::from_fn(bounded_body));
    let slots = Arc::new(Slots {
        limits,
        counters: counters.clone(),
        by_ip: Mutex::default(),
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, or a connection reset before we
                    // took it: wait a little rather than spin.
                    debug!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let remote = canonical(remote);
        let Some(slot) = Slots::take(&slots, remote.ip()) else {
            counters.connections_refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            remote,
            local: canonical(local),
        };
        let app = app.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(conn);
            app.clone().oneshot(req.map(Body::new))
        });
        let io = TokioIo::new(Stalls::new(stream, STALL_TIMEOUT));
        let served = graceful.watch(http.serve_connection(io, svc));
        tokio::spawn(async move {
            if let Err(e) = served.await {
                debug!("HTTP connection from {remote}: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    info!(
        "HTTP: no new connections; waiting up to {} s for requests under way",
        SHUTDOWN_GRACE.as_secs()
    );
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            warn!("shutting down with HTTP requests still under way");
        }
    }
}

/// An IPv4 peer on a dual-stack socket is counted by its IPv4 address.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Reads the whole request body, bounded in size and time, before the
/// handler runs: no handler waits on a client.
async fn bounded_body(req: Request, next: Next) -> Response {
    use axum::body::HttpBody as _;
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let read = Limited::new(body, MAX_BODY).collect();
    match tokio::time::timeout(BODY_DEADLINE, read).await {
        Ok(Ok(b)) => {
            next.run(Request::from_parts(parts, Body::from(b.to_bytes())))
                .await
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is over {MAX_BODY} bytes"),
        ),
        Ok(Err(e)) => error(
            StatusCode::BAD_REQUEST,
            format!("reading the request body: {e}"),
        ),
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                BODY_DEADLINE.as_secs()
            ),
        ),
    }
}

/// Open connections, in total and by source address.
struct Slots {
    limits: Limits,
    counters: Arc<Counters>,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection; dropping it frees its place.
struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    fn take(this: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut g = this.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        let open = &this.counters.connections_open;
        if open.load(Ordering::Relaxed) >= this.limits.total as u64 {
            return None;
        }
        let n = g.entry(ip).or_default();
        if *n >= this.limits.per_ip {
            return None;
        }
        *n += 1;
        open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            slots: this.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.slots.by_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = g.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.ip);
            }
        }
        self.slots
            .counters
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that fails once neither direction has moved a byte for `limit`
/// while an operation waits. One clock for both directions: hyper reads
/// while it writes a response (to notice a client leaving), and a long
/// download must not die of that read's silence.
struct Stalls<S> {
    inner: S,
    limit: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<S> Stalls<S> {
    fn new(inner: S, limit: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            limit,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + limit)),
        }
    }

    fn moved(&mut self, n: usize) {
        if n > 0 {
            self.last = Instant::now();
        }
    }

    /// Called when the inner socket is not ready: an error once stalled.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let due = self.last + self.limit;
        if self.timer.deadline() != due {
            self.timer.as_mut().reset(due);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no progress for {} s", self.limit.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stalls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.moved(buf.filled().len() - before);
                Poll::Ready(r)
            }
            Poll::Pending => this.stalled(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stalls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, b) {
            Poll::Ready(r) => {
                this.moved(*r.as_ref().unwrap_or(&0));
                Poll::Ready(r)
            }
            Poll::Pending => this.stalled(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.moved(*r.as_ref().unwrap_or(&0));
                Poll::Ready(r)
            }
            Poll::Pending => this.stalled(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.stalled(cx),
            r => r,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.stalled(cx),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_stalled_socket_fails_a_moving_one_does_not() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Stalls::new(a, Duration::from_secs(30));
        // A byte every 20 s keeps a waiting read alive, past 30 s in total.
        let writer = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                b.write_all(b"x").await.unwrap();
            }
            b
        });
        let mut buf = [0u8; 8];
        for _ in 0..4 {
            assert_eq!(s.read(&mut buf).await.unwrap(), 1);
        }
        let _b = writer.await.unwrap();
        let t0 = Instant::now();
        let e = s.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_secs(30));
        // Writes count as progress too, and a full pipe is a stall.
        s.write_all(&[0u8; 64]).await.unwrap();
        let t0 = Instant::now();
        let e = s.write_all(&[0u8; 64]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(t0.elapsed(), Duration::from_secs(30));
    }
}

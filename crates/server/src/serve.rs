//! The HTTP accept loop, hardened against clients that hold resources
//! without using them: a cap on open connections, a deadline for request
//! headers (slowloris), an idle timeout for connections with no request in
//! flight and no bytes moving, and a bounded graceful shutdown.
//!
//! The header deadline is ours, not hyper's: hyper's also runs while a
//! kept-alive connection waits for its next request, so it would close
//! idle connections after a few seconds, racing clients that reuse them
//! (seen: reqwest's next request on such a connection failed). Ours runs
//! from the first byte of a request until its headers are complete.

use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// Connections one client address may hold; more are closed at once.
    pub max_connections_per_ip: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long in-flight requests may finish after a shutdown signal.
    pub shutdown_grace: Duration,
}

pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    // No server-initiated HTTP/2 pings: their bytes would count as activity
    // and keep idle connections open forever.
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_peer = PerPeer::default();
    tokio::pin!(shutdown);
    loop {
        // Past the cap we stop accepting: new connections wait in the
        // kernel's backlog instead of costing us memory and a task each.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(peer_slot) = per_peer.claim(peer.ip(), limits.max_connections_per_ip) else {
            tracing::debug!(%peer, "too many connections from this address: closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let io = TokioIo::new(Watched {
            stream,
            activity: activity.clone(),
        });
        let router = router.clone();
        let in_flight = activity.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            if request.version() == axum::http::Version::HTTP_2 {
                in_flight.mark_http2();
            }
            let request_guard = in_flight.begin_request();
            let router = router.clone();
            async move {
                let response = router.oneshot(request.map(axum::body::Body::new)).await;
                drop(request_guard);
                response
            }
        });
        let connection = graceful.watch(
            builder
                .serve_connection_with_upgrades(io, service)
                .into_owned(),
        );
        tokio::spawn(async move {
            tokio::select! {
                result = connection => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                why = activity.expired(limits) => {
                    tracing::debug!(%peer, why, "closing a connection");
                }
            }
            drop(peer_slot);
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections finished"),
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(grace_secs = limits.shutdown_grace.as_secs(), "cutting connections still open after the grace period");
        }
    }
}

/// When a connection last moved bytes, and how many requests it has open.
#[derive(Clone)]
struct Activity {
    inner: Arc<ActivityInner>,
}

struct ActivityInner {
    epoch: Instant,
    last_millis: AtomicU64,
    requests: AtomicUsize,
    /// Since when a request head has been awaited: from accept, then from
    /// the first byte after each request (milliseconds since `epoch`, plus
    /// one; 0: none pending).
    head_since: AtomicU64,
    /// HTTP/2 connections carry control frames between requests, so after
    /// their first request the header deadline no longer applies.
    http2: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            inner: Arc::new(ActivityInner {
                epoch: Instant::now(),
                last_millis: AtomicU64::new(0),
                requests: AtomicUsize::new(0),
                // The first request's head is due from accept: a client
                // that connects and sends nothing is a slowloris too.
                head_since: AtomicU64::new(1),
                http2: AtomicBool::new(false),
            }),
        }
    }

    fn now_millis(&self) -> u64 {
        self.inner.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.inner
            .last_millis
            .store(self.now_millis(), Ordering::Relaxed);
    }

    fn mark_http2(&self) {
        self.inner.http2.store(true, Ordering::Relaxed);
    }

    /// Bytes came in: the start of a request head if none is in flight.
    fn on_read(&self) {
        self.touch();
        if !self.inner.http2.load(Ordering::Relaxed)
            && self.inner.requests.load(Ordering::SeqCst) == 0
        {
            let _ = self.inner.head_since.compare_exchange(
                0,
                self.now_millis() + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    fn begin_request(&self) -> RequestGuard {
        self.inner.requests.fetch_add(1, Ordering::SeqCst);
        self.inner.head_since.store(0, Ordering::SeqCst);
        RequestGuard(self.clone())
    }

    /// Resolves once the connection should go: a request head unfinished
    /// past the header deadline, or no request open and no bytes moving
    /// for the idle timeout. A request being handled (a long command run)
    /// keeps it open however quiet it is.
    async fn expired(&self, limits: ConnectionLimits) -> &'static str {
        let shortest = limits.header_read_timeout.min(limits.idle_timeout);
        let tick = (shortest / 4).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(tick).await;
            let now = self.now_millis();
            let head_since = self.inner.head_since.load(Ordering::SeqCst);
            if head_since != 0
                && Duration::from_millis(now.saturating_sub(head_since - 1))
                    >= limits.header_read_timeout
            {
                return "request headers not complete in time";
            }
            let last = self.inner.last_millis.load(Ordering::Relaxed);
            let quiet = Duration::from_millis(now.saturating_sub(last));
            if self.inner.requests.load(Ordering::SeqCst) == 0 && quiet >= limits.idle_timeout {
                return "idle";
            }
        }
    }
}

struct RequestGuard(Activity);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.inner.requests.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A TCP stream that records each successful read and write.
struct Watched {
    stream: TcpStream,
    activity: Activity,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Open connections per client address.
#[derive(Clone, Default)]
struct PerPeer {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

struct PeerSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl PerPeer {
    fn claim(&self, ip: std::net::IpAddr, max: usize) -> Option<PeerSlot> {
        let mut counts = self.counts.lock().unwrap();
        let count = counts.entry(ip).or_default();
        if *count >= max.max(1) {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            counts: self.counts.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

//! Accepting connections on both ports under the `[connections]` limits, against slowloris
//! and connection floods.
//!
//! Each port has its own acceptor task. It holds the port's connection cap (a semaphore
//! whose permit every connection carries until it closes; a connection past the cap is
//! closed at once, never queued), does the TLS handshake in a task of its own under the
//! handshake timeout, and hands the connection to the protocol front end (tonic or hyper)
//! wrapped in a [`Conn`], which also enforces the timeouts those front ends lack: on the
//! gRPC port the HTTP/2 connection preface must arrive within the handshake timeout (hyper
//! sends keepalive PINGs only once it has), on the HTTP port a connection on which nothing
//! moves for the idle timeout is closed.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// The client's first bytes on an HTTP/2 connection (RFC 9113 section 3.4).
const H2_PREFACE_LEN: usize = 24;
/// Accept errors (typically EMFILE) are retried after this pause rather than in a spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Refused connections are logged at most this often, with a count.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Dead peers that never answer are found by the kernel after this much silence, too.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// What one port enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// "grpc" or "http", for logs.
    pub port: &'static str,
    pub max_connections: usize,
    /// Accept to finished TLS handshake (and, with `preface`, to the HTTP/2 preface).
    pub handshake_timeout: Duration,
    /// Require the HTTP/2 connection preface within the handshake timeout.
    pub preface: bool,
    /// Close a connection on which nothing is read or written for this long.
    pub idle_timeout: Option<Duration>,
}

/// Accepts on `listener` until the returned receiver is dropped. Every connection sent
/// has a permit of the port's cap and has finished its TLS handshake (if `tls`).
pub fn spawn_acceptor(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
) -> (mpsc::UnboundedReceiver<Conn>, JoinHandle<()>) {
    // Unbounded is bounded here: every queued connection holds one of the cap's permits.
    let (tx, rx) = mpsc::unbounded_channel();
    let incoming = TcpIncoming::from(listener)
        // Nagle's algorithm would hold back the small frames that end each response.
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE));
    let task = tokio::spawn(accept_loop(incoming, tls, limits, tx));
    (rx, task)
}

async fn accept_loop(
    mut incoming: TcpIncoming,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    tx: mpsc::UnboundedSender<Conn>,
) {
    let port = limits.port;
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut refusals = Refusals::default();
    loop {
        let tcp = tokio::select! {
            next = incoming.next() => match next {
                Some(Ok(tcp)) => tcp,
                Some(Err(e)) => {
                    tracing::warn!(port, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
                None => break,
            },
            // The front end stopped (shutdown): stop listening at once.
            _ = tx.closed() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Closing now frees the descriptor; queueing would hold it for an attacker.
            drop(tcp);
            refusals.note(&limits);
            continue;
        };
        let info = tcp.connect_info();
        let (tls, limits, tx) = (tls.clone(), limits.clone(), tx.clone());
        // Handshakes run concurrently: one stalled client must not hold up the next.
        tokio::spawn(async move {
            let peer = info.remote_addr;
            let deadline = Instant::now() + limits.handshake_timeout;
            let io = match tls {
                None => Io::Plain(tcp),
                Some(acceptor) => {
                    match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => Io::Tls(Box::new(s)),
                        Ok(Err(e)) => {
                            tracing::debug!(port, ?peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(port, ?peer, "TLS handshake timed out; closing");
                            return;
                        }
                    }
                }
            };
            let conn = Conn {
                _permit: permit,
                io,
                info,
                preface: limits.preface.then(|| Preface {
                    remaining: H2_PREFACE_LEN,
                    deadline: Box::pin(tokio::time::sleep_until(deadline)),
                }),
                idle: limits.idle_timeout.map(|limit| Idle {
                    limit,
                    last: Instant::now(),
                    timer: Box::pin(tokio::time::sleep(limit)),
                }),
            };
            // A closed receiver means shutdown: the connection just closes.
            let _ = tx.send(conn);
        });
    }
    tracing::debug!(port, "stopped accepting");
}

/// Counts refused connections and logs them without flooding the log.
#[derive(Default)]
struct Refusals {
    count: u64,
    logged: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, limits: &Limits) {
        self.count += 1;
        if self
            .logged
            .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(
                port = limits.port,
                max_connections = limits.max_connections,
                refused = self.count,
                "connection limit reached: closing new connections (connections.max_connections)"
            );
            self.count = 0;
            self.logged = Some(Instant::now());
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

struct Preface {
    remaining: usize,
    deadline: Pin<Box<Sleep>>,
}

struct Idle {
    limit: Duration,
    last: Instant,
    /// Fires at or after `last + limit`; re-armed lazily, not on every read.
    timer: Pin<Box<Sleep>>,
}

/// An accepted connection: the (TLS) stream, its share of the port's cap, and the
/// deadlines the protocol layer above does not enforce itself.
pub struct Conn {
    // Fields drop in order: the permit is back before the peer can see the close.
    _permit: OwnedSemaphorePermit,
    io: Io,
    info: TcpConnectInfo,
    preface: Option<Preface>,
    idle: Option<Idle>,
}

impl Conn {
    pub fn peer(&self) -> Option<SocketAddr> {
        self.info.remote_addr
    }

    fn moved(&mut self, read: usize) {
        if let Some(p) = &mut self.preface {
            p.remaining = p.remaining.saturating_sub(read);
            if p.remaining == 0 {
                self.preface = None;
            }
        }
        if let Some(idle) = &mut self.idle {
            idle.last = Instant::now();
        }
    }

    /// Called while the stream is not ready: an error once a deadline has passed. Polling
    /// the timers registers the task to be woken when they fire.
    fn poll_deadlines(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(p) = &mut self.preface {
            if p.deadline.as_mut().poll(cx).is_ready() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 connection preface within connections.handshake_timeout_seconds",
                ));
            }
        }
        if let Some(idle) = &mut self.idle {
            while idle.timer.as_mut().poll(cx).is_ready() {
                let due = idle.last + idle.limit;
                if Instant::now() >= due {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle for connections.idle_timeout_seconds",
                    ));
                }
                idle.timer.as_mut().reset(due);
            }
        }
        Ok(())
    }

    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.poll_deadlines(cx) {
            Ok(()) => Poll::Pending,
            Err(e) => {
                tracing::debug!(peer = ?self.peer(), error = %e, "closing connection");
                Poll::Ready(Err(e))
            }
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

macro_rules! io_call {
    ($io:expr, $method:ident ( $($arg:expr),* )) => {
        match $io {
            Io::Plain(s) => Pin::new(s).$method($($arg),*),
            Io::Tls(s) => Pin::new(s.as_mut()).$method($($arg),*),
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match io_call!(&mut this.io, poll_read(cx, buf)) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.moved(n);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.pending(cx),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match io_call!(&mut this.io, poll_write(cx, buf)) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.moved(0);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.pending(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match io_call!(&mut this.io, poll_write_vectored(cx, bufs)) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.moved(0);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.pending(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match io_call!(&mut this.io, poll_flush(cx)) {
            Poll::Pending => this.pending(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match io_call!(&mut this.io, poll_shutdown(cx)) {
            Poll::Pending => this.pending(cx),
            ready => ready,
        }
    }
}

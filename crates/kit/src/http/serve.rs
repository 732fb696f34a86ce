//! Serving a router: hyper's HTTP/1 connections with a timer (slow or idle clients are cut off),
//! a bound on connections per listener, and shutdown in steps (`/ready` 503 → stop accepting →
//! finish requests in flight → close what is left).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::config::HttpSettings;
use crate::shutdown::Shutdown;

/// How often "connection limit reached" may be logged.
const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How a listener serves. [`ServeOptions::from`] reads them from `[http]`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// A request head must be complete this long after the connection opened or after its
    /// previous response; hyper closes the connection otherwise (slowloris, idle keep-alive).
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the accept backlog.
    pub max_connections: usize,
    /// After shutdown begins, keep accepting (with `/ready` at 503) this long.
    pub drain: Duration,
    /// Then give requests in flight this long before closing their connections.
    pub grace: Duration,
}

impl From<&HttpSettings> for ServeOptions {
    fn from(http: &HttpSettings) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(http.header_read_timeout_secs.max(1)),
            max_connections: http.max_connections.max(1),
            drain: Duration::from_secs(http.shutdown_drain_secs),
            grace: Duration::from_secs(http.shutdown_grace_secs),
        }
    }
}

/// A request extension set by [`serve`]: whether the server has begun to stop (`/ready` answers
/// 503 from then on). Behind an `Arc`: it is cloned into every request, and a clone of
/// [`Shutdown`]'s cancellation tokens takes a lock when dropped.
#[derive(Debug, Clone, Default)]
pub struct Stopping(Arc<Shutdown>);

impl Stopping {
    pub fn is_stopping(&self) -> bool {
        self.0.is_begun()
    }
}

/// Binds `addr` (port 0 picks a free port; the listener knows which).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (is another process using the port?)"))
}

/// Serves `app` on `listener` until `shutdown` begins, then: keeps accepting for `drain`, stops
/// accepting, lets requests in flight finish for up to `grace` (idle connections close at once),
/// and closes every connection still open after that or when `shutdown` is forced.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: Shutdown,
    options: ServeOptions,
) -> std::io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let limit = Arc::new(Semaphore::new(options.max_connections));
    // Cancelled once the listener is closed: connections then finish their request and close.
    let closing = CancellationToken::new();
    let stopping = Stopping(Arc::new(shutdown.clone()));
    let mut connections = JoinSet::new();
    let mut warned_at: Option<Instant> = None;

    let stop_accepting = async {
        shutdown.begun().await;
        tokio::time::sleep(options.drain).await;
    };
    tokio::pin!(stop_accepting);
    loop {
        while connections.try_join_next().is_some() {}
        let permit = match limit.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Once per interval, not once per connection: a flood must not flood the log.
                if warned_at.is_none_or(|at| at.elapsed() >= LIMIT_LOG_INTERVAL) {
                    warned_at = Some(Instant::now());
                    tracing::warn!(
                        max_connections = options.max_connections,
                        "connection limit reached; new connections wait until one closes \
                         (http.max_connections)"
                    );
                }
                tokio::select! {
                    permit = limit.clone().acquire_owned() => {
                        permit.expect("the semaphore is never closed")
                    }
                    () = &mut stop_accepting => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: the listener is still good.
                    tracing::warn!(error.message = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop_accepting => break,
        };
        connections.spawn(connection(
            stream,
            peer,
            app.clone(),
            builder.clone(),
            closing.clone(),
            stopping.clone(),
            permit,
        ));
    }
    drop(listener);
    closing.cancel();
    tracing::info!("stopped accepting connections");

    let open = connections.len();
    if open > 0 {
        tracing::info!(
            connections = open,
            "listener closed; waiting for requests in flight"
        );
    }
    let finished = async { while connections.join_next().await.is_some() {} };
    tokio::select! {
        () = finished => {}
        () = tokio::time::sleep(options.grace) => {
            tracing::warn!(
                connections = connections.len(),
                grace_secs = options.grace.as_secs(),
                "requests still running after the grace period; closing their connections"
            );
        }
        () = shutdown.forced() => {
            tracing::warn!(connections = connections.len(), "shutdown forced; closing connections");
        }
    }
    connections.shutdown().await;
    Ok(())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    builder: Arc<http1::Builder>,
    closing: CancellationToken,
    stopping: Stopping,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(stopping.clone());
        app.clone().oneshot(request)
    });
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = closing.cancelled() => {
            // Finish the request in flight (if any), then close.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        // Timeouts, resets and garbage from clients: theirs to worry about, not a server fault.
        tracing::debug!(%peer, error.message = %err, "connection ended with an error");
    }
}

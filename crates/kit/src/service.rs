//! What a service crate hands to the `agora` binary (and to tests): a named router plus the
//! resources to close on shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::Db;

/// A built service, not yet listening.
pub struct App {
    pub name: &'static str,
    /// The complete router, standard layers included.
    pub router: Router,
    /// Closed after the server has drained.
    pub db: Option<Db>,
}

/// A service listening on a socket.
pub struct Running {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub handle: JoinHandle<std::io::Result<()>>,
}

impl App {
    /// Serves on `listener` until `shutdown` fires; the returned handle ends once drained.
    pub fn spawn(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
        settings: &Settings,
    ) -> std::io::Result<Running> {
        let addr = listener.local_addr()?;
        let grace = Duration::from_secs(settings.http.shutdown_grace_secs);
        let App { name, router, db } = self;
        let handle = tokio::spawn(async move {
            let result = crate::http::serve(listener, router, shutdown, grace).await;
            if let Some(db) = db {
                db.close().await;
            }
            result
        });
        Ok(Running { name, addr, handle })
    }
}

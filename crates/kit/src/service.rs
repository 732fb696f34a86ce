//! What a service crate hands to the `agora` binary (and to tests): a named router, the
//! background tasks it runs beside it (e.g. the outbox relay), and the resources to close on
//! shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::Db;

/// A background task: started with the server, told to stop by the token, awaited before the
/// database closes.
pub type Task = Box<dyn FnOnce(CancellationToken) -> JoinHandle<()> + Send>;

/// A built service, not yet listening.
pub struct App {
    pub name: &'static str,
    /// The complete router, standard layers included.
    pub router: Router,
    /// Closed after the server and the tasks have stopped.
    pub db: Option<Db>,
    pub tasks: Vec<Task>,
}

/// A service listening on a socket.
pub struct Running {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub handle: JoinHandle<std::io::Result<()>>,
}

impl App {
    pub fn new(name: &'static str, router: Router, db: Option<Db>) -> Self {
        Self {
            name,
            router,
            db,
            tasks: Vec::new(),
        }
    }

    /// Runs `task` beside the server.
    pub fn with_task(
        mut self,
        task: impl FnOnce(CancellationToken) -> JoinHandle<()> + Send + 'static,
    ) -> Self {
        self.tasks.push(Box::new(task));
        self
    }

    /// Serves on `listener` until `shutdown` fires; the returned handle ends once the requests in
    /// flight and the background tasks have finished.
    pub fn spawn(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
        settings: &Settings,
    ) -> std::io::Result<Running> {
        let addr = listener.local_addr()?;
        let grace = Duration::from_secs(settings.http.shutdown_grace_secs);
        let App {
            name,
            router,
            db,
            tasks,
        } = self;
        let tasks: Vec<JoinHandle<()>> = tasks
            .into_iter()
            .map(|task| task(shutdown.child_token()))
            .collect();
        let handle = tokio::spawn(async move {
            let result = crate::http::serve(listener, router, shutdown, grace).await;
            for task in tasks {
                // Tasks stop on the same signal; a panicked one has nothing left to wait for.
                let _ = tokio::time::timeout(grace, task).await;
            }
            if let Some(db) = db {
                db.close().await;
            }
            result
        });
        Ok(Running { name, addr, handle })
    }
}

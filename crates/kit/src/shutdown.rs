//! Process shutdown in two steps: `begin` (stop taking work: `/ready` answers 503, listeners
//! close after the drain delay, connections finish what they are doing) and `force` (close
//! whatever is still open). A server forces itself after its grace period; `agora up` forces the
//! services behind the gateway on one deadline for the whole process.

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// The two tokens of a shutdown. Clones share them.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    begin: CancellationToken,
    force: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// A shutdown that begins when the process receives Ctrl-C or SIGTERM.
    pub fn on_signal() -> Self {
        let shutdown = Self::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; finishing requests in flight");
            trigger.begin();
        });
        shutdown
    }

    /// Stop taking new work and finish what is in flight.
    pub fn begin(&self) {
        self.begin.cancel();
    }

    /// Close everything still open now (implies `begin`).
    pub fn force(&self) {
        self.begin.cancel();
        self.force.cancel();
    }

    pub fn is_begun(&self) -> bool {
        self.begin.is_cancelled()
    }

    pub fn begun(&self) -> WaitForCancellationFuture<'_> {
        self.begin.cancelled()
    }

    pub fn forced(&self) -> WaitForCancellationFuture<'_> {
        self.force.cancelled()
    }
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

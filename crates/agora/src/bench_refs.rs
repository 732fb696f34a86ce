//! The reference servers of `agora bench` (`crates/reference`), started from next to the
//! agora binary as children of the bench on ports base + 10 to 13, stopped by pid at the end.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bench_system::{self, Backends};

/// The reference servers, each a child of the bench (stopped by pid at the end).
pub(crate) struct References {
    pub(crate) children: Vec<(&'static str, Child)>,
    pub(crate) failed: Vec<(&'static str, String)>,
    pub(crate) base_port: u16,
}

impl References {
    pub(crate) fn port(&self, name: &str) -> u16 {
        let offset = match name {
            "ref-hello" => 10,
            "ref-proxy" => 11,
            "ref-redis" => 12,
            _ => 13,
        };
        self.base_port + offset
    }

    pub(crate) fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c.id())
    }

    pub(crate) async fn start(names: &[&'static str], base_port: u16, backends: &Backends) -> Self {
        let mut refs = Self {
            children: Vec::new(),
            failed: Vec::new(),
            base_port,
        };
        let dir = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(std::path::Path::to_path_buf));
        for &name in names {
            let exe = dir.as_ref().map(|d| d.join(name));
            let Some(exe) = exe.filter(|e| e.exists()) else {
                refs.failed.push((
                    name,
                    format!("{name} not found next to agora (cargo build --workspace builds it)"),
                ));
                continue;
            };
            let mut command = Command::new(exe);
            command.args(["--port", &refs.port(name).to_string()]);
            match name {
                "ref-proxy" => {
                    command.args([
                        "--upstream",
                        &format!("http://127.0.0.1:{}", refs.port("ref-hello")),
                    ]);
                }
                "ref-redis" => {
                    command.args(["--redis-url", &backends.redis_url]);
                }
                "ref-pg" => {
                    command.args(["--database-url", &backends.database_url]);
                }
                _ => {}
            }
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            match command.spawn() {
                Ok(child) => refs.children.push((name, child)),
                Err(err) => refs.failed.push((name, format!("starting {name}: {err}"))),
            }
        }
        // Up when they answer; one that exits first failed (PostgreSQL or Redis unreachable).
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut i = 0;
        while i < refs.children.len() {
            let (name, child) = &mut refs.children[i];
            let name = *name;
            let url = format!("http://127.0.0.1:{}/users/1", base_port + offset_of(name));
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                i += 1;
                continue;
            }
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            if exited || std::time::Instant::now() > deadline {
                // Stopped first: its stderr ends only when it does.
                let mut removed = refs.children.remove(i);
                bench_system::stop_children(std::slice::from_mut(&mut removed));
                let mut why = String::new();
                if let Some(mut stderr) = removed.1.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut why);
                }
                if !exited {
                    why = format!("no answer within 20 s {why}");
                }
                refs.failed
                    .push((name, format!("{name} did not start: {}", why.trim())));
                continue;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        refs
    }
}

fn offset_of(name: &str) -> u16 {
    match name {
        "ref-hello" => 10,
        "ref-proxy" => 11,
        "ref-redis" => 12,
        _ => 13,
    }
}

impl Drop for References {
    fn drop(&mut self) {
        bench_system::stop_children(&mut self.children);
    }
}

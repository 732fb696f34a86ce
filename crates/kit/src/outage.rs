//! Logging a dependency's outages by state change, not by request.
//!
//! When Redis, the database, the bus or an upstream goes away, every request that touches it
//! fails the same way; logging each one buries the one line that matters under thousands (an
//! outage of 45 s once wrote 70,000 warnings). An [`Outage`] tracker logs instead:
//! - once when the dependency goes down (WARN, with the first error),
//! - while it stays down, one summary per [`SUMMARY_EVERY`] with the failures counted since
//!   (WARN),
//! - once when it is back (INFO, with how long it was down and how many failures it cost).
//!
//! Each failure's own detail stays at DEBUG. The happy path ([`Outage::succeeded`] while up) is one
//! relaxed atomic load.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How often a dependency that stays down is reported again.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// The up/down state of one dependency, as far as its users have seen.
#[derive(Debug)]
pub struct Outage {
    /// What is down, as logged: "cache (redis)", "database", "upstream users #1", ...
    what: String,
    down: AtomicBool,
    state: Mutex<Down>,
    summary_every: Duration,
}

#[derive(Debug, Default)]
struct Down {
    since: Option<Instant>,
    /// Failures since the outage began, and since the last summary.
    failures: u64,
    unreported: u64,
    reported_at: Option<Instant>,
}

/// What a call to [`Outage::failed`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The dependency was up until this failure.
    WentDown,
    /// It was already down.
    StillDown,
}

impl Outage {
    pub fn new(what: impl Into<String>) -> Self {
        Self::with_summary_every(what, SUMMARY_EVERY)
    }

    /// With another summary period (tests).
    pub fn with_summary_every(what: impl Into<String>, summary_every: Duration) -> Self {
        Self {
            what: what.into(),
            down: AtomicBool::new(false),
            state: Mutex::new(Down::default()),
            summary_every,
        }
    }

    /// Whether the last thing seen was a failure.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Records a failure: logged at WARN when it starts an outage, counted into the periodic
    /// summary otherwise (and logged at DEBUG either way).
    pub fn failed(&self, err: &dyn std::fmt::Display) -> Change {
        tracing::debug!(dependency = %self.what, error.message = %err, "dependency call failed");
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        state.failures += 1;
        let Some(since) = state.since else {
            state.since = Some(now);
            state.failures = 1;
            state.unreported = 0;
            state.reported_at = Some(now);
            self.down.store(true, Ordering::Relaxed);
            tracing::warn!(
                dependency = %self.what,
                error.message = %err,
                "dependency is down; failures are counted and summarised until it is back"
            );
            return Change::WentDown;
        };
        state.unreported += 1;
        if state
            .reported_at
            .is_none_or(|at| now.duration_since(at) >= self.summary_every)
        {
            tracing::warn!(
                dependency = %self.what,
                down_for_secs = now.duration_since(since).as_secs(),
                failures = state.unreported,
                failures_in_all = state.failures,
                error.message = %err,
                "dependency is still down"
            );
            state.unreported = 0;
            state.reported_at = Some(now);
        }
        Change::StillDown
    }

    /// Records a success; logs "back" once if the dependency was down. Returns whether it was.
    pub fn succeeded(&self) -> bool {
        if !self.down.load(Ordering::Relaxed) {
            return false;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(since) = state.since.take() else {
            return false;
        };
        self.down.store(false, Ordering::Relaxed);
        tracing::info!(
            dependency = %self.what,
            down_for_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
            failures = state.failures,
            "dependency is back"
        );
        *state = Down::default();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::CapturedLogs;

    #[test]
    fn an_outage_logs_its_start_a_summary_per_period_and_its_end() {
        let logs = CapturedLogs::start();
        let outage = Outage::with_summary_every("cache (redis)", Duration::from_millis(200));
        assert!(!outage.succeeded(), "nothing to report while up");
        assert_eq!(outage.failed(&"refused"), Change::WentDown);
        for _ in 0..10_000 {
            assert_eq!(outage.failed(&"refused"), Change::StillDown);
        }
        std::thread::sleep(Duration::from_millis(250));
        outage.failed(&"refused");
        assert!(outage.is_down());
        assert!(outage.succeeded());
        assert!(!outage.is_down());
        assert!(!outage.succeeded(), "back is logged once");

        let lines = logs.lines();
        let warn = lines.iter().filter(|l| l.contains("WARN")).count();
        let info = lines.iter().filter(|l| l.contains("INFO")).count();
        assert_eq!(
            (warn, info),
            (2, 1),
            "10,002 failures log: down once, one summary, back once:\n{}",
            lines.join("\n")
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("still down") && l.contains("failures=10001")),
            "the summary counts the failures:\n{}",
            lines.join("\n")
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("is back") && l.contains("failures=10002")),
            "{}",
            lines.join("\n")
        );
    }
}

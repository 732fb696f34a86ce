//! A circuit breaker: closed → (N failures in a row) → open for a pause → half-open (one call
//! probes) → closed on its success, open again on its failure.
//!
//! One per neighbour in [`crate::client::ServiceClient`], one per upstream replica in the
//! gateway. A dead dependency then costs nothing per request (calls are refused at once) and is
//! found again by itself (the probe).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Failures in a row that open it (at least 1).
    pub failures: u32,
    /// How long it refuses calls before it lets one through to probe.
    pub open_for: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failures: 5,
            open_for: Duration::from_secs(2),
        }
    }
}

/// The state of a circuit, as metrics show it (`0` closed, `1` open, `2` half-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open,
    /// The pause is over: the next call (or the one in flight) probes.
    HalfOpen,
}

impl Circuit {
    /// The gauge value of the state.
    pub fn as_gauge(self) -> i64 {
        match self {
            Circuit::Closed => 0,
            Circuit::Open => 1,
            Circuit::HalfOpen => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

/// A circuit breaker; see the module docs.
#[derive(Debug, Default)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    open_until: Option<Instant>,
    /// When the probe in flight was let through. A probe whose verdict never comes (its caller
    /// gave up) is replaced by another after one more pause.
    probing_since: Option<Instant>,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Self {
            policy: BreakerPolicy {
                failures: policy.failures.max(1),
                ..policy
            },
            state: Mutex::default(),
        }
    }

    pub fn policy(&self) -> BreakerPolicy {
        self.policy
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go ahead now. Every call let through must be followed by
    /// [`Breaker::record`].
    pub fn allow(&self) -> bool {
        let mut state = self.lock();
        let now = Instant::now();
        match state.open_until {
            None => true,
            Some(until) if now < until => false,
            // Half-open: one call probes; the others wait for its verdict.
            Some(_) => match state.probing_since {
                Some(since) if now.duration_since(since) < self.policy.open_for => false,
                _ => {
                    state.probing_since = Some(now);
                    true
                }
            },
        }
    }

    /// Records the outcome of a call let through; returns the state after it.
    pub fn record(&self, success: bool) -> Circuit {
        let mut state = self.lock();
        state.probing_since = None;
        if success {
            state.failures = 0;
            state.open_until = None;
            return Circuit::Closed;
        }
        state.failures = state.failures.saturating_add(1);
        if state.failures >= self.policy.failures {
            state.open_until = Some(Instant::now() + self.policy.open_for);
            return Circuit::Open;
        }
        Circuit::Closed
    }

    /// The current state.
    pub fn state(&self) -> Circuit {
        let state = self.lock();
        match state.open_until {
            None => Circuit::Closed,
            Some(until) if Instant::now() < until => Circuit::Open,
            Some(_) => Circuit::HalfOpen,
        }
    }

    /// Ends the pause now: the next call probes (half-open). For a caller that has learnt by
    /// other means that the far side is back (an active health check), and for tests.
    pub fn expire_pause(&self) {
        let mut state = self.lock();
        if state.open_until.is_some() {
            state.open_until = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_a_probe_closes_it() {
        let breaker = Breaker::new(BreakerPolicy::default());
        let n = breaker.policy().failures;
        for _ in 0..n - 1 {
            assert!(breaker.allow());
            breaker.record(false);
        }
        breaker.record(true);
        assert_eq!(
            breaker.state(),
            Circuit::Closed,
            "a success resets the count"
        );
        for _ in 0..n {
            breaker.record(false);
        }
        assert_eq!(breaker.state(), Circuit::Open);
        assert!(!breaker.allow(), "open: refused at once");
        breaker.expire_pause();
        assert_eq!(breaker.state(), Circuit::HalfOpen);
        assert!(breaker.allow(), "after the pause one probe goes through");
        assert!(!breaker.allow(), "only one");
        assert_eq!(breaker.record(true), Circuit::Closed, "the probe closed it");
        assert!(breaker.allow());
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let breaker = Breaker::new(BreakerPolicy {
            failures: 2,
            open_for: Duration::from_secs(60),
        });
        breaker.record(false);
        assert_eq!(breaker.record(false), Circuit::Open);
        breaker.expire_pause();
        assert!(breaker.allow());
        assert_eq!(breaker.record(false), Circuit::Open);
        assert!(!breaker.allow(), "a new pause began");
    }
}

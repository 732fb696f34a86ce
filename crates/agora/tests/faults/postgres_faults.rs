//! PostgreSQL faults: the database is the source of truth, so while it is gone requests may
//! fail, but only as 503 `dependency_unavailable` problems with `Retry-After` (never a 500, never
//! a reset connection); no acknowledged create may be lost; and once it is back requests succeed
//! again within a bound, without restarting Agora.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::Topology;
use crate::load::Load;
use crate::report::Report;
use crate::{PG_BOUND, System, WARM, on_both_topologies, until};

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `pg_ctl restart -m fast`: every session is ended, the server is back in about a second.
    Restart,
    /// `pg_ctl stop -m fast`, 5 s without a database, `pg_ctl start`.
    Stop,
}

impl Fault {
    fn scenario(self) -> &'static str {
        match self {
            Self::Restart => "postgres-restart",
            Self::Stop => "postgres-stopped-5s",
        }
    }
}

on_both_topologies! {
    /// PostgreSQL restarts (fast) under load.
    restart => postgres_fault(Fault::Restart);
    /// PostgreSQL is stopped for 5 s under load.
    stopped => postgres_fault(Fault::Stop);
}

async fn postgres_fault(fault: Fault, topology: Topology) {
    let mut report = Report::new(fault.scenario(), topology);
    let mut system = System::start(topology).await;
    let known = system.cached_user("Known").await;
    let load = Load::start(
        &system.agora.gateway,
        &system.agora.users_metrics,
        known["id"].as_i64().expect("an id"),
    );
    tokio::time::sleep(WARM).await;

    let fault_started = Instant::now();
    match fault {
        Fault::Restart => system.pg.restart().await,
        Fault::Stop => {
            system.pg.stop().await;
            until(fault_started + Duration::from_secs(5)).await;
            system.pg.start_again().await;
        }
    }
    let fault_end = Instant::now();
    // The load goes on past the bound, so a recovery that does not happen shows.
    until(fault_end + PG_BOUND + Duration::from_secs(1)).await;
    let run = load.finish().await;

    let figures = run.figures(fault_end);
    let lost = run.lost(&system.agora.gateway).await;
    let mut violations = system.common_violations(
        &figures,
        &lost,
        figures.recovered_ok,
        PG_BOUND,
        "requests succeeding again",
    );
    if !figures.unexpected.is_empty() {
        violations.push(format!(
            "failures other than 503 dependency_unavailable with Retry-After: {:?}",
            figures.unexpected
        ));
    }
    let (log_lines, warn_lines, log_messages) = system.agora.log_counts();
    report.write(
        &figures,
        lost.len(),
        PG_BOUND,
        json!({
            "outage_s": (fault_end - fault_started).as_secs_f64(),
            "log_lines": log_lines,
            "warn_lines": warn_lines,
            "log_messages": log_messages,
        }),
        &violations,
    );
    assert!(
        violations.is_empty(),
        "{} on {}:\n- {}\nmost frequent warnings and errors:\n{}\nusers log (tail):\n{}",
        fault.scenario(),
        topology.name(),
        violations.join("\n- "),
        log_messages.join("\n"),
        system.agora.log_tail(
            match topology {
                Topology::Up => "up",
                Topology::Serve => "users",
            },
            5
        )
    );
}

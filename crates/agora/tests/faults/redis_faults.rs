//! Redis faults: the cache is an optimisation, so while Redis hangs, dies or is stopped every
//! read and write must keep succeeding from the database; once it is back, hits must resume
//! within `redis.retry_after_ms` + 5 s while the load goes on (issue 9: under steady traffic
//! they never did); and a write made during the outage must never be hidden by a stale entry.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::Topology;
use crate::load::Load;
use crate::report::Report;
use crate::{HITS_BOUND, System, WARM, on_both_topologies, until};

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `DEBUG SLEEP 3`: Redis accepts connections and answers nothing for 3 s.
    Hang,
    /// SIGKILL, and a new redis-server on the same port 2 s later (empty: no persistence).
    Kill,
    /// SIGSTOP for 10 s, then SIGCONT: every open connection hangs, the data survives.
    Stop,
}

impl Fault {
    fn scenario(self) -> &'static str {
        match self {
            Self::Hang => "redis-hang-3s",
            Self::Kill => "redis-kill9-restart-2s",
            Self::Stop => "redis-stopped-10s",
        }
    }
}

on_both_topologies! {
    /// Redis hangs for 3 s (`DEBUG SLEEP 3`) under load.
    hang => redis_fault(Fault::Hang);
    /// Redis is killed with SIGKILL under load and restarted 2 s later.
    kill_and_restart => redis_fault(Fault::Kill);
    /// Redis is stopped (SIGSTOP) for 10 s under load.
    stopped => redis_fault(Fault::Stop);
}

async fn redis_fault(fault: Fault, topology: Topology) {
    let mut report = Report::new(fault.scenario(), topology);
    let mut system = System::start(topology).await;
    let known = system.cached_user("Known").await;
    // Cached before the outage, renamed during it: a stale entry would show the old name.
    let victim = system.cached_user("Victim").await;
    let victim_id = victim["id"].as_i64().expect("an id");
    let renamed = format!("Renamed during the {} outage", fault.scenario());

    let load = Load::start(
        &system.agora.gateway,
        &system.agora.users_metrics,
        known["id"].as_i64().expect("an id"),
    );
    tokio::time::sleep(WARM).await;

    // The write during the outage, 1 s into it.
    let rename = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let response = system
            .client
            .patch(format!("{}/api/v1/users/{victim_id}", system.agora.gateway))
            .json(&json!({ "name": renamed }))
            .send()
            .await;
        match response {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(format!(
                "{} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            )),
            Err(err) => Err(format!("{err:#}")),
        }
    };
    let fault_started = Instant::now();
    let renamed_during = match fault {
        Fault::Hang => tokio::join!(system.redis.hang(3), rename).1,
        Fault::Kill => {
            system.redis.kill().await;
            let renamed = rename.await;
            until(fault_started + Duration::from_secs(2)).await;
            system.redis.spawn().await;
            renamed
        }
        Fault::Stop => {
            system.redis.pause();
            let renamed = rename.await;
            until(fault_started + Duration::from_secs(10)).await;
            system.redis.resume();
            renamed
        }
    };
    let fault_end = Instant::now();

    // The load goes on through the whole recovery window (that is when hits must resume);
    // the renamed user is read back once a second meanwhile, and twice more at the end.
    let mut stale = Vec::new();
    for second in 1..=HITS_BOUND.as_secs() + 1 {
        until(fault_end + Duration::from_secs(second)).await;
        stale.push(system.read_user(victim_id).await);
    }
    let run = load.finish().await;
    for _ in 0..2 {
        stale.push(system.read_user(victim_id).await);
    }
    let stale: Vec<String> = stale
        .into_iter()
        .filter_map(|read| match read {
            Ok(user) if user["name"] == renamed.as_str() => None,
            Ok(user) => Some(format!("name {}", user["name"])),
            Err(err) => Some(err),
        })
        .collect();

    let figures = run.figures(fault_end);
    let lost = run.lost(&system.agora.gateway).await;
    let mut violations = system.common_violations(
        &figures,
        &lost,
        figures.recovered_hits,
        HITS_BOUND,
        "cache hits resuming under load",
    );
    if figures.problem > 0 {
        violations.push(format!(
            "{} requests failed with a problem while only the cache was down (expected none): {:?}",
            figures.problem, figures.unexpected
        ));
    }
    if let Err(err) = &renamed_during {
        violations.push(format!("the rename during the outage failed: {err}"));
    }
    if !stale.is_empty() {
        violations.push(format!(
            "{} of {} reads after Redis was back did not show the rename made during the \
             outage ({renamed:?}): {stale:?}",
            stale.len(),
            HITS_BOUND.as_secs() + 3
        ));
    }
    let (log_lines, warn_lines, log_messages) = system.agora.log_counts();
    report.write(
        &figures,
        lost.len(),
        HITS_BOUND,
        json!({
            "stale_reads": stale.len(),
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

//! The figures of one `agora bench` run: a row per scenario, the processes measured during it,
//! the ratios of Agora's rows to their references, and the table (or JSON) they are printed as.

use serde::Serialize;

use crate::load::Outcome;
use crate::procs::{self, Sample};

/// The load generator's own process, shown for what it costs but left out of the ratios.
pub const LOAD_GENERATOR: &str = "load generator";

/// CPU and memory of one process (or one server and its children) over one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessFigures {
    pub name: String,
    pub pid: u32,
    /// CPU time (user + system) over the scenario divided by its successful requests.
    pub cpu_us_per_request: Option<f64>,
    /// At the end of the scenario (of the first pid of a group).
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
}

/// An Agora row against one reference: throughput as a share of the reference's, and CPU per
/// request as a multiple of it.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub reference: String,
    pub throughput: f64,
    pub cpu_per_request: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub reference_row: bool,
    pub connections: usize,
    pub requests: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Successful requests that took longer than 100 ms.
    pub over_100ms: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub processes: Vec<ProcessFigures>,
    /// The reference rows this row is compared to.
    #[serde(skip)]
    pub compare_to: Vec<&'static str>,
    pub ratios: Vec<Ratio>,
    pub note: Option<String>,
}

impl Row {
    pub fn from_outcome(scenario: &str, connections: usize, outcome: &Outcome) -> Self {
        let empty = outcome.ok == 0;
        let q = |q: f64| if empty { 0.0 } else { outcome.quantile_ms(q) };
        Self {
            scenario: scenario.to_owned(),
            reference_row: scenario.starts_with("ref-"),
            connections,
            requests: outcome.ok,
            seconds: outcome.elapsed.as_secs_f64(),
            per_second: outcome.per_second(),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: if empty { 0.0 } else { outcome.max_ms() },
            over_100ms: outcome.ok - outcome.latencies.count_between(0, 100_000).min(outcome.ok),
            errors: outcome.errors,
            first_error: outcome.first_error.clone(),
            processes: Vec::new(),
            compare_to: Vec::new(),
            ratios: Vec::new(),
            note: None,
        }
    }

    /// A scenario that could not run, and why.
    pub fn skipped(scenario: &str, why: String) -> Self {
        let mut row = Self::from_outcome(
            scenario,
            0,
            &Outcome {
                latencies: hdrhistogram::Histogram::new(3)
                    .unwrap_or_else(|_| unreachable!("3 significant digits are valid")),
                ok: 0,
                errors: 0,
                first_error: None,
                elapsed: std::time::Duration::ZERO,
            },
        );
        row.note = Some(format!("skipped: {why}"));
        row
    }

    /// CPU µs per request of the measured processes, the load generator left out.
    pub fn cpu_per_request(&self) -> Option<f64> {
        let measured: Vec<f64> = self
            .processes
            .iter()
            .filter(|p| p.name != LOAD_GENERATOR)
            .filter_map(|p| p.cpu_us_per_request)
            .collect();
        (!measured.is_empty()).then(|| measured.iter().sum())
    }
}

/// Processes sampled at the start of a scenario: `(name, pids)`, several pids adding up to one
/// (a server and its children).
///
/// A group of several pids is a server whose children do the work (PostgreSQL: a backend per
/// connection, and autovacuum workers that come and go). Its children are counted whole: those
/// born during the scenario (found again at the end) and those that ended during it (their CPU
/// is in the server's cutime + cstime once it has waited for them; this also counts what such a
/// child spent before the start, a small excess next to missing it all).
pub struct Watch {
    groups: Vec<(String, Vec<u32>, Vec<Sample>)>,
    ticks_per_second: u64,
}

impl Watch {
    pub fn start(groups: Vec<(String, Vec<u32>)>, ticks_per_second: u64) -> Self {
        let groups = groups
            .into_iter()
            .map(|(name, pids)| {
                let samples = pids
                    .iter()
                    .map(|&p| procs::sample(p).unwrap_or_default())
                    .collect();
                (name, pids, samples)
            })
            .collect();
        Self {
            groups,
            ticks_per_second,
        }
    }

    /// The figures since [`Watch::start`], per request of `requests`.
    pub fn finish(self, requests: u64) -> Vec<ProcessFigures> {
        self.groups
            .into_iter()
            .map(|(name, pids, before)| {
                let after: Vec<Sample> = pids
                    .iter()
                    .map(|&p| procs::sample(p).unwrap_or_default())
                    .collect();
                let mut ticks: u64 = after
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| a.cpu_ticks.saturating_sub(b.cpu_ticks))
                    .sum();
                let first = after.first().copied().unwrap_or_default();
                if pids.len() > 1 {
                    let parent_before = before.first().copied().unwrap_or_default();
                    ticks += first
                        .ended_children_ticks
                        .saturating_sub(parent_before.ended_children_ticks);
                    ticks += procs::with_children(pids[0])
                        .into_iter()
                        .filter(|p| !pids.contains(p))
                        .filter_map(procs::sample)
                        .map(|s| s.cpu_ticks)
                        .sum::<u64>();
                }
                ProcessFigures {
                    name,
                    pid: pids.first().copied().unwrap_or(0),
                    cpu_us_per_request: (requests > 0).then(|| {
                        ticks as f64 * 1e6 / self.ticks_per_second as f64 / requests as f64
                    }),
                    rss_mb: first.rss_kb as f64 / 1024.0,
                    peak_rss_mb: first.peak_rss_kb as f64 / 1024.0,
                }
            })
            .collect()
    }
}

/// Each row's ratios to the reference rows it names (those that ran).
pub fn fill_ratios(rows: &mut [Row]) {
    let references: Vec<(String, f64, Option<f64>)> = rows
        .iter()
        .filter(|r| r.reference_row && r.requests > 0)
        .map(|r| (r.scenario.clone(), r.per_second, r.cpu_per_request()))
        .collect();
    for row in rows.iter_mut().filter(|r| !r.reference_row) {
        row.ratios = row
            .compare_to
            .iter()
            .filter_map(|name| references.iter().find(|(n, _, _)| n == name))
            .map(|(name, per_second, cpu)| Ratio {
                reference: name.clone(),
                throughput: row.per_second / per_second,
                cpu_per_request: match (row.cpu_per_request(), cpu) {
                    (Some(mine), Some(theirs)) if *theirs > 0.0 => Some(mine / theirs),
                    _ => None,
                },
            })
            .collect();
    }
}

fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// The Markdown table of `rows`, and each row's note or first error below it.
pub fn render_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | conns | req/s | p50 ms | p99 ms | p99.9 ms | errors | CPU µs/req | RSS MB (peak) | vs reference (req/s share, CPU/req multiple) |\n\
         |---|---:|---:|---:|---:|---:|---:|---|---|---|\n",
    );
    let mut notes = Vec::new();
    for row in rows {
        let cpu = row
            .processes
            .iter()
            .map(|p| match p.cpu_us_per_request {
                Some(us) => format!("{} {us:.0}", p.name),
                None => format!("{} -", p.name),
            })
            .collect::<Vec<_>>()
            .join(" · ");
        let rss = row
            .processes
            .iter()
            .filter(|p| p.name != LOAD_GENERATOR)
            .map(|p| format!("{} {:.0} ({:.0})", p.name, p.rss_mb, p.peak_rss_mb))
            .collect::<Vec<_>>()
            .join(" · ");
        let ratios = row
            .ratios
            .iter()
            .map(|r| match r.cpu_per_request {
                Some(cpu) => format!("{}: {:.2}×, CPU {cpu:.1}×", r.reference, r.throughput),
                None => format!("{}: {:.2}×", r.reference, r.throughput),
            })
            .collect::<Vec<_>>()
            .join("; ");
        let skipped = row.connections == 0;
        if skipped {
            out.push_str(&format!(
                "| {} | - | - | - | - | - | - | - | - | - |\n",
                row.scenario
            ));
        } else {
            out.push_str(&format!(
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |\n",
                row.scenario,
                row.connections,
                row.per_second,
                ms(row.p50_ms),
                ms(row.p99_ms),
                ms(row.p999_ms),
                row.errors,
                if cpu.is_empty() { "-".to_owned() } else { cpu },
                if rss.is_empty() { "-".to_owned() } else { rss },
                if ratios.is_empty() {
                    "-".to_owned()
                } else {
                    ratios
                },
            ));
        }
        if let Some(note) = &row.note {
            notes.push(format!("- {}: {note}", row.scenario));
        }
        if let Some(error) = &row.first_error {
            notes.push(format!("- {}: first error: {error}", row.scenario));
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        out.push_str(&notes.join("\n"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(scenario: &str, per_second: f64, cpu: f64) -> Row {
        let mut row = Row::skipped(scenario, String::new());
        row.note = None;
        row.connections = 4;
        row.requests = 1000;
        row.per_second = per_second;
        row.p50_ms = 0.123;
        row.p99_ms = 12.345;
        row.p999_ms = 123.4;
        row.processes = vec![
            ProcessFigures {
                name: "agora up".into(),
                pid: 1,
                cpu_us_per_request: Some(cpu),
                rss_mb: 40.2,
                peak_rss_mb: 51.7,
            },
            ProcessFigures {
                name: LOAD_GENERATOR.into(),
                pid: 2,
                cpu_us_per_request: Some(10.0),
                rss_mb: 9.0,
                peak_rss_mb: 9.0,
            },
        ];
        row
    }

    #[test]
    fn ratios_compare_to_the_named_references_without_the_load_generator() {
        let mut rows = vec![
            row("ref-hello", 40_000.0, 20.0),
            row("cached-get-direct", 10_000.0, 80.0),
        ];
        rows[1].compare_to = vec!["ref-hello", "ref-redis"];
        fill_ratios(&mut rows);
        assert!(rows[0].ratios.is_empty(), "a reference has no ratio");
        let ratios = &rows[1].ratios;
        assert_eq!(ratios.len(), 1, "a reference that did not run is left out");
        assert_eq!(ratios[0].reference, "ref-hello");
        assert!((ratios[0].throughput - 0.25).abs() < 1e-9);
        assert_eq!(
            ratios[0].cpu_per_request.map(|c| (c * 10.0).round()),
            Some(40.0)
        );
    }

    #[test]
    fn the_table_has_a_line_per_row_and_the_notes_below() {
        let mut rows = vec![
            row("ref-hello", 40_000.0, 20.0),
            row("cached-get-direct", 10_000.0, 80.0),
        ];
        rows[1].compare_to = vec!["ref-hello"];
        rows.push(Row::skipped("ref-pg", "PostgreSQL is not reachable".into()));
        fill_ratios(&mut rows);
        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("| scenario | conns | req/s | p50 ms | p99 ms | p99.9 ms |"));
        assert_eq!(
            lines[3],
            "| cached-get-direct | 4 | 10000 | 0.12 | 12.3 | 123 | 0 | agora up 80 · load generator 10 \
             | agora up 40 (52) | ref-hello: 0.25×, CPU 4.0× |"
        );
        assert_eq!(lines[4], "| ref-pg | - | - | - | - | - | - | - | - | - |");
        assert!(
            table.contains("- ref-pg: skipped: PostgreSQL is not reachable"),
            "{table}"
        );
    }
}

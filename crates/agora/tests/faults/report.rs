//! One row per scenario: printed, and written as one line of JSON to the report directory
//! (`AGORA_FAULTS_REPORT`, else `<target>/tmp/faults`), where `scripts/faults` collects every
//! row into one table after the run.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::Topology;
use crate::load::Figures;

pub fn dir() -> PathBuf {
    std::env::var_os("AGORA_FAULTS_REPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults"))
}

/// The row of one scenario. Dropped during a panic before [`Report::write`] (a server that did
/// not start, say), it still writes a row saying so, so the table never silently misses a test.
pub struct Report {
    scenario: &'static str,
    topology: &'static str,
    written: bool,
}

fn secs(d: Option<Duration>) -> Value {
    d.map_or(Value::Null, |d| {
        json!((d.as_secs_f64() * 100.0).round() / 100.0)
    })
}

impl Report {
    pub fn new(scenario: &'static str, topology: Topology) -> Self {
        Self::named(scenario, topology.name())
    }

    /// A row for a topology of the scenario's own (the orders scenarios: one `agora serve`
    /// process per service, two workers).
    pub fn named(scenario: &'static str, topology: &'static str) -> Self {
        Self {
            scenario,
            topology,
            written: false,
        }
    }

    /// Writes a row of figures that are not the user load's (`figures` holds them all, with
    /// the columns of the table: `sent`, `ok`, `lost`, ...), and the failed checks.
    pub fn write_figures(&mut self, figures: Value, violations: &[String]) {
        let mut row = json!({
            "scenario": self.scenario,
            "topology": self.topology,
            "passed": violations.is_empty(),
            "violations": violations,
        });
        if let (Some(row), Value::Object(figures)) = (row.as_object_mut(), figures) {
            row.extend(figures);
        }
        self.emit(&row);
        self.written = true;
    }

    /// Writes the row; `extra` adds scenario-specific figures, `violations` the failed checks.
    pub fn write(
        &mut self,
        figures: &Figures,
        lost: usize,
        bound: Duration,
        extra: Value,
        violations: &[String],
    ) {
        let mut row = json!({
            "scenario": self.scenario,
            "topology": self.topology,
            "sent": figures.sent,
            "reads": figures.reads,
            "creates": figures.creates,
            "ok": figures.ok,
            "failed_problem": figures.problem,
            "failed_no_problem": figures.no_problem,
            "lost": lost,
            "http_500": figures.http_500,
            "server_errors": figures.server_errors,
            "recovery_ok_s": secs(figures.recovered_ok),
            "recovery_hits_s": secs(figures.recovered_hits),
            "bound_s": bound.as_secs_f64(),
            "cache_errors": figures.cache_errors,
            "passed": violations.is_empty(),
            "violations": violations,
        });
        if let (Some(row), Value::Object(extra)) = (row.as_object_mut(), extra) {
            row.extend(extra);
        }
        self.emit(&row);
        self.written = true;
    }

    fn emit(&self, row: &Value) {
        println!("fault row: {row}");
        let dir = dir();
        // The topology may be words ("serve, 2 workers"); the file name keeps to [a-z0-9-].
        let name: String = format!("{}-{}", self.scenario, self.topology)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = dir.join(format!("{name}.json"));
        if let Err(err) =
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, format!("{row}\n")))
        {
            eprintln!("could not write {}: {err}", path.display());
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if !self.written && std::thread::panicking() {
            self.emit(&json!({
                "scenario": self.scenario,
                "topology": self.topology,
                "passed": false,
                "violations": ["the test failed before its figures were complete; see its output"],
            }));
        }
    }
}

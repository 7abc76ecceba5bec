//! The benchmark's results: one [`Series`] of samples per scenario × metric, written as
//! `results.json` and `results.md` (the tables, the ratios against direct and stunnel, and
//! the goals, reported, never asserted).

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::SAME_NODE_HBONE;

pub struct Report {
    pub quick: bool,
    pub conditions: Value,
    /// What the agent said its proxy hop is (`plaintext`, `HBONE/mTLS`).
    pub transport: String,
    pub elapsed: Duration,
    pub scenarios: Vec<ScenarioInfo>,
    pub series: Vec<Series>,
    /// Measurements that failed (a path that did not carry traffic).
    pub failures: Vec<String>,
    /// The 1-minute load average at the start of each repetition: how busy the machine was.
    pub load: Vec<f64>,
    /// The ztunnel binary of the ztunnel paths; None: they were not run.
    pub ztunnel: Option<String>,
}

pub struct ScenarioInfo {
    pub key: String,
    pub label: String,
    pub baseline: Option<String>,
}

/// Samples of one metric in one scenario, one per repetition; no samples and a `note`
/// when the figure is not available (yet).
pub struct Series {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub samples: Vec<f64>,
    pub note: Option<String>,
}

impl Series {
    pub fn median(&self) -> Option<f64> {
        let mut s = self.samples.clone();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let mid = s.len() / 2;
        Some(if s.len() % 2 == 1 {
            s[mid]
        } else {
            (s[mid - 1] + s[mid]) / 2.0
        })
    }

    pub fn min(&self) -> Option<f64> {
        self.samples.iter().copied().reduce(f64::min)
    }

    pub fn max(&self) -> Option<f64> {
        self.samples.iter().copied().reduce(f64::max)
    }

    fn cell(&self) -> String {
        match (self.median(), self.min(), self.max(), &self.note) {
            (Some(m), Some(lo), Some(hi), _) if self.samples.len() > 1 => {
                format!("{} ({}–{})", num(m), num(lo), num(hi))
            }
            (Some(m), ..) => num(m),
            (None, .., Some(note)) => note.clone(),
            _ => "–".to_string(),
        }
    }
}

impl Report {
    pub fn new(quick: bool, conditions: Value) -> Self {
        Report {
            quick,
            conditions,
            transport: "unknown".into(),
            elapsed: Duration::ZERO,
            scenarios: Vec::new(),
            series: Vec::new(),
            failures: Vec::new(),
            load: Vec::new(),
            ztunnel: None,
        }
    }

    /// Reads back what [`Report::write`] wrote (to render it again without measuring).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("results.json");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let doc: Value = serde_json::from_str(&text).context("parse results.json")?;
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(Into::into))
                .collect()
        };
        let mut report = Report::new(
            doc["quick"].as_bool().unwrap_or(false),
            doc["conditions"].clone(),
        );
        report.transport = doc["transport"].as_str().unwrap_or("unknown").into();
        report.ztunnel = doc["ztunnel"].as_str().map(Into::into);
        report.elapsed = Duration::from_secs_f64(doc["elapsed_s"].as_f64().unwrap_or(0.0));
        report.failures = strings(&doc["failures"]);
        report.load = doc["load_average_per_repetition"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_f64)
            .collect();
        for s in doc["scenarios"].as_array().into_iter().flatten() {
            report.scenario(
                s["key"].as_str().unwrap_or("?"),
                s["label"].as_str().unwrap_or("?"),
                s["baseline"].as_str(),
            );
        }
        for r in doc["results"].as_array().into_iter().flatten() {
            report.series.push(Series {
                scenario: r["scenario"].as_str().unwrap_or("?").into(),
                metric: r["metric"].as_str().unwrap_or("?").into(),
                unit: r["unit"].as_str().unwrap_or("?").into(),
                samples: r["samples"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_f64)
                    .collect(),
                note: r["note"].as_str().map(Into::into),
            });
        }
        Ok(report)
    }

    /// Records the 1-minute load average now.
    pub fn sample_load(&mut self) {
        let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        if let Some(load) = text.split_whitespace().next().and_then(|l| l.parse().ok()) {
            self.load.push(load);
        }
    }

    pub fn scenario(&mut self, key: &str, label: &str, baseline: Option<&str>) {
        self.scenarios.push(ScenarioInfo {
            key: key.into(),
            label: label.into(),
            baseline: baseline.map(Into::into),
        });
    }

    /// Adds one sample to the series `scenario` × `metric`.
    pub fn add(&mut self, scenario: &str, metric: &str, unit: &str, value: f64) {
        if let Some(s) = self
            .series
            .iter_mut()
            .find(|s| s.scenario == scenario && s.metric == metric)
        {
            s.samples.push(value);
            return;
        }
        self.series.push(Series {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            samples: vec![value],
            note: None,
        });
    }

    pub fn fail(&mut self, scenario: &str, what: &str, error: &anyhow::Error) {
        let line = format!("{scenario}: {what}: {error:#}");
        println!("  FAILED {line}");
        self.failures.push(line);
    }

    /// The data-path figures the L7 scenario cannot have: a waypoint parses HTTP, so the
    /// raw TCP workloads do not pass it. Present in the tables as such.
    pub fn not_available(&mut self) {
        if !self.scenarios.iter().any(|s| s.key == L7) {
            return;
        }
        let mut missing: Vec<(String, String)> = Vec::new();
        for s in self.series.iter().filter(|s| s.scenario == "direct") {
            let measured = self.get(L7, &s.metric).is_some();
            if !measured && !missing.iter().any(|(m, _)| m == &s.metric) {
                missing.push((s.metric.clone(), s.unit.clone()));
            }
        }
        for (metric, unit) in missing {
            self.na(L7, &metric, &unit, "n/a (HTTP only)");
        }
    }

    fn na(&mut self, scenario: &str, metric: &str, unit: &str, note: &str) {
        self.series.push(Series {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            samples: Vec::new(),
            note: Some(note.into()),
        });
    }

    pub fn label(&self, key: &str) -> String {
        self.scenarios
            .iter()
            .find(|s| s.key == key)
            .map_or_else(|| key.to_string(), |s| s.label.clone())
    }

    pub fn get(&self, scenario: &str, metric: &str) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.scenario == scenario && s.metric == metric)
    }

    fn median(&self, scenario: &str, metric: &str) -> Option<f64> {
        self.get(scenario, metric)?.median()
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let results: Vec<Value> = self
            .series
            .iter()
            .map(|s| {
                json!({
                    "scenario": s.scenario,
                    "scenario_label": self.label(&s.scenario),
                    "metric": s.metric,
                    "unit": s.unit,
                    "samples": s.samples,
                    "median": s.median(),
                    "min": s.min(),
                    "max": s.max(),
                    "note": s.note,
                })
            })
            .collect();
        let doc = json!({
            "quick": self.quick,
            "transport": self.transport,
            "ztunnel": self.ztunnel,
            "conditions": self.conditions,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "failures": self.failures,
            "load_average_per_repetition": self.load,
            "scenarios": self
                .scenarios
                .iter()
                .map(|s| json!({ "key": s.key, "label": s.label, "baseline": s.baseline }))
                .collect::<Vec<_>>(),
            "results": results,
        });
        let json_path = dir.join("results.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("write {}", json_path.display()))?;
        let md_path = dir.join("results.md");
        std::fs::write(&md_path, self.markdown())
            .with_context(|| format!("write {}", md_path.display()))?;
        Ok(())
    }

    /// The whole report as Markdown.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let c = &self.conditions;
        let _ = writeln!(
            md,
            "{} run, {:.0} s; {} CPUs ({}), kernel {}; load average at start {}; {} compiler \
             process(es) running at start; 1-minute load average at each repetition: {}; weft \
             proxy hop: {}. Cells: median (min–max) over the repetitions.\n",
            if self.quick {
                "Quick (`--quick`)"
            } else {
                "Full"
            },
            self.elapsed.as_secs_f64(),
            c["cpus"],
            c["cpu_model"].as_str().unwrap_or("?"),
            c["kernel"].as_str().unwrap_or("?"),
            c["loadavg_at_start"].as_str().unwrap_or("?"),
            c["compilers_running_at_start"],
            self.load
                .iter()
                .map(|l| format!("{l:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.transport,
        );
        self.headline(&mut md);
        self.waypoint_hop(&mut md);
        self.data_path_table(&mut md);
        self.agent_table(&mut md);
        self.goals(&mut md);
        if !self.failures.is_empty() {
            let _ = writeln!(md, "\n### Failed measurements\n");
            for f in &self.failures {
                let _ = writeln!(md, "- {f}");
            }
        }
        md
    }

    fn data_path_table(&self, md: &mut String) {
        let keys: Vec<&ScenarioInfo> = self.scenarios.iter().collect();
        let _ = writeln!(md, "\n### Data path\n");
        let _ = write!(md, "| metric | unit |");
        for s in &keys {
            let _ = write!(md, " {} |", s.label);
        }
        let _ = write!(md, "\n|---|---|");
        for _ in &keys {
            let _ = write!(md, "---|");
        }
        md.push('\n');
        for (metric, unit) in self.metrics(|m| self.get("direct", m).is_some()) {
            let _ = write!(md, "| {metric} | {unit} |");
            for s in &keys {
                let cell = self
                    .get(&s.key, &metric)
                    .map_or_else(|| "–".to_string(), Series::cell);
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
    }

    fn agent_table(&self, md: &mut String) {
        let columns = ["weft-l4", "stunnel", ZTUNNEL, "weft-l4-x", ZTUNNEL_X];
        let _ = write!(
            md,
            "\n### Agent: cost, scale and control plane\n\n| metric | unit |"
        );
        for key in columns {
            let _ = write!(md, " {} |", self.label(key));
        }
        let _ = writeln!(md, "\n|---|---|{}", "---|".repeat(columns.len()));
        // Metrics of these columns only (the waypoint's own rows are in its table).
        let of_columns = |m: &str| {
            self.get("direct", m).is_none() && columns.iter().any(|k| self.get(k, m).is_some())
        };
        for (metric, unit) in self.metrics(of_columns) {
            let _ = write!(md, "| {metric} | {unit} |");
            for key in columns {
                let cell = self
                    .get(key, &metric)
                    .map_or_else(|| "–".to_string(), Series::cell);
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
    }

    /// Ratios against direct (same topology) and against stunnel, from the medians.
    fn headline(&self, md: &mut String) {
        let _ = writeln!(md, "### Headline (medians of this run)\n");
        let rows = [
            ("throughput, 1 stream", Kind::Ratio),
            ("throughput, 8 streams", Kind::Ratio),
            ("throughput, 64 streams", Kind::Ratio),
            ("1 B round trip p50", Kind::Added),
            ("1 B round trip p99", Kind::Added),
            ("1 B round trip, CPUs kept awake p50", Kind::Added),
            ("1 B round trip, CPUs kept awake p99", Kind::Added),
            ("1 KiB round trip p50", Kind::Added),
            ("1 KiB round trip p99", Kind::Added),
            ("new connections", Kind::Ratio),
        ];
        match &self.ztunnel {
            Some(binary) => {
                let _ = writeln!(md, "ztunnel paths: `{binary}`, one ztunnel per pod.\n");
            }
            None => {
                let _ = writeln!(
                    md,
                    "ztunnel paths: not run (no ztunnel binary; `--ztunnel PATH`): the ztunnel \
                     columns are empty.\n"
                );
            }
        }
        let _ = writeln!(
            md,
            "| metric | weft L4 same node vs direct | weft L4 vs stunnel | weft L4 vs ztunnel, same node | weft L4 cross node vs direct cross node | weft L4 vs ztunnel, cross node | weft same node over HBONE vs direct | weft same node over HBONE vs ztunnel |\n|---|---|---|---|---|---|---|---|"
        );
        for (metric, kind) in rows {
            let cmp = |a: &str, b: &str| -> String {
                match (self.median(a, metric), self.median(b, metric)) {
                    (Some(x), Some(y)) if y > 0.0 => match kind {
                        Kind::Ratio => format!("{:.2}×", x / y),
                        Kind::Added => format!("{:+.1} µs ({:.2}×)", x - y, x / y),
                    },
                    _ => "–".into(),
                }
            };
            let _ = writeln!(
                md,
                "| {metric} | {} | {} | {} | {} | {} | {} | {} |",
                cmp("weft-l4", "direct"),
                cmp("weft-l4", "stunnel"),
                cmp("weft-l4", ZTUNNEL),
                cmp("weft-l4-x", "direct-x"),
                cmp("weft-l4-x", ZTUNNEL_X),
                cmp(SAME_NODE_HBONE, "direct"),
                cmp(SAME_NODE_HBONE, ZTUNNEL)
            );
        }
    }

    /// What the waypoint hop adds to an HTTP request, against the L4 mesh and direct.
    fn waypoint_hop(&self, md: &mut String) {
        let rows: Vec<&Series> = self
            .series
            .iter()
            .filter(|s| s.scenario == L7 && !s.samples.is_empty())
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "\n### Waypoint hop (medians of this run)\n\n| metric | {} | added vs weft L4 | added vs direct |\n|---|---|---|---|",
            self.label(L7)
        );
        for series in rows {
            let metric = &series.metric;
            let l7 = series.median().unwrap_or(0.0);
            let added = |base: &str| {
                self.median(base, metric).map_or_else(
                    || "–".into(),
                    |b| format!("{:+.0} µs ({:.2}×)", l7 - b, l7 / b),
                )
            };
            let _ = writeln!(
                md,
                "| {metric} | {} {} | {} | {} |",
                num(l7),
                series.unit,
                added("weft-l4"),
                added("direct")
            );
        }
    }

    /// The goals of the issue, reported against this run's medians (never asserted).
    fn goals(&self, md: &mut String) {
        let _ = writeln!(md, "\n### Goals (reported, not asserted)\n");
        let m = |s: &str, metric: &str| self.median(s, metric);
        let ratio = |metric: &str| Some(m("weft-l4", metric)? / m("direct", metric)?);
        let added = |metric: &str| Some(m("weft-l4", metric)? - m("direct", metric)?);
        let verdict = |ok: Option<bool>| match ok {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        let show = |v: Option<f64>, unit: &str| {
            v.map_or_else(|| "–".into(), |v| format!("{}{unit}", num(v)))
        };
        let rss = self.series.iter().find(|s| {
            s.scenario == "weft-l4"
                && s.metric.starts_with("agent RSS (VmRSS)")
                && s.metric.ends_with("connections open")
        });
        let mut rows: Vec<(String, String, &str)> = vec![
            (
                "single-stream throughput ≥ 60% of direct".into(),
                show(ratio("throughput, 1 stream").map(|r| r * 100.0), "%"),
                verdict(ratio("throughput, 1 stream").map(|r| r >= 0.6)),
            ),
            (
                "added p50 < 30 µs (1 B round trip)".into(),
                show(added("1 B round trip p50"), " µs"),
                verdict(added("1 B round trip p50").map(|a| a < 30.0)),
            ),
            (
                "added p99 < 80 µs (1 B round trip)".into(),
                show(added("1 B round trip p99"), " µs"),
                verdict(added("1 B round trip p99").map(|a| a < 80.0)),
            ),
            (
                "new connections/s ≥ 50% of direct".into(),
                show(ratio("new connections").map(|r| r * 100.0), "%"),
                verdict(ratio("new connections").map(|r| r >= 0.5)),
            ),
            (
                format!(
                    "agent RSS < 20 MB at 100 pods and 1,000 connections{}",
                    rss.map_or(String::new(), |s| format!(" (measured: {})", s.metric))
                ),
                show(rss.and_then(Series::median), " MB"),
                verdict(rss.and_then(Series::median).map(|v| v < 20.0)),
            ),
        ];
        for (weft, rival, name) in [
            ("weft-l4", "stunnel", "stunnel"),
            ("weft-l4", ZTUNNEL, "ztunnel on one node"),
            ("weft-l4-x", ZTUNNEL_X, "ztunnel across nodes"),
        ] {
            let (value, ok) = self.ahead(weft, rival);
            rows.push((
                format!("weft L4 ahead of {name} on every metric"),
                value,
                verdict(ok),
            ));
        }
        let _ = writeln!(md, "| goal | this run | |\n|---|---|---|");
        for (goal, value, v) in rows {
            let _ = writeln!(md, "| {goal} | {value} | {v} |");
        }
    }

    /// Whether `weft` beats `rival` on every data-path metric both have: (what it says,
    /// None when nothing was compared).
    fn ahead(&self, weft: &str, rival: &str) -> (String, Option<bool>) {
        let mut behind = Vec::new();
        let mut compared = 0;
        for s in self.series.iter().filter(|s| s.scenario == rival) {
            let (Some(w), Some(r)) = (self.median(weft, &s.metric), s.median()) else {
                continue;
            };
            compared += 1;
            let higher_is_better = s.unit == "Gbit/s" || s.unit == "conn/s";
            let ahead = if higher_is_better { w > r } else { w < r };
            if !ahead {
                behind.push(s.metric.clone());
            }
        }
        let value = if compared == 0 {
            "–".to_string()
        } else if behind.is_empty() {
            format!("ahead on {compared} of {compared}")
        } else {
            format!("behind on: {}", behind.join("; "))
        };
        (value, (compared > 0).then_some(behind.is_empty()))
    }

    /// Distinct (metric, unit) in first-seen order, filtered.
    fn metrics(&self, keep: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for s in &self.series {
            if keep(&s.metric) && !out.iter().any(|(m, _)| m == &s.metric) {
                out.push((s.metric.clone(), s.unit.clone()));
            }
        }
        out
    }
}

#[derive(Clone, Copy)]
enum Kind {
    /// x / y (higher is better).
    Ratio,
    /// x − y in µs (lower is better).
    Added,
}

/// About three significant digits.
/// The ztunnel paths' keys (same node, cross node).
const ZTUNNEL: &str = "ztunnel";
const ZTUNNEL_X: &str = "ztunnel-x";

pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

const L7: &str = "weft-l7";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max_of_samples() {
        let mut r = Report::new(true, json!({}));
        for v in [3.0, 1.0, 2.0, 10.0] {
            r.add("direct", "x", "u", v);
        }
        let s = r.get("direct", "x").unwrap();
        assert_eq!(
            (s.median(), s.min(), s.max()),
            (Some(2.5), Some(1.0), Some(10.0))
        );
        assert_eq!(s.cell(), "2.50 (1.00–10.0)");
    }
}

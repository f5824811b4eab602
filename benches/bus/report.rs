//! Percentiles pooled over repeats, the Markdown table, the 1 ms target, and where the time
//! goes between the setups.

use std::time::Duration;

use crate::rig::Setup;
use crate::rounds::Run;
use crate::stats::{ms, quantile};

/// The most the bus may add to publish → wake at p50 (issue 12, item 7).
pub const TARGET_MS: f64 = 1.0;

/// One row: every run of one setup with one number of polls.
pub struct Row {
    pub setup: Setup,
    pub polls: usize,
    pub rounds: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub answered_p50: f64,
    /// p50 of each repeat on its own, in run order: the spread between fresh processes.
    pub repeat_p50: Vec<f64>,
    pub load_min: f64,
    pub load_max: f64,
    pub cut_short: bool,
}

pub fn rows(runs: &[Run], setups: &[Setup], polls: &[usize]) -> Vec<Row> {
    let mut out = Vec::new();
    for &k in polls {
        for &setup in setups {
            // Redis alone has no polls: one row, under the first number.
            if setup == Setup::RedisAlone && k != polls[0] {
                continue;
            }
            let mine: Vec<&Run> = runs
                .iter()
                .filter(|r| r.setup == setup.key() && r.polls == k)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let mut wake: Vec<Duration> =
                mine.iter().flat_map(|r| r.wake.iter().copied()).collect();
            let mut answered: Vec<Duration> = mine
                .iter()
                .flat_map(|r| r.answered.iter().copied())
                .collect();
            wake.sort_unstable();
            answered.sort_unstable();
            let repeat_p50 = mine
                .iter()
                .map(|r| {
                    let mut w = r.wake.clone();
                    w.sort_unstable();
                    ms(quantile(&w, 0.5))
                })
                .collect();
            let loads = mine.iter().flat_map(|r| [r.load_before, r.load_after]);
            out.push(Row {
                setup,
                polls: k,
                rounds: wake.len(),
                p50: ms(quantile(&wake, 0.5)),
                p90: ms(quantile(&wake, 0.9)),
                p99: ms(quantile(&wake, 0.99)),
                max: ms(wake.last().copied().unwrap_or_default()),
                answered_p50: ms(quantile(&answered, 0.5)),
                repeat_p50,
                load_min: loads.clone().fold(f64::INFINITY, f64::min),
                load_max: loads.fold(0.0, f64::max),
                cut_short: mine.iter().any(|r| r.cut_short),
            });
        }
    }
    out
}

fn find(rows: &[Row], setup: Setup, polls: usize) -> Option<&Row> {
    rows.iter().find(|r| r.setup == setup && r.polls == polls)
}

/// The table of every row.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| setup | polls | rounds | p50 ms | p90 ms | p99 ms | max ms | publish answered, p50 ms | p50 per repeat | load avg |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|---|---|\n",
    );
    for r in rows {
        let polls = if r.setup == Setup::RedisAlone {
            "—".to_owned()
        } else {
            r.polls.to_string()
        };
        let repeats: Vec<String> = r.repeat_p50.iter().map(|v| format!("{v:.3}")).collect();
        out.push_str(&format!(
            "| {}{} | {polls} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.2}–{:.2} |\n",
            r.setup.label(),
            if r.cut_short { " (cut short)" } else { "" },
            r.rounds,
            r.p50,
            r.p90,
            r.p99,
            r.max,
            r.answered_p50,
            repeats.join(", "),
            r.load_min,
            r.load_max,
        ));
    }
    out
}

/// The target, per bus setup and number of polls: p50 through the bus minus p50 without.
/// Returns the table and whether every comparison met it (`None`: nothing to compare).
pub fn targets(rows: &[Row], polls: &[usize]) -> (String, Option<bool>) {
    let mut out = String::from(
        "| publish | polls | p50 no bus, ms | p50 with the bus, ms | bus − no bus, ms | target ≤ 1 ms |\n\
         |---|--:|--:|--:|--:|---|\n",
    );
    let mut all = None;
    for &k in polls {
        let Some(base) = find(rows, Setup::NoBus, k) else {
            continue;
        };
        for setup in [Setup::BusViaNode, Setup::BusViaXadd] {
            let Some(bus) = find(rows, setup, k) else {
                continue;
            };
            let diff = bus.p50 - base.p50;
            let met = diff <= TARGET_MS;
            all = Some(all.unwrap_or(true) && met);
            let how = match setup {
                Setup::BusViaNode => "to node A",
                _ => "XADD by the bench",
            };
            out.push_str(&format!(
                "| {how} | {k} | {:.3} | {:.3} | {diff:+.3} | {} |\n",
                base.p50,
                bus.p50,
                if met { "target met" } else { "target NOT MET" }
            ));
        }
    }
    (out, all)
}

/// Where the time goes with one poll, from differences of p50s (each a rough share: p50s do
/// not add up exactly).
pub fn breakdown(rows: &[Row], polls: usize) -> Option<String> {
    let p = |s| find(rows, s, polls).map(|r| r.p50);
    let answered = |s| find(rows, s, polls).map(|r| r.answered_p50);
    let redis = find(rows, Setup::RedisAlone, rows.first()?.polls).map(|r| r.p50);
    let mut lines = Vec::new();
    if let Some(v) = p(Setup::NoBus) {
        lines.push(format!(
            "no bus: publish → wake {v:.3} ms (HTTP in, hub, answer out)"
        ));
    }
    if let Some(v) = redis {
        lines.push(format!(
            "Redis alone: XADD → a blocked XREAD answered {v:.3} ms (the floor of any stream reader here)"
        ));
    }
    if let (Some(xadd), Some(r)) = (p(Setup::BusViaXadd), redis) {
        lines.push(format!(
            "node B's reader: bench XADD → wake {xadd:.3} ms, {:.3} ms above Redis alone \
             (the reader's reply path, applying the entry, the answer out)",
            xadd - r
        ));
    }
    if let (Some(node), Some(xadd)) = (p(Setup::BusViaNode), p(Setup::BusViaXadd)) {
        lines.push(format!(
            "node A's hop: publish to A → wake {node:.3} ms, {:+.3} ms against the bench's own XADD \
             (HTTP to A, A's XADD through the redis crate)",
            node - xadd
        ));
    }
    if let (Some(a), Some(x)) = (answered(Setup::BusViaNode), answered(Setup::BusViaXadd)) {
        lines.push(format!(
            "publish answered: by node A {a:.3} ms, by Redis to the bench's XADD {x:.3} ms"
        ));
    }
    (!lines.is_empty()).then(|| lines.join("\n"))
}

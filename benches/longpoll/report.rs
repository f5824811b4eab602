//! From the runs to the report: medians per server, the table (Markdown, so it can go into
//! docs/performance.md as printed), the targets, and the JSON with every run.

use serde_json::{Value, json};

use crate::runs::{ParkRun, RateRun};
use crate::server::Scenario;
use crate::stats::median;

/// One line of the table: a value per server (median over repeats), `None` where not measured.
pub struct Row {
    pub label: String,
    pub unit: &'static str,
    pub values: Vec<Option<f64>>,
    /// Whether nudge / Nchan means anything here: not for values that are ~0 by design
    /// (CPU while parked, kernel TCP buffers of idle sockets), where it only divides noise.
    pub ratio: bool,
}

/// A section heading, or a row.
pub enum Line {
    Section(String),
    Row(Row),
}

/// Everything the report is made from.
pub struct Results<'a> {
    pub servers: &'a [String],
    pub scenarios: &'a [Scenario],
    pub ns: &'a [usize],
    pub park: &'a [ParkRun],
    pub rate: &'a [RateRun],
}

impl Results<'_> {
    fn runs<'b>(
        &'b self,
        server: &'b str,
        scenario: Scenario,
        n: usize,
    ) -> impl Iterator<Item = &'b ParkRun> {
        self.park
            .iter()
            .filter(move |r| r.server == server && r.scenario == scenario.name() && r.n == n)
    }

    /// Median over repeats of `f` for one server, scenario and N.
    fn park_median(
        &self,
        server: &str,
        scenario: Scenario,
        n: usize,
        f: impl Fn(&ParkRun) -> Option<f64>,
    ) -> Option<f64> {
        median(self.runs(server, scenario, n).filter_map(f))
    }

    /// Bytes per parked poll between two N, each measured above its own process's baseline,
    /// paired by repeat; the median of the pairs. Fixed costs cancel out.
    pub fn slope(
        &self,
        server: &str,
        scenario: Scenario,
        n1: usize,
        n2: usize,
        rss: bool,
    ) -> Option<f64> {
        let above = |r: &ParkRun| {
            let kb = if rss {
                r.parked_rss_kb as f64 - r.base_rss_kb as f64
            } else {
                r.parked_pss_kb as f64 - r.base_pss_kb as f64
            };
            kb * 1024.0
        };
        let pairs = self.runs(server, scenario, n1).filter_map(|a| {
            let b = self
                .runs(server, scenario, n2)
                .find(|b| b.repeat == a.repeat)?;
            Some((above(b) - above(a)) / (n2 as f64 - n1 as f64))
        });
        median(pairs)
    }

    /// Fan-out p99 growth between two N, in microseconds per extra poll.
    pub fn wake_slope(
        &self,
        server: &str,
        scenario: Scenario,
        n1: usize,
        n2: usize,
    ) -> Option<f64> {
        let p99 = |n| self.park_median(server, scenario, n, |r| Some(r.wake.as_ref()?.p99_ms));
        Some((p99(n2)? - p99(n1)?) * 1000.0 / (n2 as f64 - n1 as f64))
    }

    fn rate_median(&self, server: &str, f: impl Fn(&RateRun) -> Option<f64>) -> Option<f64> {
        median(
            self.rate
                .iter()
                .filter(|r| r.server == server)
                .filter_map(f),
        )
    }

    fn row(&self, label: String, unit: &'static str, value: impl Fn(&str) -> Option<f64>) -> Line {
        Line::Row(Row {
            label,
            unit,
            values: self.servers.iter().map(|s| value(s)).collect(),
            ratio: true,
        })
    }

    /// A row whose ratio column stays empty.
    fn row_no_ratio(
        &self,
        label: String,
        unit: &'static str,
        value: impl Fn(&str) -> Option<f64>,
    ) -> Line {
        match self.row(label, unit, value) {
            Line::Row(row) => Line::Row(Row {
                ratio: false,
                ..row
            }),
            section => section,
        }
    }

    /// The table's lines, less rows with no value at all (a measure only one server has, when
    /// that server is not in the run).
    pub fn lines(&self) -> Vec<Line> {
        self.all_lines()
            .into_iter()
            .filter(|line| match line {
                Line::Section(_) => true,
                Line::Row(row) => row.values.iter().any(Option::is_some),
            })
            .collect()
    }

    fn all_lines(&self) -> Vec<Line> {
        let mut lines = Vec::new();
        let (Some(&n_min), Some(&n_max)) = (self.ns.first(), self.ns.last()) else {
            return lines;
        };
        for &scenario in self.scenarios {
            lines.push(Line::Section(scenario_title(scenario).to_owned()));
            if n_max > n_min {
                lines.push(self.row(
                    format!("userspace per parked poll, slope N={n_min}→{n_max} (PSS)"),
                    "B",
                    |s| self.slope(s, scenario, n_min, n_max, false),
                ));
                lines.push(self.row(
                    format!("  same from VmRSS, slope N={n_min}→{n_max}"),
                    "B",
                    |s| self.slope(s, scenario, n_min, n_max, true),
                ));
            }
            for &n in self.ns {
                lines.push(self.row(
                    format!("userspace per parked poll above baseline, N={n}"),
                    "B",
                    |s| self.park_median(s, scenario, n, |r| Some(r.pss_bytes_per_poll())),
                ));
            }
            lines.push(self.row(
                format!("kernel slab per parked poll, both ends, N={n_max}"),
                "B",
                |s| self.park_median(s, scenario, n_max, |r| Some(r.slab_bytes_per_poll())),
            ));
            lines.push(self.row_no_ratio(
                format!("kernel TCP buffers per parked poll (sockstat mem), N={n_max}"),
                "B",
                |s| self.park_median(s, scenario, n_max, |r| Some(r.tcp_mem_bytes_per_poll())),
            ));
            lines.push(
                self.row_no_ratio(format!("CPU while {n_max} parked"), "% core", |s| {
                    self.park_median(s, scenario, n_max, |r| r.cpu_parked_percent)
                }),
            );
            lines.push(
                self.row(format!("time to park {n_max} (paced connects)"), "s", |s| {
                    self.park_median(s, scenario, n_max, |r| Some(r.park_seconds))
                }),
            );
            for &n in self.ns {
                lines.push(self.row(format!("wake p99, N={n}"), "ms", |s| {
                    self.park_median(s, scenario, n, |r| Some(r.wake.as_ref()?.p99_ms))
                }));
            }
            lines.push(self.row(format!("wake p50, N={n_max}"), "ms", |s| {
                self.park_median(s, scenario, n_max, |r| Some(r.wake.as_ref()?.p50_ms))
            }));
            lines.push(self.row(format!("wake max, N={n_max}"), "ms", |s| {
                self.park_median(s, scenario, n_max, |r| Some(r.wake.as_ref()?.max_ms))
            }));
            lines.push(self.row(format!("publish answered, N={n_max}"), "ms", |s| {
                self.park_median(s, scenario, n_max, |r| {
                    Some(r.wake.as_ref()?.publish_answered_ms)
                })
            }));
            lines.push(self.row(
                format!("server's own fan-out (nudge_fanout_seconds), N={n_max}"),
                "ms",
                |s| self.park_median(s, scenario, n_max, |r| r.wake.as_ref()?.server_fanout_ms),
            ));
            lines.push(self.row(
                format!("server CPU during the wake, N={n_max}"),
                "ms",
                |s| self.park_median(s, scenario, n_max, |r| Some(r.wake.as_ref()?.server_cpu_ms)),
            ));
            lines.push(self.row(
                format!("client (bench) CPU during the wake, N={n_max}"),
                "ms",
                |s| self.park_median(s, scenario, n_max, |r| Some(r.wake.as_ref()?.client_cpu_ms)),
            ));
            lines.push(self.row(
                format!(
                    "CPU floor of that wake: (server + client CPU) / {} cores, N={n_max}",
                    cores()
                ),
                "ms",
                |s| {
                    self.park_median(s, scenario, n_max, |r| {
                        let w = r.wake.as_ref()?;
                        Some((w.server_cpu_ms + w.client_cpu_ms) / cores() as f64)
                    })
                },
            ));
            lines.push(self.row(
                format!("polls not woken with new_change, N={n_max}"),
                "",
                |s| self.park_median(s, scenario, n_max, |r| Some(r.wake.as_ref()?.wrong as f64)),
            ));
        }
        if !self.rate.is_empty() {
            lines.push(Line::Section("no poll parked".to_owned()));
            lines.push(self.row(
                "publish throughput, one per request".to_owned(),
                "/s",
                |s| self.rate_median(s, |r| Some(r.publishes_per_second)),
            ));
            let batch = self.rate.iter().find_map(|r| r.batch_size).unwrap_or(0);
            lines.push(self.row(
                format!("publish throughput, NDJSON batches of {batch}"),
                "/s",
                |s| self.rate_median(s, |r| r.batched_publishes_per_second),
            ));
            lines.push(
                self.row("connections accepted and answered".to_owned(), "/s", |s| {
                    self.rate_median(s, |r| Some(r.connections_per_second))
                }),
            );
        }
        lines
    }

    /// The targets of the performance issue and the spec, judged against the first Nchan
    /// column (one worker, as in the spec's reference numbers).
    pub fn targets(&self) -> Vec<(String, Option<bool>)> {
        let mut out = Vec::new();
        let (Some(&n_min), Some(&n_max)) = (self.ns.first(), self.ns.last()) else {
            return out;
        };
        let nudge = "nudge";
        if self.servers.iter().any(|s| s == "floor") {
            out.extend(self.floor_targets(n_min, n_max));
        }
        let Some(nchan) = self.servers.iter().find(|s| s.starts_with("nchan")) else {
            return out;
        };
        let scenario = Scenario::OneTopic;
        let per_poll = |s: &str| {
            if n_max > n_min {
                self.slope(s, scenario, n_min, n_max, false)
            } else {
                self.park_median(s, scenario, n_max, |r| Some(r.pss_bytes_per_poll()))
            }
        };
        let judge = |ok: Option<bool>, text: String| (text, ok);
        match (per_poll(nudge), per_poll(nchan)) {
            (Some(a), Some(b)) => {
                out.push(judge(Some(a <= 0.5 * b), format!(
                    "userspace per parked poll ≤ 0.5 × {nchan}: {a:.0} B vs {:.0} B (ratio {:.2})", 0.5 * b, a / b
                )));
            }
            _ => out.push(judge(
                None,
                format!("userspace per parked poll ≤ 0.5 × {nchan}: not measured"),
            )),
        }
        match per_poll(nudge) {
            Some(a) => out.push(judge(
                Some(a <= 2000.0),
                format!("userspace per parked poll ≤ 2 KB: {a:.0} B"),
            )),
            None => out.push(judge(
                None,
                "userspace per parked poll ≤ 2 KB: not measured".to_owned(),
            )),
        }
        let p99 = |s: &str| self.park_median(s, scenario, n_max, |r| Some(r.wake.as_ref()?.p99_ms));
        match (p99(nudge), p99(nchan)) {
            (Some(a), Some(b)) => out.push(judge(Some(a <= 0.5 * b), format!(
                "wake p99 of one publish to {n_max} parked ≤ 0.5 × {nchan}: {a:.1} ms vs {:.1} ms", 0.5 * b
            ))),
            _ => out.push(judge(None, format!("wake p99 to {n_max} ≤ 0.5 × {nchan}: not measured"))),
        }
        // The client shares the cores: no wake-up can end before the CPU both sides spent on
        // it, spread over every core, has run. Said next to the target, so that a miss can be
        // told apart from a floor.
        let floor = self.park_median(nudge, scenario, n_max, |r| {
            let w = r.wake.as_ref()?;
            Some((w.server_cpu_ms + w.client_cpu_ms) / cores() as f64)
        });
        if let (Some(f), Some(b)) = (floor, p99(nchan)) {
            out.push((
                format!(
                    "  (nudge's CPU floor for that wake on this machine: {f:.1} ms = {:.2} × {nchan}'s p99)",
                    f / b
                ),
                None,
            ));
        }
        let cpu = self.park_median(nudge, scenario, n_max, |r| r.cpu_parked_percent);
        match cpu {
            Some(c) => out.push(judge(
                Some(c <= 0.5),
                format!("~0 CPU while {n_max} parked (≤ 0.5 % of a core): {c:.2} %"),
            )),
            None => out.push(judge(None, "~0 CPU while parked: not measured".to_owned())),
        }
        // Linearity: the slope over each step between successive N agrees with the overall one.
        if self.ns.len() >= 3 {
            let steps: Vec<(usize, usize)> = self.ns.windows(2).map(|w| (w[0], w[1])).collect();
            let memory: Vec<Option<f64>> = steps
                .iter()
                .map(|&(a, b)| self.slope(nudge, scenario, a, b, false))
                .collect();
            let wake: Vec<Option<f64>> = steps
                .iter()
                .map(|&(a, b)| self.wake_slope(nudge, scenario, a, b))
                .collect();
            for (what, unit, slopes) in [("memory", "B", memory), ("wake p99", "µs", wake)] {
                let text: Vec<String> = steps
                    .iter()
                    .zip(&slopes)
                    .map(|(&(a, b), v)| match v {
                        Some(v) => format!("{a}→{b}: {v:.1} {unit}/poll"),
                        None => format!("{a}→{b}: —"),
                    })
                    .collect();
                let values: Vec<f64> = slopes.iter().flatten().copied().collect();
                let ok = (values.len() == slopes.len() && !values.is_empty()).then(|| {
                    let (lo, hi) = values
                        .iter()
                        .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                    // Within a factor 1.5 of each other (or both tiny: under 64 B or 1 µs a poll).
                    hi <= 1.5 * lo || hi < if unit == "B" { 64.0 } else { 1.0 }
                });
                out.push(judge(
                    ok,
                    format!(
                        "nudge {what} linear in N (step slopes within 1.5×): {}",
                        text.join(", ")
                    ),
                ));
            }
        }
        out
    }

    /// The targets against the floor (issue 14), measured in the same run with the same
    /// client: what nudge costs beyond the least a tokio long-poll server can.
    fn floor_targets(&self, n_min: usize, n_max: usize) -> Vec<(String, Option<bool>)> {
        let mut out = Vec::new();
        let mut judge = |what: String, limit: f64, unit: &str, a: Option<f64>, b: Option<f64>| {
            out.push(match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => (
                    format!(
                        "{what} ≤ {limit} × floor: {a:.1} {unit} vs {b:.1} {unit} (ratio {:.2})",
                        a / b
                    ),
                    Some(a <= limit * b),
                ),
                _ => (format!("{what} ≤ {limit} × floor: not measured"), None),
            })
        };
        let wake = |s: &str, scenario, f: fn(&crate::runs::Wake) -> f64| {
            self.park_median(s, scenario, n_max, |r| r.wake.as_ref().map(f))
        };
        // A wake figure of nudge against the floor's, within 15 %.
        let mut judge_wake =
            |what: String, unit: &str, scenario, f: fn(&crate::runs::Wake) -> f64| {
                judge(
                    what,
                    1.15,
                    unit,
                    wake("nudge", scenario, f),
                    wake("floor", scenario, f),
                );
            };
        let p99 = |w: &crate::runs::Wake| w.p99_ms;
        let cpu_per_answer = |w: &crate::runs::Wake| 1000.0 * w.server_cpu_ms / w.answered as f64;
        for (label, scenario) in [
            ("one topic", Scenario::OneTopic),
            ("a channel per poll", Scenario::OneTopicChannelEach),
        ] {
            let what = format!("wake p99, one publish to {n_max} parked ({label})");
            judge_wake(what, "ms", scenario, p99);
            let what = format!("server CPU per answer ({label})");
            judge_wake(what, "µs", scenario, cpu_per_answer);
        }
        let what = format!("wake p99, {n_max} topics of one poll each");
        judge_wake(what, "ms", Scenario::NTopics, p99);
        let per_poll = |s: &str| {
            let scenario = Scenario::OneTopicChannelEach;
            if n_max > n_min {
                self.slope(s, scenario, n_min, n_max, false)
            } else {
                self.park_median(s, scenario, n_max, |r| Some(r.pss_bytes_per_poll()))
            }
        };
        judge(
            "userspace per parked poll, a channel per poll".to_owned(),
            1.1,
            "B",
            per_poll("nudge"),
            per_poll("floor"),
        );
        out
    }

    /// The table as Markdown: one column per server, and after each other server's column
    /// (the floor's, Nchan's) the ratio nudge / that column.
    pub fn table(&self) -> String {
        let nudge_col = self.servers.iter().position(|s| s == "nudge");
        let mut header = vec!["measurement".to_owned(), "unit".to_owned()];
        for server in self.servers {
            header.push(server.clone());
            if nudge_col.is_some() && server != "nudge" {
                header.push(format!("nudge / {server}"));
            }
        }
        let mut rows: Vec<Vec<String>> = Vec::new();
        for line in self.lines() {
            match line {
                Line::Section(title) => {
                    let mut row = vec![format!("**{title}**")];
                    row.resize(header.len(), String::new());
                    rows.push(row);
                }
                Line::Row(row) => {
                    let mut cells = vec![row.label.clone(), row.unit.to_owned()];
                    for (i, server) in self.servers.iter().enumerate() {
                        cells.push(number(row.values[i]));
                        if let Some(k) = nudge_col.filter(|_| server != "nudge") {
                            let ratio = match (row.values[k], row.values[i]) {
                                (Some(a), Some(b)) if row.ratio && b.abs() > f64::EPSILON => {
                                    Some(a / b)
                                }
                                _ => None,
                            };
                            cells.push(ratio.map_or("—".to_owned(), |r| format!("{r:.2}")));
                        }
                    }
                    rows.push(cells);
                }
            }
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|c| {
                rows.iter()
                    .chain(std::iter::once(&header))
                    .map(|r| r[c].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let render = |cells: &[String]| {
            let padded: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(c, cell)| {
                    let pad = widths[c] - cell.chars().count();
                    if c < 2 {
                        format!("{cell}{}", " ".repeat(pad))
                    } else {
                        format!("{}{cell}", " ".repeat(pad))
                    }
                })
                .collect();
            format!("| {} |", padded.join(" | "))
        };
        let mut out = vec![render(&header)];
        let rule: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(c, w)| {
                if c < 2 {
                    "-".repeat(*w)
                } else {
                    format!("{}:", "-".repeat(w - 1))
                }
            })
            .collect();
        out.push(format!(
            "|{}|",
            rule.iter()
                .map(|r| format!(" {r} "))
                .collect::<Vec<_>>()
                .join("|")
        ));
        out.extend(rows.iter().map(|r| render(r)));
        out.join("\n")
    }

    /// The summary for the JSON: every row with its values by server.
    pub fn summary_json(&self) -> Value {
        let rows: Vec<Value> = self
            .lines()
            .into_iter()
            .map(|line| match line {
                Line::Section(title) => json!({ "section": title }),
                Line::Row(row) => {
                    let values: serde_json::Map<String, Value> = self
                        .servers
                        .iter()
                        .zip(&row.values)
                        .map(|(s, v)| (s.clone(), v.map_or(Value::Null, |v| json!(v))))
                        .collect();
                    json!({ "measurement": row.label, "unit": row.unit, "values": values })
                }
            })
            .collect();
        json!(rows)
    }
}

fn scenario_title(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::OneTopic => "one topic, one channel: one publish wakes N",
        Scenario::OneTopicChannelEach => "one topic, one channel each: one publish wakes N ¹",
        Scenario::NTopics => "N topics, one poll each: N publishes wake N ²",
    }
}

/// What the table's marks and words mean.
pub const NOTES: &str = "\
Ratios are nudge / that column: below 1 is nudge smaller or faster for B, ms, s and %; above 1
is nudge faster for /s. Userspace memory is PSS summed over the server's processes (nginx:
master and workers), above that process's own baseline after a warm-up; the slope between the
smallest and largest N is the per-poll cost with fixed costs cancelled. Kernel rows are
system-wide and count both ends of each loopback connection. Wake times run from the first byte
of the publish request to each poll's complete answer, as the client sees it; the client shares
the machine's cores, and its CPU row says how much of them it took.
¹ nudge: N channels bound to the topic; Nchan: each subscriber multiplexes a channel of its own
  with the shared one (`nchan_channel_id $arg_channel $arg_own`).
² nudge: one NDJSON request of N publishes; Nchan: N publish requests (it takes one message per
  request) over 8 keep-alive connections.";

/// Three significant digits or so, never scientific notation.
pub fn number(value: Option<f64>) -> String {
    match value {
        None => "—".to_owned(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// The cores the server and the bench client share.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

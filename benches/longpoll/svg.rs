//! The pictures: how the wake times of the largest N spread, and userspace memory per parked
//! poll against N, one colour per server. Plain SVG written by hand (no plotting crate), next to
//! the JSON, so that a run can be looked at and the README can show the latest one.
//!
//! [`check`] is the bench's own test of this file: every SVG it writes must be well-formed XML
//! with every server in its legend; [`self_check`] runs it on made-up runs whose server names
//! need escaping, every time the bench runs (`cargo test --all-targets` included).

use std::fmt::Write;

use crate::procfs::KernelMemory;
use crate::report::Results;
use crate::runs::{ParkRun, Wake};
use crate::server::Scenario;
use crate::stats::median;

const WIDTH: f64 = 900.0;
/// Title and legend above the panels.
const HEAD: f64 = 70.0;
const PANEL: f64 = 270.0;
/// Plot area inside a panel: room for the y labels on the left, the x labels below.
const LEFT: f64 = 80.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;

/// The wake picture: per scenario, the share of polls answered against the time since the
/// publish, at the largest N (the repeat with the median p99), with dots at p50 and p99.
pub fn wake(results: &Results) -> String {
    let n = results.ns.last().copied().unwrap_or(0);
    let mut svg = Svg::new(
        results.scenarios.len(),
        &format!("Wake time, N = {n}: share of polls answered, against ms since the publish"),
        results.servers,
        "dots: p50 and p99",
    );
    for (i, &scenario) in results.scenarios.iter().enumerate() {
        let curves: Vec<(usize, &Wake)> = results
            .servers
            .iter()
            .enumerate()
            .filter_map(|(s, server)| Some((s, median_wake(results, server, scenario, n)?)))
            .collect();
        let x_max = curves
            .iter()
            .filter_map(|(_, w)| w.percentiles_ms.last().copied())
            .fold(0.0, f64::max);
        let plot = svg.panel(
            i,
            scenario_title(scenario),
            Axis::new(x_max, "ms since the publish"),
            Axis::new(100.0, "% of polls answered"),
        );
        for (s, wake) in curves {
            let colour = colour(&results.servers[s], s);
            let points: Vec<(f64, f64)> = wake
                .percentiles_ms
                .iter()
                .enumerate()
                .map(|(p, &ms)| (ms, p as f64))
                .collect();
            svg.line(&plot, &points, colour);
            for (ms, p) in [(wake.p50_ms, 50.0), (wake.p99_ms, 99.0)] {
                svg.dot(&plot, (ms, p), colour);
            }
        }
    }
    svg.finish()
}

/// The memory picture: per scenario, userspace bytes per parked poll (PSS above the process's
/// own baseline, median over repeats) against N.
pub fn memory(results: &Results) -> String {
    let mut svg = Svg::new(
        results.scenarios.len(),
        "Userspace memory per parked poll (PSS above baseline) against N",
        results.servers,
        "median over repeats",
    );
    let n_max = results.ns.last().copied().unwrap_or(0) as f64;
    for (i, &scenario) in results.scenarios.iter().enumerate() {
        let lines: Vec<(usize, Vec<(f64, f64)>)> = results
            .servers
            .iter()
            .enumerate()
            .map(|(s, server)| {
                let points = results
                    .ns
                    .iter()
                    .filter_map(|&n| {
                        let bytes = median(
                            results
                                .park
                                .iter()
                                .filter(|r| {
                                    &r.server == server && r.scenario == scenario.name() && r.n == n
                                })
                                .map(ParkRun::pss_bytes_per_poll),
                        )?;
                        Some((n as f64, bytes))
                    })
                    .collect();
                (s, points)
            })
            .collect();
        let y_max = lines
            .iter()
            .flat_map(|(_, points)| points.iter().map(|p| p.1))
            .fold(0.0, f64::max);
        let plot = svg.panel(
            i,
            scenario_title(scenario),
            Axis::new(n_max, "N, polls parked"),
            Axis::new(y_max, "bytes per parked poll"),
        );
        for (s, points) in lines {
            let colour = colour(&results.servers[s], s);
            svg.line(&plot, &points, colour);
            for &point in &points {
                svg.dot(&plot, point, colour);
            }
        }
    }
    svg.finish()
}

/// Of one server's runs at N, the one with the median p99 (the lower middle for an even count):
/// a real distribution, rather than a mix of several.
fn median_wake<'a>(
    results: &'a Results,
    server: &str,
    scenario: Scenario,
    n: usize,
) -> Option<&'a Wake> {
    let mut wakes: Vec<&Wake> = results
        .park
        .iter()
        .filter(|r| r.server == server && r.scenario == scenario.name() && r.n == n)
        .filter_map(|r| r.wake.as_ref())
        .filter(|w| w.percentiles_ms.len() == 101)
        .collect();
    wakes.sort_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms));
    wakes.get(wakes.len().checked_sub(1)? / 2).copied()
}

fn scenario_title(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::OneTopic => "one topic, one channel",
        Scenario::OneTopicChannelEach => "one topic, one channel each",
        Scenario::NTopics => "N topics, one poll each",
    }
}

/// The same colour for a server in every picture and every run.
fn colour(server: &str, index: usize) -> &'static str {
    match server {
        "nudge" => "#1f5fbf",
        "nudge-1t" => "#7fa7e6",
        "floor" => "#555555",
        "nchan-1w" => "#d62728",
        "nchan-2w" => "#ff8c00",
        _ => ["#2ca02c", "#9467bd", "#8c564b", "#e377c2"][index % 4],
    }
}

/// Text as XML character data or an attribute value.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// One axis: from 0 to a round number at or above the largest value, ticks at round steps.
struct Axis {
    max: f64,
    step: f64,
    label: &'static str,
}

impl Axis {
    fn new(largest: f64, label: &'static str) -> Axis {
        let largest = if largest.is_finite() && largest > 0.0 {
            largest
        } else {
            1.0
        };
        let raw = largest / 5.0;
        let magnitude = 10f64.powf(raw.log10().floor());
        let step = match raw / magnitude {
            r if r <= 1.0 => 1.0,
            r if r <= 2.0 => 2.0,
            r if r <= 5.0 => 5.0,
            _ => 10.0,
        } * magnitude;
        Axis {
            max: (largest / step).ceil() * step,
            step,
            label,
        }
    }

    fn ticks(&self) -> impl Iterator<Item = f64> + '_ {
        let count = (self.max / self.step).round() as usize;
        (0..=count).map(|i| i as f64 * self.step)
    }

    fn text(&self, value: f64) -> String {
        let decimals = if self.step >= 1.0 {
            0
        } else {
            (-self.step.log10()).ceil() as usize
        };
        format!("{value:.decimals$}")
    }
}

/// Where a panel's plot area is, and its scales.
struct Plot {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x: Axis,
    y: Axis,
}

impl Plot {
    fn at(&self, (x, y): (f64, f64)) -> (f64, f64) {
        (
            self.left + x / self.x.max * self.width,
            self.top + self.height - y / self.y.max * self.height,
        )
    }
}

/// An SVG under construction: a title, a legend, panels stacked top to bottom.
struct Svg {
    out: String,
}

impl Svg {
    fn new(panels: usize, title: &str, servers: &[String], note: &str) -> Svg {
        let height = HEAD + PANEL * panels.max(1) as f64;
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            out,
            r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#
        );
        let _ = writeln!(
            out,
            r#"<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{}</text>"#,
            escape(title)
        );
        out.push_str("<g class=\"legend\">\n");
        let mut x = LEFT;
        for (i, server) in servers.iter().enumerate() {
            let colour = colour(server, i);
            let _ = writeln!(
                out,
                r#"<line x1="{x}" y1="45" x2="{}" y2="45" stroke="{colour}" stroke-width="3"/>"#,
                x + 24.0
            );
            let _ = writeln!(
                out,
                r#"<text x="{}" y="49">{}</text>"#,
                x + 30.0,
                escape(server)
            );
            x += 40.0 + 8.0 * server.chars().count() as f64;
        }
        out.push_str("</g>\n");
        let _ = writeln!(
            out,
            r##"<text x="{}" y="49" text-anchor="end" fill="#555555">{}</text>"##,
            WIDTH - RIGHT,
            escape(note)
        );
        Svg { out }
    }

    /// Draws panel `index`'s frame, grid, ticks and labels; returns where to plot.
    fn panel(&mut self, index: usize, title: &str, x: Axis, y: Axis) -> Plot {
        let plot = Plot {
            left: LEFT,
            top: HEAD + PANEL * index as f64 + TOP,
            width: WIDTH - LEFT - RIGHT,
            height: PANEL - TOP - BOTTOM,
            x,
            y,
        };
        let out = &mut self.out;
        let (left, top, bottom) = (plot.left, plot.top, plot.top + plot.height);
        let right = left + plot.width;
        let _ = writeln!(
            out,
            r#"<text x="{left}" y="{}" font-weight="bold">{}</text>"#,
            top - 8.0,
            escape(title)
        );
        for value in plot.x.ticks() {
            let (px, _) = plot.at((value, 0.0));
            let _ = writeln!(
                out,
                r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{bottom}" stroke="#e4e4e4"/>"##
            );
            let _ = writeln!(
                out,
                r#"<text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"#,
                bottom + 16.0,
                plot.x.text(value)
            );
        }
        for value in plot.y.ticks() {
            let (_, py) = plot.at((0.0, value));
            let _ = writeln!(
                out,
                r##"<line x1="{left}" y1="{py:.1}" x2="{right}" y2="{py:.1}" stroke="#e4e4e4"/>"##
            );
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                py + 4.0,
                plot.y.text(value)
            );
        }
        let _ = writeln!(
            out,
            r#"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="black"/>"#,
            plot.width, plot.height
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            left + plot.width / 2.0,
            bottom + 34.0,
            escape(plot.x.label)
        );
        let (cx, cy) = (left - 52.0, top + plot.height / 2.0);
        let _ = writeln!(
            out,
            r#"<text x="{cx}" y="{cy:.1}" text-anchor="middle" transform="rotate(-90 {cx} {cy:.1})">{}</text>"#,
            escape(plot.y.label)
        );
        plot
    }

    fn line(&mut self, plot: &Plot, points: &[(f64, f64)], colour: &str) {
        if points.len() < 2 {
            return;
        }
        let coordinates: Vec<String> = points
            .iter()
            .map(|&p| {
                let (x, y) = plot.at(p);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = writeln!(
            self.out,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            coordinates.join(" ")
        );
    }

    fn dot(&mut self, plot: &Plot, point: (f64, f64), colour: &str) {
        let (x, y) = plot.at(point);
        let _ = writeln!(
            self.out,
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.5" fill="{colour}"/>"#
        );
    }

    fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }
}

/// Whether `svg` is well-formed XML as far as these pictures go (one root `svg` with width,
/// height and a viewBox; tags balanced; attributes quoted; `&` only in entities) and its legend
/// names every one of `servers`.
pub fn check(svg: &str, servers: &[String]) -> Result<(), String> {
    let mut open: Vec<&str> = Vec::new();
    let mut roots = 0;
    let mut rest = svg;
    loop {
        let (text, after) = match rest.find('<') {
            Some(at) => (&rest[..at], Some(&rest[at + 1..])),
            None => (rest, None),
        };
        check_text(text)?;
        if open.is_empty() && !text.trim().is_empty() {
            return Err(format!("text outside the root: {:?}", text.trim()));
        }
        let Some(after) = after else { break };
        let end = after
            .find('>')
            .ok_or_else(|| "a tag that never ends".to_owned())?;
        let tag = &after[..end];
        rest = &after[end + 1..];
        if tag.contains('<') || tag.matches('"').count() % 2 != 0 {
            return Err(format!("a broken tag: <{tag}>"));
        }
        if let Some(name) = tag.strip_prefix('/') {
            match open.pop() {
                Some(top) if top == name.trim() => {}
                top => return Err(format!("</{name}> closes {top:?}")),
            }
            continue;
        }
        let name = tag
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap_or_default();
        if name.is_empty() {
            return Err(format!("a tag without a name: <{tag}>"));
        }
        check_text(tag)?;
        if open.is_empty() {
            roots += 1;
            if name != "svg" || roots > 1 {
                return Err(format!("root element <{name}> (number {roots})"));
            }
            for attribute in ["width=\"", "height=\"", "viewBox=\"0 0 "] {
                if !tag.contains(attribute) {
                    return Err(format!("the svg element has no {attribute}…\""));
                }
            }
        }
        if !tag.ends_with('/') {
            open.push(name);
        }
    }
    if roots != 1 || !open.is_empty() {
        return Err(format!("{roots} root(s); left open: {open:?}"));
    }
    let legend = svg
        .split_once("<g class=\"legend\">")
        .and_then(|(_, after)| after.split_once("</g>"))
        .map(|(legend, _)| legend)
        .ok_or_else(|| "no legend".to_owned())?;
    for server in servers {
        if !legend.contains(&format!(">{}</text>", escape(server))) {
            return Err(format!("{server} is not in the legend"));
        }
    }
    Ok(())
}

/// Every `&` begins an entity, and no `<` is left bare.
fn check_text(text: &str) -> Result<(), String> {
    for (at, _) in text.match_indices('&') {
        let entity = text[at + 1..].split(';').next().unwrap_or_default();
        let known = matches!(entity, "amp" | "lt" | "gt" | "quot" | "apos")
            || entity
                .strip_prefix('#')
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()));
        if !known || !text[at..].contains(';') {
            return Err(format!("a bare & in {text:?}"));
        }
    }
    Ok(())
}

/// Draws both pictures from made-up runs of four servers, one named to need escaping, and
/// checks them: a picture that stops being well-formed fails the bench in every mode.
pub fn self_check() -> Result<(), String> {
    let servers: Vec<String> = ["nudge", "floor", "nchan-1w", "<odd & \"named\">"]
        .map(str::to_owned)
        .to_vec();
    let scenarios = [Scenario::OneTopicChannelEach, Scenario::OneTopic];
    let ns = [200, 1000];
    let mut park = Vec::new();
    for (s, server) in servers.iter().enumerate() {
        for scenario in scenarios {
            for n in ns {
                let slope = 1000.0 * (s + 1) as f64;
                let percentiles_ms: Vec<f64> = (0..=100)
                    .map(|p| n as f64 / 50.0 * (1.0 + p as f64 / 100.0) * slope / 1000.0)
                    .collect();
                park.push(ParkRun {
                    server: server.clone(),
                    scenario: scenario.name(),
                    n,
                    repeat: 0,
                    base_rss_kb: 10_000,
                    base_pss_kb: 10_000,
                    parked_rss_kb: 10_000 + (n as f64 * slope / 1024.0) as u64,
                    parked_pss_kb: 10_000 + (n as f64 * slope / 1024.0) as u64,
                    kernel_base: KernelMemory::default(),
                    kernel_parked: KernelMemory::default(),
                    cpu_parked_percent: None,
                    cpu_window_seconds: None,
                    park_seconds: 0.1,
                    wake: Some(Wake {
                        answered: n,
                        wrong: 0,
                        p50_ms: percentiles_ms[50],
                        p99_ms: percentiles_ms[99],
                        max_ms: percentiles_ms[100],
                        publish_answered_ms: 1.0,
                        server_cpu_ms: 1.0,
                        client_cpu_ms: 1.0,
                        server_fanout_ms: None,
                        percentiles_ms,
                    }),
                });
            }
        }
    }
    let results = Results {
        servers: &servers,
        scenarios: &scenarios,
        ns: &ns,
        park: &park,
        rate: &[],
    };
    for (name, svg) in [("wake", wake(&results)), ("memory", memory(&results))] {
        check(&svg, &servers).map_err(|e| format!("svg self-check, {name} picture: {e}"))?;
        // One line per server, in every panel.
        let lines = svg.matches("<polyline").count();
        if lines != servers.len() * scenarios.len() {
            return Err(format!(
                "svg self-check, {name} picture: {lines} lines, not {}",
                servers.len() * scenarios.len()
            ));
        }
    }
    // And the check itself notices what it is there for.
    for broken in [
        "<svg width=\"1\" height=\"1\" viewBox=\"0 0 1 1\"><g class=\"legend\"></g><g></svg>",
        "<svg width=\"1\" height=\"1\" viewBox=\"0 0 1 1\"><g class=\"legend\"></g><text>a & b</text></svg>",
        "<svg width=\"1\" height=\"1\"><g class=\"legend\"></g></svg>",
    ] {
        if check(broken, &[]).is_ok() {
            return Err(format!("svg self-check passes a broken SVG: {broken}"));
        }
    }
    Ok(())
}

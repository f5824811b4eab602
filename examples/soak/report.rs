//! The end of a run: what happened, printed for a person, a JSON report when asked, and
//! the verdict (every failure named).

use std::collections::HashMap;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::{Ctx, fmt_ms, mib};

/// What the run measured after the clients left, for the report.
pub(crate) struct Outcome {
    pub seed: u64,
    /// How long the burst took to be registered and polling.
    pub burst_ready: Option<Duration>,
    pub soak_time: Duration,
    /// Every client stopped in time.
    pub left: bool,
    /// Every node's samples, summed.
    pub node_metrics: HashMap<String, f64>,
    pub gauges: [&'static str; 4],
    /// The gauges' last values, when they did not return to 0.
    pub last: Vec<f64>,
    /// How long after the last client left the gauges were all 0.
    pub drained: Option<Duration>,
    pub rss_baseline: u64,
    pub rss_peak: u64,
    pub rss_after: u64,
    pub rss_allowance: u64,
    pub rss_took: Duration,
    pub rss_ok: bool,
    /// The nodes sent SIGTERM at the end, and how the last of them exited.
    pub shut_down: Vec<String>,
    pub exit: Option<ExitStatus>,
    pub ids_logged: usize,
    pub ids: usize,
}

/// Prints the report; true when the run passed.
pub(crate) fn report(ctx: &Ctx, outcome: Outcome) -> bool {
    let o = &outcome;
    // Named in format strings below.
    let (seed, ids_logged, ids) = (o.seed, o.ids_logged, o.ids);
    let (gauges, last) = (o.gauges, &o.last);
    let args = &ctx.args;
    let hot = crate::hot_topics(args.topics);
    // The report.
    let f = &ctx.figures;
    let c = &ctx.ledger.counts;
    let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
    let lost = g(&c.lost);
    let node_polls: f64 = o
        .node_metrics
        .iter()
        .filter(|(k, _)| k.starts_with("nudge_polls_total"))
        .map(|(_, v)| v)
        .sum();
    let percentiles = ctx.ledger.latency_percentiles();
    println!(
        "nudge-soak: {} clients (+{} burst), {} topics ({hot} hot), {:.0}s, ttl {:?}, retry_timeout {:?}, max_retries {}, seed {seed}",
        args.clients,
        args.burst,
        args.topics,
        o.soak_time.as_secs_f64(),
        args.ttl,
        args.retry_timeout,
        args.max_retries
    );
    println!(
        "  polls        {:>9}  (nudge's running processes counted {node_polls}): new_change {}, reconnect {}, max_retries {}, cancelled mid-park {} ({} of them leaving bytes queued or by RST; +{} answered just before), 429 {}, 503 {}",
        g(&f.polls),
        g(&f.new_change),
        g(&f.reconnect),
        g(&f.max_retries),
        g(&f.cancelled),
        g(&f.left_with_bytes_or_reset),
        g(&f.answered_at_cancel),
        g(&f.too_many_polls),
        g(&f.over_capacity)
    );
    println!(
        "  publishes    {:>9}  in {} requests (retried {})",
        g(&f.publishes),
        g(&f.publish_requests),
        g(&f.publish_retries)
    );
    println!(
        "  wakes        {:>9}  (new_change answers received)",
        g(&f.new_change)
    );
    println!(
        "  obligations  {:>9}: woken {}, covered by an earlier fetch {}; excused: cancel {}, retirement race {}, node gone {}; dropped when leaving {}",
        g(&c.obligations),
        g(&c.woken),
        g(&c.covered_early),
        g(&c.excused_cancel),
        g(&c.excused_retire),
        g(&c.excused_node),
        g(&c.dropped_at_leave)
    );
    println!(
        "  spurious     {:>9}  new_change with no publish on the client's topics since its previous one ({} more inside a wake-all's window)",
        g(&c.spurious),
        g(&c.spurious_in_wake_all)
    );
    if args.nodes > 1 {
        println!(
            "  bus tracker  {:>9} times a node was seen to have applied the newest publish",
            g(&c.applied_seen)
        );
    }
    if let Some([p50, p90, p99, p999, max]) = percentiles {
        println!(
            "  latency      p50 {} p90 {} p99 {} p99.9 {} max {}  (publish sent -> new_change received, pauses excluded)",
            fmt_ms(p50),
            fmt_ms(p90),
            fmt_ms(p99),
            fmt_ms(p999),
            fmt_ms(max)
        );
    }
    println!(
        "  churn        registrations {}, leaves {} (old channel expired on return: {}, still there: {})",
        g(&f.registrations),
        g(&f.leaves),
        g(&f.expired_on_time),
        g(&f.expiry_late)
    );
    if args.burst > 0 {
        match o.burst_ready {
            Some(d) => println!(
                "  burst        {} clients registered and polling within {:.2}s",
                args.burst,
                d.as_secs_f64()
            ),
            None => println!(
                "  burst        {} clients: not all polling by the end",
                args.burst
            ),
        }
    }
    match o.drained {
        Some(d) => println!(
            "  leak check   channels, parked polls, topics, connections all 0 {:.1}s after the last client left",
            d.as_secs_f64()
        ),
        None => println!(
            "  leak check   FAILED: {gauges:?} = {last:?} after {:?}",
            args.ttl * 2 + Duration::from_secs(5)
        ),
    }
    println!(
        "  memory       rss baseline {:.1} MiB, peak {:.1} MiB, {:.1} MiB {:.0}s after the leak check (allowed {:.1} MiB)",
        mib(o.rss_baseline),
        mib(o.rss_peak),
        mib(o.rss_after),
        o.rss_took.as_secs_f64(),
        mib(o.rss_baseline + o.rss_allowance)
    );
    println!("  ids in log   {ids_logged} of {ids} channel ids");
    println!(
        "  shutdown     SIGTERM to {}: {}",
        o.shut_down.join(", "),
        o.exit.map_or("did not exit".to_owned(), |s| s.to_string())
    );
    for note in ctx.drill_notes.lock().iter() {
        println!("  drill        {note}");
    }
    if args.drills {
        println!(
            "  drills       {} obligations published around the bus gap (due 2 s after the nodes' 2 s gap spread), slowest {:.2}s; {} clients moved off the drained node; {} polls cut or refused by the crashed node (retried on their URL)",
            g(&c.gap_obligations),
            ctx.ledger.gap_latency_max().as_secs_f64(),
            g(&f.moved),
            g(&f.cut_by_crash)
        );
    }
    if g(&f.transport_errors) + g(&f.protocol_errors) > 0 {
        println!(
            "  errors       transport {}, protocol {}",
            g(&f.transport_errors),
            g(&f.protocol_errors)
        );
        for s in ctx.protocol_samples.lock().iter() {
            println!("    {s}");
        }
    }
    for s in ctx.ledger.lost_samples() {
        println!("    LOST {s}");
    }
    if lost > 0 {
        println!(
            "  of the lost  {} arrived late (the latest {:.2}s after the publish), {} never did",
            g(&c.late),
            ctx.ledger.late_max().as_secs_f64(),
            g(&c.never)
        );
    }
    let phases = ctx.ledger.phase_counts();
    if phases.len() > 1 {
        println!(
            "  by phase     (publishes by when they were sent, spurious answers by when they came; overlapping drills are joined by +)"
        );
        println!(
            "    {:<22} {:>11} {:>6} {:>9} {:>8}",
            "phase", "obligations", "lost", "spurious", "excused"
        );
        for p in &phases {
            println!(
                "    {:<22} {:>11} {:>6} {:>9} {:>8}",
                p.name, p.obligations, p.lost, p.spurious, p.excused
            );
        }
    }
    let (spurious, spurious_wake_all, excused) = (
        g(&c.spurious),
        g(&c.spurious_in_wake_all),
        g(&c.excused_gap),
    );
    // `excused`: kept from being lost only by the reset drill's window (checker.rs,
    // `Counts::excused_gap`): what the checker would count lost without that allowance.
    println!(
        "lost: {lost}  spurious: {spurious} (+{spurious_wake_all} in a wake-all's window)  excused: {excused} (by the reset window alone)"
    );

    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!("{lost} changes lost"));
    }
    if !o.left {
        failures.push("clients did not stop".to_owned());
    }
    if o.drained.is_none() {
        failures.push("gauges did not return to 0".to_owned());
    }
    if !o.rss_ok {
        failures.push("resident memory did not return near its baseline".to_owned());
    }
    if ids_logged > 0 {
        failures.push("channel ids in nudge's log".to_owned());
    }
    if !o.exit.is_some_and(|s| s.success()) {
        failures.push("nudge did not exit 0 on SIGTERM".to_owned());
    }
    if g(&f.protocol_errors) > 0 || g(&f.transport_errors) > 0 {
        failures.push("transport or protocol errors".to_owned());
    }
    if g(&f.expiry_late) > 0 {
        failures.push("channels outlived their ttl".to_owned());
    }
    if g(&f.polls) == 0 || g(&f.publishes) == 0 || g(&c.woken) == 0 {
        failures.push("nothing happened".to_owned());
    }
    failures.extend(ctx.drill_failures.lock().iter().cloned());
    if let Some(path) = &args.report {
        let report = json!({
            "clients": args.clients, "burst": args.burst, "topics": args.topics,
            "seconds": o.soak_time.as_secs_f64(), "seed": seed,
            "polls": g(&f.polls), "node_polls": node_polls, "publishes": g(&f.publishes),
            "wakes": g(&f.new_change), "obligations": g(&c.obligations), "woken": g(&c.woken),
            "lost": lost,
            "spurious": spurious, "spurious_in_wake_all": spurious_wake_all,
            "excused_gap": excused,
            "phases": phases.iter().map(|p| json!({
                "phase": p.name, "obligations": p.obligations, "lost": p.lost,
                "spurious": p.spurious, "excused": p.excused,
            })).collect::<Vec<_>>(),
            "latency_ms": percentiles.map(|p| p.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>()),
            "rss_mib": [mib(o.rss_baseline), mib(o.rss_peak), mib(o.rss_after)],
            "failures": failures,
        });
        let _ = std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        );
    }
    if failures.is_empty() {
        println!("verdict: ok");
        true
    } else {
        println!("verdict: FAILED: {}", failures.join("; "));
        false
    }
}

//! The fault drills (`--drills`): the bus interrupted three ways under the nodes; a node
//! drained with SIGTERM and started again while the main API sends its clients elsewhere; a
//! node upgraded in place (SIGUSR2) under its clients; and a node killed (SIGKILL) and
//! started again on its addresses with its state directory, its clients polling on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nudge_testkit::redis::RedisServer;
use tokio::time::{Instant, sleep};

use crate::node::Node;
use crate::{Ctx, NodeAddrs, NodeSlot};

const REPLAYED: &str = r#"nudge_bus_gaps_total{cause="reconnect",repair="replayed"}"#;
const RESET: &str = r#"nudge_bus_gaps_total{cause="reset",repair="woke_all"}"#;

/// The bus drills, one after the other:
/// 1. every node's Redis connections killed (`CLIENT KILL TYPE normal`): each reader
///    reconnects and replays; the checker excuses nothing;
/// 2. Redis paused (SIGSTOP) for 6 s, longer than a reader waits for a reply: each node
///    turns not ready, then replays once Redis runs again; the checker excuses nothing;
/// 3. Redis killed (SIGKILL) and restarted empty: the stream is gone, each node wakes all;
///    obligations published around it get the wake-all's window (`Ledger::bus_gap_*`).
///
/// The main API takes no node as ready until its bus is back (`nudge_bus_connected` 1).
pub(crate) async fn bus_drills(ctx: Arc<Ctx>, mut redis: RedisServer) -> Option<RedisServer> {
    let started = Instant::now();
    let before = gap_counts(&ctx, REPLAYED).await;
    ctx.ledger.phase_begin("kill");
    match redis_cmd(redis.port(), &["CLIENT", "KILL", "TYPE", "normal"]).await {
        Ok(_) => {}
        Err(e) => ctx.drill_failures.lock().push(format!("kill drill: {e}")),
    }
    let killed = wait_gaps(&ctx, REPLAYED, &before, "kill drill").await;
    ctx.ledger.phase_end("kill", Instant::now());
    ctx.drill_notes.lock().push(format!(
        "Redis connections killed: every node replayed (no wake-all) within {killed:.2}s"
    ));

    let before = gap_counts(&ctx, REPLAYED).await;
    let paused = Instant::now();
    ctx.ledger.phase_begin("pause");
    if !redis.signal("STOP") {
        ctx.drill_failures
            .lock()
            .push("pause drill: SIGSTOP failed".to_owned());
    }
    sleep(Duration::from_secs(6)).await;
    redis.signal("CONT");
    let replayed = wait_gaps(&ctx, REPLAYED, &before, "pause drill").await;
    ctx.ledger.phase_end("pause", Instant::now());
    ctx.drill_notes.lock().push(format!(
        "Redis paused 6 s: every node replayed (no wake-all) {:.2}s after the pause began",
        replayed + 6.0f64.min(paused.elapsed().as_secs_f64())
    ));

    let before = gap_counts(&ctx, RESET).await;
    ctx.ledger.bus_gap_begin();
    for n in ctx.nodes.write().iter_mut() {
        n.bus_ok = false;
    }
    let killed = Instant::now();
    redis.kill();
    sleep(Duration::from_secs(1)).await;
    match redis.launch().await {
        Ok(true) => {}
        Ok(false) => {
            let e = format!("port {} was taken", redis.port());
            ctx.drill_failures.lock().push(format!("reset drill: {e}"));
            return None;
        }
        Err(e) => {
            ctx.drill_failures.lock().push(format!("reset drill: {e}"));
            return None;
        }
    }
    let restarted = killed.elapsed();
    let back = wait_gaps(&ctx, RESET, &before, "reset drill").await;
    for n in ctx.nodes.write().iter_mut() {
        n.bus_ok = true;
    }
    ctx.ledger.bus_gap_end();
    ctx.drill_notes.lock().push(format!(
        "Redis killed and restarted empty after {:.2}s: every node detected the reset and woke all \
         within {back:.2}s; the three bus drills took {:.1}s",
        restarted.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    Some(redis)
}

/// A gap counter of every up node, by internal address.
async fn gap_counts(ctx: &Ctx, metric: &str) -> Vec<(NodeAddrs, f64)> {
    let nodes: Vec<NodeAddrs> = ctx
        .nodes
        .read()
        .iter()
        .filter(|n| n.up)
        .map(|n| n.addrs)
        .collect();
    let mut out = Vec::new();
    for a in nodes {
        out.push((a, node_metric(ctx, a, metric).await.unwrap_or(0.0)));
    }
    out
}

/// Waits until every node in `before` counted one more `metric` and is connected again;
/// returns the seconds it took, or records a failure after 30 s.
async fn wait_gaps(ctx: &Ctx, metric: &str, before: &[(NodeAddrs, f64)], drill: &str) -> f64 {
    let started = Instant::now();
    let until = started + Duration::from_secs(30);
    loop {
        let mut all = true;
        for (a, n) in before {
            let counted = node_metric(ctx, *a, metric).await.is_some_and(|m| m > *n);
            let connected = node_metric(ctx, *a, "nudge_bus_connected")
                .await
                .is_some_and(|m| m == 1.0);
            all &= counted && connected;
        }
        if all {
            return started.elapsed().as_secs_f64();
        }
        if Instant::now() > until {
            ctx.drill_failures.lock().push(format!(
                "{drill}: a node did not count {metric} and reconnect within 30 s"
            ));
            return started.elapsed().as_secs_f64();
        }
        sleep(Duration::from_millis(20)).await;
    }
}

async fn node_metric(ctx: &Ctx, a: NodeAddrs, name: &str) -> Option<f64> {
    let text = ctx
        .http
        .get(format!("http://{}/metrics", a.internal))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// One command to Redis, in its inline form, on a connection of its own.
async fn redis_cmd(port: u16, args: &[&str]) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    conn.write_all(format!("{}\r\n", args.join(" ")).as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .map_err(|_| "no answer".to_owned())?
        .map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    if answer.starts_with('-') {
        return Err(answer.trim().to_owned());
    }
    Ok(answer)
}

/// Node `index` is drained with SIGTERM while the main API sends its clients elsewhere, then
/// started again (new process, new ports) and taken back into rotation.
pub(crate) async fn drain_drill(
    ctx: Arc<Ctx>,
    mut node: Node,
    index: usize,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
) -> Node {
    let old_epoch = {
        let mut nodes = ctx.nodes.write();
        nodes[index].up = false;
        nodes[index].addrs.epoch
    };
    let started = Instant::now();
    ctx.ledger.phase_begin("drain");
    node.sigterm();
    let exit = node.wait_exit(Duration::from_secs(20)).await;
    let drained = started.elapsed();
    if !exit.is_some_and(|s| s.success()) {
        ctx.drill_failures
            .lock()
            .push(format!("drain drill: {} exited {exit:?}", node.name));
    }
    let name = format!("{}-restarted", node.name);
    let restarted = Node::start(&name, &bin, &args, log, &ctx.http).await;
    ctx.ledger.phase_end("drain", Instant::now());
    match restarted {
        Ok(new) => {
            ctx.nodes.write()[index] = NodeSlot {
                addrs: NodeAddrs {
                    public: new.public,
                    internal: new.internal,
                    index,
                    epoch: old_epoch + 1,
                },
                up: true,
                bus_ok: true,
                crash_cut_until: None,
            };
            ctx.drill_notes.lock().push(format!(
                "{} drained and exited 0 in {:.2}s; restarted and ready {:.2}s after the SIGTERM",
                node.name,
                drained.as_secs_f64(),
                started.elapsed().as_secs_f64()
            ));
            new
        }
        Err(e) => {
            ctx.drill_failures.lock().push(format!("drain drill: {e}"));
            node
        }
    }
}

/// The node upgrades in place (`SIGUSR2`; it was started with `--pid-file pid_file`) while
/// its clients poll on: the old process must exit 0, the pid file must name the new one, and
/// the checker excuses nothing (the node never stops being up for the main API).
pub(crate) async fn upgrade_drill(ctx: &Ctx, node: &mut Node, pid_file: &Path) {
    let started = Instant::now();
    ctx.ledger.phase_begin("upgrade");
    let old = node.pid();
    if !node.signal("USR2") {
        ctx.drill_failures
            .lock()
            .push("upgrade drill: SIGUSR2 failed".to_owned());
    }
    let exit = node.wait_exit(Duration::from_secs(20)).await;
    let exited = started.elapsed();
    if !exit.is_some_and(|s| s.success()) {
        ctx.drill_failures
            .lock()
            .push(format!("upgrade drill: the old process exited {exit:?}"));
    }
    let until = Instant::now() + Duration::from_secs(10);
    let new = loop {
        let pid = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        match pid {
            Some(pid) if pid != old => break Some(pid),
            _ if Instant::now() > until => break None,
            _ => sleep(Duration::from_millis(10)).await,
        }
    };
    ctx.ledger.phase_end("upgrade", Instant::now());
    let Some(new) = new else {
        ctx.drill_failures
            .lock()
            .push("upgrade drill: the pid file did not name a new process".to_owned());
        return;
    };
    node.follow(new);
    let moved = node.log_field("connections handed over moved=");
    ctx.drill_notes.lock().push(format!(
        "{} upgraded in place (SIGUSR2): {moved} connections moved to the new process, the old \
         one exited 0 {:.2}s after the signal; its clients kept their connections",
        node.name,
        exited.as_secs_f64()
    ));
}

/// The node is killed (SIGKILL: no drain, every connection cut) and started again at once on
/// the same addresses with the same arguments, its `--state-dir` among them, as systemd's
/// `Restart=` does. Its clients keep their URLs and poll on (a refused connection is retried
/// after 50 ms and counted apart); the restored node knows their channels and replays the bus
/// from its snapshot's position. The checker excuses nothing.
///
/// Channels registered after the last snapshot are unknown after a crash (a documented
/// limit), so the drill takes the node out of the main API's rotation first and kills it
/// once a snapshot holds every channel it acknowledged: what it tests is the restore.
pub(crate) async fn crash_drill(
    ctx: Arc<Ctx>,
    mut node: Node,
    index: usize,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
) -> Node {
    let started = Instant::now();
    ctx.ledger.phase_begin("crash");
    ctx.nodes.write()[index].bus_ok = false;
    let a = ctx.nodes.read()[index].addrs;
    let written = node_metric(&ctx, a, "nudge_state_snapshots_total")
        .await
        .unwrap_or(0.0);
    let until = Instant::now() + Duration::from_secs(10);
    // Two snapshots after the node left the rotation: the last registration answered
    // before it is in the second.
    while node_metric(&ctx, a, "nudge_state_snapshots_total")
        .await
        .unwrap_or(0.0)
        < written + 2.0
    {
        if Instant::now() > until {
            ctx.drill_failures
                .lock()
                .push("crash drill: no snapshot written within 10 s".to_owned());
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    ctx.nodes.write()[index].crash_cut_until = Some(None);
    let killed = Instant::now();
    node.kill();
    let name = format!("{}-after-crash", node.name);
    let restarted = Node::restart(&node, &name, &bin, &args, log, &ctx.http).await;
    let back = killed.elapsed();
    {
        let mut nodes = ctx.nodes.write();
        // A client paused between polls finds its connection broken when it polls again.
        nodes[index].crash_cut_until = Some(Some(Instant::now() + ctx.args.pause_max * 2));
        nodes[index].bus_ok = true;
    }
    ctx.ledger.phase_end("crash", Instant::now());
    match restarted {
        Ok(new) => {
            let restored = new.log_field("state restored channels=");
            if restored == "?" || restored == "0" {
                ctx.drill_failures
                    .lock()
                    .push(format!("crash drill: {name} restored {restored} channels"));
            }
            ctx.drill_notes.lock().push(format!(
                "{} killed (SIGKILL) {:.2}s after it left the rotation; started again on its \
                 addresses and ready {:.2}s after the kill, {restored} channels restored",
                node.name,
                killed.duration_since(started).as_secs_f64(),
                back.as_secs_f64()
            ));
            new
        }
        Err(e) => {
            ctx.drill_failures.lock().push(format!("crash drill: {e}"));
            node
        }
    }
}

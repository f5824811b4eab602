//! The fault drills (`--drills`): the bus interrupted three ways under the nodes, and a node
//! drained with SIGTERM and started again while the main API sends its clients elsewhere.

use std::path::PathBuf;
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
    match redis_cmd(redis.port(), &["CLIENT", "KILL", "TYPE", "normal"]).await {
        Ok(_) => {}
        Err(e) => ctx.drill_failures.lock().push(format!("kill drill: {e}")),
    }
    let killed = wait_gaps(&ctx, REPLAYED, &before, "kill drill").await;
    ctx.drill_notes.lock().push(format!(
        "Redis connections killed: every node replayed (no wake-all) within {killed:.2}s"
    ));

    let before = gap_counts(&ctx, REPLAYED).await;
    let paused = Instant::now();
    if !redis.signal("STOP") {
        ctx.drill_failures
            .lock()
            .push("pause drill: SIGSTOP failed".to_owned());
    }
    sleep(Duration::from_secs(6)).await;
    redis.signal("CONT");
    let replayed = wait_gaps(&ctx, REPLAYED, &before, "pause drill").await;
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
    node.sigterm();
    let exit = node.wait_exit(Duration::from_secs(20)).await;
    let drained = started.elapsed();
    if !exit.is_some_and(|s| s.success()) {
        ctx.drill_failures
            .lock()
            .push(format!("drain drill: {} exited {exit:?}", node.name));
    }
    let name = format!("{}-restarted", node.name);
    match Node::start(&name, &bin, &args, log, &ctx.http).await {
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

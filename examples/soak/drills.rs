//! The fault drills (`--drills`): Redis killed and restarted under the nodes, and a node
//! drained with SIGTERM and started again while the main API sends its clients elsewhere.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nudge_testkit::redis::RedisServer;
use tokio::time::{Instant, sleep};

use crate::node::Node;
use crate::{Ctx, NodeAddrs, NodeSlot};

/// Redis killed (SIGKILL) and restarted on the same port a second later. The main API takes
/// no node as ready until its bus is back (`nudge_bus_connected` 1).
pub(crate) async fn redis_drill(ctx: Arc<Ctx>, mut redis: RedisServer) -> Option<RedisServer> {
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
            ctx.drill_failures.lock().push(format!("redis drill: {e}"));
            return None;
        }
        Err(e) => {
            ctx.drill_failures.lock().push(format!("redis drill: {e}"));
            return None;
        }
    }
    let restarted = killed.elapsed();
    let until = Instant::now() + Duration::from_secs(30);
    let mut back = Vec::new();
    loop {
        let addrs: Vec<(usize, NodeAddrs, bool)> = ctx
            .nodes
            .read()
            .iter()
            .enumerate()
            .map(|(i, n)| (i, n.addrs, n.bus_ok))
            .collect();
        let mut all = true;
        for (i, a, ok) in addrs {
            if ok {
                continue;
            }
            let url = format!("http://{}/metrics", a.internal);
            let connected = match ctx.http.get(url).send().await {
                Ok(r) => r
                    .text()
                    .await
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l == "nudge_bus_connected 1"),
                Err(_) => false,
            };
            if connected {
                ctx.nodes.write()[i].bus_ok = true;
                back.push(format!("node {i} {:.2}s", killed.elapsed().as_secs_f64()));
            } else {
                all = false;
            }
        }
        if all {
            break;
        }
        if Instant::now() > until {
            ctx.drill_failures
                .lock()
                .push("redis drill: a node did not resubscribe within 30 s".to_owned());
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    ctx.ledger.bus_gap_end();
    ctx.drill_notes.lock().push(format!(
        "redis killed and restarted after {:.2}s; resubscribed: {}",
        restarted.as_secs_f64(),
        back.join(", ")
    ));
    Some(redis)
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

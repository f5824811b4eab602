//! The main API's side of publishing: the publisher (log first, then nudge) and, with a
//! bus, the tracker that asks every node which positions it has applied.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::{Instant, sleep};

use crate::checker::Published;
use crate::{Ctx, NodeAddrs, hot_topics, inc, topic_name};

/// The main API's publisher: appends to its log, then publishes to nudge.
pub(crate) async fn publisher(ctx: Arc<Ctx>, mut rng: fastrand::Rng) {
    let a = &ctx.args;
    let hot = hot_topics(a.topics);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.publish_rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !ctx.stop_publisher.load(Ordering::Acquire) {
        tick.tick().await;
        n += 1;
        let entries = if rng.f64() < 0.8 { 1 } else { rng.usize(2..=4) };
        let mut batch = Vec::with_capacity(entries);
        for _ in 0..entries {
            let topic = if rng.bool() || hot == a.topics {
                rng.usize(0..hot)
            } else {
                rng.usize(hot..a.topics)
            } as u32;
            let stream_type = match rng.u8(0..10) {
                0..5 => None,
                5..8 => Some("changes"),
                _ => Some("admin_logs"),
            };
            let position = ctx.head.fetch_add(1, Ordering::AcqRel) + 1;
            batch.push((topic, position, stream_type));
        }
        let object = |&(t, p, st): &(u32, u64, Option<&str>)| {
            let mut o = json!({ "topic": topic_name(t), "position": p });
            if let Some(st) = st {
                o["stream_type"] = json!(st);
            }
            o
        };
        let (content_type, body) = if entries == 1 {
            ("application/json", object(&batch[0]).to_string())
        } else if n.is_multiple_of(2) {
            (
                "application/json",
                Value::Array(batch.iter().map(object).collect()).to_string(),
            )
        } else {
            (
                "application/x-ndjson",
                batch
                    .iter()
                    .map(|e| object(e).to_string() + "\n")
                    .collect::<String>(),
            )
        };
        for attempt in 0..400 {
            let Some(node) = ctx.pick_node(n as usize + attempt) else {
                inc(&ctx.figures.publish_retries);
                sleep(Duration::from_millis(50)).await;
                continue;
            };
            let sent = Instant::now();
            ctx.ledger.sending(batch.iter().map(|&(topic, _, _)| topic));
            let res = ctx
                .http
                .post(format!("http://{}/v1/publish", node.internal))
                .header("content-type", content_type)
                .body(body.clone())
                .send()
                .await;
            match res {
                Ok(r) if r.status() == reqwest::StatusCode::OK => {
                    let answered = Instant::now();
                    inc(&ctx.figures.publish_requests);
                    for &(topic, position, stream_type) in &batch {
                        ctx.published.fetch_max(position, Ordering::AcqRel);
                        inc(&ctx.figures.publishes);
                        ctx.ledger.published(&Published {
                            topic,
                            position,
                            stream_type,
                            sent,
                            answered,
                        });
                    }
                    break;
                }
                Ok(r) if r.status().is_client_error() => {
                    ctx.protocol_error(format!("publish answered {}", r.status()));
                    break;
                }
                _ => {
                    inc(&ctx.figures.publish_retries);
                    sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// With a bus, finds out when each node has applied the publishes answered so far, for the
/// checker's `max_retries` rule. The publisher is sequential and its positions grow, so Redis
/// hands every node the publishes in position order: a node that has applied position p has
/// applied every publish before it. To ask, the tracker holds probe channels on every node,
/// bound to all the topics between them, and polls them with `dont_block=true` and
/// `stream_position=p-1`: `new_change` means a topic's newest position there is at least p
/// (SPEC §3). The one other way to get `new_change`, the unpositioned mark a gap in the bus
/// sets on every channel, is cleared by the tracker's next poll; answers to polls sent
/// around the gap are not used.
pub(crate) async fn tracker(ctx: Arc<Ctx>) {
    // Per node process: its probe channels' targets, and the newest position confirmed.
    let mut probes: std::collections::HashMap<SocketAddr, (Vec<String>, u64)> =
        std::collections::HashMap::new();
    let topics: Vec<String> = (0..ctx.args.topics as u32).map(topic_name).collect();
    // A client of its own: its pooled connections to the public listeners close with it
    // when the tracker is stopped, so that the leak check does not wait for them.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let published = ctx.published.load(Ordering::Acquire);
        let nodes: Vec<NodeAddrs> = ctx
            .nodes
            .read()
            .iter()
            .filter(|n| n.up && n.bus_ok)
            .map(|n| n.addrs)
            .collect();
        for node in nodes {
            let (targets, confirmed) = probes.entry(node.internal).or_default();
            if published <= *confirmed {
                continue;
            }
            if targets.is_empty() {
                match register_probes(&ctx, &http, node, &topics).await {
                    Ok(t) => *targets = t,
                    Err(_) => continue,
                }
            }
            let sent = Instant::now();
            let (mut seen, mut lost) = (false, false);
            for target in targets.iter() {
                let url = format!(
                    "http://{}{target}&dont_block=true&stream_position={}",
                    node.public,
                    published - 1
                );
                let answer = match http.get(url).send().await {
                    Ok(r) => r.json::<Value>().await.ok(),
                    Err(_) => None,
                };
                match answer.as_ref().and_then(|a| a["message"].as_str()) {
                    Some("new_change") => seen = true,
                    Some("no_change") => {}
                    // Expired or gone (a drill): new probes next time.
                    _ => lost = true,
                }
            }
            if lost {
                targets.clear();
            }
            if seen && !ctx.ledger.in_bus_gap(sent) {
                *confirmed = published;
                ctx.ledger.applied(node.internal, published, Instant::now());
            }
        }
    }
}

/// Registers the tracker's probe channels on a node: every topic, at most 64 per channel.
async fn register_probes(
    ctx: &Ctx,
    http: &reqwest::Client,
    node: NodeAddrs,
    topics: &[String],
) -> Result<Vec<String>, String> {
    let mut targets = Vec::new();
    for chunk in topics.chunks(64) {
        let res = http
            .post(format!("http://{}/v1/channels", node.internal))
            .json(&json!({ "topics": chunk, "subject": "soak:tracker" }))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = res.json().await.map_err(|e| e.to_string())?;
        targets.push(ctx.registered_channel(&body)?.1);
    }
    Ok(targets)
}

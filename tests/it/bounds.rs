//! Bounds on what untrusted clients can take from a node (issue 11).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestServer, eventually};

/// Keep-alive clients re-polling made-up ids take at most 1/8 of `--max-parked` as held
/// polls (the rest are answered `max_retries` at once), so polls of real channels still park.
#[tokio::test]
async fn made_up_ids_cannot_take_the_room_of_real_channels() {
    let s = TestServer::with(|c| c.max_parked = Some(16)).await;
    let mut urls = Vec::new();
    for _ in 0..3 {
        urls.push(s.register_topic("t").await.url);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    for i in 0..40 {
        let url = s.public_url(&format!("/subscribe?channel=not-an-id-{}", i % 3));
        let stop = stop.clone();
        attackers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let res = http.get(&url).send().await.unwrap();
                let held = res.status() == StatusCode::OK
                    && res.json::<Value>().await.unwrap()["message"] == "reconnect";
                if !held {
                    // An attacker that ignores `max_retries`; paced so the test stays light.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    let hub = s.hub.clone();
    eventually("made-up ids are being held", Duration::from_secs(5), || {
        let hub = hub.clone();
        async move { hub.counts().held >= 2 }
    })
    .await;
    // 9 legitimate polls (3 per channel, under `--max-polls-per-channel`): 2 + 9 < 16.
    let polls: Vec<_> = urls
        .iter()
        .cycle()
        .take(9)
        .map(|u| s.spawn_poll(u))
        .collect();
    s.wait_parked(9).await;
    assert!(s.hub.counts().held <= 2, "held polls stay within 1/8");
    s.publish(json!({"topic": "t"})).await;
    for p in polls {
        // `spawn_poll` also asserts 200: none was refused `503 over_capacity`.
        assert_eq!(p.await.unwrap(), "new_change");
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.await.unwrap();
    }
}

/// Held polls are capped per id like parked polls per channel: eight clients re-polling one
/// made-up id get four places; the other four are answered `max_retries` at once, before
/// any held poll could end (holds last at least 1 s).
#[tokio::test]
async fn one_made_up_id_holds_at_most_max_polls_per_channel() {
    let s = TestServer::start().await;
    let url = s.public_url("/subscribe?channel=not-an-id");
    assert_eq!(
        s.message(&url, "").await,
        "max_retries",
        "first poll of a dead id"
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..8 {
        let (http, url, tx) = (s.http.clone(), url.clone(), tx.clone());
        tokio::spawn(async move {
            let res = http.get(&url).send().await.unwrap();
            let body: Value = res.json().await.unwrap();
            let _ = tx.send(body["message"].as_str().unwrap().to_owned());
        });
    }
    let mut answers = Vec::new();
    while answers.len() < 8 {
        let next = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        answers.push(next.expect("every poll is answered").unwrap());
    }
    assert_eq!(
        answers,
        [
            "max_retries",
            "max_retries",
            "max_retries",
            "max_retries",
            "reconnect",
            "reconnect",
            "reconnect",
            "reconnect"
        ],
        "four held, four turned away at once"
    );
    assert_eq!(s.hub.counts().held, 0);
    s.stop().await;
}

//! Both paths answer every request alike, by generation (issue 11.5): `cargo test` sends a
//! bounded number of request heads built from the grammar in `fuzz/both_paths.rs` to a node
//! with the fast path and to one without, and compares answers and channel state. The fuzz
//! target `both_paths` explores the same grammar for as long as it is given
//! (`bash scripts/fuzz.sh 300 both_paths`).
//!
//! `NUDGE_GRAMMAR_CASES` (default 200) and `NUDGE_GRAMMAR_SEED` (default fixed, so CI is
//! repeatable; `random` for a new one, printed on failure) steer it.

#[allow(dead_code)]
#[path = "../../fuzz/both_paths.rs"]
mod both_paths;

use both_paths::{Draw, Nodes, generate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_requests_get_the_same_answers_on_both_paths() {
    let cases: usize = std::env::var("NUDGE_GRAMMAR_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed = match std::env::var("NUDGE_GRAMMAR_SEED").ok().as_deref() {
        None => 0x006e_7564_6765,
        Some("random") => fastrand::u64(..),
        Some(s) => s.parse().expect("NUDGE_GRAMMAR_SEED is a number or random"),
    };
    let mut rng = fastrand::Rng::with_seed(seed);
    let nodes = Nodes::start().await;
    for case_no in 0..cases {
        let input: Vec<u8> = (0..256).map(|_| rng.u8(..)).collect();
        let case = generate(&mut Draw::new(&input), case_no);
        if let Err(diff) = nodes.compare(&case, case_no).await {
            panic!("case {case_no} of seed {seed}: {diff}");
        }
    }
    // The grammar does reach the fast path, not only hyper's refusals: about one generated
    // request in three is a poll the fast path serves.
    let served = nodes
        .fast
        .hub
        .metrics()
        .public_requests_total
        .with_label_values(&["fast"])
        .get();
    assert!(
        served as usize >= cases / 4,
        "the fast path served only {served} requests"
    );
}

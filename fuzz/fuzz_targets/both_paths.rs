//! Both paths of the public listener answer alike: request heads from a grammar, driven by
//! libFuzzer's input, sent to a fast-path node and a hyper-only node (see ../both_paths.rs).
#![no_main]

#[path = "../both_paths.rs"]
mod both_paths;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use both_paths::{Draw, Nodes, generate};

/// The runtime and the two nodes, started once for the whole run.
fn nodes() -> &'static (tokio::runtime::Runtime, Nodes) {
    static NODES: OnceLock<(tokio::runtime::Runtime, Nodes)> = OnceLock::new();
    NODES.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let nodes = rt.block_on(Nodes::start());
        (rt, nodes)
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    static CASE: AtomicUsize = AtomicUsize::new(0);
    let (rt, nodes) = nodes();
    let case_no = CASE.fetch_add(1, Ordering::Relaxed);
    let case = generate(&mut Draw::new(data), case_no);
    if let Err(diff) = rt.block_on(nodes.compare(&case, case_no)) {
        panic!("{diff}");
    }
});

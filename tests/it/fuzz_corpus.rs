//! Replays the committed fuzz inputs — the seeds in `fuzz/corpus/<target>/` and every input
//! that once broke a property in `fuzz/regressions/<target>/` — through the fuzz targets'
//! own checks (`fuzz/checks.rs`), so they stay fixed without cargo-fuzz or a nightly
//! compiler in the test command. `scripts/fuzz.sh` does the fuzzing itself.

use std::path::Path;

#[allow(dead_code)]
#[path = "../../fuzz/checks.rs"]
mod checks;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(outcome.is_ok(), "{} breaks {target}", path.display());
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no committed inputs for {target}");
}

#[test]
fn subscribe_query_inputs() {
    replay("subscribe_query", checks::subscribe_query);
}

#[test]
fn publish_body_inputs() {
    replay("publish_body", checks::publish_body);
}

#[test]
fn register_body_inputs() {
    replay("register_body", checks::register_body);
}

#[test]
fn fast_classify_inputs() {
    replay("fast_classify", checks::fast_classify);
}

//! The kit's Sentinel set on its own, before any nudge test leans on it: what was written to
//! the primary and replicated is on the primary the sentinels promote after a SIGKILL.

use std::time::Duration;

use nudge_testkit::sentinel::{Sentinels, query};

#[tokio::test]
async fn a_killed_primary_is_replaced_and_the_new_one_holds_what_was_replicated() {
    let mut set = Sentinels::start("testkit-failover")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addrs = set.sentinel_addrs();
    assert_eq!(addrs.split(',').count(), 3, "{addrs}");

    let old = set.primary_port().await.unwrap_or_else(|e| panic!("{e}"));
    let ok: String = query(old, &["SET", "kit:key", "before-failover"])
        .await
        .unwrap_or_else(|e| panic!("SET on the primary: {e}"));
    assert_eq!(ok, "OK");
    set.wait_in_sync(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    set.kill(old);
    let new = set
        .wait_failover(old, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(new, old);

    // The new primary holds the key and takes writes.
    let value: Option<String> = query(new, &["GET", "kit:key"])
        .await
        .unwrap_or_else(|e| panic!("GET on the new primary: {e}"));
    assert_eq!(value.as_deref(), Some("before-failover"));
    let ok: String = query(new, &["SET", "kit:key", "after-failover"])
        .await
        .unwrap_or_else(|e| panic!("SET on the new primary: {e}"));
    assert_eq!(ok, "OK");
}

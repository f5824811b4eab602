//! HTTP/1.1 by hand over any byte stream (plain TCP or TLS): the test kit's client
//! (`testkit/src/raw.rs`), under the names the tests have always used.

pub use nudge_testkit::raw::{Response, closed_within, exchange, get, poll_now, read_response};

//! Bytes behind a parked poll (issue 11.1): whatever a client sends after the request it
//! parked — a pipelined request, a stray `\r\n`, one byte, the missing part of an announced
//! body — the node must still see it leave (FIN or RST), free the poll at once, and keep a
//! change published then for the client's next poll. On both paths.

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::raw;
use crate::support::TestServer;

/// What the client sends behind its parked poll.
#[derive(Clone, Copy, Debug)]
enum Trailer {
    /// A second poll, pipelined.
    Pipelined,
    /// A stray empty line (RFC 9112 §2.2 lets a server skip it).
    Crlf,
    /// One byte of something.
    OneByte,
    /// The parked request announced `Content-Length: 2` and sent one byte.
    PartialBody,
}

const TRAILERS: [Trailer; 4] = [
    Trailer::Pipelined,
    Trailer::Crlf,
    Trailer::OneByte,
    Trailer::PartialBody,
];

/// How the client leaves.
#[derive(Clone, Copy, Debug)]
enum Leave {
    Fin,
    Rst,
}

/// Parks a poll of `path` on a new connection, then sends `trailer` behind it.
async fn park_with_trailer(s: &TestServer, path: &str, trailer: Trailer) -> TcpStream {
    let mut conn = TcpStream::connect(s.public).await.unwrap();
    let head = match trailer {
        Trailer::PartialBody => raw::get(path, "Content-Length: 2\r\n") + "a",
        _ => raw::get(path, ""),
    };
    conn.write_all(head.as_bytes()).await.unwrap();
    s.wait_parked(1).await;
    let behind = match trailer {
        Trailer::Pipelined => raw::get(path, ""),
        Trailer::Crlf => "\r\n".into(),
        Trailer::OneByte => "x".into(),
        Trailer::PartialBody => String::new(),
    };
    conn.write_all(behind.as_bytes()).await.unwrap();
    conn
}

fn leave(conn: TcpStream, how: Leave) {
    if let Leave::Rst = how {
        // A zero linger makes the close an RST.
        socket2::SockRef::from(&conn)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    drop(conn);
}

fn path_of<'a>(s: &TestServer, url: &'a str) -> &'a str {
    url.strip_prefix(&format!("http://{}", s.public)).unwrap()
}

/// The node notices the client leave by itself (no publish needed to find out): the poll
/// is freed at once, not at the end of its park time, and is not charged to the budget; a
/// publish then finds nobody parked and keeps the change for the next poll.
#[tokio::test]
async fn a_client_that_leaves_behind_queued_bytes_is_seen_at_once_and_its_change_kept() {
    for fast_path in [true, false] {
        let s = TestServer::with(|c| c.fast_path = fast_path).await;
        for trailer in TRAILERS {
            for how in [Leave::Fin, Leave::Rst] {
                let case = format!("fast_path {fast_path}, {trailer:?}, {how:?}");
                let ch = s.register_topic("queued").await;
                let conn = park_with_trailer(&s, path_of(&s, &ch.url), trailer).await;
                leave(conn, how);
                let what = format!("{case}: the poll is freed");
                s.wait_parked_within(0, Duration::from_secs(3), &what).await;
                let (published, woken) = s.publish(json!({"topic": "queued"})).await;
                assert_eq!((published, woken), (1, 0), "{case}: nobody is parked");
                assert_eq!(
                    s.message(&ch.url, "&dont_block=true").await,
                    "new_change",
                    "{case}: the change waits for the next poll"
                );
                let info = s.hub.channel_info(&ch.id).unwrap();
                assert_eq!(info.retries_used, 0, "{case}: no reconnect was charged");
            }
        }
        s.stop().await;
    }
}

/// The same clients, with the publish sent the moment they leave: the node sees the close
/// and the publish at nearly the same moment, and whichever it handles first, the change
/// must reach the client's next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_published_as_a_client_leaves_behind_queued_bytes_waits_for_its_next_poll() {
    const ROUNDS: usize = 12;
    for fast_path in [true, false] {
        let s = TestServer::with(|c| c.fast_path = fast_path).await;
        let ch = s.register_topic("leaving").await;
        let path = path_of(&s, &ch.url).to_owned();
        for round in 0..ROUNDS {
            for trailer in TRAILERS {
                let how = if round % 2 == 0 {
                    Leave::Fin
                } else {
                    Leave::Rst
                };
                let conn = park_with_trailer(&s, &path, trailer).await;
                leave(conn, how);
                s.publish(json!({"topic": "leaving"})).await;
                let what = format!(
                    "fast_path {fast_path}, round {round}, {trailer:?}, {how:?}: new_change on the next poll"
                );
                s.wait_new_change(&ch.url, &what).await;
                s.wait_parked(0).await;
            }
        }
        s.stop().await;
    }
}

/// A client that stays, with a request pipelined behind its parked poll, gets both answers
/// in order: reading the queued bytes to watch the client loses none of them.
#[tokio::test]
async fn a_request_pipelined_behind_a_parked_poll_is_answered_after_it() {
    for fast_path in [true, false] {
        let s = TestServer::with(|c| c.fast_path = fast_path).await;
        let ch = s.register_topic("stays").await;
        let path = path_of(&s, &ch.url).to_owned();
        let mut conn = park_with_trailer(&s, &path, Trailer::Pipelined).await;
        // Sent in pieces, as a slow client would: the watch reads them as they come.
        conn.write_all(b"\r\n").await.unwrap();
        s.publish(json!({"topic": "stays"})).await;
        let first = raw::read_response(&mut conn, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(first.text(), r#"{"message":"new_change"}"#);
        // The pipelined poll parks in its turn; a second publish answers it.
        s.wait_parked(1).await;
        s.publish(json!({"topic": "stays"})).await;
        let second = raw::read_response(&mut conn, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            second.text(),
            r#"{"message":"new_change"}"#,
            "fast_path {fast_path}"
        );
        s.stop().await;
    }
}

/// Far more than a request head's worth queued behind a parked poll is not a client worth
/// waiting for: the connection is closed, the poll freed, and the channel keeps its change.
/// (hyper buffers up to 64 KiB of it itself, the watch as much again.)
#[tokio::test]
async fn a_flood_behind_a_parked_poll_closes_the_connection_and_keeps_the_change() {
    for fast_path in [true, false] {
        let s = TestServer::with(|c| c.fast_path = fast_path).await;
        let ch = s.register_topic("flood").await;
        let conn = park_with_trailer(&s, path_of(&s, &ch.url), Trailer::OneByte).await;
        let (mut read, mut write) = conn.into_split();
        // The node may close before it has read it all: the writer's error is expected.
        let writer = tokio::spawn(async move {
            let flood = vec![b'x'; 256 * 1024];
            let _ = tokio::time::timeout(Duration::from_secs(5), write.write_all(&flood)).await;
            write
        });
        assert!(
            raw::closed_within(&mut read, Duration::from_secs(3)).await,
            "fast_path {fast_path}: the connection is closed"
        );
        drop(writer.await.unwrap());
        s.wait_parked(0).await;
        s.publish(json!({"topic": "flood"})).await;
        assert_eq!(s.message(&ch.url, "&dont_block=true").await, "new_change");
        s.stop().await;
    }
}

/// TLS connections are served by hyper over the same watch, which sits under TLS: bytes the
/// client queues inside TLS are read raw and decrypted later, and its FIN or RST is seen.
#[tokio::test]
async fn over_tls_a_client_that_leaves_behind_queued_bytes_is_seen_too() {
    use nudge::hub::{Answer, PollRequest, PollStart};
    use tokio_rustls::rustls::pki_types::ServerName;
    let cert = crate::ops::TestCert::new();
    let s = TestServer::with(|c| c.tls = Some(cert.files())).await;
    for trailer in [Trailer::Pipelined, Trailer::Crlf] {
        for how in [Leave::Fin, Leave::Rst] {
            let case = format!("TLS, {trailer:?}, {how:?}");
            let ch = s.register_topic("tls").await;
            let path = ch
                .url
                .strip_prefix(&format!("https://{}", s.public))
                .unwrap();
            let tcp = TcpStream::connect(s.public).await.unwrap();
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = cert.connector().connect(name, tcp).await.unwrap();
            tls.write_all(raw::get(path, "").as_bytes()).await.unwrap();
            s.wait_parked(1).await;
            let behind = match trailer {
                Trailer::Pipelined => raw::get(path, ""),
                _ => "\r\n".into(),
            };
            tls.write_all(behind.as_bytes()).await.unwrap();
            tls.flush().await.unwrap();
            let (tcp, _) = tls.into_inner();
            leave(tcp, how);
            let what = format!("{case}: the poll is freed");
            s.wait_parked_within(0, Duration::from_secs(3), &what).await;
            assert_eq!(s.publish(json!({"topic": "tls"})).await, (1, 0), "{case}");
            let next = PollRequest {
                dont_block: true,
                ..Default::default()
            };
            assert!(
                matches!(
                    s.hub.poll(&ch.id, next),
                    PollStart::Answer(Answer::NewChange)
                ),
                "{case}: the change waits for the next poll"
            );
        }
    }
    s.stop().await;
}

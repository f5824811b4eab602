//! The load generator's side of HTTP/1.1 over raw TCP, the same for both servers: the test
//! kit's client (`testkit/src/raw.rs`: a connection is a `TcpStream` and a small buffer, no
//! HTTP client library per connection whose own costs would blur what is measured), and
//! client sockets spread over many loopback source addresses.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use tokio::net::{TcpSocket, TcpStream};

pub use nudge_testkit::raw::{
    Client as Connection, Response, read_buffered as read_response, request_bytes,
};

/// Opens a client socket from `source` (port chosen by the kernel) to `target`.
///
/// Binding client sockets across several `127.0.0.x` addresses gives each address its own range
/// of ephemeral ports, so 18,000 connections (and the ones before them) never exhaust one range.
/// `SO_LINGER` 0 makes a close send RST: no `TIME_WAIT` is left to hold a port for a minute.
pub async fn connect_from(source: Ipv4Addr, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_zero_linger()?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The `i`th of `count` client source addresses, starting at 127.0.0.2 (127.0.0.1 is left to the
/// control connections). All of 127.0.0.0/8 is routed to `lo` on Linux, with no setup.
pub fn source_address(i: usize, count: usize) -> Ipv4Addr {
    let k = (i % count.max(1)) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + k)
}

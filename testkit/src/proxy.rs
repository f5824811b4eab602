//! A TCP proxy on loopback between nudge and its Redis, to break the path the way networks
//! break it while Redis itself stays up (so a main API can go on appending meanwhile):
//!
//! - [`Proxy::cut`]: every connection through it is closed at once and new ones are
//!   refused (reset) until [`Proxy::mend`]: a partition that the kernel reports.
//! - [`Proxy::stall`]: connections stay open but nothing is forwarded either way until
//!   [`Proxy::mend`]: a partition nobody reports, a stalled socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    Cut,
    Stalled,
}

/// A proxy to `127.0.0.1:<upstream>`, served until dropped.
pub struct Proxy {
    addr: SocketAddr,
    state: watch::Sender<State>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream_port`.
    pub async fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port");
        let addr = listener.local_addr().expect("bound");
        let state = watch::Sender::new(State::Open);
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let state = state.clone();
            let connections = connections.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *state.borrow() == State::Cut {
                        let _ = socket2::SockRef::from(&client)
                            .set_linger(Some(std::time::Duration::ZERO));
                        drop(client);
                        continue;
                    }
                    connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(forward(client, upstream_port, state.subscribe()));
                }
            }
        });
        Proxy {
            addr,
            state,
            connections,
            task,
        }
    }

    /// `redis://127.0.0.1:<port>` through the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.state.send_replace(State::Cut);
    }

    /// Keeps connections open but forwards nothing.
    pub fn stall(&self) {
        self.state.send_replace(State::Stalled);
    }

    /// Back to forwarding (connections closed by a cut stay closed).
    pub fn mend(&self) {
        self.state.send_replace(State::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.send_replace(State::Cut);
    }
}

/// Copies both ways while the state allows; a cut ends the connection.
async fn forward(mut client: TcpStream, upstream_port: u16, mut state: watch::Receiver<State>) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
        return;
    };
    let (mut a, mut b) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
    loop {
        let now = *state.borrow_and_update();
        match now {
            State::Cut => return,
            State::Stalled => {
                if state.changed().await.is_err() {
                    return;
                }
                continue;
            }
            State::Open => {}
        }
        tokio::select! {
            n = client.read(&mut a) => match n {
                Ok(n) if n > 0 => if server.write_all(&a[..n]).await.is_err() { return },
                _ => return,
            },
            n = server.read(&mut b) => match n {
                Ok(n) if n > 0 => if client.write_all(&b[..n]).await.is_err() { return },
                _ => return,
            },
            changed = state.changed() => if changed.is_err() { return },
        }
    }
}

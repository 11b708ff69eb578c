//! A small TCP chaos proxy on loopback, to break the network between herald and a real server in
//! the ways real networks break: reset, blackhole, one direction only, added latency.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Which way bytes flow through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (herald) to the server.
    ToServer,
    /// From the server back to the client (replies, confirmations).
    ToClient,
}

/// The state of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow both ways.
    Healthy,
    /// Open connections are reset and new ones closed at once, as when the server's host is down.
    Reset,
    /// Connections stay open but nothing gets through either way, as behind a route that drops
    /// packets: clients find out only by their own timeouts. Bytes are held, not discarded (TCP
    /// retransmits them), so they arrive once the link heals.
    Blackhole,
    /// Like [`Link::Blackhole`] in one direction only: requests reach the server but its replies
    /// (confirmations) are held back, or the reverse.
    Drop(Direction),
    /// Every chunk is held this long before it is forwarded.
    Latency(Duration),
}

/// Forwards connections from a local port to `target`, with a [`Link`] state that tests and
/// `herald verify` change while traffic flows.
pub struct ChaosProxy {
    addr: SocketAddr,
    state: watch::Sender<(Link, u64)>,
    task: tokio::task::JoinHandle<()>,
}

impl ChaosProxy {
    /// Starts a proxy on `127.0.0.1:0` in front of `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<ChaosProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        // (link, epoch): the epoch changes on every reset so open connections notice.
        let (state, _) = watch::channel((Link::Healthy, 0u64));
        let state2 = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = state2.subscribe();
                if rx.borrow().0 == Link::Reset {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pump(cr, sw, Direction::ToServer, rx.clone()) => {}
                        _ = pump(sr, cw, Direction::ToClient, rx) => {}
                    }
                });
            }
        });
        Ok(ChaosProxy { addr, state, task })
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the link's state; [`Link::Reset`] drops every open connection.
    pub fn set(&self, link: Link) {
        self.state.send_modify(|(l, epoch)| {
            *l = link;
            if link == Link::Reset {
                *epoch += 1;
            }
        });
    }

    /// The link's current state.
    pub fn link(&self) -> Link {
        self.state.borrow().0
    }

    /// Cuts the link: drops open connections and refuses new ones until [`ChaosProxy::heal`].
    pub fn cut(&self) {
        self.set(Link::Reset);
    }

    /// Restores the link.
    pub fn heal(&self) {
        self.set(Link::Healthy);
    }
}

/// Copies one direction of a connection, applying the link's state to every chunk.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    dir: Direction,
    mut state: watch::Receiver<(Link, u64)>,
) {
    let epoch = state.borrow().1;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = state.changed() => {
                if changed.is_err() || state.borrow().1 != epoch {
                    return;
                }
                continue;
            }
        };
        // Hold the chunk while the link does not let this direction through.
        loop {
            let link = state.borrow().0;
            match link {
                Link::Reset => return,
                Link::Blackhole => {}
                Link::Drop(d) if d == dir => {}
                Link::Latency(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Link::Healthy | Link::Drop(_) => break,
            }
            if state.changed().await.is_err() || state.borrow().1 != epoch {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(Link::Reset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
        s.write_all(b"ping").await.ok()?;
        let mut b = [0u8; 4];
        match tokio::time::timeout(wait, s.read_exact(&mut b)).await {
            Ok(Ok(_)) => Some(b.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn each_link_state_behaves_as_named() {
        let proxy = ChaosProxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let short = Duration::from_millis(300);
        assert_eq!(
            roundtrip(&mut s, short).await.as_deref(),
            Some(&b"ping"[..])
        );

        proxy.set(Link::Drop(Direction::ToClient));
        assert_eq!(roundtrip(&mut s, short).await, None, "replies held back");
        proxy.set(Link::Blackhole);
        assert_eq!(roundtrip(&mut s, short).await, None, "blackholed");
        // Held bytes arrive once the link heals, as TCP retransmits them.
        proxy.heal();
        let mut b = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut b))
            .await
            .expect("held replies arrive after healing")
            .unwrap();
        assert_eq!(&b, b"pingping");

        proxy.set(Link::Latency(Duration::from_millis(150)));
        let mut s2 = TcpStream::connect(proxy.addr()).await.unwrap();
        let t = std::time::Instant::now();
        assert!(roundtrip(&mut s2, Duration::from_secs(2)).await.is_some());
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "both ways delayed"
        );

        proxy.cut();
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(2), s2.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "reset closes: {r:?}");
        proxy.heal();
        let mut s3 = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(roundtrip(&mut s3, Duration::from_secs(2)).await.is_some());
    }
}

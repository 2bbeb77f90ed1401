//! A TCP proxy a test can cut: the service talks to PostgreSQL (or RabbitMQ) through it, and
//! `set_down(true)` drops every open connection and refuses new ones until `set_down(false)`.
//! An outage for this test's service alone, without stopping the machine's shared servers.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The proxy; its accept loop and connections are owned by one task, stopped on drop.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    down: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (down, down_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        if *down_rx.borrow() {
                            drop(client);
                            continue;
                        }
                        let mut down_rx = down_rx.clone();
                        connections.spawn(async move {
                            let Ok(mut server) = TcpStream::connect(target).await else { return };
                            let mut client = client;
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                                _ = down_rx.wait_for(|d| *d) => {}
                            }
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Proxy {
            addr,
            down,
            task: Some(task),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts (true) or restores (false) the link.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Aborting the owner drops its JoinSet, which aborts every connection task.
            task.abort();
        }
    }
}

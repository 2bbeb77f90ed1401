//! A loopback port that forwards each new connection to the first cluster node that accepts it.
//!
//! The reliability harness inspects the broker (declares the run's topology, reads queue depths
//! and the books queue, cleans up) through one URL; behind this proxy that URL keeps working
//! after the node it first reached is killed. The services never use it: they get the node list.
//!
//! It runs on a thread of its own with its own runtime, so it keeps serving while a failing test
//! unwinds and the harness's clean-up connects through it. Dropping it stops it.

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

/// The proxy; stopped on drop.
#[derive(Debug)]
pub struct InspectProxy {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl InspectProxy {
    /// Listens on a free loopback port; each connection goes to the first of `targets` that
    /// accepts within 2 s.
    ///
    /// # Panics
    /// When it cannot bind.
    pub fn start(targets: Vec<SocketAddr>) -> InspectProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("proxy address");
        let (stop, mut stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let mut connections = JoinSet::new();
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            let Ok((client, _)) = accepted else { continue };
                            let targets = targets.clone();
                            connections.spawn(forward(client, targets));
                        }
                        Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    }
                }
            });
        });
        InspectProxy {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

async fn forward(mut client: TcpStream, targets: Vec<SocketAddr>) {
    for target in targets {
        if let Ok(Ok(mut server)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await
        {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            return;
        }
    }
}

impl Drop for InspectProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

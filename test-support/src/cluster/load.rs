//! The load a run drives: requests published from the test process on a connection of its own.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use video_orchestrator::broker::{Broker, BrokerOptions};
use video_orchestrator::client::{new_request, Client};

use super::Cluster;

/// The load driver's own broker connection (supervised, so it rides out a broker restart) and a
/// client on it.
#[derive(Debug)]
pub struct Driver {
    /// Publishes requests and cancels.
    pub client: Client,
    stop: CancellationToken,
    supervisor: JoinHandle<()>,
}

impl Driver {
    /// Stops the supervisor and waits for it.
    pub async fn close(self) {
        self.stop.cancel();
        let _ = self.supervisor.await;
    }
}

/// Submits `n` requests at `per_second`, every `fail_every`-th with the `[fail]` directive,
/// spread over 24 virtual keys. Returns the request ids in order.
pub async fn submit_load(
    client: Client,
    run: &'static str,
    n: usize,
    per_second: f64,
    fail_every: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
    for i in 0..n {
        tick.tick().await;
        let fail = fail_every > 0 && i % fail_every == fail_every - 1;
        let prompt = format!("{run} task {i}{}", if fail { " [fail]" } else { "" });
        let request = new_request(&format!("vk-{run}-{}", i % 24), "sora-2", &prompt);
        let id = client
            .submit(&request)
            .await
            .unwrap_or_else(|e| panic!("{run}: request {i} not published: {e}"));
        ids.push(id);
    }
    ids
}

impl Cluster {
    /// A driver: its own supervised broker connection and a client.
    pub async fn driver(&self) -> Driver {
        let broker = Broker::connect(
            BrokerOptions::from_settings(&self.env.settings),
            self.env.topology(),
        )
        .await
        .expect("driver connects");
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(broker.clone().supervise(stop.clone()));
        Driver {
            client: Client::new(broker, stop.clone()),
            stop,
            supervisor,
        }
    }
}

//! The hub: one consumer per instance on `video.events`, fanned out to the streams.
//!
//! The consumer runs while anyone listens (and [`LINGER`] after the last one left, for clients
//! that reconnect), so an instance nobody watches spends nothing on events. Its queue is
//! exclusive, auto-delete and server-named: it belongs to this connection and goes with it. When
//! the broker connection drops, the consumer ends; the hub opens a new one on the connection the
//! broker's supervisor re-establishes and tells every subscriber to re-read what it may have
//! missed ([`HubMessage::Resync`]).
//!
//! Why a buffer per subscriber (`mpsc` with `try_send`) rather than one `broadcast`: the hub
//! filters for each subscriber (a task, a tenant, everything), so a quiet task's stream is not
//! pushed out by other tenants' traffic, and the hub sees a full buffer at once and removes that
//! subscriber, instead of the subscriber finding out only when it is polled again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Consumer};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{LiveEvent, TaskUpdate, ROUTING_KEYS};
use crate::broker::{Broker, BrokerError};

/// How long the consumer stays after the last subscriber left.
pub const LINGER: Duration = Duration::from_secs(30);
/// Deliveries the broker may have in flight to the hub.
const PREFETCH: u16 = 512;
/// The hub's queue holds at most this many events (oldest dropped): a hub held up must not
/// grow the broker.
const QUEUE_MAX_LENGTH: i32 = 10_000;
/// First and longest pause before the consumer is opened again after a failure.
const RETRY_INITIAL: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The longest opening the consumer may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Which events a subscriber gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// One task's (by request id).
    Task(String),
    /// One tenant's (by virtual key).
    Tenant(String),
    /// Every tenant's (an admin).
    All,
}

/// What the hub sends a subscriber.
#[derive(Debug, Clone)]
pub enum HubMessage {
    /// An event that passed the subscriber's filter.
    Event(Arc<LiveEvent>),
    /// The consumer was (re)opened as `epoch`; events from `gap_start` until then may have been
    /// missed.
    Resync {
        /// The consumer's number; [`Subscription::ready`] returns the same.
        epoch: u64,
        /// Since when events may be missing.
        gap_start: DateTime<Utc>,
    },
}

/// What [`Subscription::recv`] returns.
#[derive(Debug, Clone)]
pub enum Next {
    /// A message.
    Message(HubMessage),
    /// The subscriber's buffer was full: it was removed (everything buffered came before).
    Dropped,
    /// The hub stopped.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Readiness {
    epoch: u64,
    ready: bool,
}

#[derive(Debug)]
struct Subscriber {
    filter: Filter,
    tx: mpsc::Sender<HubMessage>,
    dropped: Arc<AtomicBool>,
}

/// Subscribers, indexed by what they filter on, so an event reaches its subscribers without a
/// pass over all of them.
#[derive(Debug, Default)]
struct Registry {
    subscribers: HashMap<u64, Subscriber>,
    by_task: HashMap<String, HashSet<u64>>,
    by_tenant: HashMap<String, HashSet<u64>>,
    all: HashSet<u64>,
    /// Closed to newcomers once the hub stopped.
    closed: bool,
}

impl Registry {
    fn index(&mut self, filter: &Filter) -> &mut HashSet<u64> {
        match filter {
            Filter::Task(id) => self.by_task.entry(id.clone()).or_default(),
            Filter::Tenant(vk) => self.by_tenant.entry(vk.clone()).or_default(),
            Filter::All => &mut self.all,
        }
    }

    fn insert(&mut self, id: u64, subscriber: Subscriber) {
        self.index(&subscriber.filter).insert(id);
        self.subscribers.insert(id, subscriber);
    }

    fn remove(&mut self, id: u64) -> Option<Subscriber> {
        let subscriber = self.subscribers.remove(&id)?;
        let (map, key) = match &subscriber.filter {
            Filter::Task(key) => (&mut self.by_task, key),
            Filter::Tenant(key) => (&mut self.by_tenant, key),
            Filter::All => {
                self.all.remove(&id);
                return Some(subscriber);
            }
        };
        if let Some(set) = map.get_mut(key) {
            set.remove(&id);
            if set.is_empty() {
                map.remove(key);
            }
        }
        Some(subscriber)
    }

    /// The subscribers `event` is for.
    fn targets(&self, event: &LiveEvent) -> Vec<u64> {
        let mut ids: Vec<u64> = self.all.iter().copied().collect();
        for (map, key) in [
            (&self.by_task, &event.request_id),
            (&self.by_tenant, &event.virtual_key_id),
        ] {
            if let Some(set) = map.get(key) {
                ids.extend(set.iter().copied());
            }
        }
        ids
    }

    /// Offers `message` to each of `ids`; a full buffer removes its subscriber.
    fn offer(&mut self, ids: Vec<u64>, message: &HubMessage) -> usize {
        let mut dropped = 0;
        for id in ids {
            let Some(subscriber) = self.subscribers.get(&id) else {
                continue;
            };
            match subscriber.tx.try_send(message.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    subscriber.dropped.store(true, Ordering::Release);
                    self.remove(id);
                    dropped += 1;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.remove(id);
                }
            }
        }
        dropped
    }
}

#[derive(Debug)]
struct Inner {
    buffer: usize,
    registry: Mutex<Registry>,
    readiness: watch::Sender<Readiness>,
    wake: Notify,
    next_id: AtomicU64,
}

/// Fans the events of `video.events` out to subscribers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// One subscriber's end: its buffer, and its place in the hub until dropped.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    rx: mpsc::Receiver<HubMessage>,
    dropped: Arc<AtomicBool>,
    readiness: watch::Receiver<Readiness>,
    hub: Arc<Inner>,
}

impl Hub {
    /// A hub whose subscribers each have room for `buffer` messages.
    pub fn new(buffer: usize) -> Self {
        let (readiness, _) = watch::channel(Readiness {
            epoch: 0,
            ready: false,
        });
        Self {
            inner: Arc::new(Inner {
                buffer: buffer.max(1),
                registry: Mutex::new(Registry::default()),
                readiness,
                wake: Notify::new(),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.inner.registry()
    }

    /// Registers a subscriber for `filter` (and wakes the consumer if it is not running).
    pub fn subscribe(&self, filter: Filter) -> Subscription {
        let (tx, rx) = mpsc::channel(self.inner.buffer);
        let dropped = Arc::new(AtomicBool::new(false));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut registry = self.registry();
            // After the hub stopped, the sender is dropped at once: the stream ends.
            if !registry.closed {
                registry.insert(
                    id,
                    Subscriber {
                        filter,
                        tx,
                        dropped: dropped.clone(),
                    },
                );
            }
        }
        self.inner.wake.notify_one();
        Subscription {
            id,
            rx,
            dropped,
            readiness: self.inner.readiness.subscribe(),
            hub: self.inner.clone(),
        }
    }

    /// Subscribers now.
    pub fn subscribers(&self) -> usize {
        self.registry().subscribers.len()
    }

    /// The room each subscriber has.
    pub fn buffer(&self) -> usize {
        self.inner.buffer
    }

    /// Hands `event` to every subscriber it is for; returns how many were dropped because their
    /// buffer was full. Never waits.
    pub fn dispatch(&self, event: LiveEvent) -> usize {
        let mut registry = self.registry();
        let targets = registry.targets(&event);
        if targets.is_empty() {
            return 0;
        }
        let dropped = registry.offer(targets, &HubMessage::Event(Arc::new(event)));
        if dropped > 0 {
            debug!(
                dropped,
                "event stream clients dropped: their buffers were full"
            );
        }
        dropped
    }

    /// Marks the consumer `epoch` as open and tells every subscriber to catch up from
    /// `gap_start`.
    fn opened(&self, epoch: u64, gap_start: DateTime<Utc>) {
        self.inner
            .readiness
            .send_replace(Readiness { epoch, ready: true });
        let mut registry = self.registry();
        let ids: Vec<u64> = registry.subscribers.keys().copied().collect();
        registry.offer(ids, &HubMessage::Resync { epoch, gap_start });
    }

    fn closed(&self, epoch: u64) {
        self.inner.readiness.send_replace(Readiness {
            epoch,
            ready: false,
        });
    }

    /// Runs the consumer whenever anyone listens, until `stop`; then ends every subscription.
    pub async fn run(self, broker: Arc<Broker>, stop: CancellationToken) {
        let mut epoch = 0;
        let mut gap_start = Utc::now();
        let mut retry = RETRY_INITIAL;
        'outer: loop {
            while self.subscribers() == 0 {
                tokio::select! {
                    _ = stop.cancelled() => break 'outer,
                    _ = self.inner.wake.notified() => {}
                }
                gap_start = Utc::now();
            }
            let (channel, consumer) = match open(&broker, &stop).await {
                Ok(opened) => opened,
                Err(OpenError::Broker(BrokerError::Shutdown)) => break,
                Err(e) => {
                    warn!(error = %e, retry_in_ms = retry.as_millis() as u64, "live events: cannot consume video.events");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    continue;
                }
            };
            retry = RETRY_INITIAL;
            epoch += 1;
            self.opened(epoch, gap_start);
            debug!(epoch, "live events: consuming video.events");
            let end = self.pump(&channel, consumer, &stop).await;
            self.closed(epoch);
            gap_start = Utc::now();
            let _ = channel
                .close(200, "live events consumer closed".into())
                .await;
            match end {
                PumpEnd::Stop => break,
                PumpEnd::Idle => debug!("live events: nobody listens; consumer closed"),
                PumpEnd::Lost => info!("live events: consumer lost; opening it again"),
            }
        }
        self.closed(epoch);
        let mut registry = self.registry();
        registry.closed = true;
        let ids: Vec<u64> = registry.subscribers.keys().copied().collect();
        for id in ids {
            registry.remove(id);
        }
    }

    async fn pump(
        &self,
        channel: &Channel,
        mut consumer: Consumer,
        stop: &CancellationToken,
    ) -> PumpEnd {
        let mut idle_since: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return PumpEnd::Stop,
                delivery = consumer.next() => {
                    let delivery = match delivery {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => {
                            debug!(error = %e, "live events: consumer failed");
                            return PumpEnd::Lost;
                        }
                        None => return PumpEnd::Lost,
                    };
                    let received_at = Utc::now();
                    match TaskUpdate::from_event(delivery.routing_key.as_str(), &delivery.data) {
                        Some((kind, update)) => {
                            self.dispatch(LiveEvent::new(kind, &update, received_at));
                        }
                        None => debug!(routing_key = %delivery.routing_key, "live events: not a lifecycle event; skipped"),
                    }
                    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                        debug!(error = %e, "live events: ack failed");
                        return PumpEnd::Lost;
                    }
                }
                _ = tick.tick() => {
                    // A consumer is told when its channel closes; this is in case it is not.
                    if !channel.status().connected() {
                        return PumpEnd::Lost;
                    }
                    if self.subscribers() > 0 {
                        idle_since = None;
                    } else if idle_since.get_or_insert_with(tokio::time::Instant::now).elapsed() >= LINGER {
                        return PumpEnd::Idle;
                    }
                }
            }
        }
    }
}

enum PumpEnd {
    Stop,
    Idle,
    Lost,
}

impl Inner {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Nothing is left half-done under this lock (no await, no panic path), so a poisoned
        // lock still holds a consistent registry.
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why the consumer could not be opened.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("the broker did not answer within {0:?}")]
    TimedOut(Duration),
}

/// A channel on the current connection with the hub's queue bound and consumed. Bounded in
/// time: a connection that died a moment ago may still look alive, and a call on it not return.
async fn open(broker: &Broker, stop: &CancellationToken) -> Result<(Channel, Consumer), OpenError> {
    let connection = broker.connection(stop).await?;
    tokio::time::timeout(OPEN_TIMEOUT, declare(broker, &connection))
        .await
        .map_err(|_| OpenError::TimedOut(OPEN_TIMEOUT))?
        .map_err(OpenError::Broker)
}

async fn declare(
    broker: &Broker,
    connection: &lapin::Connection,
) -> Result<(Channel, Consumer), BrokerError> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(QUEUE_MAX_LENGTH));
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    let exchange = broker.topology().events_exchange();
    for key in ROUTING_KEYS {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "live-events".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

impl Subscription {
    /// Waits up to `timeout` for the consumer to be open; its epoch, or `None` if it is not.
    pub async fn ready(&mut self, timeout: Duration) -> Option<u64> {
        let ready = tokio::time::timeout(timeout, self.readiness.wait_for(|r| r.ready)).await;
        match ready {
            Ok(Ok(r)) => Some(r.epoch),
            _ => None,
        }
    }

    /// The next message, in the order the hub sent them.
    pub async fn recv(&mut self) -> Next {
        match self.rx.recv().await {
            Some(message) => Next::Message(message),
            None if self.dropped.load(Ordering::Acquire) => Next::Dropped,
            None => Next::Closed,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.registry().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::Kind;
    use crate::store::TaskStatus;

    fn event(request_id: &str, virtual_key_id: &str, progress: u8) -> LiveEvent {
        let update = TaskUpdate {
            progress: Some(progress),
            rank: 1000 + u32::from(progress),
            ..TaskUpdate::new(
                request_id,
                virtual_key_id,
                TaskStatus::Processing,
                Utc::now(),
            )
        };
        LiveEvent::new(Kind::Progress, &update, Utc::now())
    }

    fn try_next(sub: &mut Subscription) -> Option<Arc<LiveEvent>> {
        match sub.rx.try_recv() {
            Ok(HubMessage::Event(e)) => Some(e),
            _ => None,
        }
    }

    #[test]
    fn each_subscriber_gets_only_what_its_filter_names() {
        let hub = Hub::new(8);
        let mut task = hub.subscribe(Filter::Task("r-1".into()));
        let mut tenant = hub.subscribe(Filter::Tenant("vk-b".into()));
        let mut all = hub.subscribe(Filter::All);
        hub.dispatch(event("r-1", "vk-a", 10));
        hub.dispatch(event("r-2", "vk-b", 20));
        assert_eq!(try_next(&mut task).map(|e| e.rank), Some(1010));
        assert!(try_next(&mut task).is_none());
        assert_eq!(try_next(&mut tenant).map(|e| e.rank), Some(1020));
        assert!(try_next(&mut tenant).is_none());
        let seen: Vec<u32> = std::iter::from_fn(|| try_next(&mut all).map(|e| e.rank)).collect();
        assert_eq!(seen, vec![1010, 1020]);
        drop(task);
        assert_eq!(
            hub.subscribers(),
            2,
            "a dropped subscription leaves the hub"
        );
        assert!(hub.registry().by_task.is_empty());
    }

    #[tokio::test]
    async fn a_full_buffer_drops_its_subscriber_after_what_it_holds_and_spares_the_others() {
        let hub = Hub::new(2);
        let mut slow = hub.subscribe(Filter::All);
        let mut quick = hub.subscribe(Filter::All);
        let mut dropped = 0;
        for p in 1..=3 {
            dropped += hub.dispatch(event("r-1", "vk-a", p));
            // The quick one reads as it goes.
            assert_eq!(
                try_next(&mut quick).map(|e| e.rank),
                Some(1000 + u32::from(p))
            );
        }
        assert_eq!(dropped, 1, "the third event found the slow buffer full");
        assert_eq!(hub.subscribers(), 1);
        for p in 1..=2 {
            match slow.recv().await {
                Next::Message(HubMessage::Event(e)) => assert_eq!(e.rank, 1000 + p),
                other => panic!("expected the buffered event {p}, got {other:?}"),
            }
        }
        assert!(matches!(slow.recv().await, Next::Dropped));
        hub.dispatch(event("r-1", "vk-a", 4));
        assert_eq!(try_next(&mut quick).map(|e| e.rank), Some(1004));
    }

    #[tokio::test]
    async fn an_opened_consumer_makes_subscribers_ready_and_resync() {
        let hub = Hub::new(4);
        let mut sub = hub.subscribe(Filter::Tenant("vk-a".into()));
        assert_eq!(sub.ready(Duration::from_millis(10)).await, None);
        let gap = Utc::now();
        hub.opened(7, gap);
        assert_eq!(sub.ready(Duration::from_millis(10)).await, Some(7));
        match sub.recv().await {
            Next::Message(HubMessage::Resync { epoch, gap_start }) => {
                assert_eq!((epoch, gap_start), (7, gap));
            }
            other => panic!("expected a resync, got {other:?}"),
        }
    }
}

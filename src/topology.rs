//! Exchange and queue layout (DESIGN §3), declared idempotently at every start.
//!
//! Everything lives under `topology.prefix`, so environments and tests share one broker:
//! - `video.events` (topic): lifecycle and progress events;
//! - `video.generation` (quorum): requests, cancels and provider outcomes;
//! - `video.progress` (`x-consistent-hash` on the `x-virtual-key` header) and its partitions
//!   `video.progress.p{i}` (quorum, single-active-consumer);
//! - `video.progress.delay.{ms}` (quorum, fixed TTL, at-least-once dead-lettering back into
//!   `video.progress`, reject-publish on overflow): broker-side delays;
//! - `video.generation.retry.{ms}` (quorum, fixed TTL, dead-lettering back into
//!   `video.generation`): delayed retries of messages that failed for a transient reason;
//! - `video.parking` (quorum): poison and unprocessable messages, and whatever a consumed queue
//!   dead-letters at its delivery limit;
//! - with `interop.masstransit` on, MassTransit's exchanges for our message types (`masstransit`).

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ExchangeKind};

use crate::config::{QueueLimits, Settings};
use crate::messages::{Envelope, Message};

mod masstransit;
pub use masstransit::{MASSTRANSIT_EVENTS, MASSTRANSIT_INBOUND};

/// The header the consistent-hash exchange hashes: the virtual key.
pub const VIRTUAL_KEY_HEADER: &str = "x-virtual-key";

/// Broker refusals while declaring.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The broker already has a different partition layout under this prefix.
    #[error(
        "partition layout mismatch under prefix `{prefix}`: the broker has {found} partitions, \
         the configuration says {configured} (topology.partitions); changing the count moves \
         virtual keys between partitions and is a migration, not a restart"
    )]
    PartitionMismatch {
        /// The prefix.
        prefix: String,
        /// What the broker has (a lower bound when larger).
        found: String,
        /// What the configuration says.
        configured: u16,
    },
    /// The broker has no `x-consistent-hash` exchange type: the plugin is off.
    #[error(
        "RabbitMQ lacks the consistent-hash exchange type: enable it with \
         `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` (docker-compose.yml in this \
         repository enables it)"
    )]
    ConsistentHashMissing,
    /// A consumed queue exists without the delivery limit and dead-letter target this version
    /// declares (queue arguments cannot change on redeclare).
    #[error(
        "queue `{name}` exists without the delivery limit and dead-letter arguments this version \
         declares; apply the policy in README \"Moving queues to delivery limits\" and set \
         topology.consumer_queue_limits = \"policy\""
    )]
    LegacyQueue {
        /// The queue.
        name: String,
        /// The broker's answer.
        #[source]
        source: lapin::Error,
    },
    /// An existing queue or exchange was declared with other arguments.
    #[error("declaring `{name}` failed (does it exist with other arguments?)")]
    Declare {
        /// The exchange or queue.
        name: String,
        /// The broker's answer.
        #[source]
        source: lapin::Error,
    },
    /// Any other broker error.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
}

/// Names and layout of every exchange and queue, under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    partitions: u16,
    delay_tiers_ms: Vec<u64>,
    retry_tiers_ms: Vec<u64>,
    quorum_group_size: u32,
    delivery_limit: u32,
    queue_limits: QueueLimits,
    /// `interop.masstransit.namespace` when interop is on.
    masstransit_namespace: Option<String>,
}

/// Retry tiers of [`Topology::new`] (the configuration's defaults).
const DEFAULT_RETRY_TIERS_MS: [u64; 4] = [1000, 5000, 30000, 120000];

impl Topology {
    /// From explicit values (tests and benches).
    pub fn new(prefix: impl Into<String>, partitions: u16, delay_tiers_ms: Vec<u64>) -> Self {
        Self {
            prefix: prefix.into(),
            partitions,
            delay_tiers_ms,
            retry_tiers_ms: DEFAULT_RETRY_TIERS_MS.to_vec(),
            quorum_group_size: 0,
            delivery_limit: 20,
            queue_limits: QueueLimits::Arguments,
            masstransit_namespace: None,
        }
    }

    /// From the configuration.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            prefix: settings.topology.prefix.clone(),
            partitions: settings.topology.partitions,
            delay_tiers_ms: settings.tracking.delay_tiers_ms.clone(),
            retry_tiers_ms: settings.generation.retry_tiers_ms.clone(),
            quorum_group_size: settings.topology.quorum_group_size,
            delivery_limit: settings.topology.delivery_limit,
            queue_limits: settings.topology.consumer_queue_limits,
            masstransit_namespace: settings
                .interop
                .masstransit
                .enabled_namespace()
                .map(str::to_owned),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Number of progress partitions.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// Delay tiers in milliseconds, ascending.
    pub fn delay_tiers_ms(&self) -> &[u64] {
        &self.delay_tiers_ms
    }

    /// `video.events`
    pub fn events_exchange(&self) -> String {
        format!("{}video.events", self.prefix)
    }

    /// `video.generation`
    pub fn generation_queue(&self) -> String {
        format!("{}video.generation", self.prefix)
    }

    /// `video.progress`
    pub fn progress_exchange(&self) -> String {
        format!("{}video.progress", self.prefix)
    }

    /// `video.progress.p{i}`
    pub fn partition_queue(&self, partition: u16) -> String {
        format!("{}video.progress.p{partition}", self.prefix)
    }

    /// `video.progress.delay.{ms}`
    pub fn delay_queue(&self, tier_ms: u64) -> String {
        format!("{}video.progress.delay.{tier_ms}", self.prefix)
    }

    /// `video.parking`
    pub fn parking_queue(&self) -> String {
        format!("{}video.parking", self.prefix)
    }

    /// `video.generation.retry.{ms}`
    pub fn retry_queue(&self, tier_ms: u64) -> String {
        format!("{}video.generation.retry.{tier_ms}", self.prefix)
    }

    /// Retry tiers in milliseconds, ascending.
    pub fn retry_tiers_ms(&self) -> &[u64] {
        &self.retry_tiers_ms
    }

    /// The tier the `attempt`-th retry (1-based) waits in.
    pub fn retry_tier(&self, attempt: u32) -> u64 {
        let i = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.retry_tiers_ms
            .get(i)
            .or(self.retry_tiers_ms.last())
            .copied()
            .unwrap_or(1000)
    }

    /// The tier a delay goes into: the largest tier not above `delay_ms` (the smallest tier when
    /// every tier is longer).
    pub fn tier_at_most(&self, delay_ms: u64) -> u64 {
        self.delay_tiers_ms
            .iter()
            .copied()
            .rev()
            .find(|t| *t <= delay_ms)
            .unwrap_or(self.delay_tiers_ms[0])
    }

    /// The smallest tier not below `delay_ms` (the largest tier when every tier is shorter).
    pub fn tier_at_least(&self, delay_ms: u64) -> u64 {
        self.delay_tiers_ms
            .iter()
            .copied()
            .find(|t| *t >= delay_ms)
            .unwrap_or(self.longest_tier_ms())
    }

    /// The longest tier.
    pub fn longest_tier_ms(&self) -> u64 {
        self.delay_tiers_ms.last().copied().unwrap_or(0)
    }

    /// An event on `video.events` with its routing key.
    pub fn event<M: Message>(&self, message: &M) -> Envelope {
        Envelope::new(self.events_exchange(), M::ROUTING_KEY, message)
    }

    /// A progress check into the delay tier of `tier_ms`.
    pub fn delayed_check(
        &self,
        tier_ms: u64,
        check: &crate::messages::VideoProgressCheckRequested,
    ) -> Envelope {
        Envelope::to_queue(self.delay_queue(tier_ms), check)
    }

    /// Every queue name, for inspection and clean-up.
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues = vec![self.generation_queue(), self.parking_queue()];
        queues.extend((0..self.partitions).map(|p| self.partition_queue(p)));
        queues.extend(self.delay_tiers_ms.iter().map(|t| self.delay_queue(*t)));
        queues.extend(self.retry_tiers_ms.iter().map(|t| self.retry_queue(*t)));
        queues
    }

    /// Every exchange name.
    pub fn all_exchanges(&self) -> Vec<String> {
        let mut exchanges = vec![self.events_exchange(), self.progress_exchange()];
        exchanges.extend(self.masstransit_exchanges());
        exchanges
    }

    fn quorum_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        if self.quorum_group_size > 0 {
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongInt(i32::try_from(self.quorum_group_size).unwrap_or(i32::MAX)),
            );
        }
        args
    }

    /// Arguments of a queue the service consumes: quorum, plus (unless a policy provides them) a
    /// delivery limit whose overflow is dead-lettered, at least once, into `video.parking`. The
    /// broker records why in the `x-death` / `x-first-death-reason` headers (`delivery_limit`).
    fn consumed_queue_args(&self) -> FieldTable {
        let mut args = self.quorum_args();
        if self.queue_limits == QueueLimits::Arguments {
            args.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongInt(i32::try_from(self.delivery_limit).unwrap_or(i32::MAX)),
            );
            self.dead_letter_to(&mut args, "", &self.parking_queue());
        }
        args
    }

    /// At-least-once dead-lettering (quorum queues, RabbitMQ ≥ 3.10) into `exchange` with
    /// `routing_key`; it needs `reject-publish` overflow.
    fn dead_letter_to(&self, args: &mut FieldTable, exchange: &str, routing_key: &str) {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(exchange.into()),
        );
        if !routing_key.is_empty() {
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(routing_key.into()),
            );
        }
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }

    /// Declares everything; safe to run any number of times and from any number of instances.
    ///
    /// # Errors
    /// [`TopologyError::ConsistentHashMissing`] without the plugin;
    /// [`TopologyError::PartitionMismatch`] when the broker holds another partition count under
    /// this prefix; [`TopologyError::Declare`] when an existing entity has other arguments;
    /// [`TopologyError::LegacyQueue`] for a consumed queue declared by an earlier version.
    pub async fn declare(&self, connection: &Connection) -> Result<(), TopologyError> {
        // Before anything is created, so a broker without the plugin is left as it was.
        if !has_consistent_hash(connection).await? {
            return Err(TopologyError::ConsistentHashMissing);
        }
        let channel = connection.create_channel().await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let events = self.events_exchange();
        channel
            .exchange_declare(
                events.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::Declare {
                name: events.clone(),
                source,
            })?;

        self.check_partition_layout(connection).await?;

        let progress = self.progress_exchange();
        let mut hash_args = FieldTable::default();
        hash_args.insert(
            "hash-header".into(),
            AMQPValue::LongString(VIRTUAL_KEY_HEADER.into()),
        );
        // Recorded for operators; the broker does not compare exchange arguments, so the
        // layout check above is what refuses a different count.
        hash_args.insert(
            "x-partitions".into(),
            AMQPValue::LongInt(i32::from(self.partitions)),
        );
        let channel = fresh(connection, channel).await?;
        channel
            .exchange_declare(
                progress.as_str().into(),
                ExchangeKind::Custom("x-consistent-hash".into()),
                durable,
                hash_args,
            )
            .await
            .map_err(|source| {
                if is_missing_exchange_type(&source) {
                    TopologyError::ConsistentHashMissing
                } else {
                    TopologyError::Declare {
                        name: progress.clone(),
                        source,
                    }
                }
            })?;

        let queue_opts = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let generation = self.generation_queue();
        declare_consumed_queue(
            &channel,
            &generation,
            queue_opts,
            self.consumed_queue_args(),
        )
        .await?;
        for key in [
            crate::messages::VideoGenerationRequested::ROUTING_KEY,
            crate::messages::VideoGenerationCancelRequested::ROUTING_KEY,
            crate::messages::VideoProviderTaskFinished::ROUTING_KEY,
        ] {
            channel
                .queue_bind(
                    generation.as_str().into(),
                    events.as_str().into(),
                    key.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        self.declare_masstransit(&channel).await?;

        for p in 0..self.partitions {
            let name = self.partition_queue(p);
            let mut args = self.consumed_queue_args();
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            declare_consumed_queue(&channel, &name, queue_opts, args).await?;
            // For the consistent-hash exchange the binding key is the partition's weight.
            channel
                .queue_bind(
                    name.as_str().into(),
                    progress.as_str().into(),
                    "1".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }

        for tier in &self.delay_tiers_ms {
            let name = self.delay_queue(*tier);
            let mut args = self.quorum_args();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(*tier).unwrap_or(i64::MAX)),
            );
            self.dead_letter_to(&mut args, &progress, "");
            declare_queue(&channel, &name, queue_opts, args).await?;
        }

        for tier in &self.retry_tiers_ms {
            let name = self.retry_queue(*tier);
            let mut args = self.quorum_args();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(*tier).unwrap_or(i64::MAX)),
            );
            self.dead_letter_to(&mut args, "", &generation);
            declare_queue(&channel, &name, queue_opts, args).await?;
        }

        declare_queue(
            &channel,
            &self.parking_queue(),
            queue_opts,
            self.quorum_args(),
        )
        .await?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// Refuses a partition count that differs from what the broker holds under this prefix.
    ///
    /// The broker ignores unknown exchange arguments when comparing declarations, so the check
    /// probes the queues instead: `p{N}` must not exist, and if `p0` exists then `p{N-1}` must.
    async fn check_partition_layout(&self, connection: &Connection) -> Result<(), TopologyError> {
        let n = self.partitions;
        if queue_exists(connection, &self.partition_queue(n)).await? {
            let mut found = n + 1;
            while found < 4096 && queue_exists(connection, &self.partition_queue(found)).await? {
                found += 1;
            }
            return Err(TopologyError::PartitionMismatch {
                prefix: self.prefix.clone(),
                found: found.to_string(),
                configured: n,
            });
        }
        if queue_exists(connection, &self.partition_queue(0)).await?
            && !queue_exists(connection, &self.partition_queue(n - 1)).await?
        {
            let mut found = 1;
            while found < n && queue_exists(connection, &self.partition_queue(found)).await? {
                found += 1;
            }
            return Err(TopologyError::PartitionMismatch {
                prefix: self.prefix.clone(),
                found: found.to_string(),
                configured: n,
            });
        }
        Ok(())
    }

    /// Deletes every queue and exchange under this prefix (tests, `demo`).
    ///
    /// # Errors
    /// Broker errors other than "not found".
    pub async fn delete(&self, connection: &Connection) -> Result<(), TopologyError> {
        let mut channel = connection.create_channel().await?;
        for queue in self.all_queues() {
            if channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .is_err()
            {
                channel = connection.create_channel().await?;
            }
        }
        for exchange in self.all_exchanges() {
            if channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .is_err()
            {
                channel = connection.create_channel().await?;
            }
        }
        let _ = channel.close(200, "deleted".into()).await;
        Ok(())
    }
}

async fn declare_queue(
    channel: &lapin::Channel,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> Result<(), TopologyError> {
    channel
        .queue_declare(name.into(), options, args)
        .await
        .map(|_| ())
        .map_err(|source| TopologyError::Declare {
            name: name.to_owned(),
            source,
        })
}

/// As [`declare_queue`], naming the migration when the queue predates delivery limits.
async fn declare_consumed_queue(
    channel: &lapin::Channel,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> Result<(), TopologyError> {
    let limited = args.inner().contains_key("x-delivery-limit");
    match declare_queue(channel, name, options, args).await {
        Err(TopologyError::Declare { name, source })
            if limited && source.to_string().contains("PRECONDITION_FAILED") =>
        {
            Err(TopologyError::LegacyQueue { name, source })
        }
        other => other,
    }
}

/// A passive declare closes its channel when the queue is missing, so each probe gets its own.
///
/// # Errors
/// Broker errors other than "not found".
pub async fn queue_exists(connection: &Connection, name: &str) -> Result<bool, lapin::Error> {
    Ok(queue_depth(connection, name).await?.is_some())
}

/// Whether the broker knows the `x-consistent-hash` exchange type (plugin
/// `rabbitmq_consistent_hash_exchange`): declares and deletes a probe exchange.
///
/// # Errors
/// Broker errors other than the unknown exchange type.
pub async fn has_consistent_hash(connection: &Connection) -> Result<bool, lapin::Error> {
    let channel = connection.create_channel().await?;
    let name = format!("vo-probe-{}", uuid::Uuid::new_v4().simple());
    let declared = channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => {
            let _ = channel
                .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = channel.close(200, "probe".into()).await;
            Ok(true)
        }
        Err(e) if is_missing_exchange_type(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `unknown exchange type` on a broker that never had the plugin, `invalid exchange type`
/// after it was disabled. Either closes the whole connection (COMMAND_INVALID is a hard error).
fn is_missing_exchange_type(e: &lapin::Error) -> bool {
    let text = e.to_string();
    text.contains("exchange type 'x-consistent-hash'")
}

/// Messages ready in a queue, or `None` when it does not exist.
///
/// # Errors
/// Broker errors other than "not found".
pub async fn queue_depth(connection: &Connection, name: &str) -> Result<Option<u32>, lapin::Error> {
    let channel = connection.create_channel().await?;
    let result = channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match result {
        Ok(q) => {
            let _ = channel.close(200, "probe".into()).await;
            Ok(Some(q.message_count()))
        }
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND") || e.to_string().contains("404")
}

async fn fresh(
    connection: &Connection,
    channel: lapin::Channel,
) -> Result<lapin::Channel, lapin::Error> {
    if channel.status().connected() {
        Ok(channel)
    } else {
        connection.create_channel().await
    }
}

/// Headers argument with a long-string value (used by publishers for `x-virtual-key`).
pub fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

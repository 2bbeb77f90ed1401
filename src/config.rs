//! Typed configuration.
//!
//! Layers, later wins: the `config/default.toml` compiled into the binary (so it runs from any
//! directory), `config/default.toml` and `config/{APP_ENVIRONMENT}.toml` in the working
//! directory when present, the file named by `APP_CONFIG_FILE`, then `APP__SECTION__KEY`
//! environment variables. Every value is checked once at start; an error names the key.
//!
//! [`Settings::redacted`] writes the loaded values back out as TOML (what `config check` prints),
//! with passwords and keys replaced, so the output can be read or pasted back as a config file.

use std::collections::{BTreeMap, HashMap};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::providers::{ProviderConfigError, ProviderSettings, RoutingSettings};
use crate::redact::{secret_redacted, url_redacted, urls_redacted};
pub use http::HttpSettings;

const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "rabbitmq.urls",
    "tracking.delay_tiers_ms",
    "webhooks.allowed_hosts",
];

/// A configuration that cannot be used. The message always names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value could not be read or has the wrong type (the text names the key).
    #[error("{0}")]
    Load(String),
    /// A value has the right type but is not acceptable.
    #[error("configuration key `{key}`: {reason}")]
    Invalid {
        /// The dotted key, e.g. `topology.partitions`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// `Ok` when `holds`, else the error naming `key`.
fn ensure(holds: bool, key: &str, reason: &str) -> Result<(), ConfigError> {
    if holds {
        Ok(())
    } else {
        Err(ConfigError::invalid(key, reason))
    }
}

fn strictly_increasing(values: &[u64]) -> bool {
    values.windows(2).all(|pair| pair[0] < pair[1])
}

/// The whole configuration, one struct per section.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Settings {
    /// Deployment environment name (`APP_ENVIRONMENT`), e.g. `local` or `production`.
    #[serde(skip)]
    pub environment: String,
    /// Broker connection.
    pub rabbitmq: RabbitSettings,
    /// PostgreSQL connection.
    pub database: DatabaseSettings,
    /// Exchange and queue naming and layout.
    pub topology: TopologySettings,
    /// Health, readiness and metrics endpoint.
    pub http: HttpSettings,
    /// Log output.
    pub log: LogSettings,
    /// Generation orchestrator.
    pub generation: GenerationSettings,
    /// Progress-tracking orchestrator and sweeper.
    pub tracking: TrackingSettings,
    /// Transactional outbox relay.
    pub outbox: OutboxSettings,
    /// Webhook delivery.
    pub webhooks: WebhookSettings,
    /// Graceful shutdown.
    pub shutdown: ShutdownSettings,
    /// How long finished work is kept (`[retention]`).
    pub retention: RetentionSettings,
    /// Who may publish commands for which tenant (`[security]`).
    #[serde(default)]
    pub security: SecuritySettings,
    /// Other frameworks' wire formats (`[interop]`).
    #[serde(default)]
    pub interop: InteropSettings,
    /// Span export (`[telemetry]`).
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// Video providers by name.
    #[serde(default, serialize_with = "providers_redacted")]
    pub providers: HashMap<String, ProviderSettings>,
    /// Model to provider routing.
    #[serde(default)]
    pub routing: RoutingSettings,
}

/// `[rabbitmq]`: where the broker is, how to reconnect, how long to wait for confirms.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RabbitSettings {
    /// One broker URL (`amqp://` or `amqps://`).
    #[serde(serialize_with = "url_redacted")]
    pub url: SecretString,
    /// A cluster's node list; when non-empty it replaces `url`.
    #[serde(default, serialize_with = "urls_redacted")]
    pub urls: Vec<SecretString>,
    /// Shown in the broker's connection list.
    pub connection_name: String,
    /// First reconnect delay.
    pub reconnect_initial_ms: u64,
    /// Longest reconnect delay.
    pub reconnect_max_ms: u64,
    /// How long a publish waits for its confirm before it is re-sent.
    pub confirm_timeout_ms: u64,
}

impl RabbitSettings {
    /// The broker URLs to try, in order.
    pub fn node_urls(&self) -> Vec<SecretString> {
        if self.urls.is_empty() {
            vec![self.url.clone()]
        } else {
            self.urls.clone()
        }
    }

    /// The RabbitMQ user the service connects as (the first node URL's; `guest` when the URL
    /// names none, as AMQP URIs default). `None` for a user name in percent-encoding.
    pub fn user(&self) -> Option<String> {
        let url = url::Url::parse(self.node_urls().first()?.expose_secret()).ok()?;
        match url.username() {
            "" => Some("guest".to_owned()),
            user if user.contains('%') => None,
            user => Some(user.to_owned()),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (i, url) in self.node_urls().iter().enumerate() {
            let key = if self.urls.is_empty() {
                "rabbitmq.url".to_owned()
            } else {
                format!("rabbitmq.urls[{i}]")
            };
            url.expose_secret()
                .parse::<lapin::uri::AMQPUri>()
                .map_err(|e| ConfigError::invalid(&key, format!("not an AMQP URL: {e}")))?;
        }
        Ok(())
    }
}

/// `[database]`: the PostgreSQL URL and the pool.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DatabaseSettings {
    /// `postgres://` URL; `?sslmode=require` and friends are honoured.
    #[serde(serialize_with = "url_redacted")]
    pub url: SecretString,
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a query waits for a pooled connection.
    pub acquire_timeout_ms: u64,
}

impl DatabaseSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose_secret();
        ensure(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "database.url",
            "must start with postgres:// or postgresql://",
        )?;
        url.parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| ConfigError::invalid("database.url", e.to_string()))?;
        ensure(
            self.max_connections > 0,
            "database.max_connections",
            "must be at least 1",
        )
    }
}

/// `[topology]`: names and layout of the exchanges and queues, declared at every start.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TopologySettings {
    /// Prepended verbatim to every exchange and queue name.
    #[serde(default)]
    pub prefix: String,
    /// Number of progress partitions (`video.progress.p{i}`).
    pub partitions: u16,
    /// `x-quorum-initial-group-size`; 0 lets the broker decide.
    #[serde(default)]
    pub quorum_group_size: u32,
    /// `x-delivery-limit` on every queue the service consumes from: a message returned this many
    /// times (crashes, shutdowns) is dead-lettered into `video.parking` instead of looping. The
    /// same number on RabbitMQ 3.10 (no default limit) and 4.x (default 20).
    pub delivery_limit: u32,
    /// Where the delivery limit and dead-letter target of consumed queues come from.
    pub consumer_queue_limits: QueueLimits,
}

impl TopologySettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            (1..=1024).contains(&self.partitions),
            "topology.partitions",
            "must be between 1 and 1024",
        )?;
        ensure(
            !self.prefix.chars().any(char::is_whitespace),
            "topology.prefix",
            "must not contain whitespace",
        )?;
        ensure(
            self.delivery_limit > 0,
            "topology.delivery_limit",
            "must be at least 1",
        )
    }
}

/// How consumed queues get their delivery limit and dead-letter target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueLimits {
    /// Declared as queue arguments (new deployments).
    Arguments,
    /// Left to a broker policy: for queues declared by an earlier version, whose arguments cannot
    /// change on redeclare (README, "Moving queues to delivery limits").
    Policy,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line (production).
    Json,
    /// Human-readable lines.
    Pretty,
}

/// `[log]`: the log line format; the filter comes from `RUST_LOG`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogSettings {
    /// `json` or `pretty`.
    pub format: LogFormat,
}

/// `[generation]`: limits, submit retries and retry queues of the generation orchestrator.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct GenerationSettings {
    /// Prefetch on the `video.generation` queue.
    pub prefetch: u16,
    /// Messages handled at once per instance.
    pub concurrency: usize,
    /// Longest accepted prompt, in characters.
    pub max_prompt_length: usize,
    /// Longest accepted clip, in seconds.
    pub max_duration_seconds: u32,
    /// Submit attempts on transient provider errors.
    pub submit_max_attempts: u32,
    /// First backoff between submit attempts.
    pub submit_backoff_initial_ms: u64,
    /// Longest backoff between submit attempts.
    pub submit_backoff_max_ms: u64,
    /// A task still `pending` this long after creation is re-driven by the sweeper.
    pub pending_grace_ms: u64,
    /// Largest message body accepted on `video.generation`, checked before parsing.
    pub max_message_bytes: usize,
    /// Largest `metadata` of a request, as JSON.
    pub max_metadata_bytes: usize,
    /// Delays of the retry queues `video.generation.retry.{ms}`: the n-th retry of a message that
    /// failed for a transient reason waits the n-th tier (the last one from then on).
    pub retry_tiers_ms: Vec<u64>,
    /// How long a message may keep failing for transient reasons before it is parked.
    pub retry_max_ms: u64,
    /// What to do with a submit whose outcome is unknown (no answer after sending, or a crash
    /// before the job was recorded): the provider may have created a job.
    pub ambiguous_submit: AmbiguousSubmit,
}

/// `generation.ambiguous_submit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AmbiguousSubmit {
    /// The task fails, `retryable`, with `error: "submission outcome unknown"`: never a second
    /// job billed silently; the client decides whether to ask again.
    Fail,
    /// Submit again: the task completes, at the risk of a second job at the provider.
    Resubmit,
}

impl GenerationSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            self.concurrency > 0,
            "generation.concurrency",
            "must be at least 1",
        )?;
        ensure(
            self.prefetch > 0,
            "generation.prefetch",
            "must be at least 1 (0 means unbounded)",
        )?;
        ensure(
            !self.retry_tiers_ms.is_empty()
                && !self.retry_tiers_ms.contains(&0)
                && strictly_increasing(&self.retry_tiers_ms),
            "generation.retry_tiers_ms",
            "needs at least one tier, strictly increasing, none of them 0",
        )?;
        ensure(
            self.max_message_bytes >= 1024,
            "generation.max_message_bytes",
            "must be at least 1024",
        )?;
        ensure(
            self.submit_max_attempts > 0,
            "generation.submit_max_attempts",
            "must be at least 1",
        )
    }
}

/// How checks are serialised inside one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SerializeBy {
    /// One check at a time per task (default).
    Request,
    /// One check at a time per virtual key (the seed's partitioner).
    VirtualKey,
}

/// `[tracking]`: check intervals, concurrency, delay tiers and partition leases of progress
/// tracking and the sweeper.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TrackingSettings {
    /// First interval between checks.
    pub min_interval_ms: u64,
    /// Longest interval between checks.
    pub max_interval_ms: u64,
    /// A task processing longer than this is timed out.
    pub max_duration_ms: u64,
    /// A processing task whose next check is overdue by this much is re-armed.
    pub sweeper_grace_ms: u64,
    /// How often the sweeper looks.
    pub sweeper_interval_ms: u64,
    /// Checks in flight per instance.
    pub concurrency: usize,
    /// Checks in flight per virtual key per instance.
    pub per_key_concurrency: usize,
    /// Prefetch per partition consumer.
    pub prefetch: u16,
    /// `request` or `virtual_key`.
    pub serialize_by: SerializeBy,
    /// Delay tier queues, in milliseconds.
    pub delay_tiers_ms: Vec<u64>,
    /// A partition lease not renewed for this long is free for another instance.
    pub lease_ttl_ms: u64,
    /// How often leases are renewed and rebalanced.
    pub lease_heartbeat_ms: u64,
}

impl TrackingSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            !self.delay_tiers_ms.is_empty() && !self.delay_tiers_ms.contains(&0),
            "tracking.delay_tiers_ms",
            "needs at least one tier, none of them 0",
        )?;
        ensure(
            strictly_increasing(&self.delay_tiers_ms),
            "tracking.delay_tiers_ms",
            "must be strictly increasing",
        )?;
        ensure(
            self.min_interval_ms > 0,
            "tracking.min_interval_ms",
            "must be above 0",
        )?;
        ensure(
            self.max_interval_ms >= self.min_interval_ms,
            "tracking.max_interval_ms",
            "must not be below tracking.min_interval_ms",
        )?;
        for (key, value) in [
            ("tracking.concurrency", self.concurrency),
            ("tracking.per_key_concurrency", self.per_key_concurrency),
        ] {
            ensure(value > 0, key, "must be at least 1")?;
        }
        ensure(
            self.prefetch > 0,
            "tracking.prefetch",
            "must be at least 1 (0 means unbounded)",
        )?;
        ensure(
            self.lease_heartbeat_ms > 0 && self.lease_ttl_ms > self.lease_heartbeat_ms,
            "tracking.lease_ttl_ms",
            "must be longer than tracking.lease_heartbeat_ms (and the heartbeat above 0)",
        )
    }
}

/// `[outbox]`: how the relay drains the transactional outbox.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OutboxSettings {
    /// Rows published per round.
    pub batch_size: i64,
    /// Fallback poll when no local commit wakes the relay.
    pub poll_interval_ms: u64,
}

impl OutboxSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            self.batch_size > 0,
            "outbox.batch_size",
            "must be at least 1",
        )
    }
}

/// `[webhooks]`: signing, allowed hosts and retries of webhook delivery.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WebhookSettings {
    /// HMAC-SHA256 key for `X-Webhook-Signature`.
    #[serde(serialize_with = "secret_redacted")]
    pub secret: SecretString,
    /// Hosts allowed besides public ones (loopback and private addresses only when listed).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Also deliver progress events.
    pub include_progress: bool,
    /// Per-attempt timeout.
    pub timeout_ms: u64,
    /// Give up after retrying this long.
    pub max_retry_ms: u64,
    /// Also send the earlier `X-Webhook-Signature` (HMAC of `timestamp.body` with `secret`) for
    /// receivers written before Standard Webhooks signing.
    pub legacy_signature: bool,
}

impl WebhookSettings {
    fn validate(&self, environment: &str) -> Result<(), ConfigError> {
        ensure(
            !(environment == "production" && self.secret.expose_secret().is_empty()),
            "webhooks.secret",
            "must be set with APP_ENVIRONMENT=production: deliveries of tenants without a secret \
             of their own (`keys webhook-secret`) are signed with it",
        )?;
        ensure(
            self.timeout_ms > 0,
            "webhooks.timeout_ms",
            "must be at least 1",
        )
    }
}

/// `[security]`: publisher identity on the broker.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct SecuritySettings {
    /// RabbitMQ user → the virtual keys it may publish commands for (`"*"`: any). Empty: off.
    /// When set, a command must carry the AMQP `user_id` property (RabbitMQ refuses one that is
    /// not the publishing connection's user), and a command for a virtual key its user may not
    /// act for is refused (`publisher_not_allowed`) and parked.
    #[serde(default)]
    pub publishers: BTreeMap<String, Vec<String>>,
}

impl SecuritySettings {
    /// Whether RabbitMQ user `user` may act for `virtual_key_id`.
    pub fn may_publish_for(&self, user: &str, virtual_key_id: &str) -> bool {
        self.publishers
            .get(user)
            .is_some_and(|keys| keys.iter().any(|k| k == "*" || k == virtual_key_id))
    }

    fn validate(&self, rabbitmq: &RabbitSettings) -> Result<(), ConfigError> {
        ensure(
            self.publishers.is_empty() || rabbitmq.user().is_some(),
            "security.publishers",
            "needs the service's own RabbitMQ user in rabbitmq.url (not percent-encoded)",
        )
    }
}

/// `[retention]`: how long rows that are done are kept, in days (0 keeps them for ever); the
/// sweeper role removes older ones, a bounded batch at a time.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RetentionSettings {
    /// Completed, failed, cancelled and timed-out tasks, after they finished.
    pub terminal_tasks_days: u32,
    /// Webhook deliveries that were delivered or given up.
    pub webhook_deliveries_days: u32,
    /// Parked messages (their copy in `video.parking` is the broker's to expire).
    pub parked_messages_days: u32,
    /// Tombstones of cancels that came before their request.
    pub tombstones_days: u32,
    /// Heartbeat rows of instances that stopped.
    pub stale_instances_days: u32,
    /// Rows removed per statement; each rule runs until a batch comes back short.
    pub batch_size: i64,
    /// Pause between cleanups.
    pub interval_ms: u64,
}

impl RetentionSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            self.batch_size > 0,
            "retention.batch_size",
            "must be at least 1",
        )?;
        ensure(
            self.interval_ms > 0,
            "retention.interval_ms",
            "must be at least 1",
        )
    }
}

/// `[shutdown]`: how long a SIGTERM waits for in-flight work.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ShutdownSettings {
    /// In-flight work gets this long after SIGTERM.
    pub grace_ms: u64,
}

/// `serialize_with` for the providers, sorted by name so the output is stable.
fn providers_redacted<S: Serializer>(
    providers: &HashMap<String, ProviderSettings>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let sorted: BTreeMap<&str, &ProviderSettings> = providers
        .iter()
        .map(|(name, p)| (name.as_str(), p))
        .collect();
    sorted.serialize(s)
}

/// Where the service connects, passwords removed: for start-up errors and hints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    /// Every RabbitMQ node URL, comma-separated.
    pub rabbitmq: String,
    /// The PostgreSQL URL.
    pub database: String,
}

impl Settings {
    /// [`Targets`] of these settings.
    pub fn targets(&self) -> Targets {
        Targets {
            rabbitmq: self
                .rabbitmq
                .node_urls()
                .iter()
                .map(|u| crate::redact::redact_url(u.expose_secret()))
                .collect::<Vec<_>>()
                .join(", "),
            database: crate::redact::redact_url(self.database.url.expose_secret()),
        }
    }

    /// Loads from the process environment and the working directory.
    ///
    /// # Errors
    /// Returns [`ConfigError`] naming the first bad key.
    pub fn load() -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(&vars)
    }

    /// Loads with the given environment variables (tests pass their own).
    ///
    /// # Errors
    /// Returns [`ConfigError`] naming the first bad key.
    pub fn load_from(vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let var = |name: &str| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let environment = var("APP_ENVIRONMENT").unwrap_or_else(|| "local".to_owned());
        let mut env_source = config::Environment::with_prefix("APP")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(Some(
                vars.iter()
                    .filter(|(k, _)| k.starts_with("APP__"))
                    .cloned()
                    .collect(),
            ));
        for key in LIST_KEYS {
            env_source = env_source.with_list_parse_key(key);
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULT_TOML,
                config::FileFormat::Toml,
            ))
            .add_source(config::File::with_name("config/default").required(false))
            .add_source(config::File::with_name(&format!("config/{environment}")).required(false));
        if let Some(path) = var("APP_CONFIG_FILE") {
            builder = builder.add_source(config::File::with_name(&path).required(true));
        }
        // config's errors repeat themselves through `source()`: keep the one sentence.
        let load = |e: config::ConfigError| ConfigError::Load(e.to_string());
        let mut settings: Settings = builder
            .add_source(env_source)
            .build()
            .map_err(load)?
            .try_deserialize()
            .map_err(load)?;
        settings.environment = environment;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values that have the right type but no meaning, section by section.
    ///
    /// # Errors
    /// Returns [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.rabbitmq.validate()?;
        self.database.validate()?;
        self.topology.validate()?;
        self.http.validate()?;
        self.tracking.validate()?;
        self.generation.validate()?;
        self.outbox.validate()?;
        self.retention.validate()?;
        self.security.validate(&self.rabbitmq)?;
        self.interop.validate(&self.topology)?;
        self.telemetry.validate()?;
        self.validate_providers()?;
        self.webhooks.validate(&self.environment)
    }

    /// Each provider, the routing against them, and no route to the simulated provider in
    /// production. The providers' own checks name their key (`providers.sim.base_url`).
    fn validate_providers(&self) -> Result<(), ConfigError> {
        let invalid = |e: ProviderConfigError| ConfigError::invalid("providers", e.to_string());
        for (name, provider) in &self.providers {
            provider.validate(name).map_err(invalid)?;
        }
        self.routing.validate(&self.providers).map_err(invalid)?;
        let routes_to_sim = self.routing.default_provider.as_deref() == Some("sim")
            || self.routing.models.iter().any(|r| r.provider == "sim");
        ensure(
            !(self.environment == "production" && routes_to_sim),
            "routing.default_provider",
            "routing to the simulated provider `sim` is refused with APP_ENVIRONMENT=production",
        )
    }

    /// The effective configuration as TOML, secrets redacted (`config check`).
    ///
    /// Section and key names are those of `config/default.toml`, so the text loads back as a
    /// config file. URL secrets keep everything but the password (`***`); other secrets read
    /// `[REDACTED]` when set and `""` when not. The environment name is not a key: it comes
    /// from `APP_ENVIRONMENT`.
    ///
    /// # Errors
    /// Returns the serializer's error for a value TOML cannot hold (an integer above
    /// `i64::MAX`).
    pub fn redacted(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

mod durations;
mod interop;
mod telemetry;
pub use interop::{is_dotnet_namespace, InteropSettings, MassTransitSettings};
mod http;
pub use telemetry::TelemetrySettings;
#[cfg(test)]
mod tests;

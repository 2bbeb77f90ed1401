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
use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::providers::{ProviderSettings, RoutingSettings};
use crate::redact::{secret_redacted, url_redacted, urls_redacted};

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
    /// Video providers by name.
    #[serde(default, serialize_with = "providers_redacted")]
    pub providers: HashMap<String, ProviderSettings>,
    /// Model to provider routing.
    #[serde(default)]
    pub routing: RoutingSettings,
}

/// `[rabbitmq]`
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
}

/// `[database]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DatabaseSettings {
    /// `postgres://` URL; `?sslmode=require` and friends are honoured.
    #[serde(serialize_with = "url_redacted")]
    pub url: SecretString,
    /// Pool size.
    pub max_connections: u32,
    /// How long a query waits for a pooled connection.
    pub acquire_timeout_ms: u64,
}

/// `[topology]`
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

/// `[http]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HttpSettings {
    /// Address of `/healthz`, `/readyz`, `/metrics` and `/v1/tasks`.
    pub listen: SocketAddr,
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

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogSettings {
    /// `json` or `pretty`.
    pub format: LogFormat,
}

/// `[generation]`
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
}

impl GenerationSettings {
    /// [`Self::retry_max_ms`] as a duration.
    pub fn retry_max(&self) -> Duration {
        Duration::from_millis(self.retry_max_ms)
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

/// `[tracking]`
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

/// `[outbox]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OutboxSettings {
    /// Rows published per round.
    pub batch_size: i64,
    /// Fallback poll when no local commit wakes the relay.
    pub poll_interval_ms: u64,
}

/// `[webhooks]`
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
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ShutdownSettings {
    /// In-flight work gets this long after SIGTERM.
    pub grace_ms: u64,
}

impl ShutdownSettings {
    /// The grace period as a duration.
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }
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

impl Settings {
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

    /// Checks values that have the right type but no meaning.
    ///
    /// # Errors
    /// Returns [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, url) in self.rabbitmq.node_urls().iter().enumerate() {
            let key = if self.rabbitmq.urls.is_empty() {
                "rabbitmq.url".to_owned()
            } else {
                format!("rabbitmq.urls[{i}]")
            };
            url.expose_secret()
                .parse::<lapin::uri::AMQPUri>()
                .map_err(|e| ConfigError::invalid(&key, format!("not an AMQP URL: {e}")))?;
        }
        let db = self.database.url.expose_secret();
        if !(db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            return Err(ConfigError::invalid(
                "database.url",
                "must start with postgres:// or postgresql://",
            ));
        }
        db.parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| ConfigError::invalid("database.url", e.to_string()))?;
        if self.database.max_connections == 0 {
            return Err(ConfigError::invalid(
                "database.max_connections",
                "must be at least 1",
            ));
        }
        if self.topology.partitions == 0 || self.topology.partitions > 1024 {
            return Err(ConfigError::invalid(
                "topology.partitions",
                "must be between 1 and 1024",
            ));
        }
        if self.topology.prefix.chars().any(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "topology.prefix",
                "must not contain whitespace",
            ));
        }
        let t = &self.tracking;
        if t.delay_tiers_ms.is_empty() || t.delay_tiers_ms.contains(&0) {
            return Err(ConfigError::invalid(
                "tracking.delay_tiers_ms",
                "needs at least one tier, none of them 0",
            ));
        }
        let mut sorted = t.delay_tiers_ms.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted != t.delay_tiers_ms {
            return Err(ConfigError::invalid(
                "tracking.delay_tiers_ms",
                "must be strictly increasing",
            ));
        }
        if t.min_interval_ms == 0 {
            return Err(ConfigError::invalid(
                "tracking.min_interval_ms",
                "must be above 0",
            ));
        }
        if t.max_interval_ms < t.min_interval_ms {
            return Err(ConfigError::invalid(
                "tracking.max_interval_ms",
                "must not be below tracking.min_interval_ms",
            ));
        }
        for (key, value) in [
            ("tracking.concurrency", t.concurrency),
            ("tracking.per_key_concurrency", t.per_key_concurrency),
            ("generation.concurrency", self.generation.concurrency),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1"));
            }
        }
        for (key, value) in [
            ("tracking.prefetch", t.prefetch),
            ("generation.prefetch", self.generation.prefetch),
        ] {
            if value == 0 {
                return Err(ConfigError::invalid(
                    key,
                    "must be at least 1 (0 means unbounded)",
                ));
            }
        }
        if t.lease_heartbeat_ms == 0 || t.lease_ttl_ms <= t.lease_heartbeat_ms {
            return Err(ConfigError::invalid(
                "tracking.lease_ttl_ms",
                "must be longer than tracking.lease_heartbeat_ms (and the heartbeat above 0)",
            ));
        }
        let g = &self.generation;
        let mut sorted = g.retry_tiers_ms.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if g.retry_tiers_ms.is_empty()
            || g.retry_tiers_ms.contains(&0)
            || sorted != g.retry_tiers_ms
        {
            return Err(ConfigError::invalid(
                "generation.retry_tiers_ms",
                "needs at least one tier, strictly increasing, none of them 0",
            ));
        }
        if g.max_message_bytes < 1024 {
            return Err(ConfigError::invalid(
                "generation.max_message_bytes",
                "must be at least 1024",
            ));
        }
        if self.topology.delivery_limit == 0 {
            return Err(ConfigError::invalid(
                "topology.delivery_limit",
                "must be at least 1",
            ));
        }
        if self.generation.submit_max_attempts == 0 {
            return Err(ConfigError::invalid(
                "generation.submit_max_attempts",
                "must be at least 1",
            ));
        }
        if self.outbox.batch_size <= 0 {
            return Err(ConfigError::invalid(
                "outbox.batch_size",
                "must be at least 1",
            ));
        }
        crate::providers::Providers::from_settings(&self.providers, &self.routing)
            .map_err(|e| ConfigError::invalid("providers", e.to_string()))?;
        if self.environment == "production" {
            let routes_to_sim = self.routing.default_provider.as_deref() == Some("sim")
                || self.routing.models.iter().any(|r| r.provider == "sim");
            if routes_to_sim {
                return Err(ConfigError::invalid(
                    "routing.default_provider",
                    "routing to the simulated provider `sim` is refused with APP_ENVIRONMENT=production",
                ));
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ProviderKind;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_load() {
        let s = Settings::load_from(&[]).expect("defaults are valid");
        assert_eq!(s.topology.partitions, 16);
        assert_eq!(s.topology.prefix, "");
        assert_eq!(
            s.tracking.delay_tiers_ms,
            vec![1000, 2000, 5000, 10000, 30000, 60000]
        );
        assert_eq!(s.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(
            s.rabbitmq.url.expose_secret(),
            "amqp://guest:guest@127.0.0.1:5672/%2f"
        );
    }

    #[test]
    fn environment_overrides_nested_keys_and_lists() {
        let s = Settings::load_from(&env(&[
            ("APP__TOPOLOGY__PARTITIONS", "32"),
            ("APP__TOPOLOGY__PREFIX", "x."),
            ("APP__TRACKING__DELAY_TIERS_MS", "500,1000"),
            ("APP__RABBITMQ__URLS", "amqp://a:5672/%2f,amqp://b:5672/%2f"),
            ("APP__PROVIDERS__SIM__BASE_URL", "http://127.0.0.1:9999"),
        ]))
        .expect("valid");
        assert_eq!(s.topology.partitions, 32);
        assert_eq!(s.topology.prefix, "x.");
        assert_eq!(s.tracking.delay_tiers_ms, vec![500, 1000]);
        assert_eq!(s.rabbitmq.node_urls().len(), 2);
        assert_eq!(s.providers["sim"].base_url, "http://127.0.0.1:9999");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("APP__TOPOLOGY__PARTITIONS", "many", "topology.partitions"),
            ("APP__TOPOLOGY__PARTITIONS", "0", "topology.partitions"),
            ("APP__HTTP__LISTEN", "nowhere", "http.listen"),
            ("APP__DATABASE__URL", "mysql://x", "database.url"),
            ("APP__RABBITMQ__URL", "http://x", "rabbitmq.url"),
            (
                "APP__TRACKING__DELAY_TIERS_MS",
                "2000,1000",
                "tracking.delay_tiers_ms",
            ),
            (
                "APP__TRACKING__SERIALIZE_BY",
                "tenant",
                "tracking.serialize_by",
            ),
        ];
        for (var, value, key) in cases {
            let err = Settings::load_from(&env(&[(var, value)]))
                .expect_err(&format!("{var}={value} must fail"))
                .to_string();
            assert!(
                err.contains(key),
                "{var}={value}: error `{err}` does not name `{key}`"
            );
        }
    }

    #[test]
    fn tls_urls_are_accepted_for_the_broker_and_the_database() {
        let s = Settings::load_from(&env(&[
            (
                "APP__RABBITMQ__URL",
                "amqps://user:pw@rabbit.example:5671/%2f",
            ),
            (
                "APP__DATABASE__URL",
                "postgres://app@db.example:5432/video?sslmode=require",
            ),
        ]))
        .expect("TLS URLs are valid");
        let amqp: lapin::uri::AMQPUri = s.rabbitmq.url.expose_secret().parse().unwrap();
        assert_eq!(amqp.scheme, lapin::uri::AMQPScheme::AMQPS);
        assert_eq!(amqp.authority.port, 5671);
        let pg = crate::store::connect_options(&s.database).unwrap();
        assert!(matches!(
            pg.get_ssl_mode(),
            sqlx::postgres::PgSslMode::Require
        ));
    }

    #[test]
    fn production_refuses_the_simulated_provider() {
        let err = Settings::load_from(&env(&[("APP_ENVIRONMENT", "production")]))
            .expect_err("sim in production")
            .to_string();
        assert!(err.contains("sim"), "{err}");
    }

    /// Settings from TOML texts alone (later wins), checked like `load_from` checks them.
    fn from_toml(texts: &[&str]) -> Settings {
        let mut builder = config::Config::builder();
        for text in texts {
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        let settings: Settings = builder
            .build()
            .expect("TOML loads")
            .try_deserialize()
            .expect("TOML has every key");
        settings.validate().expect("valid");
        settings
    }

    #[test]
    fn redacted_output_loads_back_as_the_same_configuration() {
        // Away from every default, so a value that is dropped or misspelt cannot pass.
        let overrides = r#"
            [rabbitmq]
            urls = ["amqp://u:pw-a@a:5672/%2f", "amqps://b.example:5671/vhost"]
            [database]
            url = "postgres://app:pw-db@db.example:5432/video?sslmode=require"
            max_connections = 3
            [topology]
            prefix = "x."
            partitions = 4
            [http]
            listen = "0.0.0.0:9090"
            [log]
            format = "pretty"
            [tracking]
            serialize_by = "virtual_key"
            delay_tiers_ms = [500, 1500]
            [webhooks]
            secret = "whsec"
            allowed_hosts = ["hooks.internal", "10.0.0.7"]
            include_progress = true
            [providers.rep]
            kind = "replicate"
            base_url = "https://api.replicate.com"
            api_key = "r8-key"
            cancel_deletes = true
            [routing]
            default_provider = "rep"
            [[routing.models]]
            model = "veo-3"
            provider = "sim"
        "#;
        let original = from_toml(&[DEFAULT_TOML, overrides]);
        let text = original.redacted().expect("renders");
        text.parse::<toml::Table>()
            .unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"));

        // The output alone, no defaults underneath: it must be a complete config file.
        let reloaded = from_toml(&[&text]);
        // Every non-secret value survives; secrets come back as their redacted form.
        assert_eq!(reloaded.redacted().expect("renders"), text);
        assert_eq!(reloaded.topology.prefix, "x.");
        assert_eq!(reloaded.topology.partitions, 4);
        assert_eq!(reloaded.database.max_connections, 3);
        assert_eq!(reloaded.http.listen, original.http.listen);
        assert_eq!(reloaded.log.format, LogFormat::Pretty);
        assert_eq!(reloaded.tracking.serialize_by, SerializeBy::VirtualKey);
        assert_eq!(reloaded.tracking.delay_tiers_ms, vec![500, 1500]);
        assert_eq!(
            reloaded.webhooks.allowed_hosts,
            original.webhooks.allowed_hosts
        );
        assert!(reloaded.webhooks.include_progress);
        let rep = &reloaded.providers["rep"];
        assert_eq!(rep.kind, ProviderKind::Replicate);
        assert!(rep.cancel_deletes);
        assert_eq!(reloaded.providers.len(), original.providers.len());
        assert_eq!(reloaded.routing.default_provider.as_deref(), Some("rep"));
        assert_eq!(reloaded.routing.models.len(), 1);
        assert_eq!(reloaded.routing.models[0].model, "veo-3");
        assert_eq!(
            reloaded.database.url.expose_secret(),
            "postgres://app:***@db.example:5432/video?sslmode=require"
        );
        let urls: Vec<_> = reloaded
            .rabbitmq
            .urls
            .iter()
            .map(|u| u.expose_secret().to_owned())
            .collect();
        assert_eq!(
            urls,
            ["amqp://u:***@a:5672/%2f", "amqps://b.example:5671/vhost"]
        );
    }

    #[test]
    fn redacted_output_hides_every_secret() {
        let s = Settings::load_from(&env(&[
            (
                "APP__RABBITMQ__URL",
                "amqp://guest:rabbit-pw@127.0.0.1:5672/%2f",
            ),
            ("APP__DATABASE__URL", "postgres://u:hunter2@h/db"),
            ("APP__PROVIDERS__SIM__API_KEY", "sk-secret-123"),
            ("APP__WEBHOOKS__SECRET", "whsec-topsecret-456"),
        ]))
        .expect("valid");
        let text = s.redacted().expect("renders");
        for secret in [
            "rabbit-pw",
            "hunter2",
            "sk-secret-123",
            "whsec-topsecret-456",
        ] {
            assert!(!text.contains(secret), "`{secret}` leaked:\n{text}");
        }
        assert!(text.contains(r#"url = "postgres://u:***@h/db""#), "{text}");
        assert!(
            text.contains(r#"url = "amqp://guest:***@127.0.0.1:5672/%2f""#),
            "{text}"
        );
        assert!(text.contains(r#"secret = "[REDACTED]""#), "{text}");
        assert!(text.contains(r#"api_key = "[REDACTED]""#), "{text}");
    }

    #[test]
    fn an_unset_secret_prints_empty_so_it_shows_as_missing() {
        let s = Settings::load_from(&[]).expect("defaults are valid");
        let text = s.redacted().expect("renders");
        assert!(text.contains("secret = \"\"\n"), "{text}");
    }
}

//! Loading, checking and printing the configuration.

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

/// The error of loading the defaults with `var=value`.
fn load_error(var: &str, value: &str) -> String {
    Settings::load_from(&env(&[(var, value)]))
        .expect_err(&format!("{var}={value} must fail"))
        .to_string()
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
        let err = load_error(var, value);
        assert!(
            err.contains(key),
            "{var}={value}: error `{err}` does not name `{key}`"
        );
    }
}

#[test]
fn bad_provider_and_routing_values_fail_the_load_naming_their_key() {
    let cases = [
        (
            "APP__PROVIDERS__SIM__BASE_URL",
            "ftp://x",
            "providers.sim.base_url",
        ),
        (
            "APP__PROVIDERS__SIM__TIMEOUT_MS",
            "0",
            "providers.sim.timeout_ms",
        ),
        (
            "APP__ROUTING__DEFAULT_PROVIDER",
            "missing",
            "routing.default_provider",
        ),
    ];
    for (var, value, key) in cases {
        let err = load_error(var, value);
        assert!(
            err.starts_with("configuration key `providers`: ") && err.contains(key),
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

#[test]
fn production_refuses_webhooks_without_a_secret() {
    let settings = Settings::load_from(&env(&[])).expect("defaults load");
    let err = settings
        .webhooks
        .validate("production")
        .expect_err("no webhook secret in production")
        .to_string();
    assert!(err.contains("webhooks.secret"), "{err}");
    assert!(settings.webhooks.validate("local").is_ok());
    let mut with_secret = settings.webhooks.clone();
    with_secret.secret = SecretString::from("s3cret");
    assert!(with_secret.validate("production").is_ok());
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

#[test]
fn span_export_is_off_by_default_and_posts_to_v1_traces() {
    let s = Settings::load_from(&env(&[])).expect("defaults load");
    assert_eq!(s.telemetry.traces_url(), None);
    assert_eq!(s.telemetry.service_name, "video-orchestrator");
    for base in ["http://127.0.0.1:4318", "http://127.0.0.1:4318/"] {
        let s = Settings::load_from(&env(&[("APP__TELEMETRY__OTLP_ENDPOINT", base)]))
            .expect("an endpoint loads");
        assert_eq!(
            s.telemetry.traces_url().as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
    }
}

#[test]
fn a_bad_otlp_endpoint_fails_naming_the_key() {
    for bad in ["not a url", "ftp://collector:4318", "127.0.0.1:4318"] {
        let err = Settings::load_from(&env(&[("APP__TELEMETRY__OTLP_ENDPOINT", bad)]))
            .expect_err(bad)
            .to_string();
        assert!(err.contains("telemetry.otlp_endpoint"), "{bad}: {err}");
    }
}

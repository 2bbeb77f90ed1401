//! Webhooks: terminal events (and optionally progress) POSTed to a request's `callbackUrl`,
//! signed with HMAC-SHA256, retried with backoff for a bounded time.
//!
//! Deliveries are rows written in the same transaction as the event they carry, so a restart
//! loses none; any instance's dispatcher may send them (`FOR UPDATE SKIP LOCKED` claims a row),
//! and sending never blocks a message consumer.

use std::net::IpAddr;
use std::time::Duration;

use futures::future::join_all;
use hmac::{Hmac, Mac};
use rand::Rng;
use secrecy::ExposeSecret;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::WebhookSettings;
use crate::messages::Envelope;
use crate::store::{DueWebhook, Store, StoreError, UnitOfWork};

/// Header with the unix time the delivery was signed.
pub const TIMESTAMP_HEADER: &str = "X-Webhook-Timestamp";
/// Header with `sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`.
pub const SIGNATURE_HEADER: &str = "X-Webhook-Signature";

/// `sha256=<hex>` signature of `body` at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a signature as a receiver would (constant-time comparison).
pub fn verify(secret: &str, timestamp: i64, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Whether `url` may receive webhooks: `http`/`https` only; with `allowed_hosts` empty, any
/// public host; otherwise only the listed hosts. Loopback, private and link-local addresses only
/// when listed.
///
/// # Errors
/// A sentence saying why not.
pub fn validate_url(url: &str, allowed_hosts: &[String]) -> Result<url::Url, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "scheme `{}` is not allowed (http or https only)",
            parsed.scheme()
        ));
    }
    let host = parsed
        .host_str()
        .ok_or("has no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    let listed = allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host));
    if !allowed_hosts.is_empty() && !listed {
        return Err(format!("host `{host}` is not in webhooks.allowed_hosts"));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        if !is_public(ip) && !listed {
            return Err(format!(
                "address {ip} is not public; list it in webhooks.allowed_hosts to allow it"
            ));
        }
    } else if (host.eq_ignore_ascii_case("localhost") || host.ends_with(".localhost")) && !listed {
        return Err("localhost is not allowed unless listed in webhooks.allowed_hosts".to_owned());
    }
    Ok(parsed)
}

/// Records a delivery of `event` to `url` in the caller's unit of work, given up after
/// `webhooks.max_retry_ms`.
///
/// # Errors
/// Database errors.
pub async fn enqueue(
    uow: &mut UnitOfWork,
    request_id: &str,
    url: &str,
    event: &Envelope,
    settings: &WebhookSettings,
) -> Result<(), StoreError> {
    let give_up_after = Duration::from_millis(settings.max_retry_ms);
    uow.enqueue_webhook(request_id, url, event, give_up_after)
        .await
}

/// Sends due deliveries until stopped.
#[derive(Debug)]
pub struct WebhookDispatcher {
    store: Store,
    settings: WebhookSettings,
    client: reqwest::Client,
}

impl WebhookDispatcher {
    /// A dispatcher.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(store: Store, settings: WebhookSettings) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            store,
            settings,
            client,
        })
    }

    /// Polls for due deliveries every 250 ms until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            let sent = match self.dispatch_due().await {
                Ok(n) => n,
                Err(e) => {
                    debug!(error = %e, "webhook dispatch round failed");
                    0
                }
            };
            if sent == 0 {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            } else if stop.is_cancelled() {
                return;
            }
        }
    }

    /// Claims and sends one batch of due deliveries. Returns how many were attempted.
    ///
    /// # Errors
    /// Database errors.
    pub async fn dispatch_due(&self) -> Result<usize, StoreError> {
        // A claim outlives the longest send (timeout, twice for a slow DNS answer, plus slack).
        let lease = Duration::from_millis(self.settings.timeout_ms * 2) + Duration::from_secs(5);
        let due = self.store.claim_due_webhooks(lease, 32).await?;
        let n = due.len();
        let results = join_all(due.iter().map(|d| self.send(d))).await;
        for (d, result) in due.iter().zip(results) {
            match result {
                Ok(()) => {
                    self.store.mark_webhook_delivered(d.id).await?;
                    metrics::counter!("video_webhook_deliveries_total", "outcome" => "delivered")
                        .increment(1);
                    info!(url = %d.url, event = %d.event_type, attempts = d.attempts, "webhook delivered");
                }
                Err(error) => {
                    let backoff_s = (2f64.powi(d.attempts.min(6))
                        * rand::rng().random_range(0.8..1.2))
                    .min(60.0);
                    self.store
                        .defer_webhook(d.id, &error, Duration::from_secs_f64(backoff_s))
                        .await?;
                    metrics::counter!("video_webhook_deliveries_total", "outcome" => "failed")
                        .increment(1);
                    warn!(url = %d.url, event = %d.event_type, attempts = d.attempts, %error, "webhook attempt failed");
                }
            }
        }
        Ok(n)
    }

    async fn send(&self, d: &DueWebhook) -> Result<(), String> {
        let url = validate_url(&d.url, &self.settings.allowed_hosts)?;
        // Re-check what the name resolves to now (DNS can change after the request was accepted).
        let listed = url.host_str().is_some_and(|h| {
            self.settings
                .allowed_hosts
                .iter()
                .any(|a| a.eq_ignore_ascii_case(h.trim_matches(['[', ']'])))
        });
        if !listed {
            let host = url.host_str().unwrap_or_default().to_owned();
            let port = url.port_or_known_default().unwrap_or(443);
            let addrs = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| format!("cannot resolve {host}: {e}"))?;
            for addr in addrs {
                if !is_public(addr.ip()) {
                    return Err(format!(
                        "{host} resolves to non-public address {}",
                        addr.ip()
                    ));
                }
            }
        }
        let timestamp = chrono::Utc::now().timestamp();
        let signature = sign(self.settings.secret.expose_secret(), timestamp, &d.body);
        let response = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, signature)
            .header("X-Webhook-Event", &d.event_type)
            .header("X-Webhook-Id", &d.message_id)
            .body(d.body.clone())
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("receiver answered {}", response.status()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_detect_tampering() {
        let sig = sign("s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(sig.starts_with("sha256="));
        assert!(verify("s3cret", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify("s3cret", 1_700_000_001, b"{\"a\":1}", &sig));
        assert!(!verify("other", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify("s3cret", 1_700_000_000, b"{\"a\":2}", &sig));
    }

    #[test]
    fn urls_are_checked() {
        assert!(validate_url("https://example.com/hook", &[]).is_ok());
        assert!(validate_url("ftp://example.com/hook", &[]).is_err());
        assert!(validate_url("http://127.0.0.1:9000/hook", &[]).is_err());
        assert!(validate_url("http://10.1.2.3/hook", &[]).is_err());
        assert!(validate_url("http://169.254.169.254/latest", &[]).is_err());
        assert!(validate_url("http://[::1]:9000/hook", &[]).is_err());
        assert!(validate_url("http://localhost:9000/hook", &[]).is_err());
        let allowed = vec!["127.0.0.1".to_owned()];
        assert!(validate_url("http://127.0.0.1:9000/hook", &allowed).is_ok());
        assert!(validate_url("https://example.com/hook", &allowed).is_err());
    }
}

//! Webhooks: terminal events (and optionally progress) POSTed to a request's `callbackUrl`,
//! signed with HMAC-SHA256, retried with backoff for a bounded time.
//!
//! Deliveries are rows written in the same transaction as the event they carry, so a restart
//! loses none; any instance's dispatcher may send them (`FOR UPDATE SKIP LOCKED` claims a row),
//! and sending never blocks a message consumer.

mod address;
mod signature;

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rand::Rng;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use address::{is_public, loggable, validate_url, VettedResolver};
pub use signature::{
    new_secret, sign, sign_standard, verify, verify_standard, SIGNATURE_HEADER, STANDARD_ID_HEADER,
    STANDARD_SIGNATURE_HEADER, STANDARD_TIMESTAMP_HEADER, TIMESTAMP_HEADER,
};

use crate::config::WebhookSettings;
use crate::messages::Envelope;
use crate::store::{DueWebhook, Store, StoreError, UnitOfWork};

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
    let give_up_after = settings.max_retry();
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
            .timeout(settings.timeout())
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(VettedResolver::new(&settings.allowed_hosts)))
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
                    info!(url = %loggable(&d.url), event = %d.event_type, attempts = d.attempts, "webhook delivered");
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
                    warn!(url = %loggable(&d.url), event = %d.event_type, attempts = d.attempts, %error, "webhook attempt failed");
                }
            }
        }
        Ok(n)
    }

    /// The secrets that sign for the delivery's tenant: its own, or the global
    /// `webhooks.secret` when it has none.
    async fn secrets(&self, d: &DueWebhook) -> Result<Vec<String>, String> {
        let own = match &d.virtual_key_id {
            Some(vk) => self
                .store
                .live_webhook_secrets(vk)
                .await
                .map_err(|e| format!("signing secrets unavailable: {e}"))?,
            None => Vec::new(),
        };
        if own.is_empty() {
            return Ok(vec![self.settings.secret.expose_secret().to_owned()]);
        }
        Ok(own)
    }

    /// One attempt. The URL is checked again (settings may have changed since the request was
    /// accepted); the client's [`VettedResolver`] checks what the name resolves to.
    async fn send(&self, d: &DueWebhook) -> Result<(), String> {
        let url = validate_url(&d.url, &self.settings.allowed_hosts)?;
        let secrets = self.secrets(d).await?;
        let timestamp = chrono::Utc::now().timestamp();
        let mut request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(STANDARD_ID_HEADER, &d.message_id)
            .header(STANDARD_TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                STANDARD_SIGNATURE_HEADER,
                sign_standard(&secrets, &d.message_id, timestamp, &d.body),
            )
            .header("X-Webhook-Event", &d.event_type)
            .header("X-Webhook-Id", &d.message_id);
        if self.settings.legacy_signature {
            let legacy = sign(self.settings.secret.expose_secret(), timestamp, &d.body);
            request = request
                .header(TIMESTAMP_HEADER, timestamp.to_string())
                .header(SIGNATURE_HEADER, legacy);
        }
        let response = request
            .body(d.body.clone())
            .send()
            .await
            .map_err(|e| format!("request failed: {}", error_chain(&e.without_url())))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("receiver answered {}", response.status()))
        }
    }
}

/// An error with its causes, `: `-separated (the resolver's refusal is a cause of reqwest's).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

//! Webhook signatures.
//!
//! - [Standard Webhooks](https://www.standardwebhooks.com/) (`webhook-id`, `webhook-timestamp`,
//!   `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`), so receivers use an
//!   existing verifier. Each tenant signs with its own secrets (`whsec_…`); during a rotation
//!   every live secret signs, space-separated, and a receiver accepts any one it knows.
//! - The earlier scheme (`X-Webhook-Signature: sha256=<hex HMAC of "timestamp.body">` with the
//!   global `webhooks.secret`), sent too while `webhooks.legacy_signature` is on.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Header with the unix time the delivery was signed (earlier scheme).
pub const TIMESTAMP_HEADER: &str = "X-Webhook-Timestamp";
/// Header with `sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>` (earlier scheme).
pub const SIGNATURE_HEADER: &str = "X-Webhook-Signature";

/// Standard Webhooks: the delivery's stable id (our event's `messageId`).
pub const STANDARD_ID_HEADER: &str = "webhook-id";
/// Standard Webhooks: unix seconds when it was signed.
pub const STANDARD_TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// Standard Webhooks: `v1,<base64>` per live secret, space-separated.
pub const STANDARD_SIGNATURE_HEADER: &str = "webhook-signature";

const SECRET_PREFIX: &str = "whsec_";

fn mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length")
}

/// `sha256=<hex>` signature of `body` at `timestamp` (earlier scheme).
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = legacy_mac(secret, timestamp, body).finalize().into_bytes();
    format!("sha256={}", hex::encode(tag))
}

fn legacy_mac(secret: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = mac(secret.as_bytes());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Checks an earlier-scheme signature as a receiver would (constant-time comparison).
pub fn verify(secret: &str, timestamp: i64, body: &[u8], signature: &str) -> bool {
    let Some(expected) = signature
        .strip_prefix("sha256=")
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    legacy_mac(secret, timestamp, body)
        .verify_slice(&expected)
        .is_ok()
}

/// A new Standard Webhooks secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", BASE64.encode(key))
}

/// The HMAC key of a secret: the base64 after `whsec_`, or (for a secret not made by
/// [`new_secret`], such as the global `webhooks.secret`) its bytes as written.
fn key_of(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix(SECRET_PREFIX)
        .and_then(|b| BASE64.decode(b).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// The HMAC of `id.timestamp.body` under `secret`, ready to finish or verify.
fn standard_mac(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = mac(&key_of(secret));
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// One `v1,<base64>` signature of `id.timestamp.body`.
fn standard_signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = standard_mac(secret, id, timestamp, body)
        .finalize()
        .into_bytes();
    format!("v1,{}", BASE64.encode(tag))
}

/// The `webhook-signature` value: one signature per secret, space-separated.
pub fn sign_standard(secrets: &[String], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| standard_signature(s, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks a `webhook-signature` value as a Standard Webhooks receiver does: any `v1` entry
/// that matches `secret` passes (constant-time per entry).
pub fn verify_standard(secret: &str, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    header.split(' ').any(|entry| {
        let Some(sig) = entry
            .strip_prefix("v1,")
            .and_then(|b| BASE64.decode(b).ok())
        else {
            return false;
        };
        standard_mac(secret, id, timestamp, body)
            .verify_slice(&sig)
            .is_ok()
    })
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

    /// The example of the Standard Webhooks reference libraries (secret, id, timestamp,
    /// payload and the signature they compute).
    #[test]
    fn the_standard_webhooks_reference_example_verifies() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let timestamp = 1_614_265_330;
        let body = br#"{"test": 2432232314}"#;
        let expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(
            sign_standard(&[secret.to_owned()], id, timestamp, body),
            expected
        );
        assert!(verify_standard(secret, id, timestamp, body, expected));
    }

    #[test]
    fn during_a_rotation_either_secret_verifies() {
        let old = new_secret();
        let new = new_secret();
        assert_ne!(old, new);
        let header = sign_standard(&[new.clone(), old.clone()], "msg_1", 1, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        assert!(verify_standard(&old, "msg_1", 1, b"{}", &header));
        assert!(verify_standard(&new, "msg_1", 1, b"{}", &header));
        assert!(!verify_standard(&new_secret(), "msg_1", 1, b"{}", &header));
        assert!(!verify_standard(&new, "msg_2", 1, b"{}", &header));
    }
}

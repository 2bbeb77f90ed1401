//! Secrets as they may be shown: URLs without their password, other secrets as `[REDACTED]`.
//!
//! A module of its own because both [`crate::config`] (for `config check`) and
//! [`crate::providers`] (whose settings carry an API key) print settings, and neither should
//! import the other for it.

use secrecy::{ExposeSecret, SecretString};
use serde::Serializer;

/// What a set secret, or a URL that does not parse, is printed as.
const REDACTED: &str = "[REDACTED]";

/// A URL with its password replaced by `***`, for logs and `config check`.
///
/// A `password` query parameter (which libpq and sqlx accept) is masked the same way. A URL
/// without a password comes back unchanged; one that does not parse comes back as
/// `[REDACTED]`, since there is no telling where its password is.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return REDACTED.to_owned();
    };
    let query_password = parsed
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"));
    if parsed.password().is_none() && !query_password {
        return url.to_owned();
    }
    if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
        return REDACTED.to_owned();
    }
    if query_password {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    "***".into()
                } else {
                    v
                };
                (k.into_owned(), v.into_owned())
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// `serialize_with` for a URL secret: the URL without its password.
pub(crate) fn url_redacted<S: Serializer>(url: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url.expose_secret()))
}

/// `serialize_with` for a list of URL secrets.
pub(crate) fn urls_redacted<S: Serializer>(urls: &[SecretString], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(urls.iter().map(|u| redact_url(u.expose_secret())))
}

/// `serialize_with` for any other secret: `[REDACTED]` when set, empty when not (so a
/// missing key shows).
pub(crate) fn secret_redacted<S: Serializer>(
    secret: &SecretString,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(if secret.expose_secret().is_empty() {
        ""
    } else {
        REDACTED
    })
}

/// As [`secret_redacted`], for an optional secret (`None` serialises as none).
pub(crate) fn optional_secret_redacted<S: Serializer>(
    secret: &Option<SecretString>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(secret) => secret_redacted(secret, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_only_their_password() {
        assert_eq!(
            redact_url("amqps://user:s3cret@rabbit.example:5671/%2f"),
            "amqps://user:***@rabbit.example:5671/%2f"
        );
        assert_eq!(
            redact_url("postgres://app@db.example/video?sslmode=require"),
            "postgres://app@db.example/video?sslmode=require",
            "no password: unchanged"
        );
        assert_eq!(
            redact_url("postgres://app@db.example/video?password=s3cret&sslmode=require"),
            "postgres://app@db.example/video?password=***&sslmode=require"
        );
        assert_eq!(redact_url("not a url s3cret"), "[REDACTED]");
    }
}

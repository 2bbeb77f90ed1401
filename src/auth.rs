//! API keys for the HTTP API: per tenant, random, shown once, stored only as a hash.
//!
//! A key reads `vo_<id>_<secret>`: the id (16 hex digits) finds the row, the secret (256 random
//! bits, hex) is compared in constant time with the stored SHA-256. A key acts for one virtual
//! key (tenant); an admin key reads every tenant's tasks. Neither the key, its hash, nor the
//! `Authorization` header is ever logged.

use rand::RngCore;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::messages::MAX_ID_BYTES;
use crate::store::{ApiKeyRecord, Store, StoreError};

const KEY_PREFIX: &str = "vo_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// A key just created: the only moment its secret exists outside the caller's hands.
#[derive(Debug)]
pub struct CreatedKey {
    /// The stored row.
    pub record: ApiKeyRecord,
    /// The whole key, to hand to the tenant (`Authorization: Bearer <key>`).
    pub key: SecretString,
}

/// Who is calling, once a key was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's id (safe to log).
    pub key_id: String,
    /// The tenant the key acts for.
    pub virtual_key_id: String,
    /// Reads every tenant's tasks.
    pub admin: bool,
}

impl Caller {
    /// Whether this caller may see a task of `virtual_key_id`.
    pub fn may_read(&self, virtual_key_id: &str) -> bool {
        self.admin || self.virtual_key_id == virtual_key_id
    }
}

/// Why a request was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("an API key is required (Authorization: Bearer <key>)")]
    Missing,
    /// A key that is not ours, wrong, or revoked: the caller learns no more than that.
    #[error("the API key is not valid")]
    Invalid,
    /// The key store could not be read.
    #[error("keys cannot be checked now")]
    Unavailable(#[source] StoreError),
}

/// Why a key could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateKeyError {
    /// The virtual key is empty, too long or has control characters.
    #[error("--virtual-key {0}")]
    BadVirtualKey(&'static str),
    /// The database refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Splits `vo_<id>_<secret>`; `None` for anything else.
fn parse(key: &str) -> Option<(&str, &str)> {
    let (id, secret) = key.strip_prefix(KEY_PREFIX)?.split_once('_')?;
    let hex_of = |s: &str, n: usize| s.len() == n * 2 && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_of(id, ID_BYTES) && hex_of(secret, SECRET_BYTES)).then_some((id, secret))
}

/// Creates a key for `virtual_key_id` and stores its hash.
///
/// # Errors
/// A virtual key that could never match a task, or database errors.
pub async fn create_key(
    store: &Store,
    virtual_key_id: &str,
    name: &str,
    admin: bool,
) -> Result<CreatedKey, CreateKeyError> {
    if virtual_key_id.trim().is_empty() {
        return Err(CreateKeyError::BadVirtualKey("must not be empty"));
    }
    if virtual_key_id.len() > MAX_ID_BYTES {
        return Err(CreateKeyError::BadVirtualKey(
            "is longer than a virtualKeyId may be",
        ));
    }
    if virtual_key_id.chars().any(char::is_control) || name.contains('\0') {
        return Err(CreateKeyError::BadVirtualKey(
            "must not contain control characters",
        ));
    }
    let id = random_hex(ID_BYTES);
    let secret = random_hex(SECRET_BYTES);
    let record = store
        .insert_api_key(&id, virtual_key_id, name, admin, &sha256(&secret))
        .await?;
    Ok(CreatedKey {
        record,
        key: SecretString::from(format!("{KEY_PREFIX}{id}_{secret}")),
    })
}

/// Checks an `Authorization` header value.
///
/// # Errors
/// [`AuthError`]: missing, invalid (unknown, wrong or revoked: the same answer for all three),
/// or the store is unreachable.
pub async fn authenticate(store: &Store, authorization: Option<&str>) -> Result<Caller, AuthError> {
    let header = authorization.ok_or(AuthError::Missing)?;
    let (scheme, key) = header.trim().split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Missing);
    }
    let (id, secret) = parse(key.trim()).ok_or(AuthError::Invalid)?;
    let record = store
        .api_key(id)
        .await
        .map_err(AuthError::Unavailable)?
        .ok_or(AuthError::Invalid)?;
    let matches: bool = sha256(secret).ct_eq(record.secret_sha256.as_slice()).into();
    if !matches || record.revoked_at.is_some() {
        return Err(AuthError::Invalid);
    }
    // Recorded to the minute: a key used within the last minute costs no second round trip.
    let recorded_recently = record
        .last_used_at
        .is_some_and(|at| chrono::Utc::now() - at < chrono::Duration::minutes(1));
    if !recorded_recently {
        if let Err(e) = store.touch_api_key(id).await {
            tracing::debug!(key_id = id, error = %e, "last use of the key not recorded");
        }
    }
    Ok(Caller {
        key_id: record.id,
        virtual_key_id: record.virtual_key_id,
        admin: record.admin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_keys_parse() {
        let id = "0123456789abcdef";
        let secret = "ab".repeat(32);
        assert_eq!(
            parse(&format!("vo_{id}_{secret}")),
            Some((id, secret.as_str()))
        );
        assert_eq!(parse(&format!("xx_{id}_{secret}")), None);
        assert_eq!(parse(&format!("vo_{id}_{}", &secret[1..])), None);
        assert_eq!(parse(&format!("vo_{id}x_{secret}")), None);
        assert_eq!(parse("vo_"), None);
    }

    #[test]
    fn a_caller_reads_its_own_tenant_and_an_admin_reads_all() {
        let tenant = Caller {
            key_id: "k".into(),
            virtual_key_id: "vk-a".into(),
            admin: false,
        };
        assert!(tenant.may_read("vk-a"));
        assert!(!tenant.may_read("vk-b"));
        let admin = Caller {
            admin: true,
            ..tenant
        };
        assert!(admin.may_read("vk-b"));
    }
}

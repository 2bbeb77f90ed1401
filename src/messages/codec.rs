//! JSON bodies: encoding, and decoding with errors that name the field.

use super::{Message, Meta, CURRENT_VERSION, MAX_ID_BYTES};

/// Why a body could not be decoded. The text names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON at all.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but a field is missing or has the wrong type.
    #[error("field `{field}`: {reason}")]
    Field {
        /// Path of the field (`.` for the body itself).
        field: String,
        /// serde's explanation.
        reason: String,
    },
    /// A version this build does not understand.
    #[error("field `version`: unsupported version {0} (this build understands {CURRENT_VERSION})")]
    UnsupportedVersion(u32),
    /// Neither the `type` property nor the routing key names a message this queue takes.
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    /// A field has the right type but an impossible value.
    #[error("field `{field}`: {reason}")]
    Invalid {
        /// Name of the field, as the body spells it.
        field: &'static str,
        /// What is impossible about the value.
        reason: String,
    },
    /// A value PostgreSQL or AMQP cannot hold (a NUL character, an id over
    /// [`MAX_ID_BYTES`]): never retried, refused at once.
    #[error("field `{field}`: {reason}")]
    Unstorable {
        /// Path of the field.
        field: String,
        /// What PostgreSQL or AMQP cannot hold in it.
        reason: String,
    },
}

impl DecodeError {
    /// The same error for a body found at `path` inside what was sent (a MassTransit envelope's
    /// `message`), its field named from there: `prompt` becomes `message.prompt`. An empty `path`
    /// changes nothing.
    #[must_use]
    pub fn within(self, path: &str) -> Self {
        let join = |field: String| match (path, field.as_str()) {
            ("", _) => field,
            (_, ".") => path.to_owned(),
            _ => format!("{path}.{field}"),
        };
        match self {
            Self::Field { field, reason } => Self::Field {
                field: join(field),
                reason,
            },
            Self::Unstorable { field, reason } => Self::Unstorable {
                field: join(field),
                reason,
            },
            other => other,
        }
    }
}

/// The first string (or object key) in `value` that holds a NUL character, as a field path.
/// PostgreSQL refuses `0x00` in `text` and `jsonb`, so such a message can never be stored.
fn nul_path(value: &serde_json::Value, path: &str) -> Option<String> {
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        serde_json::Value::String(s) => s.contains('\0').then(|| path.to_owned()),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_path(v, &format!("{path}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(join(k))
            } else {
                nul_path(v, &join(k))
            }
        }),
        _ => None,
    }
}

fn check_id(field: &str, value: &str) -> Result<(), DecodeError> {
    if value.len() > MAX_ID_BYTES {
        return Err(DecodeError::Unstorable {
            field: field.to_owned(),
            reason: format!(
                "{} bytes long; the limit is {MAX_ID_BYTES} (it travels as an AMQP short string)",
                value.len()
            ),
        });
    }
    Ok(())
}

/// Decodes a body into `M`, checking the version.
///
/// # Errors
/// [`DecodeError`] naming the field that is wrong.
pub fn decode<M: Message>(body: &[u8]) -> Result<M, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    if !value.is_object() {
        return Err(DecodeError::Field {
            field: ".".to_owned(),
            reason: "expected a JSON object".to_owned(),
        });
    }
    // Check the version first: a future version may have changed any other field.
    match value.get("version") {
        None => {
            return Err(DecodeError::Field {
                field: "version".to_owned(),
                reason: "missing field".to_owned(),
            })
        }
        Some(v) => match v.as_u64() {
            Some(v) if v == u64::from(CURRENT_VERSION) => {}
            Some(v) => {
                return Err(DecodeError::UnsupportedVersion(
                    u32::try_from(v).unwrap_or(u32::MAX),
                ))
            }
            None => {
                return Err(DecodeError::Field {
                    field: "version".to_owned(),
                    reason: format!("expected an unsigned integer, found {v}"),
                })
            }
        },
    }
    if let Some(field) = nul_path(&value, "") {
        return Err(DecodeError::Unstorable {
            field,
            reason: "contains a NUL character, which PostgreSQL cannot store".to_owned(),
        });
    }
    let message = serde_path_to_error::deserialize::<_, M>(&value).map_err(|e| {
        let mut path = e.path().to_string();
        let inner = e.into_inner().to_string();
        // A bad value in a field of the flattened `Meta` (`messageId`, `occurredAt`) is reported
        // at the body's root: ask `Meta` alone, whose error path names the field.
        if path == "." && !inner.starts_with("missing field") {
            if let Err(meta) = serde_path_to_error::deserialize::<_, Meta>(&value) {
                let meta_path = meta.path().to_string();
                if meta_path != "." {
                    path = meta_path;
                }
            }
        }
        // `missing field `x`` is reported at the parent path; name the field itself.
        let field = match inner
            .strip_prefix("missing field `")
            .and_then(|s| s.strip_suffix('`'))
        {
            Some(name) if path == "." => name.to_owned(),
            Some(name) => format!("{path}.{name}"),
            None => path,
        };
        DecodeError::Field {
            field,
            reason: inner,
        }
    })?;
    check_id("requestId", message.request_id())?;
    check_id("virtualKeyId", message.virtual_key_id())?;
    Ok(message)
}

/// Serialises a message body.
pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    serde_json::to_vec(message).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{request_json, VideoGenerationRequested};

    #[test]
    fn what_postgresql_or_amqp_cannot_hold_is_unstorable_naming_the_field() {
        let unstorable = |v: serde_json::Value| match decode::<VideoGenerationRequested>(
            &serde_json::to_vec(&v).unwrap(),
        ) {
            Err(DecodeError::Unstorable { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut v = request_json();
        v["prompt"] = serde_json::json!("a cat\u{0}");
        assert_eq!(unstorable(v), "prompt");
        let mut v = request_json();
        v["metadata"] = serde_json::json!({"outer": {"in\u{0}ner": 1}});
        assert_eq!(unstorable(v), "metadata.outer.in\u{0}ner");
        let mut v = request_json();
        v["requestId"] = serde_json::json!("r".repeat(MAX_ID_BYTES + 1));
        assert_eq!(unstorable(v), "requestId");
        let mut v = request_json();
        v["virtualKeyId"] = serde_json::json!("é".repeat(MAX_ID_BYTES / 2 + 1));
        assert_eq!(unstorable(v), "virtualKeyId");
        // At the limit is fine.
        let mut v = request_json();
        v["requestId"] = serde_json::json!("r".repeat(MAX_ID_BYTES));
        assert!(decode::<VideoGenerationRequested>(&serde_json::to_vec(&v).unwrap()).is_ok());
    }

    #[test]
    fn request_round_trips_and_ignores_unknown_fields() {
        let body = serde_json::to_vec(&request_json()).unwrap();
        let m: VideoGenerationRequested = decode(&body).unwrap();
        assert_eq!(m.request_id, "r-1");
        assert_eq!(m.duration_seconds, Some(4));
        let again: VideoGenerationRequested = decode(&encode(&m)).unwrap();
        assert_eq!(again, m);
        let v: serde_json::Value = serde_json::from_slice(&encode(&m)).unwrap();
        assert!(v.get("virtualKeyId").is_some() && v.get("messageId").is_some());
    }

    #[test]
    fn an_error_within_an_envelope_names_the_field_from_the_envelope() {
        let missing = DecodeError::Field {
            field: "prompt".into(),
            reason: "missing field `prompt`".into(),
        };
        assert!(matches!(
            missing.clone().within("message"),
            DecodeError::Field { field, .. } if field == "message.prompt"
        ));
        assert_eq!(missing.clone().within(""), missing);
        let root = DecodeError::Field {
            field: ".".into(),
            reason: "expected a JSON object".into(),
        };
        assert!(
            matches!(root.within("message"), DecodeError::Field { field, .. } if field == "message")
        );
        assert_eq!(
            DecodeError::UnsupportedVersion(2).within("message"),
            DecodeError::UnsupportedVersion(2)
        );
    }

    #[test]
    fn decode_errors_name_the_field() {
        let mut v = request_json();
        v.as_object_mut().unwrap().remove("requestId");
        let err = decode::<VideoGenerationRequested>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Field { field, .. } if field == "requestId"),
            "{err}"
        );

        let mut v = request_json();
        v["durationSeconds"] = serde_json::json!("four");
        let err = decode::<VideoGenerationRequested>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("durationSeconds"), "{err}");

        let mut v = request_json();
        v["version"] = serde_json::json!(99);
        let err = decode::<VideoGenerationRequested>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedVersion(99));

        let err = decode::<VideoGenerationRequested>(b"not json").unwrap_err();
        assert!(matches!(err, DecodeError::NotJson(_)));

        // Fields of the flattened `Meta` are named too, not reported at the root.
        for (field, bad) in [
            ("messageId", serde_json::json!(false)),
            ("messageId", serde_json::json!("not-a-uuid")),
            ("occurredAt", serde_json::json!("yesterday")),
        ] {
            let mut v = request_json();
            v[field] = bad;
            let err =
                decode::<VideoGenerationRequested>(&serde_json::to_vec(&v).unwrap()).unwrap_err();
            assert!(
                matches!(&err, DecodeError::Field { field: f, .. } if f == field),
                "{err}"
            );
        }
    }
}

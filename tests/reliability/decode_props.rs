//! Properties of message decoding (the stable toolchain has no cargo-fuzz; proptest explores the
//! same ground): decoding never panics, every error says what is wrong and where, every valid
//! message round-trips, unknown fields are ignored, and what the contract calls poison is
//! refused.

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use serde_json::{json, Value};
use video_orchestrator::messages::{
    self, decode, encode, DecodeError, GenerationCommand, Message, Meta, TaskOutcome,
    VideoGenerationCancelRequested, VideoGenerationRequested, VideoProgressCheckRequested,
    VideoProviderTaskFinished, CURRENT_VERSION,
};

/// The error text names a field, says the body is not JSON, or names the unknown type.
fn explains_itself(e: &DecodeError) -> bool {
    let text = e.to_string();
    match e {
        DecodeError::NotJson(_) => text.starts_with("body is not valid JSON"),
        DecodeError::Field { field, .. } => !field.is_empty() && text.contains("field `"),
        DecodeError::UnsupportedVersion(_) => text.starts_with("field `version`"),
        DecodeError::UnknownType(t) => text.contains(t.as_str()),
        DecodeError::Invalid { field, .. } => !field.is_empty() && text.contains("field `"),
        DecodeError::Unstorable { field, .. } => !field.is_empty() && text.contains("field `"),
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::String),
    ];
    tree(leaf)
}

/// JSON without floats, which serde_json's default parser may read back one ULP off: for
/// round-trip properties.
fn exact_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[^\\x00\n]{0,24}".prop_map(Value::String),
    ];
    tree(leaf)
}

fn tree(leaf: impl Strategy<Value = Value> + 'static) -> impl Strategy<Value = Value> {
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[^\\x00\n]{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Field names of the contract, so random objects hit real fields with random types.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("messageId".to_owned()),
        Just("occurredAt".to_owned()),
        Just("version".to_owned()),
        Just("requestId".to_owned()),
        Just("virtualKeyId".to_owned()),
        Just("model".to_owned()),
        Just("prompt".to_owned()),
        Just("durationSeconds".to_owned()),
        Just("sequence".to_owned()),
        Just("scheduledAt".to_owned()),
        Just("outcome".to_owned()),
        "[a-zA-Z]{1,10}",
    ]
}

fn contract_like_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(field_name(), any_json(), 0..10)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn timestamp() -> impl Strategy<Value = DateTime<Utc>> {
    // 1970 … 2100, whole milliseconds (what the contract writes).
    (0i64..4_102_444_800_000).prop_map(|ms| DateTime::from_timestamp_millis(ms).expect("in range"))
}

fn meta() -> impl Strategy<Value = Meta> {
    (any::<u128>(), timestamp()).prop_map(|(id, at)| Meta {
        message_id: uuid::Uuid::from_u128(id),
        occurred_at: at,
        version: CURRENT_VERSION,
    })
}

fn request() -> impl Strategy<Value = VideoGenerationRequested> {
    (
        meta(),
        "[^\\x00\n]{0,40}",
        "[^\\x00\n]{0,20}",
        "[^\\x00\n]{0,20}",
        "[^\\x00\n]{0,200}",
        proptest::option::of(any::<u32>()),
        proptest::option::of("[0-9]{1,4}x[0-9]{1,4}"),
        proptest::option::of("[a-z]{1,8}"),
        proptest::option::of(prop::collection::btree_map(
            "[a-z]{1,8}",
            exact_json(),
            0..4,
        )),
    )
        .prop_map(
            |(meta, request_id, virtual_key_id, model, prompt, duration, size, provider, md)| {
                VideoGenerationRequested {
                    meta,
                    request_id,
                    virtual_key_id,
                    model,
                    prompt,
                    duration_seconds: duration,
                    size,
                    provider,
                    callback_url: None,
                    image_url: None,
                    metadata: md.map(|m| Value::Object(m.into_iter().collect())),
                }
            },
        )
}

fn check() -> impl Strategy<Value = VideoProgressCheckRequested> {
    (
        meta(),
        "[^\\x00\n]{0,40}",
        "[^\\x00\n]{0,20}",
        timestamp(),
        any::<u32>(),
        timestamp(),
        any::<i64>(),
    )
        .prop_map(
            |(
                meta,
                request_id,
                virtual_key_id,
                scheduled_at,
                interval_index,
                start_time,
                sequence,
            )| {
                VideoProgressCheckRequested {
                    meta,
                    request_id,
                    virtual_key_id,
                    scheduled_at,
                    interval_index,
                    start_time,
                    sequence,
                }
            },
        )
}

fn finished() -> impl Strategy<Value = VideoProviderTaskFinished> {
    (
        meta(),
        "[^\\x00\n]{0,40}",
        "[^\\x00\n]{0,20}",
        prop_oneof![
            Just(TaskOutcome::Succeeded),
            Just(TaskOutcome::Failed),
            Just(TaskOutcome::Cancelled),
            Just(TaskOutcome::TimedOut),
        ],
        proptest::option::of("[^\\x00\n]{0,30}"),
        proptest::option::of("[^\\x00\n]{0,40}"),
        // Quarters are exact in binary, so the float survives JSON unchanged.
        proptest::option::of((0u32..100_000).prop_map(|q| f64::from(q) / 4.0)),
        proptest::option::of("[^\\x00\n]{0,40}"),
    )
        .prop_map(
            |(
                meta,
                request_id,
                virtual_key_id,
                outcome,
                provider_task_id,
                video_url,
                video_seconds,
                error,
            )| {
                VideoProviderTaskFinished {
                    meta,
                    request_id,
                    virtual_key_id,
                    outcome,
                    provider_task_id,
                    video_url,
                    video_url_expires_at: None,
                    video_seconds,
                    error,
                }
            },
        )
}

fn to_value<M: Message>(m: &M) -> serde_json::Map<String, Value> {
    match serde_json::to_value(m).expect("serialises") {
        Value::Object(o) => o,
        other => panic!("not an object: {other}"),
    }
}

const REQUEST_REQUIRED: [&str; 7] = [
    "messageId",
    "occurredAt",
    "version",
    "requestId",
    "virtualKeyId",
    "model",
    "prompt",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoding_arbitrary_bytes_never_panics_and_explains_itself(
        body in prop::collection::vec(any::<u8>(), 0..512),
        kind in proptest::option::of(prop_oneof![
            Just("VideoGenerationRequested".to_owned()),
            Just("VideoGenerationCancelRequested".to_owned()),
            Just("VideoProviderTaskFinished".to_owned()),
            "[^\\x00\n]{0,20}",
        ]),
    ) {
        if let Err(e) = GenerationCommand::decode(kind.as_deref(), "video.generation.requested", &body) {
            prop_assert!(explains_itself(&e), "{e}");
        }
        if let Err(e) = decode::<VideoProgressCheckRequested>(&body) {
            prop_assert!(explains_itself(&e), "{e}");
        }
    }

    #[test]
    fn decoding_arbitrary_json_names_the_field(value in prop_oneof![any_json(), contract_like_object()]) {
        let body = serde_json::to_vec(&value).expect("serialises");
        for result in [
            decode::<VideoGenerationRequested>(&body).map(|_| ()),
            decode::<VideoGenerationCancelRequested>(&body).map(|_| ()),
            decode::<VideoProviderTaskFinished>(&body).map(|_| ()),
            decode::<VideoProgressCheckRequested>(&body).map(|_| ()),
        ] {
            if let Err(e) = result {
                prop_assert!(explains_itself(&e), "{e}");
                prop_assert!(!matches!(e, DecodeError::NotJson(_)), "valid JSON reported as not JSON: {e}");
            }
        }
    }

    #[test]
    fn valid_messages_round_trip(r in request(), c in check(), f in finished()) {
        prop_assert_eq!(decode::<VideoGenerationRequested>(&encode(&r)).expect("request"), r.clone());
        prop_assert_eq!(decode::<VideoProgressCheckRequested>(&encode(&c)).expect("check"), c);
        prop_assert_eq!(decode::<VideoProviderTaskFinished>(&encode(&f)).expect("finished"), f.clone());
        // Through the generation queue's dispatch: by `type`, and by routing key without it.
        let by_type = GenerationCommand::decode(Some(VideoGenerationRequested::NAME), "x", &encode(&r));
        prop_assert_eq!(by_type.expect("by type"), GenerationCommand::Requested(r.clone()));
        let by_key = GenerationCommand::decode(None, VideoProviderTaskFinished::ROUTING_KEY, &encode(&f));
        prop_assert_eq!(by_key.expect("by key"), GenerationCommand::ProviderTaskFinished(f));
    }

    #[test]
    fn unknown_fields_are_ignored(
        r in request(),
        extra in prop::collection::btree_map("x[a-zA-Z]{1,10}", exact_json(), 1..6),
    ) {
        let mut o = to_value(&r);
        for (k, v) in extra {
            o.insert(k, v);
        }
        let body = serde_json::to_vec(&o).expect("serialises");
        prop_assert_eq!(decode::<VideoGenerationRequested>(&body).expect("decodes"), r);
    }

    #[test]
    fn a_missing_required_field_is_named(r in request(), which in 0..REQUEST_REQUIRED.len()) {
        let mut o = to_value(&r);
        let field = REQUEST_REQUIRED[which];
        o.remove(field);
        let err = decode::<VideoGenerationRequested>(&serde_json::to_vec(&o).expect("json"))
            .expect_err("a required field is missing");
        prop_assert!(
            matches!(&err, DecodeError::Field { field: f, .. } if f == field),
            "removing `{}` gave: {}", field, err
        );
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named(
        r in request(),
        which in 0..REQUEST_REQUIRED.len(),
        wrong in prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            Just(json!([])),
            Just(json!({})),
            Just(Value::Null),
            (-1000i64..-1).prop_map(|n| json!(n)),
        ],
    ) {
        let mut o = to_value(&r);
        let field = REQUEST_REQUIRED[which];
        o.insert(field.to_owned(), wrong);
        let err = decode::<VideoGenerationRequested>(&serde_json::to_vec(&o).expect("json"))
            .expect_err("a field has the wrong type");
        prop_assert!(err.to_string().contains(&format!("field `{field}`")), "{}: {}", field, err);
    }

    #[test]
    fn only_the_current_version_is_understood(r in request(), version in any::<u64>()) {
        prop_assume!(version != u64::from(CURRENT_VERSION));
        let mut o = to_value(&r);
        o.insert("version".to_owned(), json!(version));
        let err = decode::<VideoGenerationRequested>(&serde_json::to_vec(&o).expect("json"))
            .expect_err("an unknown version");
        prop_assert_eq!(err, DecodeError::UnsupportedVersion(u32::try_from(version).unwrap_or(u32::MAX)));
    }

    #[test]
    fn a_truncated_body_is_not_json(r in request(), cut in any::<prop::sample::Index>()) {
        let body = encode(&r);
        let at = cut.index(body.len());
        let err = decode::<VideoGenerationRequested>(&body[..at]).expect_err("truncated");
        prop_assert!(matches!(err, DecodeError::NotJson(_)), "{}", err);
    }
}

#[test]
fn the_poison_of_the_contract_is_refused() {
    let ok = serde_json::to_vec(&to_value(&VideoGenerationRequested {
        meta: Meta::new(),
        request_id: "r".into(),
        virtual_key_id: "vk".into(),
        model: "m".into(),
        prompt: "p".into(),
        duration_seconds: None,
        size: None,
        provider: None,
        callback_url: None,
        image_url: None,
        metadata: None,
    }))
    .expect("json");
    assert!(decode::<VideoGenerationRequested>(&ok).is_ok());
    for body in [
        &b""[..],
        b"null",
        b"[]",
        b"\"a string\"",
        b"{}",
        b"{\"version\": \"1\"}",
        b"{\"version\": 1.0}",
        b"{\"version\": -1}",
    ] {
        let err = decode::<VideoGenerationRequested>(body).expect_err("poison");
        assert!(explains_itself(&err), "{err}");
    }
    let err = messages::GenerationCommand::decode(Some("VideoGenerationStarted"), "x", &ok)
        .expect_err("not a command");
    assert_eq!(
        err,
        DecodeError::UnknownType("VideoGenerationStarted".into())
    );
}

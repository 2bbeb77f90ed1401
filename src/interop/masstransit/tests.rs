//! Reading and writing MassTransit's formats, without a broker.

use serde_json::{json, Value};

use super::*;
use crate::messages::{
    DecodeError, Envelope, GenerationCommand, Meta, VideoGenerationCompleted,
    VideoGenerationRequested, VideoProviderTaskFinished,
};

const NS: &str = "Contoso.Video.Contracts";

fn host() -> HostInfo {
    HostInfo {
        machine_name: "box".into(),
        process_name: "video-orchestrator".into(),
        process_id: 7,
        assembly: "video-orchestrator".into(),
        assembly_version: "0.1.0".into(),
        operating_system_version: "linux 6.1".into(),
    }
}

fn mt() -> MassTransit {
    let topology = Topology::new("t.", 2, vec![1000]).with_masstransit(NS);
    MassTransit::new(&topology, "amqp://guest:guest@127.0.0.1:5672/%2f", host())
        .expect("interop is on")
}

fn envelope(body: &Value) -> Vec<u8> {
    serde_json::to_vec(body).unwrap()
}

fn read_envelope(body: &Value) -> Result<Translated, DecodeError> {
    read(Some(ENVELOPE_CONTENT_TYPE), &[], &envelope(body)).expect("MassTransit's")
}

fn read(
    content_type: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Result<Translated, DecodeError>> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    mt().read(&Received {
        content_type,
        message_id: None,
        headers: &headers,
        body,
    })
}

fn request(t: &Translated) -> VideoGenerationRequested {
    match GenerationCommand::decode(Some(t.message_type), "", &t.body).expect("decodes") {
        GenerationCommand::Requested(r) => r,
        other => panic!("{other:?}"),
    }
}

fn payload() -> Value {
    json!({"requestId": "r-1", "virtualKeyId": "vk-1", "model": "sora-2", "prompt": "a cat"})
}

fn urn(name: &str) -> String {
    format!("urn:message:{NS}:{name}")
}

#[test]
fn urns_read_as_masstransit_reads_them() {
    assert_eq!(
        parse_urn("urn:message:Contoso.Video.Contracts:VideoGenerationRequested"),
        Some((Some(NS), "VideoGenerationRequested"))
    );
    assert_eq!(parse_urn("urn:message:Ping"), Some((None, "Ping")));
    assert_eq!(
        parse_urn("URN:Message:A.B:Outer+Inner:A.B.Assembly"),
        Some((Some("A.B"), "Outer+Inner"))
    );
    assert_eq!(parse_urn("urn:messages:publish-command"), None);
    assert_eq!(parse_urn("urn:message:"), None);
    assert_eq!(parse_urn("VideoGenerationRequested"), None);
}

#[test]
fn guids_read_in_every_dotnet_format_and_other_ids_derive_a_stable_uuid() {
    let id = "181c0000-6393-3630-36a4-08daf4e7c6da";
    for text in [
        id.to_owned(),
        id.replace('-', ""),
        format!("{{{id}}}"),
        format!("({id})"),
        id.to_uppercase(),
    ] {
        assert_eq!(
            guid(&text).map(|g| g.to_string()).as_deref(),
            Some(id),
            "{text}"
        );
    }
    let derived = message_id_from("Whiskey-Tango-Foxtrot 3-5-9er");
    assert_eq!(derived, message_id_from("Whiskey-Tango-Foxtrot 3-5-9er"));
    assert_ne!(derived, message_id_from("Whiskey-Tango-Foxtrot 3-5-9"));
    assert_eq!(derived.get_version(), Some(uuid::Version::Custom));
    assert_eq!(message_id_from(id).to_string(), id);
}

#[test]
fn addresses_leave_out_the_default_vhost_and_port_as_masstransit_does() {
    assert_eq!(
        address_base("amqp://guest:guest@127.0.0.1:5672/%2f"),
        "rabbitmq://127.0.0.1/"
    );
    assert_eq!(address_base("amqp://rabbit"), "rabbitmq://rabbit/");
    assert_eq!(
        address_base("amqps://u:p@mq.example:5671/video%20prod"),
        "rabbitmqs://mq.example/video%20prod/"
    );
    assert_eq!(
        address_base("amqp://u:p@mq:5673/v1"),
        "rabbitmq://mq:5673/v1/"
    );
    assert_eq!(
        mt().address("t.video.events"),
        "rabbitmq://127.0.0.1/t.video.events"
    );
}

#[test]
fn an_envelope_is_read_case_insensitively_with_its_guid_as_message_id() {
    let t = read_envelope(&json!({
        "MessageId": "181c0000-6393-3630-36a4-08daf4e7c6da",
        "ConversationId": "4bf92f35-77b3-4da6-a3ce-929d0e0e4736",
        "MessageType": [urn("VideoGenerationRequested")],
        "SentTime": "2023-01-12T21:55:53.7158820",
        "Message": {"RequestId": "r-1", "VIRTUALKEYID": "vk-1", "Model": "sora-2",
                    "Prompt": "a cat", "DurationSeconds": 4, "Metadata": {"KeepMe": 1}},
    }))
    .expect("read");
    assert_eq!(t.message_type, "VideoGenerationRequested");
    assert_eq!(t.payload_path, "message");
    let r = request(&t);
    assert_eq!(
        r.meta.message_id.to_string(),
        "181c0000-6393-3630-36a4-08daf4e7c6da"
    );
    assert_eq!(
        (r.request_id.as_str(), r.virtual_key_id.as_str()),
        ("r-1", "vk-1")
    );
    assert_eq!((r.prompt.as_str(), r.duration_seconds), ("a cat", Some(4)));
    // Inside opaque metadata nothing is renamed.
    assert_eq!(r.metadata, Some(json!({"KeepMe": 1})));
    // A time without an offset is UTC, as MassTransit writes an unspecified DateTime.
    assert_eq!(
        crate::messages::rfc3339(r.meta.occurred_at),
        "2023-01-12T21:55:53.715Z"
    );
    assert_eq!(r.meta.version, 1);
    let tp = t.traceparent.expect("a conversation is a trace");
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
}

#[test]
fn a_name_written_exactly_wins_over_another_spelling_of_it() {
    let t = read_envelope(&json!({
        "messageType": [urn("VideoGenerationRequested")],
        "message": {"requestId": "r-1", "virtualKeyId": "vk-1", "model": "sora-2",
                    "Prompt": "pascal", "prompt": "camel"},
    }))
    .expect("read");
    assert_eq!(request(&t).prompt, "camel");
}

#[test]
fn a_minimal_envelope_gets_a_stable_derived_message_id_and_no_trace() {
    let body = json!({"messageType": [urn("VideoGenerationRequested")], "message": payload()});
    let first = read_envelope(&body).expect("read");
    let again = read_envelope(&body).expect("read");
    assert_eq!(first.traceparent, None);
    assert_eq!(
        request(&first).meta.message_id,
        request(&again).meta.message_id
    );
    // The AMQP message_id stands in for a missing envelope messageId.
    let t = mt()
        .read(&Received {
            content_type: Some(ENVELOPE_CONTENT_TYPE),
            message_id: Some("181c0000-6393-3630-36a4-08daf4e7c6da"),
            headers: &[],
            body: &envelope(&body),
        })
        .expect("MassTransit's")
        .expect("read");
    assert_eq!(
        request(&t).meta.message_id.to_string(),
        "181c0000-6393-3630-36a4-08daf4e7c6da"
    );
}

#[test]
fn the_first_of_our_types_in_the_list_is_the_message_type() {
    let t = read_envelope(&json!({
        "messageType": [
            "urn:message:Contoso.Orders:OrderVideoRequested",
            urn("VideoGenerationCancelRequested"),
            urn("IVideoCommand"),
        ],
        "message": {"requestId": "r-1", "virtualKeyId": "vk-1"},
    }))
    .expect("read");
    assert_eq!(t.message_type, "VideoGenerationCancelRequested");
    // Our name in another namespace, or a type of ours they may not send, is nobody's.
    for urns in [
        json!(["urn:message:Other.Ns:VideoGenerationRequested"]),
        json!([urn("VideoProviderTaskFinished")]),
    ] {
        let err = read_envelope(&json!({"messageType": urns, "message": payload()})).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Field { field, reason } if field == "messageType" && reason.contains(&urn("VideoGenerationRequested"))),
            "{err}"
        );
    }
}

#[test]
fn a_malformed_envelope_is_an_error_naming_the_field() {
    let cases = [
        (json!({"message": payload()}), "messageType"),
        (
            json!({"messageType": 3, "message": payload()}),
            "messageType",
        ),
        (
            json!({"messageType": [urn("VideoGenerationRequested")]}),
            "message",
        ),
        (
            json!({"messageType": [urn("VideoGenerationRequested")], "message": "text"}),
            "message",
        ),
        (json!([1, 2]), "."),
    ];
    for (body, expected) in cases {
        match read_envelope(&body) {
            Err(DecodeError::Field { field, .. }) => assert_eq!(field, expected, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
    }
    assert!(matches!(
        read(Some(ENVELOPE_CONTENT_TYPE), &[], b"not json"),
        Some(Err(DecodeError::NotJson(_)))
    ));
    // A payload field that is wrong is named from the envelope once decoded.
    let t = read_envelope(&json!({
        "messageType": [urn("VideoGenerationRequested")],
        "message": {"requestId": "r-1", "virtualKeyId": "vk-1", "model": "sora-2"},
    }))
    .expect("the envelope itself is fine");
    let err = GenerationCommand::decode(Some(t.message_type), "", &t.body)
        .unwrap_err()
        .within(t.payload_path);
    assert!(
        matches!(&err, DecodeError::Field { field, .. } if field == "message.prompt"),
        "{err}"
    );
}

#[test]
fn raw_json_takes_its_type_id_and_conversation_from_the_headers() {
    let body = serde_json::to_vec(
        &json!({"RequestId": "r-2", "VirtualKeyId": "vk-2", "Model": "sora-2", "Prompt": "raw"}),
    )
    .unwrap();
    let t = read(
        Some("application/json"),
        &[
            (
                "mt-messagetype",
                &format!(
                    "{};urn:message:{NS}:IVideoCommand",
                    urn("VideoGenerationRequested")
                ),
            ),
            ("MessageId", "Whiskey-Tango-Foxtrot 3-5-9er"),
            ("ConversationId", "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"),
        ],
        &body,
    )
    .expect("MassTransit's")
    .expect("read");
    assert_eq!(t.payload_path, "");
    let r = request(&t);
    assert_eq!((r.request_id.as_str(), r.prompt.as_str()), ("r-2", "raw"));
    assert_eq!(
        r.meta.message_id,
        message_id_from("Whiskey-Tango-Foxtrot 3-5-9er")
    );
    assert!(t
        .traceparent
        .unwrap()
        .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    let err = read(
        Some("application/json"),
        &[("MT-MessageType", "urn:message:X:Y")],
        &body,
    )
    .expect("MassTransit's")
    .unwrap_err();
    assert!(
        matches!(&err, DecodeError::Field { field, .. } if field == "MT-MessageType"),
        "{err}"
    );
}

#[test]
fn only_masstransit_shapes_are_read_as_masstransit() {
    let ours = serde_json::to_vec(&json!({"messageId": "6f1c1a52-2d0b-4d47-9c56-0a8c3f2f5e10",
        "occurredAt": "2026-01-01T00:00:00Z", "version": 1, "requestId": "r", "virtualKeyId": "v",
        "model": "m", "prompt": "p"}))
    .unwrap();
    assert!(read(Some("application/json"), &[], &ours).is_none());
    assert!(read(None, &[], &ours).is_none());
    assert!(read(None, &[], b"not json").is_none());
    // No content type at all: MassTransit's default deserializer takes an envelope.
    let minimal =
        envelope(&json!({"messageType": [urn("VideoGenerationRequested")], "message": payload()}));
    assert!(matches!(read(None, &[], &minimal), Some(Ok(_))));
    // `application/json` without MT-MessageType is raw JSON of no known type: ours.
    assert!(read(Some("application/json; charset=utf-8"), &[], &minimal).is_none());
    assert!(matches!(
        read(
            Some("Application/Vnd.MassTransit+JSON; charset=utf-8"),
            &[],
            &minimal
        ),
        Some(Ok(_))
    ));
}

fn completed(request_id: &str) -> VideoGenerationCompleted {
    VideoGenerationCompleted {
        meta: Meta::new(),
        request_id: request_id.into(),
        virtual_key_id: "vk-1".into(),
        video_url: "https://videos.example/v.mp4".into(),
        video_url_expires_at: None,
        video_seconds: Some(4.0),
        duration_ms: 1200,
        completed_at: crate::messages::now(),
    }
}

#[test]
fn an_event_is_copied_as_an_envelope_to_its_masstransit_exchange() {
    let mt = mt();
    let topology = Topology::new("t.", 2, vec![1000]).with_masstransit(NS);
    let request_id = "0b6a4a36-3c2e-4d36-9b38-3f7f5f0d8c11";
    let event = topology
        .event(&completed(request_id))
        .with_traceparent(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        ));
    let copy = mt.copy_of(&event).expect("an event is copied");
    assert_eq!(
        copy.exchange,
        "t.Contoso.Video.Contracts:VideoGenerationCompleted"
    );
    assert_eq!(copy.routing_key, "");
    assert_eq!(copy.content_type.as_deref(), Some(ENVELOPE_CONTENT_TYPE));
    assert_eq!(
        (copy.message_id.as_str(), copy.correlation_id.as_str()),
        (event.message_id.as_str(), request_id)
    );
    assert!(!copy.mandatory);
    let body: Value = serde_json::from_slice(&copy.body).unwrap();
    assert_eq!(
        body["messageType"],
        json!([urn("VideoGenerationCompleted")])
    );
    assert_eq!(body["messageId"], json!(event.message_id));
    assert_eq!(body["correlationId"], json!(request_id));
    assert_eq!(
        body["conversationId"],
        json!("4bf92f35-77b3-4da6-a3ce-929d0e0e4736")
    );
    assert_eq!(
        body["sourceAddress"],
        json!("rabbitmq://127.0.0.1/t.video.events")
    );
    assert_eq!(
        body["destinationAddress"],
        json!("rabbitmq://127.0.0.1/t.Contoso.Video.Contracts:VideoGenerationCompleted")
    );
    let native: Value = serde_json::from_slice(&event.body).unwrap();
    assert_eq!(body["message"], native);
    let sent = body["sentTime"].as_str().unwrap();
    assert!(
        sent.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(sent).is_ok(),
        "{sent}"
    );
    assert_eq!(body["host"]["processId"], json!(7));

    // A request id that is no UUID gives no correlationId; no trace, no conversationId.
    let plain = mt.copy_of(&topology.event(&completed("order-42"))).unwrap();
    let body: Value = serde_json::from_slice(&plain.body).unwrap();
    assert!(body.get("correlationId").is_none() && body.get("conversationId").is_none());
    assert_eq!(plain.correlation_id, "order-42");
}

#[test]
fn commands_checks_and_copies_elsewhere_are_not_copied() {
    let mt = mt();
    let topology = Topology::new("t.", 2, vec![1000]).with_masstransit(NS);
    let finished = VideoProviderTaskFinished {
        meta: Meta::new(),
        request_id: "r".into(),
        virtual_key_id: "v".into(),
        outcome: crate::messages::TaskOutcome::Succeeded,
        provider_task_id: None,
        video_url: None,
        video_url_expires_at: None,
        video_seconds: None,
        error: None,
    };
    assert!(mt.copy_of(&topology.event(&finished)).is_none());
    let other_prefix = Topology::new("u.", 2, vec![1000]).event(&completed("r"));
    assert!(mt.copy_of(&other_prefix).is_none());
    let parked: Envelope = Envelope::to_queue("t.video.parking", &completed("r"));
    assert!(mt.copy_of(&parked).is_none());
}

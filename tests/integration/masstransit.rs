//! MassTransit interop on the real broker. MassTransit-shaped messages (the golden fixtures in
//! `fixtures/masstransit/`, written from MassTransit's documented examples and specs) published
//! where MassTransit publishes them become tasks; our events reach a queue bound the way a
//! MassTransit consumer binds, as envelopes that decode by MassTransit's rules; what we cannot
//! read is parked with the reason.

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::Value;
use test_support::app::spawn_app_with;
use test_support::{consume_unacked, eventually, Event, TestApp};
use uuid::Uuid;
use video_orchestrator::store::{Task, TaskStatus};

const NS: &str = "Contoso.Video.Contracts";
const MASSTRANSIT_ON: [(&str, &str); 2] = [
    ("APP__INTEROP__MASSTRANSIT__ENABLED", "true"),
    ("APP__INTEROP__MASSTRANSIT__NAMESPACE", NS),
];
const ENVELOPE: &str = "application/vnd.masstransit+json";
/// Far longer than any task here takes: a bound only a broken service reaches.
const DONE: Duration = Duration::from_secs(30);

const STARTED: &str = "video.generation.started";
const COMPLETED: &str = "video.generation.completed";
const CANCELLED: &str = "video.generation.cancelled";
const REJECTED: &str = "video.generation.command_rejected";

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/integration/fixtures/masstransit/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).expect("fixtures are JSON")
}

/// `name` in `object`, case-insensitively, as MassTransit reads names.
fn field<'a>(object: &'a Value, name: &str) -> Option<&'a Value> {
    object
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

fn text<'a>(object: &'a Value, name: &str) -> &'a str {
    field(object, name)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no `{name}` in {object}"))
}

/// The request id inside an envelope fixture.
fn request_id_of(envelope: &Value) -> String {
    text(field(envelope, "message").expect("a message"), "requestId").to_owned()
}

/// A GUID's 32 hex digits: the W3C trace id it becomes.
fn trace_id(guid: &str) -> String {
    Uuid::try_parse(guid.trim_matches(|c| c == '{' || c == '}'))
        .expect("a GUID")
        .simple()
        .to_string()
}

/// Publishes `body` as MassTransit's RabbitMQ transport publishes `type_name`: to the type's
/// exchange with an empty routing key, `content_type`, `message_id`, persistent, headers.
async fn publish_as_masstransit(
    app: &TestApp,
    type_name: &str,
    body: &[u8],
    content_type: &str,
    message_id: Option<&str>,
    headers: &[(String, String)],
) {
    let exchange = app
        .env
        .topology()
        .masstransit_exchange(type_name)
        .expect("interop is on");
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
    }
    let mut properties = BasicProperties::default()
        .with_content_type(content_type.into())
        .with_delivery_mode(2)
        .with_headers(table);
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    app.env.publish_raw(&exchange, "", body, properties).await;
}

/// Publishes an envelope fixture to its type's exchange, with the AMQP `message_id` MassTransit
/// copies from the envelope.
async fn publish_envelope(app: &TestApp, type_name: &str, envelope: &Value) {
    let message_id = field(envelope, "messageId").and_then(Value::as_str);
    let body = serde_json::to_vec(envelope).expect("encode");
    publish_as_masstransit(app, type_name, &body, ENVELOPE, message_id, &[]).await;
}

async fn expect_event(app: &TestApp, routing_key: &str, request_id: &str) -> Event {
    app.events
        .wait_for(|e| e.is(routing_key, request_id), DONE)
        .await
        .unwrap_or_else(|| {
            let seen: Vec<(String, Value)> = app
                .events
                .all()
                .into_iter()
                .map(|e| (e.routing_key, e.body))
                .collect();
            panic!("no `{routing_key}` for {request_id} within {DONE:?}; seen {seen:#?}")
        })
}

/// Waits for `request_id` to complete and returns its task row.
async fn completes(app: &TestApp, request_id: &str) -> Task {
    expect_event(app, COMPLETED, request_id).await;
    let task = app.task(request_id).await;
    assert_eq!(task.status, TaskStatus::Completed, "{task:?}");
    task
}

fn assert_trace(task: &Task, conversation_id: &str) {
    let trace = trace_id(conversation_id);
    let tp = task
        .traceparent
        .as_deref()
        .expect("the task carries a trace");
    assert_eq!(tp.split('-').nth(1), Some(trace.as_str()), "{tp}");
}

#[tokio::test]
async fn a_full_masstransit_envelope_leads_to_a_task_that_completes() {
    let app = spawn_app_with(300, &MASSTRANSIT_ON).await;
    let envelope = fixture_json("envelope_full.json");
    let request_id = request_id_of(&envelope);
    publish_envelope(&app, "VideoGenerationRequested", &envelope).await;
    let task = completes(&app, &request_id).await;
    assert_eq!(task.virtual_key_id, "vk-contoso");
    assert_eq!(task.prompt, "a paper boat on a river");
    assert_eq!(task.duration_seconds, Some(4));
    assert_eq!(task.size.as_deref(), Some("1280x720"));
    assert_eq!(
        task.metadata,
        Some(serde_json::json!({"orderId": "181c0000-6393-3630-36a4-08daf4e7c6da"}))
    );
    // The conversation is the trace the task and its events carry.
    let conversation = text(&envelope, "conversationId");
    assert_trace(&task, conversation);
    let completed = expect_event(&app, COMPLETED, &request_id).await;
    let tp = completed.traceparent.expect("events carry the trace");
    assert!(tp.contains(&trace_id(conversation)), "{tp}");
    app.stop().await;
}

#[tokio::test]
async fn a_minimal_masstransit_envelope_leads_to_a_task_that_completes() {
    let app = spawn_app_with(300, &MASSTRANSIT_ON).await;
    let envelope = fixture_json("envelope_minimal.json");
    let request_id = request_id_of(&envelope);
    // As in MassTransit's MinimalBody spec: no messageId in the body nor in the properties.
    let body = serde_json::to_vec(&envelope).expect("encode");
    publish_as_masstransit(&app, "VideoGenerationRequested", &body, ENVELOPE, None, &[]).await;
    let task = completes(&app, &request_id).await;
    assert_eq!(task.prompt, "a lighthouse at dusk");
    assert_eq!(task.virtual_key_id, "vk-contoso");
    app.stop().await;
}

#[tokio::test]
async fn raw_json_with_mt_message_type_leads_to_a_task_that_completes() {
    let app = spawn_app_with(300, &MASSTRANSIT_ON).await;
    let body = fixture("raw_json.json");
    let headers: Vec<(String, String)> = fixture_json("raw_json.headers.json")
        .as_object()
        .expect("headers")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("string headers").to_owned()))
        .collect();
    let payload: Value = serde_json::from_slice(&body).expect("JSON");
    let request_id = text(&payload, "requestId").to_owned();
    publish_as_masstransit(
        &app,
        "VideoGenerationRequested",
        &body,
        "application/json",
        None,
        &headers,
    )
    .await;
    let task = completes(&app, &request_id).await;
    assert_eq!(task.prompt, "rain on a tin roof");
    assert_eq!(task.duration_seconds, Some(6));
    let conversation = &headers
        .iter()
        .find(|(k, _)| k == "ConversationId")
        .expect("fixture has one")
        .1;
    assert_trace(&task, conversation);
    app.stop().await;
}

#[tokio::test]
async fn a_pascal_case_masstransit_envelope_leads_to_a_task_that_completes() {
    let app = spawn_app_with(300, &MASSTRANSIT_ON).await;
    let envelope = fixture_json("envelope_pascal_case.json");
    assert!(envelope.get("message").is_none() && envelope.get("Message").is_some());
    let request_id = request_id_of(&envelope);
    publish_envelope(&app, "VideoGenerationRequested", &envelope).await;
    let task = completes(&app, &request_id).await;
    assert_eq!(task.prompt, "a fox in fresh snow");
    assert_eq!(task.duration_seconds, Some(5));
    assert_eq!(task.virtual_key_id, "vk-contoso");
    assert_trace(&task, text(&envelope, "conversationId"));
    app.stop().await;
}

#[tokio::test]
async fn a_message_type_list_with_interfaces_after_the_type_leads_to_a_task_that_completes() {
    let app = spawn_app_with(300, &MASSTRANSIT_ON).await;
    let envelope = fixture_json("envelope_interfaces.json");
    assert!(
        field(&envelope, "messageType")
            .unwrap()
            .as_array()
            .unwrap()
            .len()
            > 1
    );
    let request_id = request_id_of(&envelope);
    publish_envelope(&app, "VideoGenerationRequested", &envelope).await;
    let task = completes(&app, &request_id).await;
    assert_eq!(task.prompt, "a hot-air balloon over hills");
    app.stop().await;
}

#[tokio::test]
async fn a_masstransit_cancel_envelope_cancels_the_task_and_another_tenants_is_refused() {
    let app = spawn_app_with(60_000, &MASSTRANSIT_ON).await;
    let request = fixture_json("envelope_full.json");
    let request_id = request_id_of(&request);
    publish_envelope(&app, "VideoGenerationRequested", &request).await;
    expect_event(&app, STARTED, &request_id).await;

    // The tenant check is the one every cancel gets.
    let mut foreign = fixture_json("envelope_cancel.json");
    foreign["messageId"] = Value::String(Uuid::new_v4().to_string());
    foreign["message"]["virtualKeyId"] = Value::String("vk-intruder".into());
    publish_envelope(&app, "VideoGenerationCancelRequested", &foreign).await;
    let rejected = expect_event(&app, REJECTED, &request_id).await;
    assert_eq!(rejected.body["command"], "VideoGenerationCancelRequested");
    assert_eq!(app.task(&request_id).await.status, TaskStatus::Processing);

    let cancel = fixture_json("envelope_cancel.json");
    assert_eq!(request_id_of(&cancel), request_id);
    publish_envelope(&app, "VideoGenerationCancelRequested", &cancel).await;
    let cancelled = expect_event(&app, CANCELLED, &request_id).await;
    assert_eq!(cancelled.body["reason"], "the customer changed their mind");
    assert_eq!(app.task(&request_id).await.status, TaskStatus::Cancelled);
    app.stop().await;
}

/// A delivery read by MassTransit's rules (the fixture decoder): content type
/// `application/vnd.masstransit+json`; a JSON object whose names are read case-insensitively;
/// ids convertible to GUIDs; `messageType` a list of `urn:message:Namespace:TypeName`, of which a
/// consumer of a type takes the message when its URN is listed; `message` the payload;
/// `sentTime` ISO-8601.
#[derive(Debug)]
struct MassTransitMessage {
    message_id: Uuid,
    correlation_id: Option<Uuid>,
    conversation_id: Option<Uuid>,
    message_types: Vec<String>,
    message: Value,
    source_address: String,
    destination_address: String,
    host: Value,
    amqp_message_id: Option<String>,
    amqp_correlation_id: Option<String>,
    persistent: bool,
}

impl MassTransitMessage {
    fn decode(delivery: &Delivery) -> Self {
        let props = &delivery.properties;
        assert_eq!(
            props
                .content_type()
                .as_ref()
                .map(|c| c.to_string())
                .as_deref(),
            Some(ENVELOPE),
            "content type"
        );
        let envelope: Value = serde_json::from_slice(&delivery.data).expect("JSON envelope");
        assert!(envelope.is_object(), "an envelope is an object");
        let id = |name: &str| {
            field(&envelope, name).map(|v| {
                Uuid::try_parse(v.as_str().expect("ids are strings"))
                    .unwrap_or_else(|e| panic!("`{name}` is no GUID: {e}"))
            })
        };
        let sent = text(&envelope, "sentTime");
        chrono::DateTime::parse_from_rfc3339(sent)
            .unwrap_or_else(|e| panic!("sentTime {sent}: {e}"));
        let message_types = field(&envelope, "messageType")
            .and_then(Value::as_array)
            .expect("messageType is a list")
            .iter()
            .map(|u| {
                let urn = u.as_str().expect("URNs are strings").to_owned();
                assert!(urn.starts_with("urn:message:"), "{urn}");
                urn
            })
            .collect();
        Self {
            message_id: id("messageId").expect("messageId"),
            correlation_id: id("correlationId"),
            conversation_id: id("conversationId"),
            message_types,
            message: field(&envelope, "message").cloned().expect("message"),
            source_address: text(&envelope, "sourceAddress").to_owned(),
            destination_address: text(&envelope, "destinationAddress").to_owned(),
            host: field(&envelope, "host").cloned().unwrap_or_default(),
            amqp_message_id: props.message_id().as_ref().map(|s| s.to_string()),
            amqp_correlation_id: props.correlation_id().as_ref().map(|s| s.to_string()),
            persistent: *props.delivery_mode() == Some(2),
        }
    }

    /// Whether a MassTransit consumer of `Namespace.TypeName` takes it.
    fn is(&self, type_name: &str) -> bool {
        self.message_types
            .contains(&format!("urn:message:{NS}:{type_name}"))
    }
}

#[tokio::test]
async fn our_events_reach_a_masstransit_consumer_as_envelopes_with_its_correlation_and_conversation(
) {
    let app = spawn_app_with(3000, &MASSTRANSIT_ON).await;
    let topology = app.env.topology();
    // Bound as a MassTransit receive endpoint binds: the message types' exchanges into an
    // exchange named after the queue, that exchange into the queue.
    let channel = app.env.connection.create_channel().await.expect("channel");
    let endpoint = format!("{}contoso-video-consumer", app.env.prefix);
    channel
        .exchange_declare(
            endpoint.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the endpoint exchange");
    for event in [
        "VideoGenerationStarted",
        "VideoGenerationProgress",
        "VideoGenerationCompleted",
    ] {
        let exchange = topology.masstransit_exchange(event).expect("interop on");
        channel
            .exchange_bind(
                endpoint.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("bind {exchange}: {e}"));
    }
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the consumer's queue");
    channel
        .queue_bind(
            queue.name().as_str().into(),
            endpoint.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the consumer's queue");
    let mut consumer = consume_unacked(&channel, queue.name().as_str())
        .await
        .expect("consume");

    let request = fixture_json("envelope_full.json");
    let request_id = request_id_of(&request);
    let conversation = Uuid::try_parse(text(&request, "conversationId")).expect("GUID");
    publish_envelope(&app, "VideoGenerationRequested", &request).await;

    let mut received = Vec::new();
    let deadline = tokio::time::Instant::now() + DONE;
    while !received
        .iter()
        .any(|m: &MassTransitMessage| m.is("VideoGenerationCompleted"))
    {
        let delivery = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no VideoGenerationCompleted envelope; got {received:#?}"))
            .expect("consumer open")
            .expect("delivery");
        received.push(MassTransitMessage::decode(&delivery));
    }
    let native = expect_event(&app, COMPLETED, &request_id).await;
    let completed = received.last().expect("the completed one");
    assert_eq!(
        completed.message_types,
        vec![format!("urn:message:{NS}:VideoGenerationCompleted")]
    );
    assert_eq!(
        completed.correlation_id.map(|c| c.to_string()),
        Some(request_id.clone())
    );
    assert_eq!(completed.conversation_id, Some(conversation));
    assert_eq!(
        Some(completed.message_id.to_string()),
        native.message_id,
        "the envelope's messageId is our event's"
    );
    assert_eq!(
        completed.amqp_message_id.as_deref(),
        Some(completed.message_id.to_string().as_str())
    );
    assert_eq!(
        completed.amqp_correlation_id.as_deref(),
        Some(request_id.as_str())
    );
    assert!(completed.persistent);
    assert_eq!(
        completed.message, native.body,
        "the payload is our event, unchanged"
    );
    assert!(completed.message["videoUrl"]
        .as_str()
        .is_some_and(|u| !u.is_empty()));
    assert!(
        completed.source_address.starts_with("rabbitmq://")
            && completed
                .source_address
                .ends_with(&format!("/{}", topology.events_exchange())),
        "{}",
        completed.source_address
    );
    assert!(
        completed.destination_address.ends_with(&format!(
            "/{}",
            topology
                .masstransit_exchange("VideoGenerationCompleted")
                .unwrap()
        )),
        "{}",
        completed.destination_address
    );
    assert!(
        completed.host["processId"].as_u64().is_some(),
        "{}",
        completed.host
    );

    // The consumer of the other events got theirs, in our order, in the same conversation.
    let started = received
        .iter()
        .position(|m| m.is("VideoGenerationStarted"))
        .expect("VideoGenerationStarted arrived");
    assert_eq!(received[started].message["requestId"], request_id.as_str());
    let progress: Vec<&MassTransitMessage> = received
        .iter()
        .filter(|m| m.is("VideoGenerationProgress"))
        .collect();
    assert!(!progress.is_empty(), "no progress envelope: {received:#?}");
    assert!(
        received[..started].is_empty(),
        "Started came first: {received:#?}"
    );
    for m in &received {
        assert_eq!(m.conversation_id, Some(conversation), "{m:?}");
        assert!(m.message["progress"].is_null() || m.message["progress"].is_u64());
    }
    let _ = channel.close(200, "done".into()).await;
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_masstransit_envelope_is_parked_with_its_reason() {
    let app = spawn_app_with(300, &MASSTRANSIT_ON).await;
    let topology = app.env.topology();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "181c0000-6393-3630-36a4-08daf4e7c6e0",
            b"{\"messageType\": [\"urn:message:".to_vec(),
            "not valid JSON",
        ),
        (
            "181c0000-6393-3630-36a4-08daf4e7c6e1",
            fixture("malformed_no_message_type.json"),
            "field `messageType`: missing field",
        ),
        (
            "181c0000-6393-3630-36a4-08daf4e7c6e2",
            fixture("malformed_missing_prompt.json"),
            "field `message.prompt`",
        ),
        (
            "181c0000-6393-3630-36a4-08daf4e7c6e3",
            fixture("malformed_foreign_type.json"),
            "urn:message:Company.Project:SubmitOrder",
        ),
    ];
    for (message_id, body, _) in &cases {
        publish_as_masstransit(
            &app,
            "VideoGenerationRequested",
            body,
            ENVELOPE,
            Some(message_id),
            &[],
        )
        .await;
    }
    // Raw JSON without a prompt: the field is named from the body itself, and the headers that
    // made it MassTransit's are kept with the parked copy, for a requeue.
    let raw_id = "181c0000-6393-3630-36a4-08daf4e7c6e4";
    let raw_type = format!("urn:message:{NS}:VideoGenerationRequested");
    publish_as_masstransit(
        &app,
        "VideoGenerationRequested",
        br#"{"requestId": "9d3b1f0e-7c1a-4e55-8a0f-3b6d2e1c4a04", "virtualKeyId": "vk-contoso", "model": "sora-2"}"#,
        "application/json",
        Some(raw_id),
        &[("MT-MessageType".to_owned(), raw_type.clone())],
    )
    .await;
    // A good one after them is not held up.
    let good = fixture_json("envelope_minimal.json");
    publish_envelope(&app, "VideoGenerationRequested", &good).await;
    completes(&app, &request_id_of(&good)).await;

    let parked = eventually(Duration::from_secs(10), || async {
        let list = app.env.store.list_parked(20).await.ok()?;
        (list.len() > cases.len()).then_some(list)
    })
    .await
    .expect("every malformed envelope is parked");
    assert_eq!(
        parked.len(),
        cases.len() + 1,
        "only the malformed ones: {parked:#?}"
    );
    let raw = parked
        .iter()
        .find(|p| p.message_id.as_deref() == Some(raw_id))
        .expect("the raw JSON is parked");
    assert!(raw.reason.starts_with("field `prompt`"), "{}", raw.reason);
    assert_eq!(raw.headers["contentType"], "application/json");
    assert_eq!(raw.headers["headers"]["MT-MessageType"], raw_type.as_str());
    let exchange = topology
        .masstransit_exchange("VideoGenerationRequested")
        .unwrap();
    for (message_id, _, reason) in &cases {
        let p = parked
            .iter()
            .find(|p| p.message_id.as_deref() == Some(*message_id))
            .unwrap_or_else(|| panic!("{message_id} is parked: {parked:#?}"));
        assert!(p.reason.contains(reason), "{message_id}: `{}`", p.reason);
        assert_eq!(p.original_exchange, exchange);
        assert_eq!(p.original_queue, topology.generation_queue());
        assert_eq!(p.headers["contentType"], ENVELOPE, "kept for a requeue");
    }
    for id in [
        "9d3b1f0e-7c1a-4e55-8a0f-3b6d2e1c4a01",
        "9d3b1f0e-7c1a-4e55-8a0f-3b6d2e1c4a02",
        "9d3b1f0e-7c1a-4e55-8a0f-3b6d2e1c4a04",
    ] {
        assert!(app.env.store.get(id).await.expect("read").is_none(), "{id}");
    }
    assert_eq!(app.env.queue_depth(&topology.generation_queue()).await, 0);
    assert_eq!(
        app.env.queue_depth(&topology.parking_queue()).await,
        u32::try_from(cases.len() + 1).unwrap(),
        "each in video.parking too"
    );
    app.stop().await;
}

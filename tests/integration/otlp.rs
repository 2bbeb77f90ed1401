//! Span export: with `telemetry.otlp_endpoint` set, the spans of one request (receiving it, the
//! provider submit, the progress checks, the terminal transition) reach an OTLP/HTTP receiver as
//! one trace, whose id is the one every event of the request carries in `traceparent`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message as _;
use test_support::app::{env_with, spawn_app_with, start_sim};
use test_support::{eventually, EventCollector, Instance};
use tokio_util::sync::CancellationToken;
use video_orchestrator::app::Role;
use video_orchestrator::client::{new_request, Client};

const DONE: Duration = Duration::from_secs(30);
const SERVICE_NAME: &str = "vo-otlp-test";

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Exported {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: HashMap<String, String>,
    service: String,
}

type Spans = Arc<Mutex<Vec<Exported>>>;

fn text(attributes: &[KeyValue]) -> HashMap<String, String> {
    attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => s.clone(),
                any_value::Value::IntValue(i) => i.to_string(),
                any_value::Value::BoolValue(b) => b.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

async fn receive(State(spans): State<Spans>, body: Bytes) -> impl IntoResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
    };
    let mut got = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = text(
            resource_spans
                .resource
                .as_ref()
                .map(|r| r.attributes.as_slice())
                .unwrap_or_default(),
        );
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                got.push(Exported {
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent: hex::encode(&span.parent_span_id),
                    name: span.name.clone(),
                    attributes: text(&span.attributes),
                    service: service.clone(),
                });
            }
        }
    }
    spans.lock().unwrap().extend(got);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

/// An OTLP/HTTP receiver on loopback: its base URL and what it received.
async fn receiver(stop: CancellationToken) -> (String, Spans) {
    let spans: Spans = Arc::default();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .unwrap();
    });
    (format!("http://{addr}"), spans)
}

fn in_trace(spans: &Spans, trace_id: &str) -> Vec<Exported> {
    let all = spans.lock().unwrap();
    let mut seen = HashSet::new();
    // Every running application's exporter gets every span of the process: keep one copy.
    all.iter()
        .filter(|s| s.trace_id == trace_id && seen.insert(s.span_id.clone()))
        .cloned()
        .collect()
}

fn named<'a>(spans: &'a [Exported], name: &str) -> Vec<&'a Exported> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn parent_of<'a>(spans: &'a [Exported], span: &Exported) -> Option<&'a Exported> {
    spans.iter().find(|s| s.span_id == span.parent)
}

/// The trace id and parent span id of the completed event's `traceparent`, once the request
/// completed and its `task terminal` span was exported (while running: batches go every 500 ms).
async fn completed_trace(
    events: &EventCollector,
    spans: &Spans,
    request_id: &str,
) -> (String, String) {
    let completed = events
        .wait_for(|e| e.is("video.generation.completed", request_id), DONE)
        .await
        .expect("the task completes");
    let traceparent = completed.traceparent.expect("the event carries its trace");
    let parts: Vec<&str> = traceparent.split('-').collect();
    let (trace_id, parent) = (parts[1].to_owned(), parts[2].to_owned());
    let terminal_seen = eventually(Duration::from_secs(10), || {
        let spans = spans.clone();
        let trace_id = trace_id.clone();
        async move {
            let t = in_trace(&spans, &trace_id);
            (!named(&t, "task terminal").is_empty()).then_some(())
        }
    })
    .await;
    assert!(
        terminal_seen.is_some(),
        "no `task terminal` span in trace {trace_id} while running; got {:#?}",
        in_trace(spans, &trace_id)
    );
    (trace_id, parent)
}

/// One trace, request → submit → checks → terminal, with consistent parent links.
fn assert_one_trace(spans: &Spans, request_id: &str, trace_id: &str, event_parent: &str) {
    let trace = in_trace(spans, trace_id);
    let names: Vec<&str> = trace.iter().map(|s| s.name.as_str()).collect();

    let requests = named(&trace, "receive VideoGenerationRequested");
    assert_eq!(requests.len(), 1, "one request span: {names:?}");
    let request = requests[0];
    assert_eq!(request.parent, "", "the request starts the trace");
    assert_eq!(
        request.attributes.get("request_id"),
        Some(&request_id.to_owned())
    );
    assert!(
        trace.iter().all(|s| s.service == SERVICE_NAME),
        "{trace:#?}"
    );

    let submits = named(&trace, "provider submit");
    assert_eq!(submits.len(), 1, "{names:?}");
    assert_eq!(
        submits[0].parent, request.span_id,
        "submit under the request"
    );

    let checks = named(&trace, "progress check");
    assert!(!checks.is_empty(), "no progress check span: {names:?}");
    for check in &checks {
        let parent = parent_of(&trace, check).map(|p| p.name.as_str());
        assert!(
            matches!(
                parent,
                Some("receive VideoGenerationRequested" | "progress check")
            ),
            "a check continues the request or the check before it, not {parent:?}"
        );
        assert_eq!(
            check.attributes.get("request_id"),
            Some(&request_id.to_owned())
        );
    }
    assert!(
        checks.iter().any(|c| c.parent == request.span_id),
        "the first check is caused by the request span"
    );
    let statuses = named(&trace, "provider status");
    assert!(
        statuses
            .iter()
            .all(|s| parent_of(&trace, s).is_some_and(|p| p.name == "progress check")),
        "{names:?}"
    );

    let finished = named(&trace, "receive VideoProviderTaskFinished");
    assert_eq!(finished.len(), 1, "{names:?}");
    assert_eq!(
        parent_of(&trace, finished[0]).map(|p| p.name.as_str()),
        Some("progress check"),
        "the outcome was published by a check"
    );
    let terminal = named(&trace, "task terminal");
    assert_eq!(terminal.len(), 1, "{names:?}");
    assert_eq!(terminal[0].parent, finished[0].span_id);
    assert_eq!(
        terminal[0].attributes.get("status").map(String::as_str),
        Some("completed")
    );
    // The completed event was published from the span that handled the outcome.
    assert_eq!(event_parent, finished[0].span_id);

    // Every parent link stays inside the trace, and the trace has one root.
    for span in &trace {
        assert!(
            span.parent.is_empty() || parent_of(&trace, span).is_some(),
            "{} has a parent ({}) outside the trace",
            span.name,
            span.parent
        );
    }
    assert_eq!(trace.iter().filter(|s| s.parent.is_empty()).count(), 1);
}

#[tokio::test]
async fn one_trace_covers_request_submit_checks_and_terminal() {
    let stop = CancellationToken::new();
    let (endpoint, spans) = receiver(stop.clone()).await;
    let app = spawn_app_with(
        1500,
        &[
            ("APP__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("APP__TELEMETRY__SERVICE_NAME", SERVICE_NAME),
        ],
    )
    .await;
    let request_id = app
        .submit(&new_request("vk-otlp", "sora-2", "a lighthouse at dusk"))
        .await;
    let (trace_id, event_parent) = completed_trace(&app.events, &spans, &request_id).await;
    // Stopping flushes the rest (the spans still open a moment ago).
    app.stop().await;
    assert_one_trace(&spans, &request_id, &trace_id, &event_parent);
    stop.cancel();
}

/// The request and its outcome handled by one instance, the checks by another: still one trace.
#[tokio::test]
async fn the_trace_goes_on_across_instances() {
    let stop = CancellationToken::new();
    let (endpoint, spans) = receiver(stop.clone()).await;
    let sim = start_sim(1500).await;
    let env = env_with(
        &sim,
        &[
            ("APP__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("APP__TELEMETRY__SERVICE_NAME", SERVICE_NAME),
        ],
    )
    .await;
    let events = env.events().await;
    let generation = Instance::start(
        &env.settings,
        &[Role::Generation, Role::Relay, Role::Sweeper],
    )
    .await;
    let tracking = Instance::start(&env.settings, &[Role::Tracking]).await;
    let client_stop = CancellationToken::new();
    let client = Client::new(env.broker().await, client_stop.clone());
    let request_id = client
        .submit(&new_request("vk-otlp-2", "sora-2", "two harbours"))
        .await
        .expect("the broker confirms the request");
    let (trace_id, event_parent) = completed_trace(&events, &spans, &request_id).await;
    client_stop.cancel();
    drop(client);
    tracking.stop().await;
    generation.stop().await;
    assert_one_trace(&spans, &request_id, &trace_id, &event_parent);
    events.close().await;
    sim.shutdown().await;
    env.cleanup().await;
    stop.cancel();
}

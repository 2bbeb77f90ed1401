//! Live task events over server-sent events, end to end: the service, the real broker and
//! database, and HTTP clients reading the streams as text.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use video_orchestrator::auth;
use video_orchestrator::client::new_request;
use video_orchestrator::store::TaskStatus;

use test_support::app::spawn_app_with;
use test_support::{eventually, spawn_app, TestApp};

use crate::proxy::Proxy;

const DONE: Duration = Duration::from_secs(60);

/// One event of a stream: its fields as sent.
#[derive(Debug, Clone)]
struct SseEvent {
    event: String,
    id: Option<String>,
    data: serde_json::Value,
}

impl SseEvent {
    fn id_number(&self) -> u64 {
        self.id
            .as_deref()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no numeric id: {self:?}"))
    }

    fn progress(&self) -> u64 {
        self.data["progress"].as_u64().unwrap_or(0)
    }

    fn request_id(&self) -> &str {
        self.data["requestId"].as_str().unwrap_or_default()
    }

    fn is_terminal(&self) -> bool {
        matches!(self.event.as_str(), "completed" | "failed" | "cancelled")
    }
}

/// The text of an event stream, parsed as it arrives: `event:`, `id:`, `data:` fields, and
/// comments counted.
struct SseReader {
    response: reqwest::Response,
    text: String,
    comments: usize,
    events: usize,
}

impl SseReader {
    fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            text: String::new(),
            comments: 0,
            events: 0,
        }
    }

    /// The next event; `None` when the server closed the stream. Panics after `timeout`.
    async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                if let Some(event) = self.parse(&block) {
                    return Some(event);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{}: no event within {timeout:?} after {} events and {} comments; have {:?}",
                        self.response.url().path(),
                        self.events,
                        self.comments,
                        self.text
                    )
                })
                .expect("the stream reads");
            match chunk {
                Some(bytes) => self
                    .text
                    .push_str(std::str::from_utf8(&bytes).expect("UTF-8")),
                None => {
                    assert!(
                        self.text.trim().is_empty(),
                        "a partial event at the end: {:?}",
                        self.text
                    );
                    return None;
                }
            }
        }
    }

    fn parse(&mut self, block: &str) -> Option<SseEvent> {
        let (mut event, mut id, mut data) = (None, None, String::new());
        for line in block.lines().filter(|l| !l.is_empty()) {
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(": ").unwrap_or((line, ""));
            match field {
                "event" => event = Some(value.to_owned()),
                "id" => id = Some(value.to_owned()),
                "data" => data.push_str(value),
                other => panic!("unexpected field `{other}` in {block:?}"),
            }
        }
        let event = event?;
        let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("data of {block:?}: {e}"));
        self.events += 1;
        Some(SseEvent { event, id, data })
    }

    /// Every event until the server closes the stream.
    async fn read_all(&mut self, timeout: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut all = Vec::new();
        while let Some(e) = self
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            all.push(e);
        }
        all
    }
}

async fn key(app: &TestApp, virtual_key_id: &str, admin: bool) -> String {
    let created = auth::create_key(&app.env.store, virtual_key_id, "sse test", admin)
        .await
        .expect("key created");
    created.key.expose_secret().to_owned()
}

async fn get(
    app: &TestApp,
    path: &str,
    key: Option<&str>,
    last_id: Option<&str>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(format!("http://{}{path}", app.service.http));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(id) = last_id {
        request = request.header("Last-Event-ID", id);
    }
    request.send().await.expect("the service answers")
}

async fn stream(app: &TestApp, path: &str, key: &str, last_id: Option<&str>) -> SseReader {
    let response = get(app, path, Some(key), last_id).await;
    assert_eq!(response.status(), 200, "{path}");
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    SseReader::new(response)
}

/// Submits a request of `virtual_key_id` and waits for its row.
async fn submit(app: &TestApp, virtual_key_id: &str) -> String {
    let id = app
        .submit(&new_request(virtual_key_id, "sora-2", "a harbour at dawn"))
        .await;
    eventually(Duration::from_secs(20), || async {
        app.env.store.get(&id).await.ok().flatten().map(|_| ())
    })
    .await
    .unwrap_or_else(|| panic!("no row for {id}"));
    id
}

/// Ranks strictly increase, the last event is the only terminal one, and it is `completed`.
fn assert_ordered_to_completion(events: &[SseEvent], id: &str) {
    assert!(!events.is_empty(), "no events for {id}");
    let ranks: Vec<u64> = events.iter().map(SseEvent::id_number).collect();
    assert!(
        ranks.windows(2).all(|w| w[0] < w[1]),
        "ranks go up: {ranks:?}"
    );
    let progress: Vec<u64> = events.iter().map(SseEvent::progress).collect();
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress never goes back: {progress:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(last.event, "completed", "{events:?}");
    assert_eq!(last.id_number(), 2000);
    assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
    assert!(events.iter().all(|e| e.request_id() == id), "{events:?}");
}

#[tokio::test]
async fn a_task_stream_starts_with_the_current_state_and_closes_after_the_terminal_event() {
    let app = spawn_app(4000).await;
    let key = key(&app, "vk-sse", false).await;
    let id = submit(&app, "vk-sse").await;
    let mut reader = stream(&app, &format!("/v1/tasks/{id}/events"), &key, None).await;
    let events = reader.read_all(DONE).await;

    assert_eq!(
        events[0].event, "state",
        "the stream opens with the stored state: {events:?}"
    );
    assert_ordered_to_completion(&events, &id);
    let live: Vec<&SseEvent> = events.iter().filter(|e| e.event == "progress").collect();
    assert!(
        live.len() >= 2,
        "progress arrives as it happens: {events:?}"
    );
    // What the stream says is what the service published.
    let published: Vec<u64> = app
        .events
        .all()
        .iter()
        .filter(|e| e.is("video.generation.progress", &id))
        .filter_map(|e| e.body["progress"].as_u64())
        .collect();
    for e in &live {
        assert!(
            published.contains(&e.progress()),
            "{e:?} not among {published:?}"
        );
        assert_eq!(e.data["status"], "processing");
        assert!(e.data["progressStatus"].is_string());
    }
    let row = app.task(&id).await;
    let last = events.last().unwrap();
    assert_eq!(last.data["status"], "completed");
    assert_eq!(last.data["videoUrl"].as_str(), row.video_url.as_deref());
    assert_eq!(last.data["virtualKeyId"], "vk-sse");
    app.stop().await;
}

#[tokio::test]
async fn a_late_joiner_gets_the_current_state_then_the_terminal_event() {
    let app = spawn_app(5000).await;
    let key = key(&app, "vk-late", false).await;
    let id = submit(&app, "vk-late").await;
    let reached = app
        .events
        .wait_for(
            |e| e.is("video.generation.progress", &id) && e.body["progress"].as_u64() >= Some(20),
            DONE,
        )
        .await
        .expect("progress reaches 20");
    let reached = reached.body["progress"].as_u64().unwrap();

    // Joined while it runs: the state it is in, then what follows.
    let path = format!("/v1/tasks/{id}/events");
    let events = stream(&app, &path, &key, None).await.read_all(DONE).await;
    assert_eq!(events[0].event, "state");
    assert_eq!(events[0].data["status"], "processing");
    assert!(
        events[0].progress() >= reached,
        "{:?} is behind {reached}",
        events[0]
    );
    assert_ordered_to_completion(&events, &id);

    // Joined after the end: the terminal event from the store, and the stream closes.
    let events = stream(&app, &path, &key, None).await.read_all(DONE).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, "completed");
    assert_eq!(events[0].id.as_deref(), Some("2000"));
    assert_eq!(events[0].data["progress"], 100);
    assert_eq!(
        events[0].data["videoUrl"].as_str(),
        app.task(&id).await.video_url.as_deref()
    );

    // Resumed after the terminal event: nothing more to say.
    let events = stream(&app, &path, &key, Some("2000"))
        .await
        .read_all(DONE)
        .await;
    assert!(events.is_empty(), "{events:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_resumed_task_stream_repeats_nothing_and_misses_nothing() {
    let app = spawn_app(6000).await;
    let key = key(&app, "vk-resume", false).await;
    let id = submit(&app, "vk-resume").await;
    let path = format!("/v1/tasks/{id}/events");

    let mut first = stream(&app, &path, &key, None).await;
    let mut seen = Vec::new();
    while let Some(e) = first.next(DONE).await {
        let progressed = e.event == "progress" && e.progress() > 0;
        seen.push(e);
        if progressed {
            break;
        }
    }
    drop(first);
    let last_id = seen.last().expect("an event").id.clone().expect("an id");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let row = app.task(&id).await;
    assert_eq!(
        row.status,
        TaskStatus::Processing,
        "still running at the resume"
    );

    let resumed = stream(&app, &path, &key, Some(&last_id))
        .await
        .read_all(DONE)
        .await;
    let last: u64 = last_id.parse().unwrap();
    assert!(
        resumed.iter().all(|e| e.id_number() > last),
        "repeated: {resumed:?} after {last}"
    );
    assert!(
        resumed[0].progress() >= u64::try_from(row.progress).unwrap(),
        "the resume starts at least where the task was: {:?}, row at {}",
        resumed[0],
        row.progress
    );
    let mut all = seen.clone();
    all.extend(resumed);
    assert_ordered_to_completion(&all, &id);

    // The tenant stream resumes too: the tasks that changed while the client was away.
    let mut tenant = stream(&app, "/v1/events", &key, None).await;
    let other = submit(&app, "vk-resume").await;
    let first = loop {
        let e = tenant
            .next(DONE)
            .await
            .expect("the tenant stream stays open");
        if e.request_id() == other {
            break e;
        }
    };
    drop(tenant);
    let away_from = first.id_number();
    app.events
        .wait_for(|e| e.is("video.generation.completed", &other), DONE)
        .await
        .expect("the other task completes");
    let mut tenant = stream(&app, "/v1/events", &key, Some(&away_from.to_string())).await;
    let caught_up = loop {
        let e = tenant
            .next(DONE)
            .await
            .expect("the tenant stream stays open");
        assert_eq!(e.data["virtualKeyId"], "vk-resume");
        assert!(e.id_number() >= away_from, "ids never go back: {e:?}");
        if e.request_id() == other {
            break e;
        }
    };
    assert_eq!(
        caught_up.event, "completed",
        "the state it reached while the client was away"
    );
    app.stop().await;
}

#[tokio::test]
async fn another_tenants_task_is_refused_and_its_events_never_reach_a_tenant_stream() {
    let app = spawn_app(2500).await;
    let key_a = key(&app, "vk-a", false).await;
    let key_b = key(&app, "vk-b", false).await;
    let admin = key(&app, "ops", true).await;
    let mut stream_b = stream(&app, "/v1/events", &key_b, None).await;
    let mut everything = stream(&app, "/v1/events", &admin, None).await;
    let id_a = submit(&app, "vk-a").await;
    let id_b = submit(&app, "vk-b").await;

    let path = format!("/v1/tasks/{id_a}/events");
    let refused = get(&app, &path, Some(&key_b), None).await;
    assert_eq!(refused.status(), 404, "another tenant's task is not found");
    let missing = get(&app, "/v1/tasks/no-such-task/events", Some(&key_a), None).await;
    assert_eq!(missing.status(), 404);
    for path in [path.as_str(), "/v1/events"] {
        let anonymous = get(&app, path, None, None).await;
        assert_eq!(anonymous.status(), 401, "{path}");
        assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
        let wrong = get(&app, path, Some("vo_0123456789abcdef_00"), None).await;
        assert_eq!(wrong.status(), 401, "{path}");
        let bad_resume = get(&app, path, Some(&admin), Some("yesterday")).await;
        assert_eq!(bad_resume.status(), 400, "{path}");
    }
    assert_eq!(get(&app, &path, Some(&admin), None).await.status(), 200);

    loop {
        let e = stream_b.next(DONE).await.expect("B's stream stays open");
        assert_eq!(e.data["virtualKeyId"], "vk-b", "B sees only its own: {e:?}");
        assert_ne!(e.request_id(), id_a);
        if e.request_id() == id_b && e.is_terminal() {
            break;
        }
    }
    let mut finished = std::collections::HashSet::new();
    while finished.len() < 2 {
        let e = everything
            .next(DONE)
            .await
            .expect("the admin stream stays open");
        if e.is_terminal() {
            finished.insert(e.request_id().to_owned());
        }
    }
    assert!(
        finished.contains(&id_a) && finished.contains(&id_b),
        "{finished:?}"
    );
    app.stop().await;
}

/// An HTTP/1.1 request for `path` on a socket with a small receive buffer, and then nothing:
/// a client that stops reading.
async fn raw_stream(addr: SocketAddr, path: &str, key: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let mut stream = socket.connect(addr).await.expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    stream
}

/// How a raw read of a response ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The server closed (or reset) the connection.
    Closed,
    /// The chunked body ended; the connection stays open for another request.
    BodyEnded,
}

/// Reads until the server closes the connection or the chunked body ends; `None` if neither
/// happens within `timeout`.
async fn read_to_end(
    stream: &mut tokio::net::TcpStream,
    timeout: Duration,
) -> Option<(String, Ended)> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + timeout;
    let text = |all: &[u8]| String::from_utf8_lossy(all).into_owned();
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((text(&all), Ended::Closed)),
            Ok(Ok(n)) => {
                all.extend_from_slice(&buf[..n]);
                if all.ends_with(b"\r\n0\r\n\r\n") {
                    return Some((text(&all), Ended::BodyEnded));
                }
            }
        }
    }
}

/// Submits `n` requests of `virtual_key_id` and returns their ids.
async fn submit_many(app: &TestApp, virtual_key_id: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let request = new_request(virtual_key_id, "sora-2", &format!("crowd scene {i}"));
        ids.push(app.submit(&request).await);
    }
    ids
}

/// Every task completes, none slower than the provider's duration plus `slack` from start to end.
async fn assert_all_completed_in_time(
    app: &TestApp,
    ids: &[String],
    duration: Duration,
    slack: Duration,
) {
    for id in ids {
        app.events
            .wait_for(|e| e.is("video.generation.completed", id), DONE)
            .await
            .unwrap_or_else(|| panic!("{id} did not complete"));
    }
    for id in ids {
        let row = app.task(id).await;
        let took = (row.finished_at.unwrap() - row.started_at.unwrap())
            .to_std()
            .unwrap();
        assert!(
            took <= duration + slack,
            "{id} took {took:?}: checks were held up"
        );
        assert!(row.checks_count >= 2, "{id}: {} checks", row.checks_count);
    }
}

#[tokio::test]
async fn a_stalled_client_is_disconnected_and_checks_go_on_at_their_pace() {
    let duration = Duration::from_millis(6000);
    let app = spawn_app_with(
        6000,
        &[
            ("APP__HTTP__SEND_TIMEOUT_MS", "1500"),
            ("APP__HTTP__SSE_BUFFER", "8"),
        ],
    )
    .await;
    let admin = key(&app, "ops", true).await;
    let tenant = key(&app, "vk-busy", false).await;
    let mut stalled = raw_stream(app.service.http, "/v1/events", &admin).await;
    let ids = submit_many(&app, "vk-busy", 60).await;
    // A client that reads, beside the one that does not.
    let mut healthy = stream(&app, &format!("/v1/tasks/{}/events", ids[0]), &tenant, None).await;

    let events = healthy.read_all(DONE).await;
    assert_ordered_to_completion(&events, &ids[0]);
    assert!(
        events.iter().filter(|e| e.event == "progress").count() >= 2,
        "{events:?}"
    );
    assert_all_completed_in_time(&app, &ids, duration, Duration::from_secs(6)).await;

    // Had the connection stayed open, this read would wait for events that no longer come.
    let (text, ended) = read_to_end(&mut stalled, Duration::from_secs(10))
        .await
        .expect("the service closed the stalled connection");
    assert_eq!(ended, Ended::Closed);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(
        text.contains("event: "),
        "it had been sent events before it stalled"
    );
    assert!(
        !text.contains("\r\n0\r\n\r\n"),
        "the stream did not end on its own"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_falls_behind_is_dropped_with_a_final_event() {
    let duration = Duration::from_millis(5000);
    let app = spawn_app_with(
        5000,
        &[
            ("APP__HTTP__SEND_TIMEOUT_MS", "120000"),
            ("APP__HTTP__SSE_BUFFER", "4"),
        ],
    )
    .await;
    let admin = key(&app, "ops", true).await;
    let mut behind = raw_stream(app.service.http, "/v1/events", &admin).await;
    let ids = submit_many(&app, "vk-many", 60).await;
    // Far more than the socket buffers, hyper's and the subscriber's hold together.
    let flood = eventually(DONE, || async {
        let lifecycle = app
            .events
            .all()
            .iter()
            .filter(|e| {
                e.routing_key.starts_with("video.generation.")
                    && e.routing_key != "video.generation.requested"
            })
            .count();
        (lifecycle >= 350).then_some(lifecycle)
    })
    .await;
    assert!(flood.is_some(), "the tasks produce events");
    assert_all_completed_in_time(&app, &ids, duration, Duration::from_secs(6)).await;

    let (text, ended) = read_to_end(&mut behind, Duration::from_secs(20))
        .await
        .expect("the stream of a dropped client ends");
    assert_eq!(
        ended,
        Ended::BodyEnded,
        "the stream ended, not the connection"
    );
    let dropped_at = text
        .rfind("event: dropped")
        .expect("a final `dropped` event");
    assert!(
        !text[dropped_at + 1..].contains("event: "),
        "`dropped` is the last event"
    );
    assert!(
        text[..dropped_at].contains("event: progress"),
        "what was buffered came first"
    );
    app.stop().await;
}

#[tokio::test]
async fn streams_end_when_the_service_shuts_down_and_survive_a_broker_reconnect() {
    let real = std::env::var("APP__RABBITMQ__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let mut parsed = url::Url::parse(&real).expect("broker URL");
    let target: SocketAddr = format!(
        "{}:{}",
        parsed.host_str().expect("host"),
        parsed.port().unwrap_or(5672)
    )
    .parse()
    .expect("the test broker is addressed by IP");
    let proxy = Proxy::start(target).await;
    parsed.set_port(Some(proxy.addr().port())).expect("port");
    let app = spawn_app_with(
        8000,
        &[
            ("APP__RABBITMQ__URL", parsed.as_str()),
            ("APP__RABBITMQ__RECONNECT_MAX_MS", "500"),
        ],
    )
    .await;
    let key = key(&app, "vk-cut", true).await;
    let id = submit(&app, "vk-cut").await;
    let mut task = stream(&app, &format!("/v1/tasks/{id}/events"), &key, None).await;
    let mut all = stream(&app, "/v1/events", &key, None).await;
    let mut before = vec![task.next(DONE).await.expect("the first state")];
    loop {
        let e = task.next(DONE).await.expect("events before the cut");
        let progressed = e.event == "progress";
        before.push(e);
        if progressed {
            break;
        }
    }

    // The service's broker connection goes; the hub's queue goes with it.
    proxy.set_down(true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.set_down(false);
    let mut after = task.read_all(DONE).await;
    assert!(
        after.iter().any(|e| e.event == "progress"),
        "live events flow again after the reconnect: {after:?}"
    );
    before.append(&mut after);
    assert_ordered_to_completion(&before, &id);
    loop {
        let e = all
            .next(DONE)
            .await
            .expect("the tenant stream outlived the cut");
        if e.request_id() == id && e.is_terminal() {
            break;
        }
    }

    // An open stream does not hold up shutdown: it ends when shutdown starts.
    let started = Instant::now();
    let stopping = tokio::spawn(async move { app.stop().await });
    assert!(
        all.next(Duration::from_secs(10)).await.is_none(),
        "the stream ended"
    );
    stopping.await.expect("the service stopped");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

//! Fault 5: poison input. 10,000 random and mutated bodies — not JSON, not an object, wrong
//! types, huge strings, unknown versions, missing fields, unknown message types, random byte
//! mutations of good messages — published straight to `video.events` (with and without the
//! `type` property, under each routing key `video.generation` takes) and to `video.progress`
//! (with an `x-virtual-key` header, so they land in the partitions), interleaved with good
//! requests, invalid requests (refused: Failed + CommandRejected) and cancels under the wrong
//! virtual key (refused: CommandRejected).
//!
//! Every bad one must be parked with a reason, every good one complete, every refusal be
//! answered, and no consumer restart.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lapin::options::{BasicCancelOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};
use test_support::cluster::{assert_clean, one_at_a_time, Audit, Cluster, Expectation, Options};
use test_support::figures::{figure, note};
use test_support::{consume_unacked, header};
use video_orchestrator::messages::{self, GenerationCommand, VideoProgressCheckRequested};

const BAD: usize = 10_000;
/// Share of the bad bodies sent to `video.progress` (the rest go to `video.generation`).
const TO_PROGRESS_EVERY: usize = 10;
const GOOD: usize = 100;
const WRONG_KEY_CANCELS: usize = 30;

/// Every way a bad message is broken.
const KINDS: [&str; 8] = [
    "not_json",
    "not_object",
    "wrong_type",
    "huge_string",
    "unknown_version",
    "missing_field",
    "unknown_type",
    "mutated",
];

/// Where a raw message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Generation,
    Progress,
}

#[derive(Debug, Clone)]
struct Raw {
    target: Target,
    routing_key: &'static str,
    message_type: Option<String>,
    virtual_key: Option<String>,
    body: Vec<u8>,
    kind: &'static str,
}

impl Raw {
    /// What the contract says of it: `Err` is poison.
    fn decodes(&self) -> Result<(), messages::DecodeError> {
        match self.target {
            Target::Generation => GenerationCommand::decode(
                self.message_type.as_deref(),
                self.routing_key,
                &self.body,
            )
            .map(|_| ()),
            Target::Progress => {
                messages::decode::<VideoProgressCheckRequested>(&self.body).map(|_| ())
            }
        }
    }
}

fn meta() -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("messageId".into(), json!(uuid::Uuid::new_v4().to_string()));
    m.insert(
        "occurredAt".into(),
        json!(messages::rfc3339(messages::now())),
    );
    m.insert("version".into(), json!(1));
    m
}

/// A valid body of the kind `routing_key` names, with its required fields.
fn valid(target: Target, routing_key: &str) -> (Value, &'static [&'static str]) {
    let mut m = meta();
    m.insert(
        "requestId".into(),
        json!(format!("poison-{}", uuid::Uuid::new_v4().simple())),
    );
    m.insert("virtualKeyId".into(), json!("vk-poison"));
    let required: &'static [&'static str] = match (target, routing_key) {
        (Target::Progress, _) => {
            let now = messages::rfc3339(messages::now());
            m.insert("scheduledAt".into(), json!(now));
            m.insert("startTime".into(), json!(now));
            m.insert("intervalIndex".into(), json!(0));
            m.insert("sequence".into(), json!(0));
            &[
                "messageId",
                "occurredAt",
                "requestId",
                "virtualKeyId",
                "scheduledAt",
                "startTime",
                "intervalIndex",
                "sequence",
            ]
        }
        (_, "video.generation.cancel_requested") => {
            &["messageId", "occurredAt", "requestId", "virtualKeyId"]
        }
        (_, "video.provider.task_finished") => {
            m.insert("outcome".into(), json!("succeeded"));
            &[
                "messageId",
                "occurredAt",
                "requestId",
                "virtualKeyId",
                "outcome",
            ]
        }
        _ => {
            m.insert("model".into(), json!("sora-2"));
            m.insert("prompt".into(), json!("never to be rendered"));
            &[
                "messageId",
                "occurredAt",
                "requestId",
                "virtualKeyId",
                "model",
                "prompt",
            ]
        }
    };
    (Value::Object(m), required)
}

fn huge(rng: &mut StdRng) -> String {
    let n = rng.random_range(32 * 1024..96 * 1024);
    let c = char::from(b'a' + rng.random_range(0..26u8));
    std::iter::repeat_n(c, n).collect()
}

/// A value of the wrong type for `field` (every field we pick is a string, an integer or an
/// enum string).
fn wrong_value(rng: &mut StdRng, field: &str) -> Value {
    let numeric = matches!(field, "intervalIndex" | "sequence");
    let choices: Vec<Value> = if numeric {
        vec![
            json!("seven"),
            json!(1.5),
            json!(true),
            json!([1]),
            json!({"n": 1}),
            json!(null),
            json!(-1e30),
            json!("\u{0}"),
        ]
    } else {
        vec![
            json!(42),
            json!(true),
            json!([]),
            json!({"oops": "object"}),
            json!(null),
            json!(-0.5),
            // Valid JSON strings that are not valid values for ids, timestamps and enums.
            json!("\u{0}nul in a string\u{0}"),
        ]
    };
    let pick = choices[rng.random_range(0..choices.len())].clone();
    // A string is the right type for the string fields: make it wrong for those that parse it.
    if pick.is_string()
        && !numeric
        && !matches!(
            field,
            "messageId" | "occurredAt" | "outcome" | "scheduledAt" | "startTime"
        )
    {
        return json!(7);
    }
    pick
}

fn mutate_bytes(rng: &mut StdRng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..=4) {
        if bytes.is_empty() {
            bytes.push(rng.random());
            continue;
        }
        let i = rng.random_range(0..bytes.len());
        match rng.random_range(0..4) {
            0 => bytes[i] = rng.random(),
            1 => {
                bytes.remove(i);
            }
            2 => {
                let j = rng.random_range(i..bytes.len());
                let copy = bytes[i..=j].to_vec();
                bytes.splice(i..i, copy);
            }
            _ => bytes.truncate(i),
        }
    }
    bytes
}

/// One bad message; `i` spreads them over targets, routing keys, `type` property and kinds.
fn bad(rng: &mut StdRng, i: usize) -> Raw {
    let target = if i % TO_PROGRESS_EVERY == 0 {
        Target::Progress
    } else {
        Target::Generation
    };
    let routing_key = match (target, rng.random_range(0..6)) {
        (Target::Progress, _) => "check",
        (_, 0) => "video.generation.cancel_requested",
        (_, 1) => "video.provider.task_finished",
        _ => "video.generation.requested",
    };
    // Half carry the matching `type` property, half leave it to the routing key.
    let mut message_type = match (target, routing_key, rng.random_bool(0.5)) {
        (Target::Generation, "video.generation.requested", true) => {
            Some("VideoGenerationRequested".to_owned())
        }
        (Target::Generation, "video.generation.cancel_requested", true) => {
            Some("VideoGenerationCancelRequested".to_owned())
        }
        (Target::Generation, "video.provider.task_finished", true) => {
            Some("VideoProviderTaskFinished".to_owned())
        }
        _ => None,
    };
    let (mut value, required) = valid(target, routing_key);
    // A check has no `type` property to get wrong.
    let kinds: Vec<&str> = KINDS
        .into_iter()
        .filter(|k| target == Target::Generation || *k != "unknown_type")
        .collect();
    // Huge bodies are 1 in 64 (about 10 MB over the run).
    let kind = if rng.random_range(0..64) == 0 {
        "huge_string"
    } else {
        loop {
            let k = kinds[rng.random_range(0..kinds.len())];
            if k != "huge_string" {
                break k;
            }
        }
    };
    let obj = value.as_object_mut().expect("object");
    let body: Vec<u8> = match kind {
        "not_json" => match rng.random_range(0..5) {
            0 => Vec::new(),
            1 => b"{\"version\": 1, \"requestId\": ".to_vec(),
            2 => {
                let mut b = vec![0u8; rng.random_range(1..300)];
                rng.fill_bytes(&mut b);
                b
            }
            3 => format!("requestId=r-{i}&prompt=a cat").into_bytes(),
            _ => {
                let mut b = serde_json::to_vec(obj).expect("json");
                let at = rng.random_range(0..b.len());
                b.insert(at, if rng.random_bool(0.5) { 0x00 } else { 0xff });
                b
            }
        },
        "not_object" => {
            let v = [
                json!([1, 2, 3]),
                json!("a string"),
                json!(42),
                json!(null),
                json!(true),
                json!([]),
            ];
            serde_json::to_vec(&v[rng.random_range(0..v.len())]).expect("json")
        }
        "wrong_type" => {
            let field = required[rng.random_range(0..required.len())];
            let wrong = wrong_value(rng, field);
            obj.insert(field.into(), wrong);
            if rng.random_bool(0.3) {
                obj.insert("version".into(), json!("1"));
            }
            serde_json::to_vec(obj).expect("json")
        }
        "huge_string" => match rng.random_range(0..3) {
            // A huge string where a number belongs.
            0 => {
                obj.insert("version".into(), json!(huge(rng)));
                serde_json::to_vec(obj).expect("json")
            }
            // A huge string that never ends.
            1 => {
                let mut b = b"{\"version\":1,\"prompt\":\"".to_vec();
                b.extend_from_slice(huge(rng).as_bytes());
                b
            }
            // A huge id that is not a UUID.
            _ => {
                obj.insert("messageId".into(), json!(huge(rng)));
                serde_json::to_vec(obj).expect("json")
            }
        },
        "unknown_version" => {
            let v = [
                json!(0),
                json!(2),
                json!(7),
                json!(99),
                json!(u32::MAX),
                json!(u64::MAX),
            ];
            obj.insert("version".into(), v[rng.random_range(0..v.len())].clone());
            serde_json::to_vec(obj).expect("json")
        }
        "missing_field" => {
            let field = if rng.random_bool(0.2) {
                "version"
            } else {
                required[rng.random_range(0..required.len())]
            };
            obj.remove(field);
            serde_json::to_vec(obj).expect("json")
        }
        "unknown_type" => {
            let names = [
                "VideoGenerationExploded",
                "videogenerationrequested",
                "Nope",
                "VideoGenerationStarted",
            ];
            message_type = Some(names[rng.random_range(0..names.len())].to_owned());
            serde_json::to_vec(obj).expect("json")
        }
        _ => {
            let good = serde_json::to_vec(obj).expect("json");
            mutate_bytes(rng, good)
        }
    };
    let mut raw = Raw {
        target,
        routing_key,
        message_type,
        virtual_key: (target == Target::Progress)
            .then(|| format!("vk-poison-{}", rng.random_range(0..1000))),
        body,
        kind,
    };
    // A random mutation can leave a message valid (a changed letter in the prompt): then it is
    // not poison, so break it for sure — a NUL byte is never valid in JSON text.
    if raw.decodes().is_ok() {
        let at = rng.random_range(0..=raw.body.len());
        raw.body.insert(at, 0);
    }
    raw
}

fn good_request(i: usize, prompt: String, duration: Option<u32>) -> (String, Raw) {
    let mut m = meta();
    let id = format!("good-{i}-{}", uuid::Uuid::new_v4().simple());
    m.insert("requestId".into(), json!(id));
    m.insert("virtualKeyId".into(), json!(format!("vk-good-{}", i % 16)));
    m.insert("model".into(), json!("sora-2"));
    m.insert("prompt".into(), json!(prompt));
    if let Some(d) = duration {
        m.insert("durationSeconds".into(), json!(d));
    }
    let raw = Raw {
        target: Target::Generation,
        routing_key: "video.generation.requested",
        message_type: (i % 2 == 0).then(|| "VideoGenerationRequested".to_owned()),
        virtual_key: Some(format!("vk-good-{}", i % 16)),
        body: serde_json::to_vec(&Value::Object(m)).expect("json"),
        kind: "good",
    };
    (id, raw)
}

fn wrong_key_cancel(request_id: &str) -> Raw {
    let mut m = meta();
    m.insert("requestId".into(), json!(request_id));
    m.insert("virtualKeyId".into(), json!("vk-intruder"));
    m.insert("reason".into(), json!("not yours"));
    Raw {
        target: Target::Generation,
        routing_key: "video.generation.cancel_requested",
        message_type: Some("VideoGenerationCancelRequested".to_owned()),
        virtual_key: Some("vk-intruder".to_owned()),
        body: serde_json::to_vec(&Value::Object(m)).expect("json"),
        kind: "wrong_key_cancel",
    }
}

/// Publishes with confirms, a window of 1,000 in flight; every message must be routed.
async fn publish_all(conn: &Connection, cluster: &Cluster, all: &[Raw]) {
    let topology = cluster.env.topology();
    let (events, progress) = (topology.events_exchange(), topology.progress_exchange());
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm_select");
    for chunk in all.chunks(1000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut headers = FieldTable::default();
            if let Some(vk) = &m.virtual_key {
                headers.insert(
                    "x-virtual-key".into(),
                    AMQPValue::LongString(vk.as_str().into()),
                );
            }
            let mut props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into())
                .with_headers(headers);
            if let Some(t) = &m.message_type {
                props = props.with_type(t.as_str().into());
            }
            let exchange = match m.target {
                Target::Generation => events.as_str(),
                Target::Progress => progress.as_str(),
            };
            confirms.push(
                channel
                    .basic_publish(
                        exchange.into(),
                        m.routing_key.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &m.body,
                        props,
                    )
                    .await
                    .expect("publish"),
            );
        }
        for c in futures::future::join_all(confirms).await {
            assert_eq!(c.expect("confirm"), Confirmation::Ack(None), "not routed");
        }
    }
    let _ = channel.close(200, "published".into()).await;
}

/// Reads the parking queue: (original queue kind, reason category) → count, and how many had
/// no reason.
async fn read_parking(
    cluster: &Cluster,
    conn: &Connection,
    expected: u32,
) -> (BTreeMap<(String, String), usize>, usize, usize) {
    let queue = cluster.env.topology().parking_queue();
    let generation = cluster.env.topology().generation_queue();
    let channel = conn.create_channel().await.expect("channel");
    let mut consumer = consume_unacked(&channel, &queue)
        .await
        .expect("consume parking");
    let mut by = BTreeMap::new();
    let (mut read, mut unexplained) = (0usize, 0usize);
    while let Ok(Some(Ok(d))) = tokio::time::timeout(
        Duration::from_secs(3),
        futures::StreamExt::next(&mut consumer),
    )
    .await
    {
        read += 1;
        let reason = header(&d, "x-parked-reason").unwrap_or_default();
        let original = header(&d, "x-original-queue").unwrap_or_default();
        if reason.trim().is_empty() || original.is_empty() {
            unexplained += 1;
        }
        let from = if original == generation {
            "generation"
        } else if original.contains("video.progress.p") {
            "partition"
        } else {
            "other"
        };
        let category = if reason.starts_with("body is not valid JSON") {
            "not JSON"
        } else if reason.starts_with("unknown message type") {
            "unknown type"
        } else if reason.contains("unsupported version") {
            "unknown version"
        } else if reason.starts_with("field `.`") {
            "not an object"
        } else if reason.contains("missing field") {
            "missing field"
        } else if reason.starts_with("field `") {
            "bad field value"
        } else {
            "other"
        };
        *by.entry((from.to_owned(), category.to_owned()))
            .or_default() += 1;
        if read as u32 >= expected {
            break;
        }
    }
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    (by, read, unexplained)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_poison_messages_are_parked_and_good_ones_complete() {
    let run = "poison";
    let _serial = one_at_a_time().await;
    let seed: u64 = std::env::var("POISON_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::start(Options {
        name: run,
        instances: 2,
        sim_duration_ms: 1000,
        sim_jitter_ms: 1000,
        extra: vec![],
    })
    .await;
    let pids = cluster.pids();

    let bad: Vec<Raw> = (0..BAD).map(|i| bad(&mut rng, i)).collect();
    for b in &bad {
        assert!(
            b.decodes().is_err(),
            "generator bug: a `{}` body decodes: {:?}",
            b.kind,
            String::from_utf8_lossy(&b.body)
        );
    }
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for b in &bad {
        *kinds.entry(b.kind).or_default() += 1;
    }

    // Good requests, and well-formed ones the service must refuse (not poison).
    let mut good_ids = Vec::new();
    let mut refused_ids = Vec::new();
    let mut first: Vec<Raw> = Vec::new();
    let mut extra = Vec::new();
    for i in 0..GOOD {
        let (id, raw) = good_request(i, format!("a good request #{i}"), None);
        good_ids.push(id);
        extra.push(raw);
    }
    for i in 0..20 {
        let (prompt, duration) = match i % 4 {
            0 | 1 => (String::new(), None),
            2 => ("x".repeat(100_000), None),
            _ => ("fine prompt, absurd length".to_owned(), Some(100_000)),
        };
        let (id, raw) = good_request(1000 + i, prompt, duration);
        refused_ids.push(id);
        extra.push(raw);
    }
    // First half of the bad ones with the good and refused requests spread through them.
    let half = BAD / 2;
    let every = half / extra.len();
    for (i, b) in bad[..half].iter().enumerate() {
        first.push(b.clone());
        if i % every == 0 && !extra.is_empty() {
            first.push(extra.remove(0));
        }
    }
    first.append(&mut extra);

    let conn = cluster.connect().await;
    let t = Instant::now();
    publish_all(&conn, &cluster, &first).await;
    let publish_first_s = t.elapsed().as_secs_f64();
    note(
        run,
        &format!("first {} published in {publish_first_s:.1} s", first.len()),
    );

    // Cancels under the wrong key once the good tasks exist (a cancel that arrives first would
    // leave a tombstone instead), with the second half of the bad ones around them.
    let all_ids: Vec<String> = good_ids.iter().chain(&refused_ids).cloned().collect();
    let t0 = Instant::now();
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM video_tasks WHERE request_id = ANY($1)")
                .bind(&all_ids)
                .fetch_one(cluster.env.store.pool())
                .await
                .expect("count tasks");
        if n == all_ids.len() as i64 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "only {n}/{} good and refused requests recorded after 120 s",
            all_ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cancelled: Vec<String> = good_ids[..WRONG_KEY_CANCELS].to_vec();
    let mut second: Vec<Raw> = Vec::new();
    let mut cancels: Vec<Raw> = cancelled.iter().map(|id| wrong_key_cancel(id)).collect();
    let every = (BAD - half) / cancels.len();
    for (i, b) in bad[half..].iter().enumerate() {
        second.push(b.clone());
        if i % every == 0 && !cancels.is_empty() {
            second.push(cancels.remove(0));
        }
    }
    second.append(&mut cancels);
    publish_all(&conn, &cluster, &second).await;
    let published_s = t.elapsed().as_secs_f64();

    // Every bad one parked.
    let parking = cluster.env.topology().parking_queue();
    let t_park = Instant::now();
    let mut parked = 0;
    while t_park.elapsed() < Duration::from_secs(180) {
        parked = cluster.depth(&conn, &parking).await;
        if parked as usize >= BAD {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let parked_s = t.elapsed().as_secs_f64();
    note(run, &format!("{parked} parked after {parked_s:.1} s"));
    cluster.drain(&all_ids, Duration::from_secs(120)).await;
    // Nothing else arrives late.
    let parked_final = cluster.depth(&conn, &parking).await;
    let alive = cluster.all_alive();
    let ready = cluster.ready_count().await;
    let parked_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM parked_messages")
        .fetch_one(cluster.env.store.pool())
        .await
        .expect("count parked rows");
    let interrupted = cluster.log_lines("consumer interrupted");
    let same_pids = cluster.pids() == pids;

    let mut expected = Expectation::all_run(&good_ids);
    expected.extend(Expectation::all_refused(&refused_ids));
    let Audit { counters, books } = cluster.audit(&expected, &[]).await;
    let rejected = |command: &str, ids: &[String]| {
        ids.iter()
            .filter(|id| {
                books
                    .events
                    .iter()
                    .filter(|e| {
                        e.routing_key == "video.generation.command_rejected"
                            && e.request_id == **id
                            && e.body["command"] == command
                    })
                    .count()
                    == 1
            })
            .count()
    };
    let refused_answered = rejected("VideoGenerationRequested", &refused_ids);
    let cancels_answered = rejected("VideoGenerationCancelRequested", &cancelled);
    let (by_reason, read, unexplained) = read_parking(&cluster, &conn, parked_final).await;
    let _ = conn.close(200, "done".into()).await;
    let from_partitions: usize = by_reason
        .iter()
        .filter(|((from, _), _)| from == "partition")
        .map(|(_, n)| n)
        .sum();
    let sent_to_progress = bad.iter().filter(|b| b.target == Target::Progress).count();

    figure(&format!(
        "{run}: bad={BAD} parked={parked_final} parked_rows={parked_rows} parked_metric={} \
         good={GOOD} completed={} refused={} (answered {refused_answered}) wrong_key_cancels={WRONG_KEY_CANCELS} \
         (answered {cancels_answered}) lost={} duplicates_dropped={} consumer_restarts={interrupted} \
         published_s={published_s:.1} all_parked_s={parked_s:.1} parked_per_s={:.0} seed={seed} total_s={:.0}",
        counters.sum("video_parked_messages_total", ""),
        books.by_status.get("completed").copied().unwrap_or(0),
        refused_ids.len(),
        books.lost.len(),
        books.duplicates_dropped,
        BAD as f64 / parked_s,
        cluster.started.elapsed().as_secs_f64(),
    ));
    figure(&format!("{run}: kinds sent {kinds:?}"));
    figure(&format!("{run}: parked by (queue, reason) {by_reason:?}"));

    assert_clean(&cluster, &books);
    assert_eq!(
        parked_final as usize, BAD,
        "every bad message parked, nothing else"
    );
    assert_eq!(read, BAD, "read back every parked message");
    assert_eq!(unexplained, 0, "parked messages without a reason or origin");
    assert_eq!(
        from_partitions, sent_to_progress,
        "bad checks parked from the partitions"
    );
    assert_eq!(
        counters.sum("video_parked_messages_total", ""),
        BAD as u64,
        "parked counter"
    );
    assert_eq!(
        parked_rows, BAD as i64,
        "every parked message recorded in parked_messages"
    );
    assert_eq!(
        books.by_status.get("completed").copied().unwrap_or(0),
        GOOD,
        "every good request completes"
    );
    assert_eq!(
        refused_answered,
        refused_ids.len(),
        "each refused request answered once"
    );
    assert_eq!(
        cancels_answered, WRONG_KEY_CANCELS,
        "each wrong-key cancel answered once"
    );
    assert_eq!(interrupted, 0, "a consumer was interrupted");
    assert!(
        alive && same_pids && ready == 2,
        "an instance died or was replaced"
    );
    cluster.cleanup().await;
}

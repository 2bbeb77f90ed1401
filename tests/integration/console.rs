//! The operator console: its admin API over HTTP (who may call it, what it answers), and the
//! page itself in a real headless Chromium driven through chromedriver (Debian's `chromium` and
//! `chromium-driver`; `scripts/chromium-setup` installs them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use futures::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use lapin::BasicProperties;
use secrecy::ExposeSecret;
use serde_json::Value;
use test_support::app::{eventually, spawn_app, TestApp};
use video_orchestrator::auth::{self, CreatedKey};
use video_orchestrator::client::new_request;
use video_orchestrator::messages::{Message, VideoGenerationRequested};
use video_orchestrator::store::{ParkedMessage, TaskStatus};

/// A bound only a broken service reaches.
const DONE: Duration = Duration::from_secs(60);

fn bearer(key: &CreatedKey) -> String {
    format!("Bearer {}", key.key.expose_secret())
}

async fn get(addr: SocketAddr, path: &str, key: Option<&CreatedKey>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("http://{addr}{path}"));
    if let Some(key) = key {
        request = request.header("Authorization", bearer(key));
    }
    let response = request.send().await.expect("the console API answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post(addr: SocketAddr, path: &str, key: &CreatedKey) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}{path}"))
        .header("Authorization", bearer(key))
        .send()
        .await
        .expect("the console API answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn wait_completed(app: &TestApp, request_id: &str) {
    eventually(DONE, || async {
        let t = app.env.store.get(request_id).await.ok()??;
        (t.status == TaskStatus::Completed).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{request_id} completes"));
}

/// Publishes a body the generation consumer cannot decode; returns the parked row's id.
async fn park_malformed(app: &TestApp, message_id: &str) -> i64 {
    app.env
        .publish_raw(
            &app.env.topology().events_exchange(),
            VideoGenerationRequested::ROUTING_KEY,
            b"{ this is not json",
            BasicProperties::default()
                .with_message_id(message_id.into())
                .with_type(VideoGenerationRequested::NAME.into()),
        )
        .await;
    eventually(Duration::from_secs(15), || async {
        let list = app.env.store.console_parked(50, false).await.ok()?;
        list.iter()
            .find(|p| p.message_id.as_deref() == Some(message_id))
            .map(|p| p.id)
    })
    .await
    .unwrap_or_else(|| panic!("{message_id} is parked"))
}

#[tokio::test]
async fn the_admin_api_needs_an_admin_key_and_shows_tasks_instances_parked_and_figures() {
    let app = spawn_app(1500).await;
    let addr = app.service.http;
    let admin = auth::create_key(&app.env.store, "ops", "console", true)
        .await
        .unwrap();
    let tenant = auth::create_key(&app.env.store, "vk-a", "a", false)
        .await
        .unwrap();

    for path in [
        "/v1/admin/tasks",
        "/v1/admin/tasks/x",
        "/v1/admin/instances",
        "/v1/admin/parked",
        "/v1/admin/figures",
    ] {
        assert_eq!(get(addr, path, None).await.0, 401, "{path} without a key");
        assert_eq!(
            get(addr, path, Some(&tenant)).await.0,
            403,
            "{path} with a tenant key"
        );
    }
    assert_eq!(
        post(addr, "/v1/admin/parked/1/requeue", &tenant).await.0,
        403
    );

    let a = app
        .submit(&new_request("vk-a", "sora-2", "a lighthouse"))
        .await;
    let b = app
        .submit(&new_request("vk-b", "sora-2", "a harbour"))
        .await;
    wait_completed(&app, &a).await;
    wait_completed(&app, &b).await;

    // Filters: tenant, status, requestId search.
    let (code, all) = get(addr, "/v1/admin/tasks", Some(&admin)).await;
    assert_eq!(code, 200, "{all}");
    let ids = |v: &Value| -> Vec<String> {
        v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["requestId"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut both = ids(&all);
    both.sort();
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(both, expected);
    let (_, only_b) = get(addr, "/v1/admin/tasks?tenant=vk-b", Some(&admin)).await;
    assert_eq!(ids(&only_b), vec![b.clone()]);
    let (_, none) = get(addr, "/v1/admin/tasks?status=processing", Some(&admin)).await;
    assert_eq!(ids(&none), Vec::<String>::new());
    let needle = &a[a.len() - 10..];
    let (_, found) = get(
        addr,
        &format!(
            "/v1/admin/tasks?q={}&status=completed",
            needle.to_uppercase()
        ),
        Some(&admin),
    )
    .await;
    assert_eq!(ids(&found), vec![a.clone()], "case-insensitive search");
    assert_eq!(
        get(addr, "/v1/admin/tasks?status=bogus", Some(&admin))
            .await
            .0,
        400
    );

    // One task's timeline.
    let row = app.task(&a).await;
    let (code, detail) = get(addr, &format!("/v1/admin/tasks/{a}"), Some(&admin)).await;
    assert_eq!(code, 200, "{detail}");
    assert_eq!(detail["task"]["status"], "completed");
    assert_eq!(
        detail["provider"]["jobId"].as_str(),
        row.provider_task_id.as_deref()
    );
    assert!(row.provider_task_id.is_some());
    assert_eq!(detail["checks"]["count"], row.checks_count);
    assert!(row.checks_count > 0);
    let kinds: Vec<&str> = detail["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for kind in ["received", "submit", "started", "check", "finished"] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    assert_eq!(kinds.last(), Some(&"finished"), "{kinds:?}");
    assert_eq!(
        get(addr, "/v1/admin/tasks/no-such-task", Some(&admin))
            .await
            .0,
        404
    );

    // Instances: this one holds every partition.
    let partitions = app.env.topology().partitions();
    let instances = eventually(Duration::from_secs(20), || async {
        let (_, v) = get(addr, "/v1/admin/instances", Some(&admin)).await;
        let held = v["instances"]
            .as_array()?
            .iter()
            .find(|i| i["instanceId"] == app.service.instance_id.as_str())?["partitions"]
            .as_array()?
            .len();
        (held == usize::from(partitions)).then_some(v)
    })
    .await
    .expect("the instance holds every partition");
    assert_eq!(instances["partitions"], partitions);
    assert_eq!(instances["unowned"], serde_json::json!([]));

    // Parked: a valid request parked by hand (as an outage might leave one) goes back to work.
    let parked_request = new_request("vk-p", "sora-2", "requeued");
    let parked_id = app
        .env
        .store
        .record_parked(&ParkedMessage {
            id: 0,
            message_id: Some(parked_request.meta.message_id.to_string()),
            original_queue: app.env.topology().generation_queue(),
            original_exchange: app.env.topology().events_exchange(),
            routing_key: VideoGenerationRequested::ROUTING_KEY.to_owned(),
            reason: "parked by the test".to_owned(),
            headers: serde_json::json!({
                "messageId": parked_request.meta.message_id.to_string(),
                "type": VideoGenerationRequested::NAME,
                "correlationId": parked_request.request_id,
                "x-virtual-key": "vk-p",
            }),
            body: serde_json::to_vec(&parked_request).unwrap(),
            parked_at: chrono::Utc::now(),
            requeued_at: None,
        })
        .await
        .unwrap();
    let (_, list) = get(addr, "/v1/admin/parked", Some(&admin)).await;
    let listed = list["parked"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == parked_id)
        .expect("listed")
        .clone();
    assert_eq!(listed["reason"], "parked by the test");
    assert!(listed["bodyPreview"]
        .as_str()
        .unwrap()
        .contains(&parked_request.request_id));
    let (code, body) = post(
        addr,
        &format!("/v1/admin/parked/{parked_id}/requeue"),
        &admin,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    wait_completed(&app, &parked_request.request_id).await;
    let (_, list) = get(addr, "/v1/admin/parked", Some(&admin)).await;
    assert!(
        !list["parked"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == parked_id),
        "a requeued message leaves the list: {list}"
    );
    let (_, with_requeued) = get(addr, "/v1/admin/parked?all=true", Some(&admin)).await;
    assert!(with_requeued["parked"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == parked_id && !p["requeuedAt"].is_null()));
    assert_eq!(
        post(addr, "/v1/admin/parked/999999999/requeue", &admin)
            .await
            .0,
        404
    );

    // Figures: from this process's recorder, so at least what this test caused.
    let (code, first) = get(addr, "/v1/admin/figures", Some(&admin)).await;
    assert_eq!(code, 200, "{first}");
    assert!(first["checksTotal"].as_f64().unwrap() >= row.checks_count as f64);
    assert_eq!(first["parkedWaiting"], 0);
    for field in ["orphaned", "rearmed", "parked", "windowSeconds"] {
        assert!(first[field].is_number(), "{field} in {first}");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, second) = get(addr, "/v1/admin/figures", Some(&admin)).await;
    assert!(
        second["checksPerSecond"].as_f64().is_some_and(|r| r >= 0.0),
        "a rate once two readings exist: {second}"
    );
    app.stop().await;
}

// ----- the page in Chromium -----

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a free port, killed when dropped.
struct Driver {
    _child: tokio::process::Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        for path in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: the console test needs Debian's chromium and chromium-driver; \
                 run scripts/chromium-setup (as root) first"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        eventually(Duration::from_secs(20), || async {
            reqwest::get(&status)
                .await
                .ok()?
                .status()
                .is_success()
                .then_some(())
        })
        .await
        .expect("chromedriver answers within 20 s");
        Driver { _child: child, url }
    }

    async fn browser(&self) -> Browser {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,860"],
            }),
        );
        // chromedriver is on loopback, over plain HTTP: no TLS stack needed.
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

async fn text_of(browser: &Browser, css: &str) -> Option<String> {
    browser
        .find(Locator::Css(css))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

async fn wait_text(browser: &Browser, css: &str, want: &str) {
    let found = eventually(DONE, || async {
        let text = text_of(browser, css).await?;
        text.contains(want).then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "`{css}` never showed `{want}` (last: {:?})",
        text_of(browser, css).await
    );
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console.png")
}

async fn drive(browser: &Browser, app: &TestApp) {
    let addr = app.service.http;
    let admin = auth::create_key(&app.env.store, "ops", "console", true)
        .await
        .unwrap();
    let tenant = auth::create_key(&app.env.store, "vk-a", "a", false)
        .await
        .unwrap();

    browser
        .goto(&format!("http://{addr}/console"))
        .await
        .expect("the console loads");
    // A tenant's key is refused at the login form.
    browser
        .find(Locator::Id("key"))
        .await
        .unwrap()
        .send_keys(tenant.key.expose_secret())
        .await
        .unwrap();
    browser
        .find(Locator::Css("#login-form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(browser, "#login-error", "admin key").await;

    // Tasks of two tenants, one of them watched until it completes.
    let watched = app
        .submit(&new_request("vk-a", "sora-2", "a lighthouse at dusk"))
        .await;
    for (tenant, prompt) in [("vk-b", "a harbour"), ("vk-c", "a night market")] {
        app.submit(&new_request(tenant, "sora-2", prompt)).await;
    }
    let key_input = browser.find(Locator::Id("key")).await.unwrap();
    key_input.clear().await.unwrap();
    key_input
        .send_keys(admin.key.expose_secret())
        .await
        .unwrap();
    browser
        .find(Locator::Css("#login-form button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let row = format!("tr[data-request-id=\"{watched}\"]");
    wait_text(browser, &format!("{row} .status"), "").await;
    let first = text_of(browser, &format!("{row} .status")).await;
    assert!(
        first.as_deref() != Some("completed"),
        "the task is seen before it completes (the provider takes 6 s): {first:?}"
    );
    wait_text(browser, &format!("{row} .status"), "completed").await;
    wait_text(browser, &format!("{row} .progress"), "100%").await;
    assert_eq!(
        app.task(&watched).await.status,
        TaskStatus::Completed,
        "the page shows what the store says"
    );

    // Its timeline.
    browser
        .find(Locator::Css(&format!("{row} a")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(browser, "#task-detail .timeline", "finished").await;
    let job = app.task(&watched).await.provider_task_id.expect("a job id");
    wait_text(browser, "#task-detail", &job).await;

    // Instances and their partitions.
    browser
        .find(Locator::Css("nav a[data-view=instances]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(browser, "#instances-detail", &app.service.instance_id).await;

    // A parked message, requeued: it leaves the list, and since the body still cannot be
    // decoded the consumer parks it again under a new id (proof it really was republished).
    let parked_id = park_malformed(app, "console-poison").await;
    browser
        .find(Locator::Css("nav a[data-view=parked]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let parked_row = format!("tr[data-parked-id=\"{parked_id}\"]");
    wait_text(browser, &format!("{parked_row} .reason"), "").await;
    let reason = text_of(browser, &format!("{parked_row} .reason"))
        .await
        .unwrap_or_default();
    let stored = app
        .env
        .store
        .get_parked(parked_id)
        .await
        .unwrap()
        .expect("the parked row");
    assert!(
        reason.contains(&stored.reason),
        "the reason is shown: {reason:?}"
    );
    browser
        .find(Locator::Css(&format!("{parked_row} button.requeue")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let gone = eventually(Duration::from_secs(15), || async {
        let rows = browser.find_all(Locator::Css(&parked_row)).await.ok()?;
        rows.is_empty().then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the requeued message leaves the parked list"
    );
    let marked = app.env.store.get_parked(parked_id).await.unwrap().unwrap();
    assert!(marked.requeued_at.is_some(), "marked requeued in the store");
    let again = eventually(Duration::from_secs(15), || async {
        let list = app.env.store.console_parked(50, false).await.ok()?;
        list.into_iter()
            .find(|p| p.message_id.as_deref() == Some("console-poison") && p.id != parked_id)
    })
    .await
    .expect("republished, and parked again by the consumer");
    wait_text(
        browser,
        &format!("tr[data-parked-id=\"{}\"] .reason", again.id),
        "",
    )
    .await;

    // The screenshot the README shows: the task list with the headline figures.
    browser
        .find(Locator::Css("nav a[data-view=tasks]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_text(browser, &format!("{row} .status"), "completed").await;
    // checks/s needs a second reading of the figures (they refresh every 2 s).
    eventually(Duration::from_secs(10), || async {
        let text = text_of(browser, "#fig-checks").await?;
        (!text.is_empty() && text != "–").then_some(())
    })
    .await
    .expect("the headline figures show a rate");
    let png = browser.screenshot().await.expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let path = screenshot_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, png).expect("the screenshot is saved");

    // On a phone's width the tables become cards and nothing scrolls sideways.
    browser.set_window_size(390, 844).await.unwrap();
    let fits = eventually(Duration::from_secs(5), || async {
        let v = browser
            .execute(
                "return document.documentElement.scrollWidth <= window.innerWidth",
                vec![],
            )
            .await
            .ok()?;
        (v == Value::Bool(true)).then_some(())
    })
    .await;
    let phone = browser.screenshot().await.expect("a screenshot");
    let phone_path = std::env::temp_dir().join("vo-console-phone.png");
    let _ = std::fs::write(&phone_path, phone);
    assert!(
        fits.is_some(),
        "the page is wider than a phone (see {})",
        phone_path.display()
    );
    let header = browser
        .find(Locator::Css("#view-tasks thead"))
        .await
        .unwrap();
    assert!(
        !header.is_displayed().await.unwrap(),
        "the task table is shown as cards on a phone"
    );
    // Streaming where the service serves `GET /v1/events`, polling where that answers 404.
    let streams = reqwest::Client::new()
        .get(format!("http://{addr}/v1/events"))
        .header("Authorization", bearer(&admin))
        .send()
        .await
        .expect("an answer")
        .status()
        .as_u16()
        != 404;
    let live = text_of(browser, "#live-mode").await.unwrap_or_default();
    eprintln!("[console] live updates: {live}");
    let want = if streams {
        "Live: streaming"
    } else {
        "Live: polling every 2 s"
    };
    assert!(live.starts_with(want), "{want}, not {live:?}");
}

#[tokio::test]
async fn in_chromium_an_operator_logs_in_sees_a_task_complete_and_requeues_a_parked_message() {
    let driver = Driver::start().await;
    let app = spawn_app(6000).await;
    let browser = driver.browser().await;
    let outcome = std::panic::AssertUnwindSafe(drive(&browser, &app))
        .catch_unwind()
        .await;
    // The browser goes whatever happened, so no Chromium outlives the test.
    let _ = browser.close().await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    app.stop().await;
}

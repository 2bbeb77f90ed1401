//! Who may read what over HTTP: per-tenant API keys, admin keys, revocation.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;
use video_orchestrator::auth;
use video_orchestrator::http::{router, HttpState};
use video_orchestrator::live::Live;
use video_orchestrator::store::{NewTask, TaskStatus};

use test_support::process::command;
use test_support::TestEnv;

async fn serve(env: &TestEnv, stop: CancellationToken) -> std::net::SocketAddr {
    let state = HttpState {
        broker: env.broker().await,
        store: env.store.clone(),
        consumers_running: Arc::new(AtomicBool::new(true)),
        live: Live::new(env.store.clone(), &env.settings.http, stop.clone()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router(state))
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .unwrap();
    });
    addr
}

async fn insert(env: &TestEnv, request_id: &str, virtual_key_id: &str) {
    let mut uow = env.store.begin().await.unwrap();
    let task = NewTask {
        request_id: request_id.to_owned(),
        virtual_key_id: virtual_key_id.to_owned(),
        model: "sora-2".to_owned(),
        prompt: "a lighthouse".to_owned(),
        provider: "sim".to_owned(),
        ..NewTask::default()
    };
    uow.insert_task(&task, TaskStatus::Pending).await.unwrap();
    uow.commit().await.unwrap();
}

#[tokio::test]
async fn the_task_api_answers_by_key_tenant_foreign_admin_and_revoked() {
    let env = TestEnv::new().await;
    let stop = CancellationToken::new();
    let addr = serve(&env, stop.clone()).await;
    let id_a = format!("{}sec-a", env.prefix);
    insert(&env, &id_a, "vk-a").await;

    let tenant_a = auth::create_key(&env.store, "vk-a", "a", false)
        .await
        .unwrap();
    let tenant_b = auth::create_key(&env.store, "vk-b", "b", false)
        .await
        .unwrap();
    let admin = auth::create_key(&env.store, "ops", "ops", true)
        .await
        .unwrap();
    let revoked = auth::create_key(&env.store, "vk-a", "old", false)
        .await
        .unwrap();
    assert!(env.store.revoke_api_key(&revoked.record.id).await.unwrap());
    assert!(!env.store.revoke_api_key(&revoked.record.id).await.unwrap());

    let http = reqwest::Client::new();
    let get = |id: String, key: Option<String>| {
        let mut request = http.get(format!("http://{addr}/v1/tasks/{id}"));
        if let Some(key) = key {
            request = request.header("Authorization", key);
        }
        async move { request.send().await.unwrap() }
    };
    let bearer = |k: &auth::CreatedKey| Some(format!("Bearer {}", k.key.expose_secret()));
    let wrong_secret = {
        let k = tenant_a.key.expose_secret();
        let flipped = if k.ends_with('0') { '1' } else { '0' };
        Some(format!("Bearer {}{flipped}", &k[..k.len() - 1]))
    };
    let cases: Vec<(&str, Option<String>, &str, u16)> = vec![
        ("own tenant", bearer(&tenant_a), &id_a, 200),
        (
            "own tenant, scheme in lower case",
            bearer(&tenant_a).map(|h| h.replacen("Bearer", "bearer", 1)),
            &id_a,
            200,
        ),
        ("another tenant", bearer(&tenant_b), &id_a, 404),
        ("admin", bearer(&admin), &id_a, 200),
        (
            "own tenant, missing task",
            bearer(&tenant_a),
            "no-such-task",
            404,
        ),
        ("revoked", bearer(&revoked), &id_a, 401),
        ("no key", None, &id_a, 401),
        (
            "not bearer",
            Some(format!("Basic {}", tenant_a.key.expose_secret())),
            &id_a,
            401,
        ),
        (
            "malformed",
            Some("Bearer vo_nothex_zz".to_owned()),
            &id_a,
            401,
        ),
        ("right id, wrong secret", wrong_secret, &id_a, 401),
    ];
    for (what, key, id, expected) in cases {
        let response = get(id.to_owned(), key).await;
        assert_eq!(response.status().as_u16(), expected, "{what}");
        if expected == 401 {
            assert_eq!(
                response
                    .headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap()),
                Some("Bearer"),
                "{what}: 401 names the scheme"
            );
        }
        if expected == 200 {
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["virtualKeyId"], "vk-a", "{what}");
        }
    }
    let used = env
        .store
        .api_key(&tenant_a.record.id)
        .await
        .unwrap()
        .unwrap();
    assert!(used.last_used_at.is_some(), "a use is recorded");
    let unused = env
        .store
        .api_key(&tenant_b.record.id)
        .await
        .unwrap()
        .unwrap();
    assert!(unused.secret_sha256.len() == 32 && unused.revoked_at.is_none());
    let listed = env.store.list_api_keys().await.unwrap();
    for k in [&tenant_a, &tenant_b, &admin, &revoked] {
        assert!(listed.iter().any(|r| r.id == k.record.id));
        let row = serde_json::to_string(&k.record).unwrap();
        assert!(
            !row.contains(k.key.expose_secret()),
            "the secret is never in a stored row"
        );
    }
    stop.cancel();
    env.cleanup().await;
}

#[tokio::test]
async fn a_key_cannot_be_made_for_an_unusable_virtual_key() {
    let env = TestEnv::new().await;
    for bad in ["", "  ", "a\u{0}b", &"x".repeat(201)] {
        assert!(
            auth::create_key(&env.store, bad, "n", false).await.is_err(),
            "{bad:?} refused"
        );
    }
    env.cleanup().await;
}

async fn cli(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = command(args)
        .envs(env.child_vars())
        .output()
        .await
        .expect("run the binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn keys_are_created_listed_and_revoked_from_the_command_line() {
    let env = TestEnv::new().await;
    let (ok, out, err) = cli(
        &env,
        &[
            "keys",
            "create",
            "--virtual-key",
            "vk-cli",
            "--name",
            "orders",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let key = out
        .lines()
        .last()
        .expect("the key on the last line")
        .to_owned();
    assert!(key.starts_with("vo_"), "{out}");
    let caller = auth::authenticate(&env.store, Some(&format!("Bearer {key}")))
        .await
        .expect("the printed key authenticates");
    assert_eq!(caller.virtual_key_id, "vk-cli");
    assert!(!caller.admin);

    let (ok, out, err) = cli(&env, &["keys", "list", "--json"]).await;
    assert!(ok, "{err}");
    assert!(!out.contains(&key[20..]), "list never shows a secret");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["id"], caller.key_id.as_str());
    assert_eq!(listed[0]["virtualKeyId"], "vk-cli");
    assert_eq!(listed[0]["name"], "orders");
    assert!(listed[0]["revokedAt"].is_null());

    let (ok, _, err) = cli(&env, &["keys", "revoke", &caller.key_id]).await;
    assert!(ok, "{err}");
    assert!(
        auth::authenticate(&env.store, Some(&format!("Bearer {key}")))
            .await
            .is_err()
    );
    let (ok, _, err) = cli(&env, &["keys", "revoke", &caller.key_id]).await;
    assert!(
        !ok && err.contains("no key"),
        "revoking twice says so: {err}"
    );
    let (ok, _, err) = cli(&env, &["keys", "create", "--virtual-key", ""]).await;
    assert!(!ok && err.contains("virtual-key"), "{err}");

    let (ok, out, err) = cli(&env, &["keys", "webhook-secret", "--virtual-key", "vk-cli"]).await;
    assert!(ok, "{err}");
    let secret = out.lines().last().unwrap();
    assert!(secret.starts_with("whsec_"), "{out}");
    assert_eq!(
        env.store.live_webhook_secrets("vk-cli").await.unwrap(),
        vec![secret.to_owned()]
    );
    env.cleanup().await;
}

async fn rabbitmqctl(args: &[&str]) {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broker user of its own for the test, with every permission on `/`.
struct BrokerUser {
    name: String,
    url: String,
}

impl BrokerUser {
    async fn create(env: &TestEnv, role: &str) -> Self {
        let name = format!(
            "vo-{role}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", &name, &password]).await;
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]).await;
        let mut url = url::Url::parse(env.rabbitmq_url()).unwrap();
        url.set_username(&name).unwrap();
        url.set_password(Some(&password)).unwrap();
        Self {
            name,
            url: url.to_string(),
        }
    }

    /// Publishes `request` with `user_id` (or none); the broker's answer.
    async fn publish(
        &self,
        env: &TestEnv,
        request: &video_orchestrator::messages::VideoGenerationRequested,
        user_id: Option<&str>,
    ) -> Result<(), lapin::Error> {
        use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
        use lapin::types::{AMQPValue, FieldTable};
        let conn =
            lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let e = env.topology().event(request);
        let mut headers = FieldTable::default();
        headers.insert(
            "x-virtual-key".into(),
            AMQPValue::LongString(e.virtual_key.as_str().into()),
        );
        let mut properties = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(e.message_id.as_str().into())
            .with_type(e.message_type.as_str().into())
            .with_headers(headers);
        if let Some(user) = user_id {
            properties = properties.with_user_id(user.into());
        }
        let confirm = channel
            .basic_publish(
                e.exchange.as_str().into(),
                e.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &e.body,
                properties,
            )
            .await?
            .await;
        let _ = conn.close(200, "done".into()).await;
        confirm.map(|_| ())
    }

    async fn delete(self) {
        rabbitmqctl(&["delete_user", &self.name]).await;
    }
}

#[tokio::test]
async fn a_broker_user_publishes_only_for_the_virtual_keys_security_allows() {
    let sim = test_support::app::start_sim(300).await;
    let mut env = test_support::app::env_with(&sim, &[]).await;
    let alice = BrokerUser::create(&env, "alice").await;
    let bob = BrokerUser::create(&env, "bob").await;
    env.settings.security.publishers = [
        (alice.name.clone(), vec!["vk-alice".to_owned()]),
        (bob.name.clone(), vec!["vk-bob".to_owned()]),
    ]
    .into_iter()
    .collect();
    let events = env.events().await;
    let service = test_support::Instance::start_all(&env.settings).await;
    let done = std::time::Duration::from_secs(30);

    let own = video_orchestrator::client::new_request("vk-alice", "sora-2", "alice's own");
    alice
        .publish(&env, &own, Some(&alice.name))
        .await
        .expect("alice publishes as herself");
    events
        .wait_for(
            |e| e.is("video.generation.completed", &own.request_id),
            done,
        )
        .await
        .expect("an allowed publisher's request completes");

    let forged =
        video_orchestrator::client::new_request("vk-alice", "sora-2", "bob as alice's tenant");
    bob.publish(&env, &forged, Some(&bob.name))
        .await
        .expect("the broker takes bob's own user_id");
    let rejected = events
        .wait_for(
            |e| e.is("video.generation.command_rejected", &forged.request_id),
            done,
        )
        .await
        .expect("a publisher acting for another tenant is refused visibly");
    assert_eq!(rejected.body["reason"], "publisher_not_allowed");
    let unproven = video_orchestrator::client::new_request("vk-bob", "sora-2", "no user_id");
    bob.publish(&env, &unproven, None).await.unwrap();
    let rejected = events
        .wait_for(
            |e| e.is("video.generation.command_rejected", &unproven.request_id),
            done,
        )
        .await
        .expect("a command without user_id is refused");
    assert_eq!(rejected.body["reason"], "publisher_not_allowed");

    let impersonation =
        video_orchestrator::client::new_request("vk-alice", "sora-2", "bob claims alice");
    assert!(
        bob.publish(&env, &impersonation, Some(&alice.name))
            .await
            .is_err(),
        "RabbitMQ refuses a user_id that is not the connection's user"
    );

    let parked = test_support::eventually(done, || async {
        let parked = env.store.list_parked(10).await.unwrap();
        (parked.len() >= 2).then_some(parked)
    })
    .await
    .expect("both refused commands are parked");
    assert!(
        parked
            .iter()
            .all(|p| p.reason.starts_with("publisher_not_allowed")),
        "{parked:?}"
    );
    for id in [
        &forged.request_id,
        &unproven.request_id,
        &impersonation.request_id,
    ] {
        assert!(
            env.store.get(id).await.unwrap().is_none(),
            "no task for {id}"
        );
    }
    assert_eq!(
        sim.stats().submits,
        1,
        "only alice's request reached the provider"
    );

    service.stop().await;
    events.close().await;
    alice.delete().await;
    bob.delete().await;
    sim.shutdown().await;
    env.cleanup().await;
}

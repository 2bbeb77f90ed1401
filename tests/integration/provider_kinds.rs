//! Every provider kind end to end: one instance configured with a provider of each kind, all
//! speaking to the simulator. A task of each completes through its protocol; a submit whose
//! answer is lost (the simulator created the job, then hung) follows the protocol's way out:
//! found again by the provider where it has a client-set id (Kling), otherwise
//! `generation.ambiguous_submit` (default `fail`). Either way exactly one job per task.

use std::time::Duration;

use test_support::app::spawn_app_with_providers;
use video_orchestrator::client::new_request;
use video_orchestrator::providers::sim::model_for;
use video_orchestrator::providers::ProviderKind;
use video_orchestrator::store::TaskStatus;

const DONE: Duration = Duration::from_secs(60);

/// Whether a lost submit of this kind can be found at the provider again.
fn resolvable(kind: ProviderKind) -> bool {
    kind == ProviderKind::Kling
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_completes_a_task_and_a_lost_submit_leaves_exactly_one_job() {
    let app = spawn_app_with_providers(400, |sim| {
        ProviderKind::ALL
            .into_iter()
            .map(|kind| {
                let mut provider = sim.provider_settings(kind);
                // A lost answer is noticed after this long (the simulator hangs 60 s).
                provider.timeout_ms = 1_500;
                (kind.as_str().to_owned(), provider)
            })
            .collect()
    })
    .await;
    let (client, events, env, sim) = (&app.client, &app.events, &app.env, &app.sim);

    let mut plain = Vec::new();
    let mut lost = Vec::new();
    for kind in ProviderKind::ALL {
        let vk = format!("vk-kinds-{kind}");
        let mut request = new_request(&vk, model_for(kind), &format!("{kind}: a quiet lake"));
        request.provider = Some(kind.as_str().to_owned());
        plain.push((kind, client.submit(&request).await.expect("published")));
        let mut request = new_request(&vk, model_for(kind), &format!("{kind}: [lost] a storm"));
        request.provider = Some(kind.as_str().to_owned());
        lost.push((kind, client.submit(&request).await.expect("published")));
    }

    for (kind, id) in &plain {
        let done = events
            .wait_for(|e| e.is("video.generation.completed", id), DONE)
            .await
            .unwrap_or_else(|| panic!("{kind}: the task completes"));
        assert!(
            done.body["videoUrl"]
                .as_str()
                .is_some_and(|u| !u.is_empty()),
            "{kind}: a video URL: {}",
            done.body
        );
    }
    for (kind, id) in &lost {
        if resolvable(*kind) {
            events
                .wait_for(|e| e.is("video.generation.completed", id), DONE)
                .await
                .unwrap_or_else(|| panic!("{kind}: the lost submit is found again and completes"));
        } else {
            let failed = events
                .wait_for(|e| e.is("video.generation.failed", id), DONE)
                .await
                .unwrap_or_else(|| panic!("{kind}: the lost submit fails the task"));
            assert_eq!(failed.body["error"], "submission outcome unknown", "{kind}");
            assert_eq!(failed.body["retryable"], true, "{kind}");
        }
        let task = env.store.get(id).await.expect("read").expect("row");
        assert!(task.status.is_terminal(), "{kind}: {:?}", task.status);
        if resolvable(*kind) {
            assert_eq!(task.status, TaskStatus::Completed, "{kind}");
        }
    }
    let stats = sim.stats();
    let tasks = (plain.len() + lost.len()) as u64;
    assert_eq!(
        stats.submits, tasks,
        "one POST per task: a lost answer is never sent again"
    );
    assert_eq!(
        stats.jobs, tasks,
        "exactly one job per task at the simulator"
    );

    app.stop().await;
}

/// `max_status_rps` caps one provider's status calls on this instance; checks over the cap are
/// rescheduled, never waited for, so another provider's tasks go on at their own pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_provider_is_throttled_without_holding_up_another() {
    let app = spawn_app_with_providers(300, |sim| {
        let mut capped = sim.provider_settings(ProviderKind::Replicate);
        capped.max_status_rps = Some(1.0);
        vec![
            ("capped".to_owned(), capped),
            (
                "free".to_owned(),
                sim.provider_settings(ProviderKind::OpenaiVideos),
            ),
        ]
    })
    .await;
    let (client, events) = (&app.client, &app.events);

    let mut ids = Vec::new();
    for (provider, n) in [("capped", 6), ("free", 6)] {
        for i in 0..n {
            let mut request = new_request(
                &format!("vk-cap-{i}"),
                "sim-video-1",
                &format!("{provider} {i}"),
            );
            request.provider = Some(provider.to_owned());
            ids.push((provider, client.submit(&request).await.expect("published")));
        }
    }
    for (provider, id) in &ids {
        events
            .wait_for(|e| e.is("video.generation.completed", id), DONE)
            .await
            .unwrap_or_else(|| panic!("{provider}: {id} completes"));
    }
    let page = reqwest::get(format!("http://{}/metrics", app.service.http))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    let mut counters = test_support::prometheus::Counters::default();
    counters.add_page(&page);
    assert!(
        counters.sum("video_provider_throttled_total", "provider=\"capped\"") > 0,
        "six tasks at one status call per second were throttled at least once"
    );
    assert_eq!(
        counters.sum("video_provider_throttled_total", "provider=\"free\""),
        0,
        "the uncapped provider is never throttled"
    );
    assert!(counters.sum("video_progress_checks_total", "outcome=\"throttled\"") > 0);

    app.stop().await;
}

/// `imageUrl` reaches the kinds that take an input image (and is kept on the row, for a
/// re-drive); for any other kind the request is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_image_goes_to_the_kinds_that_take_one_and_is_refused_elsewhere() {
    let app = spawn_app_with_providers(400, |sim| {
        [ProviderKind::Runway, ProviderKind::Kling, ProviderKind::Fal]
            .into_iter()
            .map(|kind| {
                let mut provider = sim.provider_settings(kind);
                // Runway's 5 s floor would only slow the test down.
                provider.min_status_interval_ms = Some(0);
                (kind.as_str().to_owned(), provider)
            })
            .collect()
    })
    .await;
    let (client, events, env, sim) = (&app.client, &app.events, &app.env, &app.sim);
    let image = "data:image/png;base64,iVBORw0KGgo=";

    let mut taken = Vec::new();
    for kind in [ProviderKind::Runway, ProviderKind::Kling, ProviderKind::Fal] {
        let mut request = new_request("vk-image", model_for(kind), "the frame comes alive");
        request.provider = Some(kind.as_str().to_owned());
        request.image_url = Some(image.to_owned());
        taken.push((kind, client.submit(&request).await.expect("published")));
    }
    // The default provider (`sim`, openai_videos) takes no image.
    let mut refused = new_request("vk-image", "sora-2", "a frame for nobody");
    refused.image_url = Some(image.to_owned());
    let refused = client.submit(&refused).await.expect("published");
    let mut malformed = new_request("vk-image", "sora-2", "not an image");
    malformed.provider = Some("runway".to_owned());
    malformed.image_url = Some("ftp://example.com/frame.png".to_owned());
    let malformed = client.submit(&malformed).await.expect("published");

    for (kind, id) in &taken {
        events
            .wait_for(|e| e.is("video.generation.completed", id), DONE)
            .await
            .unwrap_or_else(|| panic!("{kind}: the image task completes"));
        let task = env.store.get(id).await.expect("read").expect("row");
        assert_eq!(
            task.image_url.as_deref(),
            Some(image),
            "{kind}: kept on the row"
        );
    }
    for (id, reason) in [
        (&refused, "imageUrl: provider `sim` takes no input image"),
        (&malformed, "imageUrl: must be an https:// URL"),
    ] {
        let failed = events
            .wait_for(|e| e.is("video.generation.failed", id), DONE)
            .await
            .unwrap_or_else(|| panic!("{reason}: the request is refused"));
        let error = failed.body["error"].as_str().unwrap_or_default();
        assert!(error.starts_with(reason), "{error}");
        assert_eq!(failed.body["retryable"], false);
    }
    let stats = sim.stats();
    assert_eq!(
        (stats.submits, stats.jobs, stats.image_jobs),
        (3, 3, 3),
        "one job per accepted task, each with its image; nothing sent for the refused ones"
    );

    app.stop().await;
}

//! The orchestrator on its own: warm pool, claims, deadlines, restarts,
//! hydration and the blob cache, with envd processes as machines (see
//! `support::ProcessRuntime`), SQLite and a local blob directory.

mod support;

use sandbox_orchestrator::{HydrateOutcome, OrchestratorError};
use sandbox_runtime::Runtime;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::{eventually, Harness, Options};

fn attachments(sandbox: &sandbox_store::Sandbox) -> Vec<serde_json::Value> {
    sandbox.volumes.as_array().unwrap().clone()
}

#[tokio::test]
async fn the_pool_fills_and_refills_after_a_claim() {
    let h = Harness::start(Options {
        pool_size: 2,
        ..Default::default()
    })
    .await;
    h.wait_for_machines(2).await;
    let pooled: HashSet<String> = h.runtime.machines().into_iter().collect();
    let sandbox = h.create(h.request(&[])).await.unwrap();
    assert!(
        pooled.contains(&sandbox.id),
        "the create took a pooled machine"
    );
    assert!(
        eventually(Duration::from_secs(20), async || h
            .runtime
            .boots
            .load(Ordering::SeqCst)
            == 3)
        .await,
        "the pool was not refilled: {:?}",
        h.runtime.machines()
    );
    // Refilled to its size, no further.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.runtime.machines().len(), 3, "{:?}", h.runtime.machines());
}

#[tokio::test]
async fn concurrent_creates_never_share_a_machine() {
    let h = Harness::start(Options {
        pool_size: 2,
        max_cold_boots: 1,
        ..Default::default()
    })
    .await;
    h.wait_for_machines(2).await;
    let creates = (0..6).map(|_| h.create(h.request(&[])));
    let sandboxes: Vec<_> = futures::future::join_all(creates)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    let ids: HashSet<&str> = sandboxes.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids.len(), 6, "each create got its own machine");
    for sandbox in &sandboxes {
        assert!(
            h.runtime.is_running(&sandbox.id),
            "{} is not running",
            sandbox.id
        );
        let agent = h
            .orchestrator
            .agent(&h.owner.id, &sandbox.id)
            .await
            .unwrap();
        agent.health().await.unwrap();
    }
}

#[tokio::test]
async fn a_failing_boot_is_an_error_and_leaves_no_machine() {
    let h = Harness::start(Options::default()).await;
    h.runtime.failing_boots.store(1, Ordering::SeqCst);
    let error = h.create(h.request(&[])).await.unwrap_err();
    assert!(
        matches!(error, OrchestratorError::NoCapacity(_)),
        "{error:?}"
    );
    assert!(
        h.runtime.machines().is_empty(),
        "{:?}",
        h.runtime.machines()
    );
    // The next one works.
    h.create(h.request(&[])).await.unwrap();
}

#[tokio::test]
async fn a_deadline_kills_and_patch_moves_it() {
    let h = Harness::start(Options::default()).await;
    let mut short = h.request(&[]);
    short.timeout_secs = 1;
    let doomed = h.create(short.clone()).await.unwrap();
    let extended = h.create(short).await.unwrap();
    h.orchestrator
        .set_timeout(&h.owner.id, &extended.id, 60)
        .await
        .unwrap();
    h.wait_until_killed(&doomed.id, "the deadline did not kill it")
        .await;
    assert!(
        eventually(Duration::from_secs(5), async || !h
            .runtime
            .is_running(&doomed.id))
        .await,
        "its machine outlived it"
    );
    assert!(matches!(
        h.orchestrator.agent(&h.owner.id, &doomed.id).await,
        Err(OrchestratorError::SandboxKilled(_))
    ));
    assert!(
        h.is_recorded_running(&extended.id).await,
        "PATCH did not move the deadline"
    );
    let row = h.orchestrator.get(&h.owner.id, &extended.id).await.unwrap();
    let left = row.end_at.unwrap() - chrono::Utc::now();
    assert!(left > chrono::Duration::seconds(50), "{left}");
}

#[tokio::test]
async fn another_owner_sees_nothing() {
    let h = Harness::start(Options::default()).await;
    let sandbox = h.create(h.request(&[])).await.unwrap();
    let mallory = h.store.ensure_owner("mallory").await.unwrap();
    assert!(matches!(
        h.orchestrator.agent(&mallory.id, &sandbox.id).await,
        Err(OrchestratorError::SandboxNotFound(_))
    ));
    assert!(matches!(
        h.orchestrator.kill(&mallory.id, &sandbox.id).await,
        Err(OrchestratorError::SandboxNotFound(_))
    ));
    assert!(h.runtime.is_running(&sandbox.id));
    let volume = h.volume(&[("a.txt", b"a")]).await;
    let error = h
        .orchestrator
        .create(&mallory.id, h.request(&[(&volume, "/data")]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, OrchestratorError::Forbidden(_)),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_restart_re_adopts_the_living_and_buries_the_rest() {
    let mut h = Harness::start(Options {
        pool_size: 1,
        ..Default::default()
    })
    .await;
    h.wait_for_machines(1).await;
    let survivor = h.create(h.request(&[])).await.unwrap();
    let crashed = h.create(h.request(&[])).await.unwrap();
    let mut short = h.request(&[]);
    short.timeout_secs = 2;
    let expiring = h.create(short).await.unwrap();

    // The process dies without a word; meanwhile one machine crashes.
    h.orchestrator.shutdown().await;
    h.runtime.crash(&crashed.id);
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.restart().await;

    assert!(h.is_recorded_running(&survivor.id).await);
    assert!(h.runtime.is_running(&survivor.id));
    let agent = h
        .orchestrator
        .agent(&h.owner.id, &survivor.id)
        .await
        .unwrap();
    agent.health().await.unwrap();
    assert!(
        !h.is_recorded_running(&crashed.id).await,
        "a dead machine is not re-adopted"
    );
    // The re-armed deadline still fires.
    h.wait_until_killed(
        &expiring.id,
        "the deadline was not re-armed after the restart",
    )
    .await;
    // Only the survivor and the new pool member remain.
    assert!(
        eventually(Duration::from_secs(20), async || {
            let machines = h.runtime.machines();
            machines.len() == 2 && machines.contains(&survivor.id)
        })
        .await,
        "{:?}",
        h.runtime.machines()
    );
}

#[tokio::test]
async fn a_machine_that_dies_is_marked_killed() {
    let h = Harness::start(Options::default()).await;
    let sandbox = h.create(h.request(&[])).await.unwrap();
    h.runtime.crash(&sandbox.id);
    h.wait_until_killed(&sandbox.id, "the liveness watch missed a dead machine")
        .await;
}

#[tokio::test]
async fn a_machine_without_a_row_is_destroyed() {
    let h = Harness::start(Options::default()).await;
    let stray = h
        .runtime
        .boot(sandbox_runtime::BootSpec {
            id: "sbx-stray".into(),
            rootfs: h.template_rootfs(),
            token: "t".into(),
            hostname: "stray".into(),
            limits: sandbox_runtime::TemplateDef::parse("x", "suite = \"s\"\nmirror = \"m\"\n")
                .unwrap()
                .limits(),
        })
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || !h
            .runtime
            .machines()
            .contains(&stray.id))
        .await,
        "the orphan sweep left {}",
        stray.id
    );
}

#[tokio::test]
async fn volumes_hydrate_before_the_create_returns() {
    let h = Harness::start(Options::default()).await;
    let volume = h
        .volume(&[("rows.csv", b"1,a\n2,b\n"), ("deep/er/x.txt", b"x")])
        .await;
    let sandbox = h.create(h.request(&[(&volume, "/data")])).await.unwrap();
    let status = &attachments(&sandbox)[0];
    assert_eq!(status["status"], "ready", "{status}");
    assert_eq!(status["files"], 2, "{status}");
    assert_eq!(
        std::fs::read(h.runtime.host_path(&sandbox.id, "/data/rows.csv")).unwrap(),
        b"1,a\n2,b\n"
    );
    assert_eq!(
        std::fs::read(h.runtime.host_path(&sandbox.id, "/data/deep/er/x.txt")).unwrap(),
        b"x"
    );
}

#[tokio::test]
async fn a_failed_hydrate_is_reported_or_in_strict_mode_refused() {
    let h = Harness::start(Options::default()).await;
    let corrupt = h.volume_from_bytes(b"this is not gzip".to_vec()).await;
    let sandbox = h.create(h.request(&[(&corrupt, "/data")])).await.unwrap();
    let status = &attachments(&sandbox)[0];
    assert_eq!(status["status"], "failed", "{status}");
    assert!(
        status["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    assert!(h.runtime.is_running(&sandbox.id), "the sandbox runs anyway");

    let mut strict = h.request(&[(&corrupt, "/data")]);
    strict.strict_hydrate = Some(true);
    let before = h.runtime.machines().len();
    let error = h.create(strict).await.unwrap_err();
    assert!(
        matches!(&error, OrchestratorError::HydrateFailed { volume_id, .. } if *volume_id == corrupt.id),
        "{error:?}"
    );
    assert_eq!(
        h.runtime.machines().len(),
        before,
        "the strict failure released its machine"
    );
}

#[tokio::test]
async fn object_storage_down_fails_the_attachment_not_the_service() {
    let h = Harness::start(Options::default()).await;
    let volume = h.volume(&[("a.txt", b"a")]).await;
    h.blobs.down.store(true, Ordering::SeqCst);
    let sandbox = h.create(h.request(&[(&volume, "/data")])).await.unwrap();
    let status = &attachments(&sandbox)[0];
    assert_eq!(status["status"], "failed", "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("down"),
        "{status}"
    );
    // Back up: the next create hydrates (the failure was not cached).
    h.blobs.down.store(false, Ordering::SeqCst);
    let sandbox = h.create(h.request(&[(&volume, "/data")])).await.unwrap();
    assert_eq!(attachments(&sandbox)[0]["status"], "ready");
}

#[tokio::test]
async fn concurrent_hydrates_of_one_volume_read_object_storage_once() {
    let h = Harness::start(Options::default()).await;
    let payload = vec![7u8; 2 << 20];
    let volume = h.volume(&[("blob.bin", &payload)]).await;
    let creates = (0..6).map(|_| h.create(h.request(&[(&volume, "/data")])));
    for sandbox in futures::future::join_all(creates).await {
        let sandbox = sandbox.unwrap();
        assert_eq!(attachments(&sandbox)[0]["status"], "ready");
        let copy = std::fs::read(h.runtime.host_path(&sandbox.id, "/data/blob.bin")).unwrap();
        assert!(copy == payload, "{} got a different copy", sandbox.id);
    }
    assert_eq!(
        h.blobs.gets.load(Ordering::SeqCst),
        1,
        "one GET for six hydrates"
    );
}

#[tokio::test]
async fn the_blob_cache_evicts_the_least_recently_used_beyond_its_budget() {
    // Three ~1 MiB blobs (incompressible) with room for two.
    let h = Harness::start(Options {
        cache_max_bytes: 2_500_000,
        ..Default::default()
    })
    .await;
    let noise = |seed: u8| -> Vec<u8> {
        let mut state = seed as u32 | 1;
        (0..1_000_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    };
    let (a, b, c) = (noise(1), noise(2), noise(3));
    let volumes = [
        h.volume(&[("a", &a)]).await,
        h.volume(&[("b", &b)]).await,
        h.volume(&[("c", &c)]).await,
    ];
    let gets = || h.blobs.gets.load(Ordering::SeqCst);
    let attach = async |volume: &sandbox_store::Volume| {
        let sandbox = h.create(h.request(&[(volume, "/data")])).await.unwrap();
        assert_eq!(attachments(&sandbox)[0]["status"], "ready");
    };
    attach(&volumes[0]).await;
    attach(&volumes[1]).await;
    assert_eq!(gets(), 2);
    attach(&volumes[0]).await; // a is now the most recently used
    assert_eq!(gets(), 2, "a cached blob is not fetched again");
    attach(&volumes[2]).await; // evicts b, the least recently used
    assert_eq!(gets(), 3);
    attach(&volumes[0]).await;
    assert_eq!(gets(), 3, "a survived the eviction");
    attach(&volumes[1]).await;
    assert_eq!(gets(), 4, "b was evicted");
}

#[test]
fn hydrate_outcomes_serialize_as_the_words_the_sdks_read() {
    assert_eq!(
        serde_json::to_value(HydrateOutcome::Ready).unwrap(),
        serde_json::json!("ready")
    );
    assert_eq!(
        serde_json::to_value(HydrateOutcome::Failed).unwrap(),
        serde_json::json!(HydrateOutcome::Failed.as_str())
    );
}

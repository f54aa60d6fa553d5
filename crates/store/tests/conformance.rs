//! One suite, two backends: every behaviour the server relies on is checked
//! against SQLite and against a fresh Postgres database.

use chrono::Utc;
use rand::Rng;
use sandbox_store::{
    BuildStatus, CustomTemplate, Json, ListedState, NewVolume, QuotaOverride, Sandbox, SandboxPage,
    SandboxState, Store, SweepCounts, TemplateBuild, Volume, VolumeState,
};
use sqlx::Connection;
use std::collections::BTreeMap;
use std::sync::Arc;

fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Creates an empty database for this run and returns its URL.
async fn fresh_postgres_database() -> String {
    let admin = postgres_admin_url();
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!("Postgres is required at {admin} (start it with scripts/postgres.sh): {e}")
        });
    let name = format!("store_test_{:08x}", rand::rng().random::<u32>());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').expect("url has a database").0;
    format!("{base}/{name}")
}

fn sample_volume(id: &str, owner_id: &str, name: &str) -> NewVolume {
    NewVolume {
        id: id.into(),
        owner_id: owner_id.into(),
        name: name.into(),
        blob_key: format!("owners/{owner_id}/volumes/{id}.tar.gz"),
        size_bytes: 1234,
        sha256: "ab".repeat(32),
        content_type: "application/gzip".into(),
        uncompressed_bytes: 10_240,
        entry_count: 3,
        metadata: BTreeMap::from([("team".to_string(), "ml".to_string())]),
    }
}

/// A volume made the way the server makes one: a pending row, then ready.
async fn insert_ready(store: &dyn Store, volume: &NewVolume) -> sandbox_store::StoreResult<Volume> {
    store.insert_pending_volume(volume).await?;
    Ok(store
        .finish_pending_volume(volume)
        .await?
        .expect("a pending row turns ready"))
}

async fn conformance(store: Arc<dyn Store>) {
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("migrate is idempotent");
    store.ping().await.unwrap();

    // Owners and keys.
    let alice = store.ensure_owner("alice").await.unwrap();
    assert_eq!(store.ensure_owner("alice").await.unwrap(), alice);
    let bob = store.ensure_owner("bob").await.unwrap();
    assert_ne!(alice.id, bob.id);
    assert_eq!(store.count_api_keys().await.unwrap(), 0);
    store
        .insert_api_key(&alice.id, "hash-a", "sm_a")
        .await
        .unwrap();
    store
        .insert_api_key(&bob.id, "hash-b", "sm_b")
        .await
        .unwrap();
    assert_eq!(store.count_api_keys().await.unwrap(), 2);
    assert_eq!(
        store.owner_by_key_hash("hash-a").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(store.owner_by_key_hash("nope").await.unwrap(), None);

    // Volumes are owner scoped and listed newest first.
    let first = insert_ready(&*store, &sample_volume("vol-00000001", &alice.id, "one"))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let second = insert_ready(&*store, &sample_volume("vol-00000002", &alice.id, "two"))
        .await
        .unwrap();
    insert_ready(&*store, &sample_volume("vol-00000003", &bob.id, "bobs"))
        .await
        .unwrap();
    assert!(
        insert_ready(&*store, &sample_volume("vol-00000001", &bob.id, "dup"))
            .await
            .is_err()
    );

    let fetched = store
        .get_volume(&alice.id, "vol-00000001")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fetched.metadata.get("team").map(String::as_str), Some("ml"));
    assert_eq!(fetched.size_bytes, 1234);
    assert_eq!(fetched.state, VolumeState::Ready);
    assert_eq!(
        fetched.created_at.timestamp_micros(),
        first.created_at.timestamp_micros()
    );
    assert_eq!(
        store.get_volume(&bob.id, "vol-00000001").await.unwrap(),
        None
    );

    let listed: Vec<String> = store
        .list_volumes(&alice.id)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(listed, vec![second.id.clone(), first.id.clone()]);
    assert!(store.volume_id_exists("vol-00000003").await.unwrap());
    assert!(!store.volume_id_exists("vol-ffffffff").await.unwrap());

    // Deletion leaves a tombstone only its owner can see.
    assert!(!store
        .mark_volume_deleted(&bob.id, "vol-00000001")
        .await
        .unwrap());
    assert!(store
        .mark_volume_deleted(&alice.id, "vol-00000001")
        .await
        .unwrap());
    assert!(!store
        .mark_volume_deleted(&alice.id, "vol-00000001")
        .await
        .unwrap());
    assert_eq!(
        store.get_volume(&alice.id, "vol-00000001").await.unwrap(),
        None
    );
    let tomb = store
        .get_volume_any_state(&alice.id, "vol-00000001")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tomb.state, VolumeState::Deleted);
    assert_eq!(store.list_volumes(&alice.id).await.unwrap().len(), 1);

    crash_safe_volumes(&*store, &alice.id).await;
    quotas_and_sweeps(&*store, &alice.id, &bob.id).await;
    pause_and_resume(&*store, &alice.id, &bob.id).await;
    custom_templates(&*store, &alice.id, &bob.id).await;
}

/// Upsert by alias keeps the id; builds finish once; a completed build
/// becomes the template's ready build; a restart fails what was running.
async fn custom_templates(store: &dyn Store, alice: &str, bob: &str) {
    let now = Utc::now();
    let template = |id: &str, spec: serde_json::Value| CustomTemplate {
        id: id.into(),
        owner_id: alice.into(),
        alias: "data".into(),
        spec: Json(spec),
        vcpus: 1,
        memory_mb: 512,
        disk_mb: 2048,
        ready_build: None,
        created_at: now,
        updated_at: now,
    };
    let first = store
        .upsert_template(&template("tpl-1", serde_json::json!({"v": 1})))
        .await
        .unwrap();
    let again = store
        .upsert_template(&template("tpl-2", serde_json::json!({"v": 2})))
        .await
        .unwrap();
    assert_eq!(again.id, "tpl-1", "the alias keeps its template");
    assert_eq!(again.spec.0["v"], 2);
    for name in ["data", "tpl-1"] {
        assert!(store.get_template(alice, name).await.unwrap().is_some());
        assert!(store.get_template(bob, name).await.unwrap().is_none());
    }
    let build = |id: &str| TemplateBuild {
        id: id.into(),
        template_id: first.id.clone(),
        owner_id: alice.into(),
        status: BuildStatus::Building.as_str().into(),
        logs: Json(Vec::new()),
        node_id: "node".into(),
        created_at: now,
        finished_at: None,
    };
    store.insert_template_build(&build("bld-1")).await.unwrap();
    store.insert_template_build(&build("bld-2")).await.unwrap();
    assert!(store
        .get_template_build(bob, "bld-1")
        .await
        .unwrap()
        .is_none());
    let lines = vec!["ok".to_string()];
    store
        .finish_template_build("bld-1", BuildStatus::Completed, &lines)
        .await
        .unwrap();
    let done = store
        .get_template_build(alice, "bld-1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (done.status.as_str(), done.logs.0.clone()),
        ("completed", lines)
    );
    let ready = store.get_template(alice, "data").await.unwrap().unwrap();
    assert_eq!(ready.ready_build.as_deref(), Some("bld-1"));
    assert_eq!(
        store
            .fail_unfinished_builds("node", "restarted")
            .await
            .unwrap(),
        ["bld-2"]
    );
    let failed = store
        .get_template_build(alice, "bld-2")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.status, "failed");
    assert_eq!(failed.logs.0, ["restarted"]);
    let ready = store.get_template(alice, "data").await.unwrap().unwrap();
    assert_eq!(
        ready.ready_build.as_deref(),
        Some("bld-1"),
        "a failure moves nothing"
    );
}

/// Pause and resume flip `paused_at` (and set the deadline) once each way,
/// for the owner only; listings tell running from paused.
async fn pause_and_resume(store: &dyn Store, alice: &str, bob: &str) {
    let started_at = Utc::now();
    let end_at = started_at + chrono::Duration::seconds(300);
    let sandbox = Sandbox {
        id: "sbx-paused".into(),
        owner_id: alice.into(),
        template: "base".into(),
        state: SandboxState::Running,
        node_id: "node".into(),
        envd_token: "t".into(),
        timeout_secs: 300,
        metadata: BTreeMap::new(),
        envs: BTreeMap::new(),
        extra: Default::default(),
        volumes: serde_json::json!([]),
        started_at,
        end_at: Some(end_at),
        killed_at: None,
        paused_at: None,
    };
    store.insert_sandbox(&sandbox).await.unwrap();
    let listed = |state: ListedState| async move {
        let page = SandboxPage {
            states: vec![state],
            limit: 10,
            before: None,
        };
        let rows = store.list_sandboxes(alice, &page).await.unwrap();
        rows.into_iter().map(|s| s.id).collect::<Vec<_>>()
    };
    assert_eq!(listed(ListedState::Running).await, ["sbx-paused"]);
    let now = Some(Utc::now());
    assert!(!store
        .set_sandbox_paused(bob, "sbx-paused", now, Some(end_at))
        .await
        .unwrap());
    assert!(store
        .set_sandbox_paused(alice, "sbx-paused", now, Some(end_at))
        .await
        .unwrap());
    assert!(!store
        .set_sandbox_paused(alice, "sbx-paused", now, Some(end_at))
        .await
        .unwrap());
    let paused = store
        .get_sandbox(alice, "sbx-paused")
        .await
        .unwrap()
        .unwrap();
    assert!(paused.is_paused());
    assert_eq!(paused.shown_state(), "paused");
    assert_eq!(listed(ListedState::Paused).await, ["sbx-paused"]);
    assert!(listed(ListedState::Running).await.is_empty());

    let later = end_at + chrono::Duration::seconds(5);
    assert!(store
        .set_sandbox_paused(alice, "sbx-paused", None, Some(later))
        .await
        .unwrap());
    assert!(!store
        .set_sandbox_paused(alice, "sbx-paused", None, Some(later))
        .await
        .unwrap());
    let resumed = store
        .get_sandbox(alice, "sbx-paused")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resumed.shown_state(), "running");
    assert_eq!(
        resumed.end_at.map(|t| t.timestamp()),
        Some(later.timestamp())
    );

    assert!(store.mark_sandbox_killed("sbx-paused").await.unwrap());
    assert!(!store
        .set_sandbox_paused(alice, "sbx-paused", now, None)
        .await
        .unwrap());
    assert_eq!(listed(ListedState::Killed).await, ["sbx-paused"]);
}

/// A pending row is invisible until finished; the reconciler can find and
/// remove it; live keys cover ready and pending rows only.
async fn crash_safe_volumes(store: &dyn Store, owner: &str) {
    let mut upload = sample_volume("vol-0000000a", owner, "pending");
    store.insert_pending_volume(&upload).await.unwrap();
    assert_eq!(store.get_volume(owner, "vol-0000000a").await.unwrap(), None);
    assert!(!store
        .list_volumes(owner)
        .await
        .unwrap()
        .iter()
        .any(|v| v.id == "vol-0000000a"));
    let later = Utc::now() + chrono::Duration::seconds(1);
    let pending = store
        .volumes_in_state(VolumeState::Pending, later)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert!(store
        .volumes_in_state(
            VolumeState::Pending,
            Utc::now() - chrono::Duration::hours(1)
        )
        .await
        .unwrap()
        .is_empty());
    let keys = store.live_volume_keys().await.unwrap();
    assert!(keys.contains(&upload.blob_key));
    assert!(!keys.contains(&format!("owners/{owner}/volumes/vol-00000001.tar.gz")));

    upload.size_bytes = 99;
    upload.sha256 = "cd".repeat(32);
    let ready = store.finish_pending_volume(&upload).await.unwrap().unwrap();
    assert_eq!((ready.state, ready.size_bytes), (VolumeState::Ready, 99));
    assert_eq!(store.finish_pending_volume(&upload).await.unwrap(), None);
    assert!(!store
        .delete_volume_row("vol-0000000a", VolumeState::Pending)
        .await
        .unwrap());

    let crashed = sample_volume("vol-0000000b", owner, "crashed");
    store.insert_pending_volume(&crashed).await.unwrap();
    assert!(store
        .delete_volume_row("vol-0000000b", VolumeState::Pending)
        .await
        .unwrap());
    assert!(!store.volume_id_exists("vol-0000000b").await.unwrap());
}

async fn quotas_and_sweeps(store: &dyn Store, alice: &str, bob: &str) {
    let usage = store.usage(alice).await.unwrap();
    // vol-00000002 (1234 bytes) and vol-0000000a (99) are ready.
    assert_eq!((usage.volumes, usage.volume_bytes), (2, 1234 + 99));
    assert_eq!(usage.running_sandboxes, 0);
    assert_eq!(store.usage(bob).await.unwrap().volumes, 1);

    assert_eq!(
        store.quota_override(alice).await.unwrap(),
        QuotaOverride::default()
    );
    let quota = QuotaOverride {
        max_running_sandboxes: Some(3),
        max_volumes: None,
        max_volume_bytes: Some(1 << 40),
    };
    store.set_quota_override(alice, &quota).await.unwrap();
    assert_eq!(store.quota_override(alice).await.unwrap(), quota);
    store
        .set_quota_override(alice, &QuotaOverride::default())
        .await
        .unwrap();
    assert_eq!(
        store.quota_override(alice).await.unwrap(),
        QuotaOverride::default()
    );
    assert_eq!(
        store.owner_by_name("alice").await.unwrap().map(|o| o.id),
        Some(alice.to_string())
    );
    assert_eq!(store.owner_by_name("nobody").await.unwrap(), None);
    let mut ids = store.owner_ids().await.unwrap();
    ids.sort();
    let mut expected = vec![alice.to_string(), bob.to_string()];
    expected.sort();
    assert_eq!(ids, expected);

    // Only rows older than the cut-offs go: vol-00000001 is a tombstone.
    let past = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(
        store.sweep(past, past).await.unwrap(),
        SweepCounts::default()
    );
    let future = Utc::now() + chrono::Duration::seconds(1);
    let swept = store.sweep(future, future).await.unwrap();
    assert_eq!(swept.deleted_volumes, 1);
    assert_eq!(
        store
            .get_volume_any_state(alice, "vol-00000001")
            .await
            .unwrap(),
        None
    );
    assert!(store
        .get_volume(alice, "vol-00000002")
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn sqlite_backend() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("store.db").display());
    let store = sandbox_store::connect(&url, 4).await.unwrap();
    assert_eq!(store.backend(), "sqlite");
    conformance(store).await;
}

#[tokio::test]
async fn postgres_backend() {
    let url = fresh_postgres_database().await;
    let store = sandbox_store::connect(&url, 4).await.unwrap();
    assert_eq!(store.backend(), "postgres");
    conformance(store).await;
}

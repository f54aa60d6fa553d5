//! Faults: the server killed (SIGTERM and kill -9) in the middle of a
//! template build, an upload or a create; Postgres and Garage restarted
//! under traffic. After each: nothing outside the data dir changed, no row
//! without its blob, no blob without its row, no machine without a row,
//! every acknowledged volume byte-identical, and recovery without a
//! server restart.

use crate::common::{self, *};
use reqwest::StatusCode;
use sandbox_blobs::{BlobStore, S3BlobStore};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

async fn download_sha(server: &TestServer, id: &str) -> String {
    sha256_hex(&server.download_volume(id).await)
}

async fn put_blob(store: &S3BlobStore, key: &str, data: &[u8]) {
    let mut upload = store.begin_upload(key).await.unwrap();
    upload.write(data.to_vec().into()).await.unwrap();
    upload.complete().await.unwrap();
}

/// Running (not gone, not a zombie waiting to be reaped).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Mount points under `dir` in the mount namespace of `pid`.
fn mounts_under(pid: &str, dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mount| mount.starts_with(&needle))
        .map(str::to_string)
        .collect()
}

/// The pid of a build process of this data dir whose mount namespace
/// already holds mounts under it (mmdebstrap bind-mounts /dev/shm there).
fn build_with_mounts(data: &Path) -> Option<String> {
    processes_naming(&data.display().to_string())
        .into_iter()
        .filter_map(|line| line.split(':').next().map(str::to_string))
        .find(|pid| !mounts_under(pid, data).is_empty())
}

#[tokio::test]
async fn a_template_build_killed_mid_way_never_reaches_host_mounts() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("a_template_build_killed_mid_way_never_reaches_host_mounts") {
        return;
    }
    let marker =
        Path::new("/dev/shm").join(format!("sandbox-manager-marker-{}", std::process::id()));
    std::fs::write(&marker, b"host state").unwrap();
    for signal in ["TERM", "KILL"] {
        // Templates built from scratch under the data dir, as on a fresh host.
        let mut server = TestServer::start(
            embedded()
                .with_setting("runtime.kind", "namespace")
                .with_setting("runtime.build_templates_on_start", "true")
                .with_setting("pool.sizes.base", "0")
                .with_setting("pool.sizes.python", "0"),
        )
        .await;
        let data = server.data_dir.path().to_path_buf();
        let mut inside = None;
        for _ in 0..600 {
            inside = build_with_mounts(&data);
            if inside.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let inside = inside.expect("the build reached the point where it mounts (120 s)");
        assert!(
            mounts_under("self", &data).is_empty(),
            "the build's mounts are visible to the host"
        );
        let pid = server.pid().unwrap();
        let started = Instant::now();
        std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        let mut child_gone = false;
        while started.elapsed() < Duration::from_secs(15) {
            if !alive(&pid.to_string()) {
                child_gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            child_gone,
            "SIG{signal}: the server did not exit within 15 s"
        );
        server.crash(); // reap it
        eventually(
            "the build's processes died with the server",
            Duration::from_secs(5),
            || {
                let left = processes_naming(&data.display().to_string());
                async move { left.is_empty() }
            },
        )
        .await;
        assert!(
            !alive(&inside),
            "build process {inside} outlived the server"
        );
        assert!(mounts_under("self", &data).is_empty());
        // What a user (or a test's cleanup) does next.
        std::fs::remove_dir_all(&data).unwrap();
        assert_eq!(
            std::fs::read(&marker).unwrap(),
            b"host state",
            "SIG{signal}"
        );
    }
    std::fs::remove_file(&marker).unwrap();
}

#[tokio::test]
async fn orphans_failed_deletes_a_crash_and_an_object_store_outage_are_reconciled() {
    let _suite = common::suite(module_path!()).await;
    let garage = PrivateGarage::start("faults", 3940);
    let store = s3_store(&garage.s3, "S3_BUCKET");
    let mut server = TestServer::start(
        production()
            .with_s3(&garage.s3)
            .with_setting("reconcile.interval_secs", "1"),
    )
    .await;
    let kept = targz(&[("kept.bin", noise(300_000, 5))]);
    let (status, kept_volume) = server.upload_volume("fault", kept.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, doomed) = server
        .upload_volume("fault", targz(&[("doomed.txt", b"bye".to_vec())]))
        .await;
    let owner = kept_volume["owner_id"].as_str().unwrap().to_string();
    let prefix = format!("owners/{owner}/");

    // A blob without a row (a crash between commit and row, an older
    // version's failed delete), and one of an owner this database does not
    // know (another deployment sharing the bucket).
    let orphan = format!("{prefix}volumes/vol-0rphan00.tar.gz");
    let foreign = "owners/own-elsewhere/volumes/vol-theirs00.tar.gz".to_string();
    put_blob(&store, &orphan, b"orphan").await;
    put_blob(&store, &foreign, b"theirs").await;
    eventually(
        "the orphan blob is removed",
        Duration::from_secs(10),
        || async { !store.list_keys(&prefix).await.unwrap().contains(&orphan) },
    )
    .await;
    assert_eq!(
        store.list_keys("owners/own-elsewhere/").await.unwrap(),
        vec![foreign.clone()]
    );
    store.delete(&foreign).await.unwrap();

    // Object storage down: a delete still succeeds (its blob is left to the
    // reconciler), an upload is a clear 503, reads of metadata still work.
    garage.stop();
    let doomed_id = doomed["volume_id"].as_str().unwrap();
    let response = match server.delete(&format!("/volumes/{doomed_id}")).send().await {
        Ok(r) => r,
        Err(e) => panic!(
            "{e}\n{}",
            std::fs::read_to_string(server.log_path()).unwrap()
        ),
    };
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, body) = server
        .upload_volume("fault", targz(&[("x", b"x".to_vec())]))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("object storage"),
        "{body}"
    );
    assert_eq!(server.volume_count().await, 1);

    // The server dies right after that delete (kill -9), comes back while
    // the store is still down, then the store returns: the deleted
    // volume's blob goes, the kept one is byte-identical, uploads work.
    server.crash();
    server.launch().await;
    garage.resume();
    let doomed_key = doomed["blob_key"].as_str().unwrap().to_string();
    eventually(
        "the failed delete's blob is removed",
        Duration::from_secs(20),
        || async {
            store
                .list_keys(&prefix)
                .await
                .is_ok_and(|keys| !keys.contains(&doomed_key))
        },
    )
    .await;
    let kept_id = kept_volume["volume_id"].as_str().unwrap();
    assert_eq!(download_sha(&server, kept_id).await, sha256_hex(&kept));
    assert_eq!(
        server
            .upload_volume("fault", targz(&[("y", b"y".to_vec())]))
            .await
            .0,
        StatusCode::CREATED
    );
    let mut keys = store.list_keys(&prefix).await.unwrap();
    keys.sort();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(store.pending_uploads(&prefix).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_postgres_restart_under_traffic_is_503s_then_full_recovery() {
    let _suite = common::suite(module_path!()).await;
    let postgres = PrivatePostgres::start("faults", 5442);
    let server =
        TestServer::start(production().with_setting("database.url", &postgres.url())).await;
    let archive = targz(&[("a.txt", b"alpha".to_vec())]);
    let (status, volume) = server.upload_volume("fault", archive.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = volume["volume_id"].as_str().unwrap().to_string();

    postgres.stop();
    for _ in 0..3 {
        let (status, body) = server.get("/volumes").reply().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body["message"].as_str().unwrap().contains("database"),
            "{body}"
        );
    }
    let (status, body) = server.upload_volume("fault", archive.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    postgres.resume();
    eventually(
        "requests succeed again",
        Duration::from_secs(30),
        || async {
            server
                .get("/volumes")
                .send()
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        },
    )
    .await;
    assert_eq!(download_sha(&server, &id).await, sha256_hex(&archive));
    assert_eq!(
        server.upload_volume("fault", archive).await.0,
        StatusCode::CREATED
    );
    let listed: Value = server.get_json("/volumes").await;
    assert_eq!(listed["volumes"].as_array().unwrap().len(), 2, "{listed}");
}

/// Every machine on disk has a running row, except the warm pool's.
async fn no_machine_without_a_row(server: &TestServer) -> bool {
    let rows = server.sandbox_ids("/sandboxes").await;
    let without_row = server
        .sandbox_dirs()
        .iter()
        .filter(|dir| !rows.contains(&dir.file_name().unwrap().to_string_lossy().into_owned()))
        .count();
    without_row <= server.metric("pool_ready").await as usize
}

#[tokio::test]
async fn kill_9_mid_create_with_hydrate_leaves_no_machine_without_a_row() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("kill_9_mid_create_with_hydrate_leaves_no_machine_without_a_row") {
        return;
    }
    let mut server = TestServer::start(production().with_sandboxes(0, 0)).await;
    let archive = targz(&[("big.bin", noise(24 << 20, 9))]);
    let (status, volume) = server.upload_volume("fault", archive.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    let body = json!({ "volumes": [{ "volume_id": volume["volume_id"], "mount_path": "/data" }] });
    for delay_ms in [300u64, 1500] {
        let create = server.post("/sandboxes").json(&body).send();
        let pending = tokio::spawn(create);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        server.crash();
        let _ = pending.await;
        server.launch().await;
        eventually(
            "every machine has a row after the restart",
            Duration::from_secs(10),
            || no_machine_without_a_row(&server),
        )
        .await;
    }
    let id = volume["volume_id"].as_str().unwrap();
    assert_eq!(download_sha(&server, id).await, sha256_hex(&archive));
}

#[tokio::test]
async fn abandoned_creates_odd_timeouts_and_runaway_output_leak_nothing() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("abandoned_creates_odd_timeouts_and_runaway_output_leak_nothing") {
        return;
    }
    let server = TestServer::start(
        production()
            .with_sandboxes(1, 0)
            .with_setting("quotas.max_running_sandboxes", "4"),
    )
    .await;

    // Timeouts: absurd ones are clamped, 0 means the default.
    let (status, huge) = server
        .create_sandbox(json!({ "timeout": 100_000_000_000_000u64 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{huge}");
    assert_eq!(huge["timeout"], 86_400);
    let (status, zero) = server.create_sandbox(json!({ "timeout": 0 })).await;
    assert_eq!(status, StatusCode::CREATED, "{zero}");
    assert_eq!(zero["timeout"], 300);
    assert!(!zero["end_at"].is_null());

    // A client that hangs up mid-create (its volume takes a while to
    // hydrate): the create still finishes, detached, and leaves a
    // recorded sandbox with its volume ready, not a machine without a row.
    let archive = targz(&[("big.bin", noise(16 << 20, 23))]);
    let (_, volume) = server.upload_volume("slow", archive).await;
    let before = server.sandbox_ids("/sandboxes").await;
    let abandoned = server
        .post("/sandboxes")
        .timeout(Duration::from_millis(30))
        .json(&json!({ "volumes": [{ "volume_id": volume["volume_id"], "mount_path": "/data" }] }))
        .send()
        .await;
    assert!(abandoned.is_err(), "the client gave up");
    eventually(
        "the abandoned create completes",
        Duration::from_secs(20),
        || async { server.sandbox_ids("/sandboxes").await.len() == before.len() + 1 },
    )
    .await;
    let finished = server
        .sandbox_ids("/sandboxes")
        .await
        .into_iter()
        .find(|id| !before.contains(id))
        .unwrap();
    let sandbox: Value = server.get_json(&format!("/sandboxes/{finished}")).await;
    assert_eq!(sandbox["volumes"][0]["status"], "ready", "{sandbox}");
    assert!(no_machine_without_a_row(&server).await);

    // The owner's quota of 4 running sandboxes.
    let mut refused = None;
    for _ in 0..4 {
        let (status, body) = server.create_sandbox(json!({})).await;
        if status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(body);
            break;
        }
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let refused = refused.expect("a fifth running sandbox is refused");
    assert!(
        refused["message"].as_str().unwrap().contains("quota"),
        "{refused}"
    );
    assert_eq!(server.sandbox_ids("/sandboxes").await.len(), 4);

    let id = huge["sandbox_id"].as_str().unwrap();
    // A batch past the list cap (1000) is refused before any file is written.
    let files: Vec<Value> = (0..1001)
        .map(|i| json!({ "path": format!("/tmp/f{i}"), "data": "x" }))
        .collect();
    let (status, body) = server
        .post(&format!("/sandboxes/{id}/files/batch"))
        .json(&json!({ "files": files }))
        .reply()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("at most 1000 files"),
        "{body}"
    );
    // A run whose output is 2 x 16 MiB of NULs: refused as too large for
    // the server to hold, not buffered as ~200 MB of JSON.
    let (status, body) = server
        .command(
            id,
            json!({ "cmd": "head -c 16M /dev/zero; head -c 16M /dev/zero >&2" }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        body["message"].as_str().unwrap().contains("exceeds"),
        "{body}"
    );

    // A stream of /dev/zero whose reader goes away: the command is killed.
    let response = server
        .post(&format!("/sandboxes/{id}/commands/stream"))
        .json(&json!({ "cmd": "cat /dev/zero" }))
        .send()
        .await
        .unwrap();
    let mut events = response.bytes_stream();
    let mut seen = 0usize;
    while seen < 4 << 20 {
        use futures::StreamExt;
        seen += events.next().await.expect("output flows").unwrap().len();
    }
    drop(events);
    eventually(
        "the abandoned stream's command is killed",
        Duration::from_secs(10),
        || async {
            let listed: Value = server.get_json(&format!("/sandboxes/{id}/commands")).await;
            listed.as_array().unwrap().is_empty()
        },
    )
    .await;
    let (health, _) = server.get("/health").reply().await;
    assert!(health.is_success());
    let rss = rss_kib(server.pid().unwrap());
    assert!(rss > 0 && rss < 256 * 1024, "server RSS {rss} KiB");
}

#[tokio::test]
async fn sigterm_ends_the_server_while_an_upload_hangs() {
    let _suite = common::suite(module_path!()).await;
    let mut server =
        TestServer::start(embedded().with_setting("http.shutdown_grace_secs", "2")).await;
    // An upload that sends a little and then nothing: a request in flight
    // and an archive walk waiting on a blocking thread.
    let archive = targz(&[("big.bin", noise(4 << 20, 21))]);
    let (tx, _pending) = streamed_upload(&server, "hanging", archive.len());
    tx.send(Ok(archive[..64 << 10].to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pid = server.pid().unwrap();
    let started = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    while alive(&pid.to_string()) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "SIGTERM: still running after 10 s (grace 2 s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.crash(); // reap
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(log.contains("shutting down"), "{log}");
    drop(tx);
}

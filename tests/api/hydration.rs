//! Volume hydration on create: real Postgres, Garage and namespace sandboxes.

use crate::common::{self, sandboxes_supported, targz, Api, PrivateGarage, Reply, TestServer};
use reqwest::StatusCode;
use serde_json::json;

fn rows_csv(lines: usize) -> Vec<u8> {
    (0..lines)
        .map(|i| format!("{i},row\n"))
        .collect::<String>()
        .into_bytes()
}

#[tokio::test]
async fn each_sandbox_gets_a_private_copy_before_the_create_returns() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("each_sandbox_gets_a_private_copy_before_the_create_returns") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(2, 0)).await;
    let archive = targz(&[
        ("rows.csv", rows_csv(1000)),
        ("nested/deep/file.txt", b"deep".to_vec()),
    ]);
    let volume = server.new_volume(archive.clone()).await;
    let id = volume["volume_id"].as_str().unwrap();
    let attach =
        json!({ "template": "base", "volumes": [{ "volume_id": id, "mount_path": "/data" }] });

    let mut sandboxes = Vec::new();
    for _ in 0..3 {
        let (status, sandbox) = server.create_sandbox(attach.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{sandbox}");
        let hydrated = &sandbox["volumes"][0];
        assert_eq!(hydrated["status"], "ready", "{sandbox}");
        assert_eq!(hydrated["volume_id"], id);
        assert_eq!(hydrated["mount_path"], "/data");
        assert_eq!(hydrated["files"], 2);
        assert_eq!(hydrated["skipped"], 0);
        assert!(hydrated["duration_ms"].is_u64());
        // The very first command already sees the data.
        let sid = sandbox["sandbox_id"].as_str().unwrap().to_string();
        let wc = server.run_command(&sid, "wc -l /data/rows.csv").await;
        assert_eq!(wc["stdout"], "1000 /data/rows.csv\n");
        sandboxes.push(sid);
    }
    // The user owns its copy and can change it; nobody else sees the change.
    let (a, b, c) = (&sandboxes[0], &sandboxes[1], &sandboxes[2]);
    let wrote = server
        .run_command(
            a,
            "echo mine > /data/new.txt && echo x >> /data/rows.csv && stat -c %U /data/rows.csv",
        )
        .await;
    assert_eq!(wrote["stdout"], "user\n", "{wrote}");
    for other in [b, c] {
        let check = server
            .run_command(other, "ls /data/new.txt 2>&1; wc -l < /data/rows.csv")
            .await;
        assert!(
            check["stdout"].as_str().unwrap().contains("No such file"),
            "{check}"
        );
        assert!(
            check["stdout"].as_str().unwrap().ends_with("1000\n"),
            "{check}"
        );
    }
    let (_, fresh) = server.create_sandbox(attach.clone()).await;
    let fresh_id = fresh["sandbox_id"].as_str().unwrap();
    let check = server
        .run_command(
            fresh_id,
            "cat /data/nested/deep/file.txt; ls /data/new.txt 2>&1",
        )
        .await;
    assert!(
        check["stdout"].as_str().unwrap().starts_with("deep"),
        "{check}"
    );
    assert!(
        check["stdout"].as_str().unwrap().contains("No such file"),
        "{check}"
    );
    let blob = server.download_volume(id).await;
    assert_eq!(
        common::sha256_hex(&blob),
        common::sha256_hex(&archive),
        "the volume itself is unchanged"
    );

    // Deleting the volume leaves existing copies alone; later attaches get 403.
    assert_eq!(
        server.delete(&format!("/volumes/{id}")).reply().await.0,
        StatusCode::NO_CONTENT
    );
    let still = server.run_command(b, "wc -l < /data/rows.csv").await;
    assert_eq!(still["stdout"], "1000\n");
    let (status, body) = server.create_sandbox(attach).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
}

#[tokio::test]
async fn hostile_archive_hydrates_only_safe_entries() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("hostile_archive_hydrates_only_safe_entries") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(1, 0)).await;
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, link: Option<&str>, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        if let Some(link) = link {
            header.set_link_name(link).unwrap();
        }
        // Raw names, so traversal and absolute names survive into the tar.
        let bytes = name.as_bytes();
        header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    };
    add("good.txt", tar::EntryType::Regular, None, b"good");
    add("../escape.txt", tar::EntryType::Regular, None, b"evil");
    add("/abs.txt", tar::EntryType::Regular, None, b"abs");
    add("link", tar::EntryType::Symlink, Some("/etc"), b"");
    add("link/passwd", tar::EntryType::Regular, None, b"evil");
    add("hard", tar::EntryType::Link, Some("/etc/shadow"), b"");
    add("dev", tar::EntryType::Char, None, b"");
    add("fifo", tar::EntryType::Fifo, None, b"");
    let archive = common::gzip(&builder.into_inner().unwrap());
    let volume = server.new_volume(archive).await;
    let (status, sandbox) = server
        .create_sandbox(
            json!({ "volumes": [{ "volume_id": volume["volume_id"], "mount_path": "/data/in" }] }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    let hydrated = &sandbox["volumes"][0];
    assert_eq!(hydrated["status"], "ready");
    // The symlink is dropped, so "link/passwd" lands as a plain file in a
    // plain directory under the mount path: nothing goes through a link.
    assert_eq!(
        hydrated["files"], 3,
        "good.txt, abs.txt (leading / stripped), link/passwd: {sandbox}"
    );
    assert_eq!(
        hydrated["skipped"], 5,
        "traversal, symlink, hardlink, device, fifo: {sandbox}"
    );
    let id = sandbox["sandbox_id"].as_str().unwrap();
    let listing = server.run_command(id, "cd /data && find . -printf '%y %p\\n' | sort -k2; cat /data/escape.txt 2>&1; grep -c evil /etc/passwd").await;
    assert_eq!(
        listing["stdout"],
        "d .\nd ./in\nf ./in/abs.txt\nf ./in/good.txt\nd ./in/link\nf ./in/link/passwd\ncat: /data/escape.txt: No such file or directory\n0\n",
        "{listing}"
    );
}

#[tokio::test]
async fn mount_path_and_volume_validation() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("mount_path_and_volume_validation") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(1, 0)).await;
    let volume = server.new_volume(targz(&[("a", b"a".to_vec())])).await;
    let id = volume["volume_id"].as_str().unwrap();
    for (attachment, expected) in [
        (
            json!({ "volume_id": id, "mount_path": "data" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "volume_id": id, "mount_path": "/" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "volume_id": id, "mount_path": "/etc/app" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "volume_id": id, "mount_path": "/usr" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "volume_id": id, "mount_path": "/data/../etc" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "volume_id": id, "mount_path": "/data", "subpath": "x" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "volume_id": id, "mount_path": "/data", "mode": "mount" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            json!({ "volume_id": "vol-00000000", "mount_path": "/data" }),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let (status, body) = server
            .create_sandbox(json!({ "volumes": [attachment] }))
            .await;
        assert_eq!(status, expected, "{attachment} → {body}");
        assert!(body["message"].is_string());
    }
    let overlapping = json!({ "volumes": [{ "volume_id": id, "mount_path": "/data" }, { "volume_id": id, "mount_path": "/data/sub" }] });
    assert_eq!(
        server.create_sandbox(overlapping).await.0,
        StatusCode::BAD_REQUEST
    );

    // Another owner's volume: 403, like a deleted or unknown one.
    let mallory = server.create_key("mallory");
    let (status, _) = server
        .http
        .post(server.url("/sandboxes"))
        .bearer_auth(&mallory)
        .json(&json!({ "volumes": [{ "volume_id": id, "mount_path": "/data" }] }))
        .reply()
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        server.sandbox_ids("/sandboxes?state=all").await.len(),
        0,
        "no sandbox was created by a refused request"
    );
}

#[tokio::test]
async fn concurrent_creates_fetch_the_blob_once() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("concurrent_creates_fetch_the_blob_once") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(8, 0)).await;
    let archive = targz(&[
        ("rows.csv", rows_csv(20_000)),
        ("noise.bin", common::noise(4 << 20, 3)),
    ]);
    let volume = server.new_volume(archive).await;
    let attach =
        json!({ "volumes": [{ "volume_id": volume["volume_id"], "mount_path": "/data" }] });
    let before = server.metric("blob_store_gets_total").await;
    let creates = (0..8).map(|_| server.create_sandbox(attach.clone()));
    for (status, sandbox) in futures::future::join_all(creates).await {
        assert_eq!(status, StatusCode::CREATED, "{sandbox}");
        assert_eq!(sandbox["volumes"][0]["status"], "ready", "{sandbox}");
        assert_eq!(sandbox["volumes"][0]["files"], 2);
    }
    assert_eq!(
        server.metric("blob_store_gets_total").await - before,
        1.0,
        "one S3 GET for 8 creates"
    );
    // The other 7 read the cached blob (copy mode) or share the one layer
    // built from it (layer mode): neither fetches again.
    let hits = server.metric("blob_cache_hits_total").await;
    let shares = server.metric("volume_layer_shares_total").await;
    assert_eq!(
        hits + shares,
        7.0,
        "{hits} cache hits, {shares} layer shares"
    );
}

#[tokio::test]
async fn object_store_outage_during_create() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("object_store_outage_during_create") {
        return;
    }
    let garage = PrivateGarage::start("outage", 3920);
    let server = TestServer::start(
        common::production()
            .with_s3(&garage.s3)
            .with_sandboxes(1, 0),
    )
    .await;
    let volume = server
        .new_volume(targz(&[("rows.csv", rows_csv(10))]))
        .await;
    let attach =
        json!({ "volumes": [{ "volume_id": volume["volume_id"], "mount_path": "/data" }] });
    garage.stop();

    // Default: the sandbox still comes up healthy; the attachment says why.
    let (status, sandbox) = server.create_sandbox(attach.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    let hydrated = &sandbox["volumes"][0];
    assert_eq!(hydrated["status"], "failed");
    assert!(
        hydrated["error"]
            .as_str()
            .unwrap()
            .contains("object storage"),
        "{sandbox}"
    );
    let id = sandbox["sandbox_id"].as_str().unwrap();
    let ok = server
        .run_command(id, "echo alive; ls /data 2>&1 | head -1")
        .await;
    assert!(
        ok["stdout"].as_str().unwrap().starts_with("alive\n"),
        "{ok}"
    );

    // Strict (per request): the create fails and no sandbox is left.
    let mut strict = attach.clone();
    strict["hydrate_strict"] = json!(true);
    let (status, body) = server.create_sandbox(strict).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("hydration failed"),
        "{body}"
    );
    assert_eq!(
        server.sandbox_ids("/sandboxes").await.len(),
        1,
        "only the lenient one"
    );
    // On disk: the lenient sandbox plus the refilled pool member, once the
    // refill settles; a leaked strict sandbox would make it three for good.
    let mut dirs = 0;
    for _ in 0..100 {
        dirs = server.sandbox_dirs().len();
        if dirs == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        dirs, 2,
        "the lenient sandbox and one pool member, nothing leaked"
    );

    // Back up: hydration works again (the failed fetch was not cached).
    garage.resume();
    let (status, sandbox) = server.create_sandbox(attach).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(sandbox["volumes"][0]["status"], "ready", "{sandbox}");
}

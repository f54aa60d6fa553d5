//! Volume write-back: `commit` packs an attached volume's mount path into a
//! new volume, `snapshot` any directory. Each test checks the new volume's
//! content where it matters (a fresh sandbox attaching it) and that the
//! source is left byte for byte, then tries what a hostile tenant would:
//! kernel views, symlinks out of the tree, sizes past the cap, someone
//! else's sandbox.

use crate::common::{self, sandboxes_supported, targz, Api, Reply, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn attach(volume_id: &Value) -> Value {
    json!({ "volumes": [{ "volume_id": volume_id, "mount_path": "/data" }] })
}

async fn post(server: &TestServer, path: &str) -> (StatusCode, Value) {
    server.post(path).reply().await
}

#[tokio::test]
async fn commit_keeps_the_edits_in_a_new_volume_and_leaves_the_source_alone() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("commit_keeps_the_edits_in_a_new_volume_and_leaves_the_source_alone") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(3, 0)).await;
    let source = server
        .new_volume(targz(&[
            ("a.txt", b"a\n".to_vec()),
            ("old/b.txt", b"b\n".to_vec()),
        ]))
        .await;
    let source_id = source["volume_id"].as_str().unwrap();
    let source_bytes = server.download_volume(source_id).await;

    let sandbox = server.new_sandbox(attach(&source["volume_id"])).await;
    let edit = server
        .run_command(
            &sandbox,
            "cd /data && echo edited >> a.txt && rm -r old && mkdir -p new/deep \
             && head -c 300000 /dev/urandom > new/deep/blob && sha256sum new/deep/blob \
             && ln -s a.txt link && chmod 600 a.txt",
        )
        .await;
    assert_eq!(edit["exit_code"], 0, "{edit}");
    let blob_sum = edit["stdout"]
        .as_str()
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string();

    let (status, committed) = post(
        &server,
        &format!("/sandboxes/{sandbox}/volumes/{source_id}/commit"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{committed}");
    assert_ne!(committed["volume_id"], source["volume_id"]);
    assert_eq!(committed["name"], "v-commit", "default name: {committed}");
    assert_eq!(committed["metadata"]["source_volume_id"], source_id);
    assert!(
        committed["entry_count"].as_i64().unwrap() >= 5,
        "{committed}"
    );
    assert_eq!(
        server.download_volume(source_id).await,
        source_bytes,
        "the source volume is byte-identical"
    );

    // A fresh sandbox attaching the new volume sees the edits.
    let fresh = server.new_sandbox(attach(&committed["volume_id"])).await;
    let seen = server
        .run_command(
            &fresh,
            "cd /data && cat a.txt && ls old 2>&1; sha256sum new/deep/blob; \
             test -e link || test -L link || echo no-link; stat -c '%a %U' a.txt",
        )
        .await;
    let seen = seen["stdout"].as_str().unwrap();
    assert!(seen.starts_with("a\nedited\n"), "{seen}");
    assert!(seen.contains("No such file"), "old/ was removed: {seen}");
    assert!(seen.contains(&blob_sum), "{seen}");
    // Symlinks are packed but, like any volume's, not materialised.
    assert!(seen.contains("no-link\n600 user"), "mode kept: {seen}");

    // And one attaching the source sees the source.
    let again = server.new_sandbox(attach(&source["volume_id"])).await;
    let seen = server
        .run_command(&again, "cat /data/a.txt /data/old/b.txt")
        .await;
    assert_eq!(seen["stdout"], "a\nb\n", "{seen}");

    // Named commits; a volume not attached is a 400, a foreign one a 404.
    let (status, named) = post(
        &server,
        &format!("/sandboxes/{sandbox}/volumes/{source_id}/commit?name=results"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{named}");
    assert_eq!(named["name"], "results");
    let committed_id = committed["volume_id"].as_str().unwrap();
    let (status, body) = post(
        &server,
        &format!("/sandboxes/{sandbox}/volumes/{committed_id}/commit"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap().contains("not attached"));
    let stranger = server.create_key("stranger");
    let (status, body) = server
        .http
        .post(server.url(&format!("/sandboxes/{sandbox}/volumes/{source_id}/commit")))
        .bearer_auth(&stranger)
        .reply()
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // A killed sandbox has nothing to commit.
    let (status, _) = server
        .delete(&format!("/sandboxes/{sandbox}"))
        .reply()
        .await;
    assert!(status.is_success());
    let (status, body) = post(
        &server,
        &format!("/sandboxes/{sandbox}/volumes/{source_id}/commit"),
    )
    .await;
    assert_eq!(status, StatusCode::GONE, "{body}");
}

#[tokio::test]
async fn snapshot_packs_a_directory_and_refuses_kernel_views_and_escapes() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("snapshot_packs_a_directory_and_refuses_kernel_views_and_escapes") {
        return;
    }
    let server = TestServer::start(
        common::production()
            .with_sandboxes(2, 0)
            .with_setting("volumes.max_upload_bytes", "2000000"),
    )
    .await;
    let sandbox = server.new_sandbox(json!({})).await;
    let made = server
        .run_command(
            &sandbox,
            "mkdir -p /home/user/out/sub && echo result > /home/user/out/sub/r.txt \
             && mkfifo /home/user/out/fifo && ln -s /etc /home/user/out/etc-link \
             && ln -s /proc /home/user/proc-link \
             && head -c 3000000 /dev/urandom > /home/user/big.bin",
        )
        .await;
    assert_eq!(made["exit_code"], 0, "{made}");

    let (status, volume) = post(
        &server,
        &format!("/sandboxes/{sandbox}/volumes/snapshot?path=/home/user/out"),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{volume}");
    assert_eq!(volume["name"], "snapshot");
    // The symlink out of the tree is archived as a link, never followed;
    // the FIFO is not data.
    let archive = server
        .download_volume(volume["volume_id"].as_str().unwrap())
        .await;
    let mut entries = Vec::new();
    let mut reader = tar::Archive::new(flate2::read::GzDecoder::new(&archive[..]));
    for entry in reader.entries().unwrap() {
        let entry = entry.unwrap();
        let link = entry.link_name().unwrap().map(|l| l.display().to_string());
        entries.push((entry.path().unwrap().display().to_string(), link));
    }
    entries.sort();
    assert_eq!(
        entries,
        [
            ("etc-link".to_string(), Some("/etc".to_string())),
            ("sub/".to_string(), None),
            ("sub/r.txt".to_string(), None),
        ],
        "{entries:?}"
    );
    let fresh = server.new_sandbox(attach(&volume["volume_id"])).await;
    let seen = server
        .run_command(
            &fresh,
            "cat /data/sub/r.txt; ls /data | tr '\\n' ' '; echo; \
             test -e /data/fifo && echo fifo-there",
        )
        .await;
    let seen = seen["stdout"].as_str().unwrap();
    // The link to /etc was packed as a link (never followed, so no /etc
    // files came along) and, like any volume's links, not materialised;
    // the FIFO is not data.
    assert_eq!(seen, "result\nsub \n", "{seen}");

    for (path, status) in [
        ("/proc", StatusCode::BAD_REQUEST),
        ("/sys/kernel", StatusCode::BAD_REQUEST),
        ("/dev", StatusCode::BAD_REQUEST),
        ("relative/dir", StatusCode::BAD_REQUEST),
        ("/home/../proc", StatusCode::BAD_REQUEST),
        // A link into /proc is resolved inside the sandbox, then refused.
        ("/home/user/proc-link", StatusCode::BAD_REQUEST),
        ("/home/user/missing", StatusCode::NOT_FOUND),
        ("/home/user/out/sub/r.txt", StatusCode::BAD_REQUEST),
    ] {
        let (got, body) = post(
            &server,
            &format!("/sandboxes/{sandbox}/volumes/snapshot?path={path}"),
        )
        .await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(body["message"].is_string(), "{path}: {body}");
    }
    // Past the upload cap: 413, and nothing is kept.
    let before = server.volume_count().await;
    let (status, body) = post(
        &server,
        &format!("/sandboxes/{sandbox}/volumes/snapshot?path=/home/user"),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(server.volume_count().await, before);
    let (status, _) = post(&server, "/sandboxes/sbx-nope/volumes/snapshot?path=/tmp").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The sandbox and the server carry on.
    let alive = server.run_command(&sandbox, "echo ok").await;
    assert_eq!(alive["stdout"], "ok\n");
}

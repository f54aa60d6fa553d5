//! Volume layers: one unpack per node, then a private copy-on-write view per
//! sandbox (an overlay on namespace sandboxes, a volume slot disk over the
//! layer's image on microVMs). Each test tries to make one sandbox's writes
//! reach another, or the store drop a layer someone still mounts.

use crate::common::{self, sandboxes_supported, targz, Api, Reply, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The volume every test attaches: files to change, delete, rename and
/// chmod from one sandbox while the others look.
fn dataset() -> Vec<u8> {
    let rows: String = (0..1000).map(|i| format!("{i},row\n")).collect();
    targz(&[
        ("rows.csv", rows.into_bytes()),
        ("keep.txt", b"keep\n".to_vec()),
        ("gone.txt", b"gone\n".to_vec()),
        ("moved.txt", b"moved\n".to_vec()),
        ("run.sh", b"#!/bin/sh\necho ran\n".to_vec()),
        ("nested/deep/file.txt", b"deep\n".to_vec()),
    ])
}

/// What a sandbox sees of the dataset: lines, listing, a mode, contents.
const LOOK: &str = "wc -l < /data/rows.csv; cd /data && find . | sort | tr '\\n' ' '; echo; \
                    stat -c '%a %U' run.sh rows.csv; cat keep.txt nested/deep/file.txt 2>&1 || true";

fn attach(volume: &Value) -> Value {
    json!({ "volumes": [{ "volume_id": volume["volume_id"], "mount_path": "/data" }] })
}

async fn create(server: &TestServer, body: &Value) -> (String, Value) {
    let (status, sandbox) = server.create_sandbox(body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    assert_eq!(sandbox["volumes"][0]["status"], "ready", "{sandbox}");
    let id = sandbox["sandbox_id"].as_str().unwrap().to_string();
    (id, sandbox["volumes"][0].clone())
}

async fn look(server: &TestServer, id: &str) -> String {
    let seen = server.run_command(id, LOOK).await;
    assert_eq!(seen["exit_code"], 0, "{seen}");
    seen["stdout"].as_str().unwrap().to_string()
}

async fn layers(server: &TestServer) -> Value {
    let health = server.get_json("/health").await;
    assert_eq!(health["hydrate"]["mode"], "layer", "{health}");
    health["hydrate"]["layers"].clone()
}

/// Polls `/health` until the layer store holds `count` layers.
async fn wait_for_layer_count(server: &TestServer, count: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let layers = layers(server).await;
        if layers["layers"] == count {
            return layers;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} layers: {layers}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn supported(test: &str) -> bool {
    sandboxes_supported(test)
}

fn on_microvms() -> bool {
    std::env::var("SANDBOX_TEST_RUNTIME").is_ok_and(|r| r == "microvm")
}

/// Root in sandbox `id` does the worst it can to its view of the layer.
/// Namespace: the per-attachment dirs are not its to enter and the mounts
/// not its to undo. microVM: the VM is root's, so it unmounts the volume
/// and zeroes the start of the disk under it, which must only ever change
/// its own copy.
async fn attack_the_layer_as_root(server: &TestServer, id: &str) {
    if on_microvms() {
        let probe = server
            .run_command_as(
                id,
                "root",
                "dev=$(awk '$2==\"/data\" {print $1}' /proc/mounts); echo dev=$dev; \
                 umount /data && dd if=/dev/zero of=$dev bs=1M count=8 conv=fsync 2>&1; echo dd=$?",
            )
            .await;
        let probe = probe["stdout"].as_str().unwrap().to_string();
        assert!(probe.contains("dev=/dev/vd"), "a disk of its own: {probe}");
        assert!(
            probe.ends_with("dd=0\n"),
            "root overwrote its disk: {probe}"
        );
        // A slot no volume uses is 1 MiB: not a place to park data.
        let spare = server
            .run_command_as(
                id,
                "root",
                "for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = slot3 ] && dev=/dev/${d##*/}; done; \
                 cat /sys/block/${dev##*/}/size; dd if=/dev/zero of=$dev bs=1M count=4 2>&1; echo dd=$?",
            )
            .await;
        let spare = spare["stdout"].as_str().unwrap().to_string();
        assert!(spare.starts_with("2048\n"), "1 MiB in sectors: {spare}");
        assert!(spare.contains("No space left on device"), "{spare}");
        assert!(!spare.ends_with("dd=0\n"), "{spare}");
        return;
    }
    let before = look(server, id).await;
    let probe = server
        .run_command_as(
            id,
            "root",
            "ls /.envd/volumes 2>&1; umount /data 2>&1; echo unmount=$?; \
             grep -c ' /data ' /proc/self/mountinfo",
        )
        .await;
    let probe = probe["stdout"].as_str().unwrap().to_string();
    assert!(probe.contains("Permission denied"), "{probe}");
    assert!(!probe.contains("unmount=0"), "{probe}");
    assert!(probe.ends_with("1\n"), "still mounted: {probe}");
    assert_eq!(look(server, id).await, before, "the probe changed nothing");
}

#[tokio::test]
async fn writes_never_cross_between_sandboxes_sharing_a_layer() {
    let _suite = common::suite(module_path!()).await;
    if !supported("writes_never_cross_between_sandboxes_sharing_a_layer") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(5, 0)).await;
    let volume = server.new_volume(dataset()).await;
    let body = attach(&volume);

    let (a, built) = create(&server, &body).await;
    assert_eq!(built["source"], "hydrated", "the first sandbox builds");
    let (b, shared) = create(&server, &body).await;
    let (c, _) = create(&server, &body).await;
    assert_eq!(shared["source"], "layer", "{shared}");
    for field in ["files", "bytes", "skipped"] {
        assert_eq!(shared[field], built[field], "{field}");
    }
    let pristine = look(&server, &b).await;
    assert!(pristine.starts_with("1000\n"), "{pristine}");
    assert!(
        pristine.contains("644 user"),
        "user owns the files: {pristine}"
    );
    assert_eq!(
        look(&server, &a).await,
        pristine,
        "builder and sharer agree"
    );

    // a changes every kind of thing a lower file can undergo.
    let wrote = server
        .run_command(
            &a,
            "cd /data && echo more >> rows.csv && rm gone.txt && mv moved.txt renamed.txt \
             && chmod 700 run.sh && echo new > new.txt && rm -r nested && echo a > keep.txt",
        )
        .await;
    assert_eq!(wrote["exit_code"], 0, "{wrote}");
    let changed = look(&server, &a).await;
    assert!(changed.starts_with("1001\n"), "{changed}");
    assert!(changed.contains("renamed.txt") && !changed.contains("gone.txt"));
    assert!(changed.contains("700 user"), "{changed}");
    for other in [&b, &c] {
        assert_eq!(
            look(&server, other).await,
            pristine,
            "a's writes reached {other}"
        );
    }

    // Root inside cannot reach the layer itself, in a sharer nor in the
    // builder (whose writes went into the layer before it was sealed).
    let (e, _) = create(&server, &body).await;
    attack_the_layer_as_root(&server, &e).await;
    for other in [&b, &c] {
        assert_eq!(
            look(&server, other).await,
            pristine,
            "root in {e} reached {other}"
        );
    }

    // And the other way: b's writes reach neither a nor c.
    let wrote = server
        .run_command(&b, "echo b > /data/keep.txt && touch /data/from-b")
        .await;
    assert_eq!(wrote["exit_code"], 0, "{wrote}");
    assert_eq!(look(&server, &c).await, pristine);
    let seen_by_a = server
        .run_command(&a, "cat /data/keep.txt; ls /data/from-b 2>&1")
        .await;
    assert!(
        seen_by_a["stdout"]
            .as_str()
            .unwrap()
            .starts_with("a\nls: cannot access"),
        "{seen_by_a}"
    );

    // The layer outlives the sandbox that built it, whatever root in the
    // builder did to its disk.
    attack_the_layer_as_root(&server, &a).await;
    let (code, _) = server.delete(&format!("/sandboxes/{a}")).reply().await;
    assert!(code.is_success(), "{code}");
    let (d, later) = create(&server, &body).await;
    assert_eq!(later["source"], "layer", "{later}");
    assert_eq!(look(&server, &d).await, pristine);

    let layers = layers(&server).await;
    assert_eq!(layers["layers"], 1, "{layers}");
    assert_eq!(layers["in_use"], 1, "{layers}");
    assert!(layers["disk_bytes"].as_u64().unwrap() > 0, "{layers}");
}

#[tokio::test]
async fn concurrent_creates_wait_for_one_layer_build() {
    let _suite = common::suite(module_path!()).await;
    if !supported("concurrent_creates_wait_for_one_layer_build") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(8, 0)).await;
    let volume = server.new_volume(dataset()).await;
    let body = attach(&volume);
    let creates = (0..8).map(|_| server.create_sandbox(body.clone()));
    let mut sources = Vec::new();
    for (status, sandbox) in futures::future::join_all(creates).await {
        assert_eq!(status, StatusCode::CREATED, "{sandbox}");
        assert_eq!(sandbox["volumes"][0]["status"], "ready", "{sandbox}");
        assert_eq!(sandbox["volumes"][0]["files"], 6, "{sandbox}");
        sources.push(
            sandbox["volumes"][0]["source"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        let id = sandbox["sandbox_id"].as_str().unwrap();
        assert!(look(&server, id).await.starts_with("1000\n"));
    }
    sources.sort();
    assert_eq!(sources[..2], ["hydrated", "layer"], "{sources:?}");
    assert_eq!(sources.iter().filter(|s| *s == "hydrated").count(), 1);
    assert_eq!(server.metric("volume_layer_builds_total").await, 1.0);
    assert_eq!(server.metric("blob_store_gets_total").await, 1.0);
}

#[tokio::test]
async fn the_budget_never_removes_a_layer_in_use_and_deleted_volumes_go_last() {
    let _suite = common::suite(module_path!()).await;
    if !supported("the_budget_never_removes_a_layer_in_use_and_deleted_volumes_go_last") {
        return;
    }
    // A budget of one byte: every idle layer is over it.
    let server = TestServer::start(
        common::production()
            .with_sandboxes(2, 0)
            .with_setting("hydrate.layers_max_bytes", "1"),
    )
    .await;
    let first = server.new_volume(dataset()).await;
    let second = server
        .new_volume(targz(&[("other.txt", b"other\n".to_vec())]))
        .await;
    let (a, _) = create(&server, &attach(&first)).await;
    let (b, _) = create(&server, &attach(&second)).await;
    let held = wait_for_layer_count(&server, 2).await;
    assert_eq!(held["in_use"], 2, "both in use, both kept: {held}");

    // a's layer is idle once a is gone: over budget, it goes.
    server.delete(&format!("/sandboxes/{a}")).reply().await;
    wait_for_layer_count(&server, 1).await;
    let (_, rebuilt) = create(&server, &attach(&first)).await;
    assert_eq!(rebuilt["source"], "hydrated", "an evicted layer is rebuilt");

    // Deleting b's volume leaves b its copy; the layer goes with b.
    let id = second["volume_id"].as_str().unwrap();
    let (code, _) = server.delete(&format!("/volumes/{id}")).reply().await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    let still = server.run_command(&b, "cat /data/other.txt").await;
    assert_eq!(still["stdout"], "other\n", "{still}");
    let (code, refused) = server.create_sandbox(attach(&second)).await;
    assert_eq!(code, StatusCode::FORBIDDEN, "{refused}");
    server.delete(&format!("/sandboxes/{b}")).reply().await;
    let left = wait_for_layer_count(&server, 1).await;
    assert_eq!(left["in_use"], 1, "{left}");
    let layer_dirs = std::fs::read_dir(server.data_dir.path().join("layers"))
        .unwrap()
        .count();
    assert_eq!(layer_dirs, 1, "only the rebuilt layer is on disk");
}

#[tokio::test]
async fn a_restart_keeps_mounted_layers_and_shares_them_again() {
    let _suite = common::suite(module_path!()).await;
    if !supported("a_restart_keeps_mounted_layers_and_shares_them_again") {
        return;
    }
    let mut server = TestServer::start(common::production().with_sandboxes(2, 0)).await;
    let volume = server.new_volume(dataset()).await;
    let body = attach(&volume);
    let (a, _) = create(&server, &body).await;
    let (b, _) = create(&server, &body).await;
    let wrote = server.run_command(&b, "echo b > /data/keep.txt").await;
    assert_eq!(wrote["exit_code"], 0);
    let pristine = look(&server, &a).await;

    server.crash();
    server.launch().await;

    assert_eq!(look(&server, &a).await, pristine, "a's view survived");
    let kept = server.run_command(&b, "cat /data/keep.txt").await;
    assert_eq!(kept["stdout"], "b\n", "b's own write survived: {kept}");
    let (c, shared) = create(&server, &body).await;
    assert_eq!(
        shared["source"], "layer",
        "re-adopted, not rebuilt: {shared}"
    );
    assert_eq!(look(&server, &c).await, pristine);
    let layers = layers(&server).await;
    assert_eq!(layers["layers"], 1, "{layers}");
    assert_eq!(layers["in_use"], 1, "{layers}");
}

#[tokio::test]
async fn copy_mode_unpacks_for_every_sandbox() {
    let _suite = common::suite(module_path!()).await;
    if !supported("copy_mode_unpacks_for_every_sandbox") {
        return;
    }
    let server = TestServer::start(
        common::production()
            .with_sandboxes(2, 0)
            .with_setting("hydrate.mode", "copy"),
    )
    .await;
    let health = server.get_json("/health").await;
    assert_eq!(health["hydrate"]["mode"], "copy", "{health}");
    assert!(health["hydrate"]["layers"].is_null(), "{health}");
    let volume = server.new_volume(dataset()).await;
    for _ in 0..2 {
        let (id, status) = create(&server, &attach(&volume)).await;
        assert_eq!(status["source"], "hydrated", "{status}");
        assert!(look(&server, &id).await.starts_with("1000\n"));
    }
}

//! Sandbox snapshots (the root filesystem, in object storage) and restore
//! under the same id: files come back as they were at each snapshot, even
//! after a kill; processes start afresh; other owners see nothing.

use crate::common::{self, sandboxes_supported, Api, Reply, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn snapshot(server: &TestServer, id: &str) -> Value {
    let (status, snap) = server
        .post(&format!("/sandboxes/{id}/snapshot"))
        .reply()
        .await;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    snap
}

async fn restore(server: &TestServer, id: &str, snapshot_id: Option<&str>) -> Value {
    let path = match snapshot_id {
        Some(s) => format!("/sandboxes/{id}/restore?snapshot_id={s}"),
        None => format!("/sandboxes/{id}/restore"),
    };
    let (status, restored) = server.post(&path).reply().await;
    assert_eq!(status, StatusCode::OK, "{restored}");
    assert_eq!(restored["sandbox_id"], id);
    restored
}

#[tokio::test]
async fn restore_brings_back_each_snapshots_files_under_the_same_id() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("restore_brings_back_each_snapshots_files_under_the_same_id") {
        return;
    }
    let server = TestServer::start(
        common::production()
            .with_sandboxes(1, 0)
            .with_setting("sandboxes.max_snapshots", "2"),
    )
    .await;
    let id = server.new_sandbox(json!({ "timeout": 600 })).await;
    let wrote = server
        .run_command_as(
            &id,
            "root",
            "echo v1 > /home/user/notes.txt && echo conf > /etc/custom.conf && ln -s notes.txt /home/user/link",
        )
        .await;
    assert_eq!(wrote["exit_code"], 0, "{wrote}");
    let first = snapshot(&server, &id).await;
    assert_eq!(first["sandbox_id"], id.as_str());
    assert_eq!(first["source"], "manual");
    assert!(
        first["created_at"].as_str().unwrap().ends_with("+00:00"),
        "{first}"
    );
    assert!(
        first["blob_key"]
            .as_str()
            .unwrap()
            .starts_with("snapshots/"),
        "{first}"
    );
    assert!(first["size_bytes"].as_i64().unwrap() > 1 << 20, "{first}");
    assert!(first["mem_size_bytes"].is_null(), "memory is not kept");

    server
        .run_command_as(
            &id,
            "root",
            "echo v2 > /home/user/notes.txt && rm /etc/custom.conf",
        )
        .await;
    let second = snapshot(&server, &id).await;
    // Each can be as large as the disk: a sandbox keeps a bounded number.
    let (status, body) = server
        .post(&format!("/sandboxes/{id}/snapshot"))
        .reply()
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("delete one"),
        "{body}"
    );
    let listed = server.get_json(&format!("/sandboxes/{id}/snapshots")).await;
    let ids: Vec<&str> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["snapshot_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            second["snapshot_id"].as_str().unwrap(),
            first["snapshot_id"].as_str().unwrap()
        ]
    );

    // Back to the first: its files, a fresh machine (the sleeper is gone).
    let (status, sleeper) = server
        .command(&id, json!({ "cmd": "sleep 600", "background": true }))
        .await;
    assert_eq!(status, StatusCode::OK, "{sleeper}");
    restore(&server, &id, first["snapshot_id"].as_str()).await;
    let info = server.get_json(&format!("/sandboxes/{id}")).await;
    assert_eq!(info["state"], "running", "{info}");
    let seen = server
        .run_command(&id, "cat /home/user/notes.txt /etc/custom.conf; readlink /home/user/link; pgrep -c sleep || true")
        .await;
    assert_eq!(seen["stdout"], "v1\nconf\nnotes.txt\n0\n", "{seen}");

    // Without an id: the newest.
    restore(&server, &id, None).await;
    let seen = server
        .run_command(
            &id,
            "cat /home/user/notes.txt; ls /etc/custom.conf 2>&1 | grep -c 'No such'",
        )
        .await;
    assert_eq!(seen["stdout"], "v2\n1\n", "{seen}");

    // A killed sandbox comes back under its id; its snapshots outlive it.
    let (status, _) = server.delete(&format!("/sandboxes/{id}")).reply().await;
    assert!(status.is_success());
    let listed = server
        .get_json(&format!("/snapshots?sandbox_id={id}"))
        .await;
    assert_eq!(listed["snapshots"].as_array().unwrap().len(), 2, "{listed}");
    restore(&server, &id, first["snapshot_id"].as_str()).await;
    let seen = server.run_command(&id, "cat /home/user/notes.txt").await;
    assert_eq!(seen["stdout"], "v1\n");

    // Another owner reaches none of it.
    let bob = server.create_key("bob");
    for request in [
        server
            .http
            .get(server.url(&format!("/sandboxes/{id}/snapshots"))),
        server
            .http
            .post(server.url(&format!("/sandboxes/{id}/restore"))),
        server
            .http
            .post(server.url(&format!("/sandboxes/{id}/snapshot"))),
        server.http.delete(server.url(&format!(
            "/sandboxes/{id}/snapshots/{}",
            first["snapshot_id"].as_str().unwrap()
        ))),
    ] {
        let (status, body) = request.bearer_auth(&bob).reply().await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    let (status, listed) = server
        .http
        .get(server.url("/snapshots"))
        .bearer_auth(&bob)
        .reply()
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["snapshots"], json!([]));

    // Delete is idempotent; a deleted snapshot cannot be restored.
    let first_id = first["snapshot_id"].as_str().unwrap();
    for _ in 0..2 {
        let (status, _) = server
            .delete(&format!("/sandboxes/{id}/snapshots/{first_id}"))
            .reply()
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (status, body) = server
        .post(&format!("/sandboxes/{id}/restore?snapshot_id={first_id}"))
        .reply()
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let second_id = second["snapshot_id"].as_str().unwrap();
    let (status, _) = server
        .delete(&format!("/sandboxes/{id}/snapshots/{second_id}"))
        .reply()
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let listed = server.get_json("/snapshots").await;
    assert_eq!(listed["snapshots"], json!([]), "{listed}");
    // Paused sandboxes cannot be snapshotted (their agent is frozen).
    let (status, _) = server.post(&format!("/sandboxes/{id}/pause")).reply().await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server
        .post(&format!("/sandboxes/{id}/snapshot"))
        .reply()
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

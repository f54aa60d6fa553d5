//! Pause and resume, and per-sandbox metrics. A paused sandbox keeps its
//! processes (and their memory) and its files, its deadline stops, and no
//! call reaches it until it resumes; metrics move when a process burns CPU.

use crate::common::{self, sandboxes_supported, Api, Reply, TestServer};
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

async fn post(server: &TestServer, path: &str) -> (StatusCode, Value) {
    server.post(path).reply().await
}

fn end_at(sandbox: &Value) -> DateTime<Utc> {
    sandbox["end_at"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn pause_keeps_processes_and_files_and_holds_the_deadline() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("pause_keeps_processes_and_files_and_holds_the_deadline") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(2, 0)).await;
    let id = server.new_sandbox(json!({ "timeout": 300 })).await;
    // A process that keeps a value only in its memory, and a file.
    let (status, started) = server
        .command(
            &id,
            json!({ "cmd": "echo kept > /tmp/file; x=$RANDOM$RANDOM; echo $x > /tmp/x; \
                             while true; do echo $x > /tmp/seen; sleep 0.2; done",
                    "background": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    let pid = started["pid"].as_u64().unwrap();
    let before = server.get_json(&format!("/sandboxes/{id}")).await;

    let (status, body) = post(&server, &format!("/sandboxes/{id}/pause")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let paused = server.get_json(&format!("/sandboxes/{id}")).await;
    assert_eq!(paused["state"], "paused", "{paused}");
    let (status, body) = post(&server, &format!("/sandboxes/{id}/pause")).await;
    assert_eq!(status, StatusCode::CONFLICT, "already paused: {body}");
    // Nothing reaches a paused sandbox: commands, files, write-back.
    for (status, body) in [
        server.command(&id, json!({ "cmd": "true" })).await,
        server
            .get(&format!("/sandboxes/{id}/files?path=/tmp/file"))
            .reply()
            .await,
        post(
            &server,
            &format!("/sandboxes/{id}/volumes/snapshot?path=/tmp"),
        )
        .await,
    ] {
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("paused"),
            "{body}"
        );
    }
    let listed = server.sandbox_ids("/sandboxes?state=paused").await;
    assert_eq!(listed, vec![id.clone()]);
    assert!(server
        .sandbox_ids("/sandboxes?state=running")
        .await
        .is_empty());
    assert_eq!(server.sandbox_ids("/sandboxes").await, vec![id.clone()]);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, body) = post(&server, &format!("/sandboxes/{id}/resume")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let resumed = server.get_json(&format!("/sandboxes/{id}")).await;
    assert_eq!(resumed["state"], "running");
    let moved = (end_at(&resumed) - end_at(&before)).num_milliseconds();
    assert!(
        moved >= 2000,
        "the deadline moved on by the pause: {moved} ms"
    );

    // The same process, with the value it held only in memory.
    let check = server
        .run_command(
            &id,
            "sleep 0.5; cat /tmp/file; [ \"$(cat /tmp/x)\" = \"$(cat /tmp/seen)\" ] && echo same",
        )
        .await;
    assert_eq!(check["stdout"], "kept\nsame\n", "{check}");
    let processes = server.get_json(&format!("/sandboxes/{id}/commands")).await;
    assert!(
        processes.to_string().contains(&format!("\"pid\":{pid}")),
        "{processes}"
    );
    // Resuming a running sandbox changes nothing; a killed one is gone.
    let (status, _) = post(&server, &format!("/sandboxes/{id}/resume")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = post(&server, &format!("/sandboxes/{id}/pause")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.delete(&format!("/sandboxes/{id}")).reply().await;
    assert!(status.is_success(), "a paused sandbox can be killed");
    let (status, _) = post(&server, &format!("/sandboxes/{id}/resume")).await;
    assert_eq!(status, StatusCode::GONE);
    common::eventually(
        "the paused sandbox's machine is gone",
        Duration::from_secs(20),
        || async { !server.sandbox_dirs().iter().any(|dir| dir.ends_with(&id)) },
    )
    .await;
}

#[tokio::test]
async fn metrics_move_when_a_process_burns_cpu() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("metrics_move_when_a_process_burns_cpu") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(1, 0)).await;
    let id = server.new_sandbox(json!({})).await;
    let path = format!("/sandboxes/{id}/metrics");
    let idle = server.get_json(&path).await;
    let idle = idle.as_array().expect("an array").last().unwrap().clone();
    for field in ["cpu_usage_percent", "memory_usage_mb", "disk_usage_mb"] {
        assert!(idle[field].is_number(), "{field}: {idle}");
    }
    // Python 3.10's fromisoformat cannot read a `Z`.
    assert!(
        idle["timestamp"].as_str().unwrap().ends_with("+00:00"),
        "{idle}"
    );
    assert!(idle["memory_usage_mb"].as_f64().unwrap() > 0.0, "{idle}");
    assert!(idle["disk_usage_mb"].as_f64().unwrap() > 0.0, "{idle}");

    let (status, _) = server
        .command(
            &id,
            json!({ "cmd": "while :; do :; done", "background": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy = server.get_json(&path).await;
    let series = busy.as_array().unwrap();
    assert!(series.len() >= 2, "samples are kept: {busy}");
    let busy = series.last().unwrap();
    let (idle_cpu, busy_cpu) = (
        idle["cpu_usage_percent"].as_f64().unwrap(),
        busy["cpu_usage_percent"].as_f64().unwrap(),
    );
    assert!(
        busy_cpu > 30.0 && busy_cpu > idle_cpu + 20.0,
        "a spinning process shows: idle {idle_cpu}%, busy {busy_cpu}%"
    );
    // A time range filters; a bad one is a 400 with a message.
    let (status, none) = server
        .get(&format!(
            "/sandboxes/{id}/metrics?end=2000-01-01T00:00:00%2B00:00"
        ))
        .reply()
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(none, json!([]));
    let (status, body) = server
        .get(&format!("/sandboxes/{id}/metrics?start=yesterday"))
        .reply()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = server.get("/sandboxes/sbx-nope/metrics").reply().await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

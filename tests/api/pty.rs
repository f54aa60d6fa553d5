//! Interactive terminals: a real pseudo-terminal (`tty` names a
//! `/dev/pts/N`, `stty` sees the size), input, resize, exit code, kill.

use crate::common::{self, sandboxes_supported, Reply, TestServer};
use base64::Engine;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

async fn open_pty(server: &TestServer, id: &str, cols: u16, rows: u16) -> u64 {
    let (status, started) = server
        .post(&format!("/sandboxes/{id}/pty"))
        .json(&json!({ "size": { "cols": cols, "rows": rows }, "user": "user", "timeout": 60 }))
        .reply()
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    started["pid"].as_u64().unwrap()
}

async fn type_in(server: &TestServer, id: &str, pid: u64, text: &str) {
    let (status, body) = server
        .post(&format!("/sandboxes/{id}/pty/{pid}/stdin"))
        .json(&json!({ "data": text }))
        .reply()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Everything the terminal prints until it exits, and the exit code.
async fn read_until_exit(server: &TestServer, id: &str, pid: u64) -> (String, i64) {
    let response = server
        .get(&format!("/sandboxes/{id}/pty/{pid}/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let (mut text, mut event) = (String::new(), String::new());
    let mut output = Vec::new();
    let read = async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = text.find('\n') {
                let line: String = text.drain(..=end).collect();
                let line = line.trim_end();
                if let Some(name) = line.strip_prefix("event: ") {
                    event = name.to_string();
                } else if let Some(data) = line.strip_prefix("data: ") {
                    let data: Value = serde_json::from_str(data).unwrap();
                    match event.as_str() {
                        "data" => output.extend(
                            base64::engine::general_purpose::STANDARD
                                .decode(data["data"].as_str().unwrap())
                                .unwrap(),
                        ),
                        "exit" => return data["exit_code"].as_i64().unwrap(),
                        other => panic!("unexpected event {other}: {data}"),
                    }
                }
            }
        }
        panic!("the stream ended without an exit event");
    };
    let exit_code = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the terminal exits");
    (String::from_utf8_lossy(&output).into_owned(), exit_code)
}

#[tokio::test]
async fn a_pty_is_a_real_terminal_with_input_resize_and_kill() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("a_pty_is_a_real_terminal_with_input_resize_and_kill") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(1, 0)).await;
    let id = crate::common::Api::new_sandbox(&server, json!({})).await;

    // Typed before anyone listens: the first listener still sees it all.
    let pid = open_pty(&server, &id, 80, 24).await;
    type_in(&server, &id, pid, "tty; stty size; id -un; exit 3\n").await;
    let (seen, exit_code) = read_until_exit(&server, &id, pid).await;
    assert!(seen.contains("/dev/pts/"), "{seen}");
    assert!(seen.contains("24 80"), "{seen}");
    assert!(seen.contains("user"), "{seen}");
    assert_eq!(exit_code, 3, "{seen}");

    let pid = open_pty(&server, &id, 80, 24).await;
    let (status, body) = server
        .patch(&format!("/sandboxes/{id}/pty/{pid}"))
        .json(&json!({ "size": { "cols": 132, "rows": 40 } }))
        .reply()
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    type_in(&server, &id, pid, "stty size; exit\n").await;
    let (seen, exit_code) = read_until_exit(&server, &id, pid).await;
    assert!(seen.contains("40 132"), "{seen}");
    assert_eq!(exit_code, 0);

    // Kill, then again: the second finds nothing.
    let pid = open_pty(&server, &id, 80, 24).await;
    for expected in [true, false] {
        let (status, body) = server
            .delete(&format!("/sandboxes/{id}/pty/{pid}"))
            .reply()
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["killed"], expected, "{body}");
    }
    // Hostile sizes and pids get a 400, unknown terminals a 404.
    let (status, body) = server
        .post(&format!("/sandboxes/{id}/pty"))
        .json(&json!({ "size": { "cols": 0, "rows": 65535 } }))
        .reply()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = server
        .get(&format!("/sandboxes/{id}/pty/abc/stream"))
        .reply()
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = server
        .post(&format!("/sandboxes/{id}/pty/999999/stdin"))
        .json(&json!({ "data": "x" }))
        .reply()
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

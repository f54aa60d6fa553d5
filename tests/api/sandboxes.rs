//! Sandboxes, commands and files against the real binary (Postgres + Garage
//! behind it), on the runtime `SANDBOX_TEST_RUNTIME` names (namespace by
//! default; scripts/test.sh runs this suite again with microvm).

use crate::common::{self, sandboxes_supported, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

async fn server(base_pool: usize) -> TestServer {
    TestServer::start(common::production().with_sandboxes(base_pool, 0)).await
}

async fn create(server: &TestServer, body: Value) -> Value {
    let response = server.post("/sandboxes").json(&body).send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

async fn run(server: &TestServer, id: &str, cmd: &str) -> Value {
    let response = server
        .post(&format!("/sandboxes/{id}/commands"))
        .json(&json!({ "cmd": cmd, "background": false, "user": "user", "timeout": 60 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

async fn status_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn lifecycle_listing_and_kill() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("lifecycle_listing_and_kill") {
        return;
    }
    let server = server(2).await;
    let health = server.health().await;
    assert_eq!(health["runtime"]["kind"], common::test_runtime().as_str());
    assert_eq!(health["runtime"]["status"], "ok");
    let sandbox = create(&server, json!({ "template": "base", "timeout": 120, "metadata": { "job": "a" }, "secure": true, "lifecycle": { "on_timeout": "kill" } })).await;
    let id = sandbox["sandbox_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("sbx-") && id.len() == 12, "{id}");
    assert_eq!(sandbox["template_id"], "tpl-base");
    assert_eq!(sandbox["state"], "running");
    assert_eq!(sandbox["metadata"], json!({ "job": "a" }));
    assert_eq!(
        sandbox["lifecycle"],
        json!({ "on_timeout": "kill" }),
        "unknown fields are kept"
    );
    assert!(sandbox["started_at"].as_str().unwrap().ends_with('Z'));
    assert!(sandbox["end_at"].as_str().unwrap().ends_with('Z'));

    let fetched: Value = server
        .get(&format!("/sandboxes/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["sandbox_id"], id);
    let status: Value = server
        .get(&format!("/sandboxes/{id}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status, json!({ "is_running": true }));

    // Timeout 0 means the default deadline (no deadline at all only where
    // the operator allows it: sandboxes.allow_no_timeout).
    let (code, body) = status_of(
        server
            .patch(&format!("/sandboxes/{id}/timeout"))
            .json(&json!({ "timeout": 0 }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let fetched: Value = server
        .get(&format!("/sandboxes/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["timeout"], 300, "{fetched}");
    assert_ne!(fetched["end_at"], Value::Null, "{fetched}");

    // Another owner sees nothing.
    let bob = server.create_key("bob");
    let foreign = server
        .http
        .get(server.url(&format!("/sandboxes/{id}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), StatusCode::NOT_FOUND);
    let foreign = server
        .http
        .delete(server.url(&format!("/sandboxes/{id}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), StatusCode::NOT_FOUND);

    // Pagination over three sandboxes, one per page.
    let second = create(&server, json!({ "template": "base" })).await["sandbox_id"]
        .as_str()
        .unwrap()
        .to_string();
    let third = create(&server, json!({})).await["sandbox_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = "/sandboxes?limit=1".to_string();
        if let Some(t) = &token {
            url.push_str(&format!("&next_token={t}"));
        }
        let page: Value = server.get(&url).send().await.unwrap().json().await.unwrap();
        seen.extend(
            page["sandboxes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["sandbox_id"].as_str().unwrap().to_string()),
        );
        match page["next_token"].as_str() {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec![third.clone(), second.clone(), id.clone()],
        "newest first, each once"
    );

    // Async kill (what sbx.kill() sends), then sync kill of an already killed one.
    let (code, body) = status_of(
        server
            .delete(&format!("/sandboxes/{id}?async=true"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (code, body),
        (StatusCode::ACCEPTED, json!({ "queued": true }))
    );
    for _ in 0..50 {
        let s: Value = server
            .get(&format!("/sandboxes/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if s["state"] == "killed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = status_of(
        server
            .delete(&format!("/sandboxes/{id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((code, body), (StatusCode::OK, json!({ "killed": false })));
    let (code, body) = status_of(
        server
            .post(&format!("/sandboxes/{id}/commands"))
            .json(&json!({ "cmd": "true" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::GONE, "{body}");
    assert!(body["message"].as_str().unwrap().contains("killed"));

    // Killed sandboxes are hidden unless asked for.
    let listed: Value = server
        .get("/sandboxes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandbox_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![third.as_str(), second.as_str()]);
    let all: Value = server
        .get("/sandboxes?state=all")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["sandboxes"].as_array().unwrap().len(), 3);
    let killed: Value = server
        .get("/sandboxes?state=killed")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(killed["sandboxes"][0]["sandbox_id"], id);

    let (code, body) = status_of(
        server
            .post("/sandboxes/kill-many")
            .json(&json!({ "sandbox_ids": [second, third, "sbx-nothere"] }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["results"][&second], json!({ "killed": true }));
    assert!(body["results"]["sbx-nothere"]["error"].is_string());

    // Unknown template, and a request-level resources field.
    let (code, _) = status_of(
        server
            .post("/sandboxes")
            .json(&json!({ "template": "nope" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, _) = status_of(
        server
            .post("/sandboxes")
            .json(&json!({ "resources": { "vcpus": 8 } }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn deadline_kills_and_idempotent_create() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("deadline_kills_and_idempotent_create") {
        return;
    }
    let server = server(1).await;
    let sandbox = create(&server, json!({ "template": "base", "timeout": 1 })).await;
    let id = sandbox["sandbox_id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let fetched: Value = server
        .get(&format!("/sandboxes/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["state"], "killed", "auto-killed at its deadline");
    assert!(
        !server.sandbox_state_dir().join(id).exists(),
        "and destroyed"
    );

    // Same key twice → one sandbox; same key, other body → 422.
    let body = json!({ "template": "base", "timeout": 60 });
    let first = server
        .post("/sandboxes")
        .header("idempotency-key", "k-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let again = server
        .post("/sandboxes")
        .header("idempotency-key", "k-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(again.status().is_success());
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["sandbox_id"], first["sandbox_id"]);
    let other = server
        .post("/sandboxes")
        .header("idempotency-key", "k-1")
        .json(&json!({ "template": "base", "timeout": 61 }))
        .send()
        .await
        .unwrap();
    let (code, body) = status_of(other).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "idempotency_key_reused");
    let all: Value = server
        .get("/sandboxes")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(all["sandboxes"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn commands_api() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("commands_api") {
        return;
    }
    let server = server(1).await;
    let id = create(&server, json!({ "envs": { "GREETING": "hi" } })).await["sandbox_id"]
        .as_str()
        .unwrap()
        .to_string();

    let result = run(&server, &id, "id -un; pwd; echo $GREETING").await;
    assert_eq!(result["stdout"], "user\n/home/user\nhi\n");
    assert_eq!(result["exit_code"], 0);
    let result = run(&server, &id, "echo oops >&2; exit 3").await;
    assert_eq!(
        (
            result["stderr"].as_str().unwrap(),
            result["exit_code"].as_i64().unwrap()
        ),
        ("oops\n", 3)
    );
    let root: Value = server
        .post(&format!("/sandboxes/{id}/commands"))
        .json(&json!({ "cmd": "id -u; pwd", "user": "root", "cwd": "/tmp", "envs": { "X": "1" } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(root["stdout"], "0\n/tmp\n");
    let timed: Value = server
        .post(&format!("/sandboxes/{id}/commands"))
        .json(&json!({ "cmd": "sleep 30", "timeout": 1 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(timed["exit_code"], 124);

    // Background, stdin, list, wait.
    let started: Value = server
        .post(&format!("/sandboxes/{id}/commands"))
        .json(&json!({ "cmd": "read line; echo got:$line", "background": true, "stdin": true }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pid = started["pid"].as_u64().unwrap();
    let listed: Value = server
        .get(&format!("/sandboxes/{id}/commands"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["pid"] == pid && p["cmd"].as_str().unwrap().contains("read line")));
    let (code, _) = status_of(
        server
            .post(&format!("/sandboxes/{id}/commands/{pid}/stdin"))
            .json(&json!({ "data": "hello\n" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let waited: Value = server
        .get(&format!("/sandboxes/{id}/commands/{pid}/wait"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(waited["stdout"], "got:hello\n");

    // Kill a background process; a bad pid is a 400.
    let sleeper: Value = server
        .post(&format!("/sandboxes/{id}/commands"))
        .json(&json!({ "cmd": "sleep 300", "background": true }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let pid = sleeper["pid"].as_u64().unwrap();
    let killed: Value = server
        .delete(&format!("/sandboxes/{id}/commands/{pid}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(killed, json!({ "killed": true }));
    let (code, body) = status_of(
        server
            .delete(&format!("/sandboxes/{id}/commands/abc"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(body["message"].is_string());

    // SSE: both keys, one line per event, exit last.
    let response = server
        .http
        .post(server.url(&format!("/sandboxes/{id}/commands/stream")))
        .header("x-api-key", &server.api_key)
        .json(&json!({ "cmd": "echo one; echo two >&2; printf three", "stream": true, "user": "user", "timeout": 60 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.unwrap();
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let event = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((event.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect();
    assert!(
        events.contains(&(
            "stdout".into(),
            json!({ "type": "stdout", "stream": "stdout", "data": "one" })
        )),
        "{text}"
    );
    assert!(
        events.contains(&(
            "stderr".into(),
            json!({ "type": "stderr", "stream": "stderr", "data": "two" })
        )),
        "{text}"
    );
    assert!(
        events.contains(&(
            "stdout".into(),
            json!({ "type": "stdout", "stream": "stdout", "data": "three" })
        )),
        "{text}"
    );
    assert_eq!(events.last().unwrap().0, "exit");
    assert_eq!(events.last().unwrap().1["exit_code"], 0);
}

#[tokio::test]
async fn files_api() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("files_api") {
        return;
    }
    let server = server(1).await;
    let id = create(&server, json!({})).await["sandbox_id"]
        .as_str()
        .unwrap()
        .to_string();
    let files = |suffix: &str| format!("/sandboxes/{id}/files{suffix}");

    let written: Value = server
        .post(&files(""))
        .json(&json!({ "path": "/home/user/a/b.txt", "username": "user", "data": "hello" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(written, json!({ "path": "/home/user/a/b.txt", "size": 5 }));
    let read = server
        .get(&files("?path=/home/user/a/b.txt&username=user"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.text().await.unwrap(), "hello");
    let owner = run(&server, &id, "stat -c %U /home/user/a/b.txt").await;
    assert_eq!(owner["stdout"], "user\n", "written as the requested user");

    let big: Vec<u8> = common::noise(3 << 20, 5);
    let put: Value = server
        .put(&files("/raw?path=/tmp/big.bin"))
        .body(big.clone())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(put["size"], big.len());
    let got = server
        .get(&files("/raw?path=/tmp/big.bin"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(common::sha256_hex(&got), common::sha256_hex(&big));
    let (code, _) = status_of(server.put(&files("/raw")).body("x").send().await.unwrap()).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "path is required");

    let batch: Value = server
        .post(&files("/batch"))
        .json(&json!({ "files": [{ "path": "/home/user/z", "data": "1" }, { "path": "/home/user/y", "data": "22" }, { "path": "/home/user/x", "data": "333" }], "username": "user" }))
        .send().await.unwrap().json().await.unwrap();
    let paths: Vec<&str> = batch
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        vec!["/home/user/z", "/home/user/y", "/home/user/x"],
        "input order"
    );

    let listed: Value = server
        .get(&files("/list?path=/home/user/a&depth=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed,
        json!([{ "name": "b.txt", "path": "/home/user/a/b.txt", "type": "file", "size": 5, "mode": listed[0]["mode"], "modified": listed[0]["modified"] }])
    );
    let exists: Value = server
        .get(&files("/exists?path=/home/user/a/b.txt"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(exists, json!({ "exists": true }));
    let info: Value = server
        .get(&files("/info?path=/home/user/a"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (info["type"].as_str(), info["size"].as_u64()),
        (Some("dir"), Some(0))
    );
    let (code, _) = status_of(
        server
            .get(&files("/info?path=/home/user/missing"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    let renamed: Value = server.patch(&files("")).json(&json!({ "old_path": "/home/user/a/b.txt", "new_path": "/home/user/c.txt", "username": "user" })).send().await.unwrap().json().await.unwrap();
    assert_eq!(renamed["path"], "/home/user/c.txt");
    let made: Value = server
        .post(&files("/mkdir"))
        .json(&json!({ "path": "/home/user/new/deep", "username": "user" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(made, json!({ "created": true }));
    let again: Value = server
        .post(&files("/mkdir"))
        .json(&json!({ "path": "/home/user/new/deep" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again, json!({ "created": false }));
    let (code, _) = status_of(
        server
            .delete(&files("?path=/home/user/new"))
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let gone: Value = server
        .get(&files("/exists?path=/home/user/new"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(gone, json!({ "exists": false }));
    let (code, _) = status_of(
        server
            .post(&files("/watch"))
            .json(&json!({ "path": "/home/user", "recursive": true }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test]
async fn sandboxes_are_isolated() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("sandboxes_are_isolated") {
        return;
    }
    let server = server(2).await;
    let a = create(&server, json!({})).await["sandbox_id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = create(&server, json!({})).await["sandbox_id"]
        .as_str()
        .unwrap()
        .to_string();

    run(
        &server,
        &a,
        "echo secret > /tmp/a.txt; echo x > /home/user/a.txt",
    )
    .await;
    let in_b = run(&server, &b, "ls /tmp/a.txt /home/user/a.txt 2>&1; true").await;
    assert!(
        in_b["stdout"].as_str().unwrap().contains("No such file"),
        "{in_b}"
    );

    // A's process table does not show B's processes.
    let marker: Value = server
        .post(&format!("/sandboxes/{b}/commands"))
        .json(&json!({ "cmd": "sleep 123.456", "background": true }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(marker["pid"].is_u64());
    let ps = run(
        &server,
        &a,
        "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '",
    )
    .await;
    assert!(!ps["stdout"].as_str().unwrap().contains("123.456"), "{ps}");

    // No network path to the host's loopback services or to B.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = run(
        &server,
        &a,
        &format!(
            "timeout 3 bash -c 'echo > /dev/tcp/127.0.0.1/{port}' && echo reached || echo blocked"
        ),
    )
    .await;
    assert_eq!(probe["stdout"], "blocked\n", "{probe}");
    // Namespace sandboxes have loopback only; a microVM has its own NIC
    // on a private user-mode network (microvm::sandboxes_are_real_isolated_vms checks it).
    if !common::is_microvm() {
        let interfaces = run(
            &server,
            &a,
            "ls /sys/class/net 2>/dev/null || cat /proc/net/dev",
        )
        .await;
        assert!(
            !interfaces["stdout"].as_str().unwrap().contains("eth"),
            "{interfaces}"
        );
    }
    drop(listener);
}

/// Everything a sandbox leaves on the host: state dirs, mounts, cgroups,
/// launcher processes.
fn host_leftovers(server: &TestServer) -> Vec<String> {
    let state = server.sandbox_state_dir();
    let mut found: Vec<String> = server
        .sandbox_leftovers()
        .iter()
        .map(|path| format!("state dir {}", path.display()))
        .collect();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    found.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&*state.to_string_lossy()))
            .map(|l| format!("mount {l}")),
    );
    // Loop devices still backed by a sandbox's disk image.
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let backing =
            std::fs::read_to_string(entry.path().join("loop/backing_file")).unwrap_or_default();
        if backing.contains(&*state.to_string_lossy()) {
            found.push(format!(
                "loop device {} on {}",
                entry.path().display(),
                backing.trim()
            ));
        }
    }
    for controller in ["memory", "pids", "cpu", "devices", ""] {
        let dir = std::path::Path::new("/sys/fs/cgroup")
            .join(controller)
            .join("sandbox-manager");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("sbx-") && entry.path().is_dir() && state_owned(server, &name) {
                found.push(format!("cgroup {}", entry.path().display()));
            }
        }
    }
    found
}

/// Cgroups are named by sandbox id; count only this server's sandboxes.
fn state_owned(server: &TestServer, id: &str) -> bool {
    let log = std::fs::read_to_string(server.log_path()).unwrap_or_default();
    log.contains(id)
}

#[tokio::test]
async fn fifty_create_kill_cycles_leave_nothing_behind() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("fifty_create_kill_cycles_leave_nothing_behind") {
        return;
    }
    let mut server = server(1).await;
    for _ in 0..50 {
        let id = create(&server, json!({})).await["sandbox_id"]
            .as_str()
            .unwrap()
            .to_string();
        let (code, _) = status_of(
            server
                .delete(&format!("/sandboxes/{id}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(code, StatusCode::OK);
    }
    // Stop the server gracefully so its warm pool is destroyed too.
    server.stop_gracefully();
    let leftovers = host_leftovers(&server);
    assert!(leftovers.is_empty(), "left behind: {leftovers:#?}");
}

#[tokio::test]
async fn restart_readopts_live_sandboxes_and_buries_dead_ones() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("restart_readopts_live_sandboxes_and_buries_dead_ones") {
        return;
    }
    let mut server = server(0).await;
    let alive = create(&server, json!({ "timeout": 600 })).await["sandbox_id"]
        .as_str()
        .unwrap()
        .to_string();
    let doomed = create(&server, json!({})).await["sandbox_id"]
        .as_str()
        .unwrap()
        .to_string();
    run(&server, &alive, "echo kept > /home/user/state").await;
    server.crash();
    // While the server is down, one sandbox dies.
    // launcher.pid (namespace) or vm.pid (QEMU) holds "PID STARTTIME".
    let pid_file = std::fs::read_to_string(
        server
            .sandbox_state_dir()
            .join(&doomed)
            .join(common::machine_pid_file()),
    )
    .unwrap();
    let pid = pid_file.split_whitespace().next().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-9", pid])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.launch().await;

    let kept = run(&server, &alive, "cat /home/user/state").await;
    assert_eq!(kept["stdout"], "kept\n");
    let dead: Value = server
        .get(&format!("/sandboxes/{doomed}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dead["state"], "killed");
    assert!(!server.sandbox_state_dir().join(&doomed).exists());
}

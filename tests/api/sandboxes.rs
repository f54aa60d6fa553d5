//! Sandboxes, commands and files against the real binary (Postgres + Garage
//! behind it), on the runtime `SANDBOX_TEST_RUNTIME` names (namespace by
//! default; scripts/test.sh runs this suite again with microvm).

use crate::common::{self, sandboxes_supported, Api, Reply, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

async fn server(base_pool: usize) -> TestServer {
    TestServer::start(common::production().with_sandboxes(base_pool, 0)).await
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
    let (status, sandbox) = server.create_sandbox(json!({ "template": "base", "timeout": 120, "metadata": { "job": "a" }, "secure": true, "lifecycle": { "on_timeout": "kill" } })).await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
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

    let fetched: Value = server.get_json(&format!("/sandboxes/{id}")).await;
    assert_eq!(fetched["sandbox_id"], id);
    let status: Value = server.get_json(&format!("/sandboxes/{id}/status")).await;
    assert_eq!(status, json!({ "is_running": true }));

    // Timeout 0 means the default deadline (no deadline at all only where
    // the operator allows it: sandboxes.allow_no_timeout).
    let (code, body) = server
        .patch(&format!("/sandboxes/{id}/timeout"))
        .json(&json!({ "timeout": 0 }))
        .reply()
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let fetched: Value = server.get_json(&format!("/sandboxes/{id}")).await;
    assert_eq!(fetched["timeout"], 300, "{fetched}");
    assert_ne!(fetched["end_at"], Value::Null, "{fetched}");

    // Another owner sees nothing.
    let bob = server.create_key("bob");
    for foreign in [
        server.http.get(server.url(&format!("/sandboxes/{id}"))),
        server.http.delete(server.url(&format!("/sandboxes/{id}"))),
    ] {
        let (code, _) = foreign.bearer_auth(&bob).reply().await;
        assert_eq!(code, StatusCode::NOT_FOUND);
    }

    // Pagination over three sandboxes, one per page.
    let second = server.new_sandbox(json!({ "template": "base" })).await;
    let third = server.new_sandbox(json!({})).await;
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = "/sandboxes?limit=1".to_string();
        if let Some(t) = &token {
            url.push_str(&format!("&next_token={t}"));
        }
        let page: Value = server.get_json(&url).await;
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
    let (code, body) = server
        .delete(&format!("/sandboxes/{id}?async=true"))
        .reply()
        .await;
    assert_eq!(
        (code, body),
        (StatusCode::ACCEPTED, json!({ "queued": true }))
    );
    for _ in 0..50 {
        let s: Value = server.get_json(&format!("/sandboxes/{id}")).await;
        if s["state"] == "killed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = server.delete(&format!("/sandboxes/{id}")).reply().await;
    assert_eq!((code, body), (StatusCode::OK, json!({ "killed": false })));
    let (code, body) = server.command(&id, json!({ "cmd": "true" })).await;
    assert_eq!(code, StatusCode::GONE, "{body}");
    assert!(body["message"].as_str().unwrap().contains("killed"));

    // Killed sandboxes are hidden unless asked for.
    let ids = server.sandbox_ids("/sandboxes").await;
    assert_eq!(ids, vec![third.clone(), second.clone()]);
    assert_eq!(server.sandbox_ids("/sandboxes?state=all").await.len(), 3);
    let killed = server.sandbox_ids("/sandboxes?state=killed").await;
    assert_eq!(killed[0], id);

    let (code, body) = server
        .post("/sandboxes/kill-many")
        .json(&json!({ "sandbox_ids": [second, third, "sbx-nothere"] }))
        .reply()
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(body["results"][&second], json!({ "killed": true }));
    assert!(body["results"]["sbx-nothere"]["error"].is_string());

    // Unknown template, and a request-level resources field.
    let (code, _) = server.create_sandbox(json!({ "template": "nope" })).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, _) = server
        .create_sandbox(json!({ "resources": { "vcpus": 8 } }))
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
    let (status, sandbox) = server
        .create_sandbox(json!({ "template": "base", "timeout": 1 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    let id = sandbox["sandbox_id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let fetched: Value = server.get_json(&format!("/sandboxes/{id}")).await;
    assert_eq!(fetched["state"], "killed", "auto-killed at its deadline");
    assert!(
        !server.sandbox_state_dir().join(id).exists(),
        "and destroyed"
    );

    // Same key twice → one sandbox; same key, other body → 422.
    let body = json!({ "template": "base", "timeout": 60 });
    let keyed = |body: &Value| {
        server
            .post("/sandboxes")
            .header("idempotency-key", "k-1")
            .json(body)
            .reply()
    };
    let (code, first) = keyed(&body).await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, again) = keyed(&body).await;
    assert!(code.is_success());
    assert_eq!(again["sandbox_id"], first["sandbox_id"]);
    let (code, body) = keyed(&json!({ "template": "base", "timeout": 61 })).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["code"], "idempotency_key_reused");
    assert_eq!(server.sandbox_ids("/sandboxes").await.len(), 1);
}

#[tokio::test]
async fn commands_api() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("commands_api") {
        return;
    }
    let server = server(1).await;
    let id = server
        .new_sandbox(json!({ "envs": { "GREETING": "hi" } }))
        .await;

    let result = server.run_command(&id, "id -un; pwd; echo $GREETING").await;
    assert_eq!(result["stdout"], "user\n/home/user\nhi\n");
    assert_eq!(result["exit_code"], 0);
    let result = server.run_command(&id, "echo oops >&2; exit 3").await;
    assert_eq!(
        (
            result["stderr"].as_str().unwrap(),
            result["exit_code"].as_i64().unwrap()
        ),
        ("oops\n", 3)
    );
    let root = server
        .command(
            &id,
            json!({ "cmd": "id -u; pwd", "user": "root", "cwd": "/tmp", "envs": { "X": "1" } }),
        )
        .await
        .1;
    assert_eq!(root["stdout"], "0\n/tmp\n");
    let timed = server
        .command(&id, json!({ "cmd": "sleep 30", "timeout": 1 }))
        .await
        .1;
    assert_eq!(timed["exit_code"], 124);

    // Background, stdin, list, wait.
    let started = server
        .command(
            &id,
            json!({ "cmd": "read line; echo got:$line", "background": true, "stdin": true }),
        )
        .await
        .1;
    let pid = started["pid"].as_u64().unwrap();
    let listed: Value = server.get_json(&format!("/sandboxes/{id}/commands")).await;
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["pid"] == pid && p["cmd"].as_str().unwrap().contains("read line")));
    let (code, _) = server
        .post(&format!("/sandboxes/{id}/commands/{pid}/stdin"))
        .json(&json!({ "data": "hello\n" }))
        .reply()
        .await;
    assert_eq!(code, StatusCode::OK);
    let waited: Value = server
        .get_json(&format!("/sandboxes/{id}/commands/{pid}/wait"))
        .await;
    assert_eq!(waited["stdout"], "got:hello\n");

    // Kill a background process; a bad pid is a 400.
    let sleeper = server
        .command(&id, json!({ "cmd": "sleep 300", "background": true }))
        .await
        .1;
    let pid = sleeper["pid"].as_u64().unwrap();
    let killed: Value = server
        .delete(&format!("/sandboxes/{id}/commands/{pid}"))
        .json_reply()
        .await;
    assert_eq!(killed, json!({ "killed": true }));
    let (code, body) = server
        .delete(&format!("/sandboxes/{id}/commands/abc"))
        .reply()
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
    let id = server.new_sandbox(json!({})).await;
    let files = |suffix: &str| format!("/sandboxes/{id}/files{suffix}");

    let written: Value = server
        .post(&files(""))
        .json(&json!({ "path": "/home/user/a/b.txt", "username": "user", "data": "hello" }))
        .json_reply()
        .await;
    assert_eq!(written, json!({ "path": "/home/user/a/b.txt", "size": 5 }));
    let read = server
        .get(&files("?path=/home/user/a/b.txt&username=user"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.text().await.unwrap(), "hello");
    let owner = server
        .run_command(&id, "stat -c %U /home/user/a/b.txt")
        .await;
    assert_eq!(owner["stdout"], "user\n", "written as the requested user");

    let big: Vec<u8> = common::noise(3 << 20, 5);
    let put: Value = server
        .put(&files("/raw?path=/tmp/big.bin"))
        .body(big.clone())
        .json_reply()
        .await;
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
    let (code, _) = server.put(&files("/raw")).body("x").reply().await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "path is required");

    let batch: Value = server
        .post(&files("/batch"))
        .json(&json!({ "files": [{ "path": "/home/user/z", "data": "1" }, { "path": "/home/user/y", "data": "22" }, { "path": "/home/user/x", "data": "333" }], "username": "user" }))
        .json_reply().await;
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
        .get_json(&files("/list?path=/home/user/a&depth=1"))
        .await;
    assert_eq!(
        listed,
        json!([{ "name": "b.txt", "path": "/home/user/a/b.txt", "type": "file", "size": 5, "mode": listed[0]["mode"], "modified": listed[0]["modified"] }])
    );
    let exists: Value = server
        .get_json(&files("/exists?path=/home/user/a/b.txt"))
        .await;
    assert_eq!(exists, json!({ "exists": true }));
    let info: Value = server.get_json(&files("/info?path=/home/user/a")).await;
    assert_eq!(
        (info["type"].as_str(), info["size"].as_u64()),
        (Some("dir"), Some(0))
    );
    let (code, _) = server
        .get(&files("/info?path=/home/user/missing"))
        .reply()
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    let renamed: Value = server.patch(&files("")).json(&json!({ "old_path": "/home/user/a/b.txt", "new_path": "/home/user/c.txt", "username": "user" })).json_reply().await;
    assert_eq!(renamed["path"], "/home/user/c.txt");
    let made: Value = server
        .post(&files("/mkdir"))
        .json(&json!({ "path": "/home/user/new/deep", "username": "user" }))
        .json_reply()
        .await;
    assert_eq!(made, json!({ "created": true }));
    let again: Value = server
        .post(&files("/mkdir"))
        .json(&json!({ "path": "/home/user/new/deep" }))
        .json_reply()
        .await;
    assert_eq!(again, json!({ "created": false }));
    let (code, _) = server
        .delete(&files("?path=/home/user/new"))
        .header("content-type", "application/json")
        .reply()
        .await;
    assert_eq!(code, StatusCode::OK);
    let gone: Value = server.get_json(&files("/exists?path=/home/user/new")).await;
    assert_eq!(gone, json!({ "exists": false }));
    let (code, _) = server
        .post(&files("/watch"))
        .json(&json!({ "path": "/home/user", "recursive": true }))
        .reply()
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
    let a = server.new_sandbox(json!({})).await;
    let b = server.new_sandbox(json!({})).await;

    server
        .run_command(&a, "echo secret > /tmp/a.txt; echo x > /home/user/a.txt")
        .await;
    let in_b = server
        .run_command(&b, "ls /tmp/a.txt /home/user/a.txt 2>&1; true")
        .await;
    assert!(
        in_b["stdout"].as_str().unwrap().contains("No such file"),
        "{in_b}"
    );

    // A's process table does not show B's processes.
    let marker = server
        .command(&b, json!({ "cmd": "sleep 123.456", "background": true }))
        .await
        .1;
    assert!(marker["pid"].is_u64());
    let ps = server
        .run_command(&a, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
        .await;
    assert!(!ps["stdout"].as_str().unwrap().contains("123.456"), "{ps}");

    // No network path to the host's loopback services or to B.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = server
        .run_command(
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
        let interfaces = server
            .run_command(&a, "ls /sys/class/net 2>/dev/null || cat /proc/net/dev")
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
        let id = server.new_sandbox(json!({})).await;
        let (code, _) = server.delete(&format!("/sandboxes/{id}")).reply().await;
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
    let alive = server.new_sandbox(json!({ "timeout": 600 })).await;
    let doomed = server.new_sandbox(json!({})).await;
    server
        .run_command(&alive, "echo kept > /home/user/state")
        .await;
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

    let kept = server.run_command(&alive, "cat /home/user/state").await;
    assert_eq!(kept["stdout"], "kept\n");
    let dead: Value = server.get_json(&format!("/sandboxes/{doomed}")).await;
    assert_eq!(dead["state"], "killed");
    assert!(!server.sandbox_state_dir().join(&doomed).exists());
}

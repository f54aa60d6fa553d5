//! What only the microVM runtime promises: a real VM (its own kernel), VM
//! isolation, no leftovers after many create/kill cycles, a crashed QEMU
//! noticed, outbound network cut on request. Runs when
//! `SANDBOX_TEST_RUNTIME=microvm` (scripts/test.sh sets it for its microVM
//! pass); otherwise each test prints why it did not run.

mod common;

use common::{sandboxes_supported, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn microvm_enabled(test: &str) -> bool {
    if !common::is_microvm() {
        eprintln!(
            "SKIP {test}: SANDBOX_TEST_RUNTIME is not microvm (scripts/test.sh runs the microVM pass)"
        );
        return false;
    }
    sandboxes_supported(test)
}

async fn server(base_pool: usize, python_pool: usize) -> TestServer {
    TestServer::start(common::production().with_sandboxes(base_pool, python_pool)).await
}

async fn create(server: &TestServer, body: Value) -> String {
    let response = server.post("/sandboxes").json(&body).send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["sandbox_id"].as_str().unwrap().to_string()
}

async fn run(server: &TestServer, id: &str, cmd: &str) -> Value {
    let response = server
        .post(&format!("/sandboxes/{id}/commands"))
        .json(&json!({ "cmd": cmd, "background": false, "timeout": 60 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// QEMU and relay processes whose command line names this server's state dir.
fn vm_processes(server: &TestServer) -> Vec<String> {
    let state = server.sandbox_state_dir().display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&state) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

#[tokio::test]
async fn sandboxes_are_real_isolated_vms() {
    if !microvm_enabled("sandboxes_are_real_isolated_vms") {
        return;
    }
    let server = server(0, 2).await;
    let health: Value = server
        .get("/health")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["runtime"]["kind"], "microvm", "{health}");
    assert!(health["runtime"]["accel"].is_string(), "{health}");
    eprintln!("accelerator: {}", health["runtime"]["accel"]);

    let a = create(&server, json!({ "template": "python" })).await;
    let b = create(&server, json!({ "template": "python" })).await;

    // Its own kernel: the guest's release is not the host's.
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let guest = run(&server, &a, "uname -r").await;
    let guest_release = guest["stdout"].as_str().unwrap();
    assert!(!guest_release.trim().is_empty(), "{guest}");
    assert_ne!(guest_release.trim(), host_release.trim());

    // Files, processes and network do not cross VMs. B serves on its own
    // 10.0.2.15; the same address inside A is A's own, where nothing listens.
    run(&server, &a, "echo secret > /tmp/only-in-a").await;
    let in_b = run(&server, &b, "cat /tmp/only-in-a 2>&1; true").await;
    assert!(
        in_b["stdout"].as_str().unwrap().contains("No such file"),
        "{in_b}"
    );
    let started = server
        .post(&format!("/sandboxes/{b}/commands"))
        .json(&json!({ "cmd": "python3 -m http.server 8123 --bind 0.0.0.0", "background": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), StatusCode::OK);
    let served = run(
        &server,
        &b,
        "for i in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:8123/ && echo up && break; sleep 0.2; done",
    )
    .await;
    assert_eq!(
        served["stdout"], "up\n",
        "B's own server should answer: {served}"
    );
    let from_a = run(
        &server,
        &a,
        "curl -s -m 3 -o /dev/null http://10.0.2.15:8123/ && echo reached || echo blocked",
    )
    .await;
    assert_eq!(from_a["stdout"], "blocked\n", "{from_a}");
    let ps = run(
        &server,
        &a,
        "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '",
    )
    .await;
    assert!(
        !ps["stdout"].as_str().unwrap().contains("http.server"),
        "{ps}"
    );

    // Clones of one snapshot must not share random streams or clocks.
    let random_a = run(&server, &a, "head -c 16 /dev/urandom | od -An -tx1").await;
    let random_b = run(&server, &b, "head -c 16 /dev/urandom | od -An -tx1").await;
    assert_ne!(random_a["stdout"], random_b["stdout"]);
    let guest_time = run(&server, &a, "date +%s").await;
    let guest_time: i64 = guest_time["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!(
        (guest_time - now).abs() < 30,
        "guest clock {guest_time} vs host {now}"
    );
}

#[tokio::test]
async fn denied_outbound_network_is_cut() {
    if !microvm_enabled("denied_outbound_network_is_cut") {
        return;
    }
    let server = server(2, 0).await;
    // A host service the guests can reach through user-mode networking's
    // gateway (10.0.2.2 is the host).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let probe = format!(
        "timeout 5 bash -c 'echo > /dev/tcp/10.0.2.2/{port}' && echo reached || echo blocked"
    );
    let open = create(&server, json!({})).await;
    assert_eq!(run(&server, &open, &probe).await["stdout"], "reached\n");
    let closed = create(&server, json!({ "network": { "deny_out": ["0.0.0.0/0"] } })).await;
    assert_eq!(run(&server, &closed, &probe).await["stdout"], "blocked\n");
}

#[tokio::test]
async fn a_crashed_vm_is_marked_killed() {
    if !microvm_enabled("a_crashed_vm_is_marked_killed") {
        return;
    }
    let server = server(1, 0).await;
    let id = create(&server, json!({ "timeout": 600 })).await;
    let pid_file = server.sandbox_state_dir().join(&id).join("vm.pid");
    let pid = std::fs::read_to_string(pid_file).unwrap();
    let pid = pid.split_whitespace().next().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sandbox: Value = server
            .get(&format!("/sandboxes/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if sandbox["state"] == "killed" {
            break;
        }
        assert!(Instant::now() < deadline, "still {sandbox}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = {
        let response = server
            .post(&format!("/sandboxes/{id}/commands"))
            .json(&json!({ "cmd": "true" }))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    };
    assert_eq!(status, StatusCode::GONE);
    assert!(!server.sandbox_state_dir().join(&id).exists());
}

#[tokio::test]
async fn twenty_create_kill_cycles_leave_nothing_behind() {
    if !microvm_enabled("twenty_create_kill_cycles_leave_nothing_behind") {
        return;
    }
    let mut server = server(1, 0).await;
    for _ in 0..20 {
        let id = create(&server, json!({})).await;
        assert_eq!(run(&server, &id, "echo hi").await["stdout"], "hi\n");
        let response = server
            .delete(&format!("/sandboxes/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    server.stop_gracefully();
    // No QEMU or relay process, overlay, socket or RAM file remains.
    let processes = vm_processes(&server);
    assert!(processes.is_empty(), "left running: {processes:#?}");
    let leftovers: Vec<_> = std::fs::read_dir(server.sandbox_state_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:#?}");
}

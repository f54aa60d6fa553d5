//! Custom templates: built inside a build sandbox from a structured spec or a
//! Dockerfile subset, then created from by alias. Checks what the build
//! installed, its env and start command, the bounded log, failures naming
//! their cause, owner isolation, and that a rebuild leaves running
//! sandboxes alone.

use crate::common::{self, sandboxes_supported, Api, Reply, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn start_build(server: &TestServer, body: Value) -> Value {
    let (status, started) = server.post("/templates/build").json(&body).reply().await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    assert_eq!(started["status"], "building", "{started}");
    started
}

/// Polls the build until it ends; returns its last status.
async fn finished(server: &TestServer, build_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        let build = server
            .get_json(&format!("/templates/builds/{build_id}"))
            .await;
        if build["status"] != "building" {
            return build;
        }
        assert!(Instant::now() < deadline, "the build never ended: {build}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn log_of(build: &Value) -> String {
    build["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_built_template_has_its_packages_files_envs_and_start_command() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("a_built_template_has_its_packages_files_envs_and_start_command") {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(1, 0)).await;
    let started = start_build(
        &server,
        json!({
            "alias": "data",
            "template": {
                "base_image": "ubuntu:22.04",
                "packages": ["jq"],
                "run_cmds": ["echo built > /opt/marker && id -u > /opt/uid"],
                "envs": {"GREETING": "hello"},
                "start_cmd": "echo started > /tmp/started",
            },
        }),
    )
    .await;
    let build = finished(&server, started["build_id"].as_str().unwrap()).await;
    let log = log_of(&build);
    assert_eq!(build["status"], "completed", "{log}");
    assert!(log.contains("step 1/2: apt-get install jq"), "{log}");
    assert!(
        log.contains("Setting up jq"),
        "apt's own output is in the log: {log}"
    );
    assert!(log.contains("template built"), "{log}");
    let template_id = build["template_id"].as_str().unwrap().to_string();
    assert!(template_id.starts_with("tpl-"), "{build}");

    let (status, sandbox) = server.create_sandbox(json!({ "template": "data" })).await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    assert_eq!(sandbox["template_id"], template_id.as_str());
    let id = sandbox["sandbox_id"].as_str().unwrap();
    let seen = server
        .run_command(
            id,
            "jq -n '1+1'; cat /opt/marker /opt/uid; echo $GREETING; \
             for i in $(seq 50); do [ -f /tmp/started ] && break; sleep 0.1; done; cat /tmp/started; id -un",
        )
        .await;
    assert_eq!(
        seen["stdout"], "2\nbuilt\n0\nhello\nstarted\nuser\n",
        "{seen}"
    );
    // The id works as well as the alias.
    let by_id = server.new_sandbox(json!({ "template": template_id })).await;
    assert_eq!(
        server.run_command(&by_id, "cat /opt/marker").await["stdout"],
        "built\n"
    );

    // Another owner sees nothing of it and may use the same alias.
    let bob = server.create_key("bob");
    let as_bob = |request: reqwest::RequestBuilder| request.bearer_auth(&bob);
    let (status, _) = as_bob(server.http.post(server.url("/sandboxes")))
        .json(&json!({ "template": "data" }))
        .reply()
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "bob cannot use alice's alias"
    );
    let (status, _) = as_bob(server.http.get(server.url(&format!(
        "/templates/builds/{}",
        started["build_id"].as_str().unwrap()
    ))))
    .reply()
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = as_bob(
        server
            .http
            .post(server.url(&format!("/templates/{template_id}/rebuild"))),
    )
    .reply()
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn failed_and_invalid_builds_say_why_and_a_rebuild_keeps_running_sandboxes() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported(
        "failed_and_invalid_builds_say_why_and_a_rebuild_keeps_running_sandboxes",
    ) {
        return;
    }
    let server = TestServer::start(common::production().with_sandboxes(1, 0)).await;
    // Refused before anything runs: a Dockerfile instruction we do not
    // build (naming its line), a built-in alias, an unknown base, sizes.
    for (body, needle) in [
        (
            json!({ "alias": "df", "template": { "dockerfile": "FROM debian:bookworm\nRUN true\nCOPY . /app\n" } }),
            "line 3",
        ),
        (json!({ "alias": "base", "template": {} }), "built-in"),
        (
            json!({ "alias": "x", "template": { "base_image": "alpine:3.19" } }),
            "cannot be built here",
        ),
        (
            json!({ "alias": "x", "template": { "packages": ["jq; reboot"] } }),
            "package",
        ),
        (
            json!({ "alias": "x", "template": {}, "memory_mb": 1_000_000 }),
            "memory_mb",
        ),
        (json!({ "alias": "../x", "template": {} }), "alias"),
    ] {
        let (status, answer) = server.post("/templates/build").json(&body).reply().await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(needle),
            "{answer}"
        );
    }

    // A step that fails: the build fails with its output and exit code,
    // and the alias has nothing to create from.
    let started = start_build(
        &server,
        json!({ "alias": "broken", "template": { "run_cmds": ["echo about to fail; exit 3"] } }),
    )
    .await;
    let build = finished(&server, started["build_id"].as_str().unwrap()).await;
    let log = log_of(&build);
    assert_eq!(build["status"], "failed", "{log}");
    assert!(log.contains("about to fail"), "{log}");
    assert!(log.contains("exited with 3"), "{log}");
    let (status, body) = server.create_sandbox(json!({ "template": "broken" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // A Dockerfile build; then a rebuild while a sandbox runs on the first.
    let started = start_build(
        &server,
        json!({ "alias": "quick", "template": { "dockerfile":
            "FROM debian:bookworm\nENV MODE=docker\nWORKDIR /srv/app\nRUN echo $MODE > stamp.txt\n\
             CMD touch /tmp/cmd-ran\n" } }),
    )
    .await;
    let build = finished(&server, started["build_id"].as_str().unwrap()).await;
    assert_eq!(build["status"], "completed", "{}", log_of(&build));
    let template_id = build["template_id"].as_str().unwrap().to_string();
    let old = server.new_sandbox(json!({ "template": "quick" })).await;
    let seen = server
        .run_command(
            &old,
            "cat /srv/app/stamp.txt; echo $MODE; sleep 1; ls /tmp/cmd-ran",
        )
        .await;
    assert_eq!(seen["stdout"], "docker\ndocker\n/tmp/cmd-ran\n", "{seen}");

    let (status, rebuilt) = server
        .post(&format!("/templates/{template_id}/rebuild"))
        .reply()
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{rebuilt}");
    assert_ne!(rebuilt["build_id"], started["build_id"]);
    let build = finished(&server, rebuilt["build_id"].as_str().unwrap()).await;
    assert_eq!(build["status"], "completed", "{}", log_of(&build));
    let seen = server.run_command(&old, "cat /srv/app/stamp.txt").await;
    assert_eq!(
        seen["stdout"], "docker\n",
        "the old build is still under it"
    );
    let new = server.new_sandbox(json!({ "template": "quick" })).await;
    assert_eq!(
        server.run_command(&new, "cat /srv/app/stamp.txt").await["stdout"],
        "docker\n"
    );
}

#[tokio::test]
async fn a_build_cut_by_a_restart_reads_failed_and_leaves_nothing_behind() {
    let _suite = common::suite(module_path!()).await;
    if !sandboxes_supported("a_build_cut_by_a_restart_reads_failed_and_leaves_nothing_behind") {
        return;
    }
    let mut server = TestServer::start(common::production().with_sandboxes(0, 0)).await;
    let started = start_build(
        &server,
        json!({ "alias": "cut", "template": {
            "packages": ["jq"], "run_cmds": ["echo sleeping; sleep 600"] } }),
    )
    .await;
    let build_id = started["build_id"].as_str().unwrap().to_string();
    let path = format!("/templates/builds/{build_id}");
    common::eventually(
        "the build's step runs",
        Duration::from_secs(300),
        || async { log_of(&server.get_json(&path).await).contains("sleeping") },
    )
    .await;
    // Builds take turns; one owner may queue only a few.
    let mut queued = Vec::new();
    for n in 0..3 {
        let body = json!({ "alias": format!("queued{n}"), "template": {} });
        let build = start_build(&server, body).await;
        queued.push(build["build_id"].as_str().unwrap().to_string());
    }
    let (status, body) = server
        .post("/templates/build")
        .json(&json!({ "alias": "one-too-many", "template": {} }))
        .reply()
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let waiting = server
        .get_json(&format!("/templates/builds/{}", queued[0]))
        .await;
    assert!(
        log_of(&waiting).contains("waiting for a build slot"),
        "{waiting}"
    );
    let build_dir = server.data_dir.path().join("builds").join(&build_id);
    if !common::is_microvm() {
        // The host installed the packages into a copy of the base there.
        assert!(build_dir.exists(), "{}", build_dir.display());
    }
    server.crash();
    server.launch().await;
    let build = server.get_json(&path).await;
    assert_eq!(build["status"], "failed", "{build}");
    assert!(log_of(&build).contains("interrupted"), "{build}");
    assert!(!build_dir.exists(), "{} is left", build_dir.display());
    for id in &queued {
        let build = server.get_json(&format!("/templates/builds/{id}")).await;
        assert_eq!(
            build["status"], "failed",
            "a queued build is cut too: {build}"
        );
    }
    let (status, body) = server.create_sandbox(json!({ "template": "cut" })).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

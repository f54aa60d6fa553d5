//! The Phase-2 SDK calls: a custom template build with one package against
//! one with no steps (what every build costs: boot, capture, prepare),
//! volume commit of a 256 MiB mount path against `tar czf` of the same tree
//! on the host, and pause/resume latency against a `commands.run("true")`
//! round trip, all measured in the same run (on the runtime
//! `SANDBOX_TEST_RUNTIME` names, namespace by default).

use crate::hydrate::{archive, create, upload};
use crate::stats::summarize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::{ServerOptions, TestServer};

const COMMITS: usize = 3;
const PAUSES: usize = 20;

/// `tar czf` (gzip's default level) of the unpacked archive into a file
/// (GNU tar skips reading the files when the archive is `/dev/null`).
fn tar_czf(archive: &Path) -> anyhow::Result<Duration> {
    let tree = tempfile::tempdir()?;
    let status = std::process::Command::new("tar")
        .arg("xzf")
        .arg(archive)
        .arg("-C")
        .arg(tree.path())
        .status()?;
    anyhow::ensure!(status.success(), "tar xzf failed");
    let out = tempfile::NamedTempFile::new()?;
    let started = Instant::now();
    let status = std::process::Command::new("tar")
        .arg("czf")
        .arg(out.path())
        .arg("-C")
        .arg(tree.path())
        .arg(".")
        .status()?;
    anyhow::ensure!(status.success(), "tar czf failed");
    Ok(started.elapsed())
}

async fn post_ok(server: &TestServer, path: &str) -> anyhow::Result<Value> {
    let response = server.post(path).send().await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    anyhow::ensure!(status.is_success(), "{path}: {status} {body}");
    Ok(body)
}

/// Seconds from `POST /templates/build` to `completed`.
async fn build_seconds(server: &TestServer, alias: &str, spec: Value) -> anyhow::Result<f64> {
    let started = Instant::now();
    let response = server
        .post("/templates/build")
        .json(&json!({ "alias": alias, "template": spec }))
        .send()
        .await?;
    let build: Value = response.json().await?;
    let id = build["build_id"].as_str().unwrap_or_default().to_string();
    loop {
        let status: Value = server
            .get(&format!("/templates/builds/{id}"))
            .send()
            .await?
            .json()
            .await?;
        match status["status"].as_str() {
            Some("building") => tokio::time::sleep(Duration::from_millis(100)).await,
            Some("completed") => return Ok(started.elapsed().as_secs_f64()),
            _ => anyhow::bail!("build {alias} failed: {status}"),
        }
    }
}

pub async fn run(binary: &Path, work_dir: &Path) -> anyhow::Result<()> {
    let archive = archive(work_dir)?;
    let server = TestServer::start(ServerOptions::production(binary).with_sandboxes(2, 0)).await;
    server.wait_for_pool(2).await;
    println!("runtime: {}", server.health().await["runtime"]["kind"]);

    // The first build warms the page cache for the rest: not measured.
    build_seconds(&server, "bench-warm", json!({})).await?;
    let empty = build_seconds(&server, "bench-empty", json!({})).await?;
    let jq = build_seconds(&server, "bench-jq", json!({ "packages": ["jq"] })).await?;
    println!("custom template build (to completed):");
    println!("  no steps (boot, capture, prepare)   {empty:>7.1} s");
    println!("  packages [\"jq\"]                     {jq:>7.1} s");
    println!("  one package / no steps              {:>7.2}x", jq / empty);

    let volume = upload(&server, &archive).await?;
    let (_, sandbox) = create(&server, Some(&volume)).await?;
    let mut tar_times = Vec::new();
    let mut commit_times = Vec::new();
    for _ in 0..COMMITS {
        tar_times.push(tar_czf(&archive)?);
        let started = Instant::now();
        let committed = post_ok(
            &server,
            &format!("/sandboxes/{sandbox}/volumes/{volume}/commit"),
        )
        .await?;
        commit_times.push(started.elapsed());
        let id = committed["volume_id"].as_str().unwrap();
        server.delete(&format!("/volumes/{id}")).send().await?;
    }
    let (tar, commit) = (summarize(&tar_times), summarize(&commit_times));
    println!("commit of a 256 MiB mount path (2,000 files), {COMMITS} runs:");
    println!("  tar czf (host, gzip -6)   {tar}");
    println!("  POST …/commit             {commit}");
    println!("  commit / tar czf (p50)    {:.2}x", commit.p50 / tar.p50);

    let mut pauses = Vec::new();
    let mut resumes = Vec::new();
    let mut round_trips = Vec::new();
    for _ in 0..PAUSES {
        let started = Instant::now();
        let result = server
            .post(&format!("/sandboxes/{sandbox}/commands"))
            .json(&json!({ "cmd": "true" }))
            .send()
            .await?;
        anyhow::ensure!(result.status().is_success());
        round_trips.push(started.elapsed());
        let started = Instant::now();
        post_ok(&server, &format!("/sandboxes/{sandbox}/pause")).await?;
        pauses.push(started.elapsed());
        let started = Instant::now();
        post_ok(&server, &format!("/sandboxes/{sandbox}/resume")).await?;
        resumes.push(started.elapsed());
    }
    let (trip, pause, resume) = (
        summarize(&round_trips),
        summarize(&pauses),
        summarize(&resumes),
    );
    println!("pause and resume, {PAUSES} cycles:");
    println!("  commands.run(\"true\")      {trip}");
    println!("  pause                     {pause}");
    println!("  resume                    {resume}");
    println!(
        "  pause / round trip (p50)  {:.2}x   resume / round trip (p50)  {:.2}x",
        pause.p50 / trip.p50,
        resume.p50 / trip.p50
    );
    Ok(())
}

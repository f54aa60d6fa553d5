//! Load run: K clients for M seconds, each cycling through what an agent
//! platform does (upload a volume, create a sandbox attaching it, run
//! commands, read files, kill), against the release build on Postgres +
//! Garage. Prints throughput and p50/p99 per operation, errors (must be 0),
//! server RSS and open fds at the end vs the start, and machines left
//! without a row (must be 0). A 1-client pass of the same mix runs first as
//! the baseline the loaded latencies are compared with.

use crate::stats::summarize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::{noise, open_fds, rss_kib, targz, ServerOptions, TestServer};

const OPS: [&str; 5] = ["upload", "create+hydrate", "command", "file read", "kill"];

#[derive(Default)]
struct Tally {
    latencies: BTreeMap<&'static str, Vec<Duration>>,
    errors: Vec<String>,
}

type Shared = Arc<Mutex<Tally>>;

fn record(tally: &Shared, op: &'static str, started: Instant, outcome: Result<(), String>) {
    let mut tally = tally.lock().unwrap();
    match outcome {
        Ok(()) => tally
            .latencies
            .entry(op)
            .or_default()
            .push(started.elapsed()),
        Err(e) => tally.errors.push(format!("{op}: {e}")),
    }
}

async fn expect(response: reqwest::Result<reqwest::Response>, want: u16) -> Result<Value, String> {
    let response = response.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if status != want {
        return Err(format!("{status}: {text}"));
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One client's cycle, repeated until `until`.
async fn client(
    server: Arc<TestServer>,
    volume: String,
    archive: Arc<Vec<u8>>,
    until: Instant,
    tally: Shared,
) {
    while Instant::now() < until {
        let started = Instant::now();
        let uploaded = expect(
            server
                .post("/volumes?name=load")
                .body(archive.as_ref().clone())
                .send()
                .await,
            201,
        )
        .await;
        let uploaded_id = uploaded
            .as_ref()
            .ok()
            .and_then(|v| v["volume_id"].as_str().map(str::to_string));
        record(&tally, "upload", started, uploaded.map(|_| ()));

        let started = Instant::now();
        let body = json!({ "volumes": [{ "volume_id": volume, "mount_path": "/data" }] });
        let created = expect(server.post("/sandboxes").json(&body).send().await, 201).await;
        let id = created
            .as_ref()
            .ok()
            .and_then(|v| v["sandbox_id"].as_str().map(str::to_string));
        let created = created.and_then(|v| match v["volumes"][0]["status"].as_str() {
            Some("ready") => Ok(()),
            other => Err(format!("hydrate {other:?}: {v}")),
        });
        record(&tally, "create+hydrate", started, created);
        let Some(id) = id else { continue };

        for _ in 0..4 {
            let started = Instant::now();
            let ran = expect(
                server
                    .post(&format!("/sandboxes/{id}/commands"))
                    .json(&json!({ "cmd": "wc -c /data/blob.bin", "user": "user" }))
                    .send()
                    .await,
                200,
            )
            .await
            .and_then(|v| match v["exit_code"].as_i64() {
                Some(0) => Ok(()),
                _ => Err(format!("command failed: {v}")),
            });
            record(&tally, "command", started, ran);
        }
        for _ in 0..4 {
            let started = Instant::now();
            let read = server
                .get(&format!(
                    "/sandboxes/{id}/files?path=/data/blob.bin&username=user"
                ))
                .send()
                .await
                .map_err(|e| e.to_string());
            let read = match read {
                Ok(response) if response.status().is_success() => response
                    .bytes()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Ok(response) => Err(format!("{}", response.status())),
                Err(e) => Err(e),
            };
            record(&tally, "file read", started, read);
        }
        let started = Instant::now();
        let killed = expect(server.delete(&format!("/sandboxes/{id}")).send().await, 200).await;
        record(&tally, "kill", started, killed.map(|_| ()));
        if let Some(uploaded) = uploaded_id {
            let _ = server.delete(&format!("/volumes/{uploaded}")).send().await;
        }
    }
}

async fn pass(server: &Arc<TestServer>, volume: &str, clients: usize, seconds: u64) -> Tally {
    let archive = Arc::new(targz(&[("small.bin", noise(256 << 10, 11))]));
    let tally: Shared = Arc::default();
    let until = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(client(
                server.clone(),
                volume.to_string(),
                archive.clone(),
                until,
                tally.clone(),
            ))
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap()
}

pub async fn run(binary: &Path, clients: usize, seconds: u64) -> anyhow::Result<()> {
    let server = Arc::new(
        TestServer::start(
            ServerOptions::production(binary)
                .with_sandboxes(clients, 0)
                .with_setting("quotas.max_running_sandboxes", "100000")
                .with_setting("quotas.max_concurrent_uploads", "1000"),
        )
        .await,
    );
    server.wait_for_pool(clients).await;
    let volume: Value = server
        .post("/volumes?name=dataset")
        .body(targz(&[("blob.bin", noise(4 << 20, 7))]))
        .send()
        .await?
        .json()
        .await?;
    let volume = volume["volume_id"].as_str().unwrap().to_string();
    let pid = server.pid().unwrap();

    let baseline = pass(&server, &volume, 1, (seconds / 4).max(5)).await;
    let (rss_start, fds_start) = (rss_kib(pid), open_fds(pid));
    let started = Instant::now();
    let loaded = pass(&server, &volume, clients, seconds).await;
    let wall = started.elapsed().as_secs_f64();
    // Let background teardown settle before counting what is left.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss_end, fds_end) = (rss_kib(pid), open_fds(pid));
    let listed: Value = server.get("/sandboxes").send().await?.json().await?;
    let running = listed["sandboxes"].as_array().map_or(0, Vec::len);
    let machines = server.sandbox_dirs().len();
    let pooled = server.metric("pool_ready").await as usize;

    println!("load run: {clients} clients for {seconds} s (namespace runtime, Postgres + Garage, release)");
    let total: usize = loaded.latencies.values().map(Vec::len).sum();
    println!(
        "  throughput               : {:.1} ops/s ({total} ops in {wall:.1} s)",
        total as f64 / wall
    );
    for op in OPS {
        let Some(samples) = loaded.latencies.get(op) else {
            continue;
        };
        let now = summarize(samples);
        let ratio = baseline
            .latencies
            .get(op)
            .map(|b| format!("   p50 {:.2}x the 1-client p50", now.p50 / summarize(b).p50))
            .unwrap_or_default();
        println!("  {op:<24} : {now}{ratio}");
    }
    println!(
        "  errors                   : {} (baseline pass: {})",
        loaded.errors.len(),
        baseline.errors.len()
    );
    for error in loaded.errors.iter().chain(&baseline.errors).take(10) {
        println!("    {error}");
    }
    println!(
        "  server RSS               : {} MiB at start, {} MiB at end",
        rss_start / 1024,
        rss_end / 1024
    );
    println!("  server open fds          : {fds_start} at start, {fds_end} at end");
    let leaked = machines.saturating_sub(running + pooled);
    println!("  machines left            : {machines} on disk, {running} running rows, {pooled} pooled → leaked {leaked}");
    anyhow::ensure!(
        loaded.errors.is_empty() && baseline.errors.is_empty(),
        "errors under load"
    );
    anyhow::ensure!(leaked == 0, "machines leaked");
    Ok(())
}

//! The microVM runtime's figures: cold boot and snapshot restore to an
//! answering envd, warm-pool create, the `commands.run("true")` round trip,
//! idle memory per pooled VM, and hydration against `tar xzf` measured in
//! the same run. Run with `SANDBOX_TEST_RUNTIME=microvm` (scripts/bench.sh
//! sets it).

use crate::hydrate;
use crate::stats::summarize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::{ServerOptions, TestServer};

async fn create(server: &TestServer) -> anyhow::Result<(Duration, String)> {
    let started = Instant::now();
    let response = server.post("/sandboxes").json(&json!({})).send().await?;
    let elapsed = started.elapsed();
    let status = response.status();
    let body: Value = response.json().await?;
    anyhow::ensure!(status.as_u16() == 201, "create failed: {body}");
    Ok((elapsed, body["sandbox_id"].as_str().unwrap().to_string()))
}

async fn kill(server: &TestServer, id: &str) -> anyhow::Result<()> {
    server.delete(&format!("/sandboxes/{id}")).send().await?;
    Ok(())
}

/// Creates on the request path (pool size 0): each is one boot.
async fn unpooled_creates(
    binary: &Path,
    snapshots: bool,
    fast_restore: bool,
    volume_slots: usize,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let server = TestServer::start(
        ServerOptions::production(binary)
            .with_sandboxes(0, 0)
            .with_setting("runtime.microvm.snapshots", &snapshots.to_string())
            .with_setting("runtime.microvm.fast_restore", &fast_restore.to_string())
            .with_setting("runtime.microvm.volume_slots", &volume_slots.to_string()),
    )
    .await;
    // With no pool nothing builds the template's snapshot ahead of the
    // first create (a new setting may need a new one): wait for it, unmeasured.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let response = server.post("/sandboxes").json(&json!({})).send().await?;
        let status = response.status().as_u16();
        let body: Value = response.json().await?;
        if status == 201 {
            kill(&server, body["sandbox_id"].as_str().unwrap_or_default()).await?;
            break;
        }
        anyhow::ensure!(
            body["code"] == "template_not_ready" && Instant::now() < deadline,
            "create failed: {body}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let mut samples = Vec::new();
    for _ in 0..n {
        let (elapsed, id) = create(&server).await?;
        samples.push(elapsed);
        kill(&server, &id).await?;
    }
    Ok(samples)
}

pub async fn run(binary: &Path, work_dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        testkit::is_microvm(),
        "set SANDBOX_TEST_RUNTIME=microvm (scripts/bench.sh microvm does)"
    );
    const POOL: usize = 4;
    let server = TestServer::start(ServerOptions::production(binary).with_sandboxes(POOL, 0)).await;
    server.wait_for_pool(POOL).await;
    let health: Value = server.get("/health").send().await?.json().await?;
    println!(
        "microVM runtime (template base, 1 vCPU, 512 MiB; release build, over HTTP)\n  accelerator              : {} ({})",
        health["runtime"]["accel"].as_str().unwrap_or("?"),
        health["runtime"]["accel_reason"].as_str().unwrap_or("")
    );

    // Idle memory of the pooled VMs, as the server publishes it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pss = server
        .metric_where("pool_idle_pss_bytes", "template=\"base\"")
        .await;
    println!(
        "  idle PSS per pooled VM   : {:.1} MiB",
        pss / (1 << 20) as f64
    );

    let mut warm = Vec::new();
    for _ in 0..50 {
        let (elapsed, id) = create(&server).await?;
        warm.push(elapsed);
        kill(&server, &id).await?;
        server.wait_for_pool(POOL).await;
    }
    println!("  warm create              : {}", summarize(&warm));

    let (_, target) = create(&server).await?;
    let mut round_trips = Vec::new();
    for _ in 0..100 {
        let started = Instant::now();
        let response = server
            .post(&format!("/sandboxes/{target}/commands"))
            .json(&json!({ "cmd": "true", "background": false, "timeout": 60 }))
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success());
        response.bytes().await?;
        round_trips.push(started.elapsed());
    }
    println!("  commands.run(\"true\")     : {}", summarize(&round_trips));
    kill(&server, &target).await?;

    // Hydration: create with the volume minus create without, against
    // tar xzf of the same archive on the host; best of 2 each.
    let archive = hydrate::archive(work_dir)?;
    let mut extra = Vec::new();
    let mut tar_runs = Vec::new();
    for _ in 0..2 {
        tar_runs.push(hydrate::tar_xzf(&archive)?);
        let volume = hydrate::upload(&server, &archive).await?;
        server.wait_for_pool(POOL).await;
        let (plain, a) = hydrate::create(&server, None).await?;
        let (with_volume, b) = hydrate::create(&server, Some(&volume)).await?;
        extra.push(with_volume.saturating_sub(plain));
        kill(&server, &a).await?;
        kill(&server, &b).await?;
    }
    let best = |d: &[Duration]| d.iter().min().copied().unwrap().as_secs_f64();
    println!(
        "  hydrate 256 MiB / tar xzf: {:.2} ({:.0} ms vs {:.0} ms; the node's first: builds the layer; target <= 1.5 under KVM)",
        best(&extra) / best(&tar_runs),
        best(&extra) * 1000.0,
        best(&tar_runs) * 1000.0
    );

    // Later creates on a node that holds the layer: a slot reopened over
    // it, whatever the volume's size.
    let small = hydrate::upload(&server, &archive).await?;
    let large = hydrate::upload(&server, &hydrate::large_archive(work_dir)?).await?;
    for (label, volume) in [("256 MiB", &small), ("2 GiB  ", &large)] {
        let added = hydrate::warm_creates(&server, volume).await?;
        println!("  later create + {label} volume, added: {added} (target <= 50 ms)");
    }
    drop(server);

    // Before/after the restore-path fixes (qcow2 header written in-process,
    // a relay started ahead of time), interleaved in one run.
    // And what the volume slots cost a restore: the same without them.
    const SLOTS: usize = 4;
    let (mut before, mut restored, mut slotless) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..2 {
        before.extend(unpooled_creates(binary, true, false, SLOTS, 10).await?);
        restored.extend(unpooled_creates(binary, true, true, SLOTS, 10).await?);
        slotless.extend(unpooled_creates(binary, true, true, 0, 10).await?);
    }
    println!(
        "  restore to ready, qemu-img + relay exec on the path: {}",
        summarize(&before)
    );
    println!(
        "  restore to ready (create, pool 0)  : {}",
        summarize(&restored)
    );
    println!(
        "  restore p50 after / before          : {:.2}",
        summarize(&restored).p50 / summarize(&before).p50
    );
    println!(
        "  restore to ready, no volume slots  : {}",
        summarize(&slotless)
    );
    println!(
        "  restore p50 {SLOTS} slots / none        : {:.2}",
        summarize(&restored).p50 / summarize(&slotless).p50
    );
    let cold = unpooled_creates(binary, false, true, SLOTS, 5).await?;
    println!(
        "  cold boot to ready (create, pool 0): {}",
        summarize(&cold)
    );
    println!(
        "  cold boot p50 / restore p50        : {:.1}x",
        summarize(&cold).p50 / summarize(&restored).p50
    );
    println!("  targets: warm create p50 <= 30 ms; restore to ready <= 250 ms under TCG");
    Ok(())
}

//! Hydration cost and fan-out: a 256 MiB (uncompressed) volume of ~2,000
//! files. Baseline: `tar xzf` of the same archive into a local directory,
//! measured in the same run.

use crate::stats::summarize;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::{ServerOptions, TestServer};

const FILES: usize = 2000;
const TOTAL: usize = 256 << 20;

/// Half noise, half text-like data, so gzip has some work to do.
pub(crate) fn archive(work_dir: &Path) -> anyhow::Result<PathBuf> {
    let path = work_dir.join("hydrate-256MiB-2000files.tar.gz");
    if path.exists() {
        return Ok(path);
    }
    eprintln!("generating {}", path.display());
    let file = std::fs::File::create(path.with_extension("partial"))?;
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let size = TOTAL / FILES;
    for i in 0..FILES {
        let data: Vec<u8> = if i % 2 == 0 {
            testkit::noise(size, i as u64 + 1)
        } else {
            (0..size)
                .map(|j| b"0123456789,abcdef\n"[(i + j) % 18])
                .collect()
        };
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("dir{:02}/file{i:05}.dat", i % 40),
            data.as_slice(),
        )?;
    }
    tar.into_inner()?.finish()?.flush()?;
    std::fs::rename(path.with_extension("partial"), &path)?;
    Ok(path)
}

pub(crate) fn tar_xzf(archive: &Path) -> anyhow::Result<Duration> {
    let dest = tempfile::tempdir()?;
    let started = Instant::now();
    let status = std::process::Command::new("tar")
        .arg("xzf")
        .arg(archive)
        .arg("-C")
        .arg(dest.path())
        .status()?;
    anyhow::ensure!(status.success(), "tar xzf failed");
    Ok(started.elapsed())
}

pub(crate) async fn upload(server: &TestServer, archive: &Path) -> anyhow::Result<String> {
    let body = tokio::fs::read(archive).await?;
    let response = server.post("/volumes?name=bench").body(body).send().await?;
    anyhow::ensure!(response.status().as_u16() == 201);
    let volume: Value = response.json().await?;
    Ok(volume["volume_id"].as_str().unwrap().to_string())
}

pub(crate) async fn create(
    server: &TestServer,
    volume: Option<&str>,
) -> anyhow::Result<(Duration, String)> {
    let body = match volume {
        Some(id) => json!({ "volumes": [{ "volume_id": id, "mount_path": "/data" }] }),
        None => json!({}),
    };
    let started = Instant::now();
    let response = server.post("/sandboxes").json(&body).send().await?;
    let elapsed = started.elapsed();
    let sandbox: Value = response.json().await?;
    if let Some(status) = sandbox["volumes"][0]["status"].as_str() {
        anyhow::ensure!(status == "ready", "hydrate failed: {sandbox}");
    }
    Ok((elapsed, sandbox["sandbox_id"].as_str().unwrap().to_string()))
}

async fn kill_all(server: &TestServer, ids: &[String]) {
    for id in ids {
        server
            .delete(&format!("/sandboxes/{id}"))
            .send()
            .await
            .unwrap();
    }
}

pub async fn run(binary: &Path, work_dir: &Path) -> anyhow::Result<()> {
    let archive = archive(work_dir)?;
    let compressed = std::fs::metadata(&archive)?.len();
    const POOL: usize = 16;
    let server = TestServer::start(ServerOptions::production(binary).with_sandboxes(POOL, 0)).await;
    server.wait_for_pool(POOL).await;

    // One hydrate vs tar xzf, interleaved, best of 3 each.
    let mut extra = Vec::new();
    let mut tar_runs = Vec::new();
    for _ in 0..3 {
        tar_runs.push(tar_xzf(&archive)?);
        let volume = upload(&server, &archive).await?; // fresh id: uncached
        server.wait_for_pool(POOL).await;
        let (plain, a) = create(&server, None).await?;
        let (with_volume, b) = create(&server, Some(&volume)).await?;
        extra.push(with_volume.saturating_sub(plain));
        kill_all(&server, &[a, b]).await;
    }
    let best = |d: &[Duration]| d.iter().min().copied().unwrap();
    let (hydrate, tar) = (best(&extra), best(&tar_runs));
    println!(
        "volume hydration: 256 MiB in {FILES} files ({:.0} MiB gzipped), namespace runtime",
        compressed as f64 / (1 << 20) as f64
    );
    println!(
        "  tar xzf into a local dir          : {:>8.1} ms",
        tar.as_secs_f64() * 1000.0
    );
    println!(
        "  create with volume - without      : {:>8.1} ms",
        hydrate.as_secs_f64() * 1000.0
    );
    println!(
        "  hydrate / tar xzf                 : {:>8.2}  (target <= 1.2)",
        hydrate.as_secs_f64() / tar.as_secs_f64()
    );

    let mut single = None;
    for n in [1usize, 4, 16] {
        let volume = upload(&server, &archive).await?;
        server.wait_for_pool(POOL).await;
        let gets = server.metric("blob_store_gets_total").await;
        let bytes = server.metric("blob_store_get_bytes_total").await;
        let started = Instant::now();
        let creates =
            futures::future::join_all((0..n).map(|_| create(&server, Some(&volume)))).await;
        let wall = started.elapsed();
        let mut ids = Vec::new();
        let mut latencies = Vec::new();
        for result in creates {
            let (latency, id) = result?;
            latencies.push(latency);
            ids.push(id);
        }
        let single_wall = *single.get_or_insert(wall);
        let gets = server.metric("blob_store_gets_total").await - gets;
        let bytes = server.metric("blob_store_get_bytes_total").await - bytes;
        println!(
            "  fan-out {n:>2}: wall {:>7.1} ms ({:.2}x fan-out 1), S3 GETs {gets:.0}, S3 bytes {:.2}x blob; {}",
            wall.as_secs_f64() * 1000.0,
            wall.as_secs_f64() / single_wall.as_secs_f64(),
            bytes / compressed as f64,
            summarize(&latencies)
        );
        kill_all(&server, &ids).await;
    }
    println!("  targets: fan-out 16 <= 2x one hydrate; S3 bytes = 1x the blob");
    Ok(())
}

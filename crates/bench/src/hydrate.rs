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
    let size = TOTAL / FILES;
    let files = (0..FILES).map(|i| {
        let data: Vec<u8> = if i % 2 == 0 {
            testkit::noise(size, i as u64 + 1)
        } else {
            (0..size)
                .map(|j| b"0123456789,abcdef\n"[(i + j) % 18])
                .collect()
        };
        (format!("dir{:02}/file{i:05}.dat", i % 40), data)
    });
    cached_archive(work_dir.join("hydrate-256MiB-2000files.tar.gz"), files)
}

/// Writes `files` as a tar.gz at `path` unless an earlier run did.
fn cached_archive<D: AsRef<[u8]>>(
    path: PathBuf,
    files: impl Iterator<Item = (String, D)>,
) -> anyhow::Result<PathBuf> {
    if path.exists() {
        return Ok(path);
    }
    eprintln!("generating {}", path.display());
    let file = std::fs::File::create(path.with_extension("partial"))?;
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, data) in files {
        let data = data.as_ref();
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, data)?;
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

const POOL: usize = 16;

async fn server(binary: &Path, mode: &str) -> TestServer {
    let options = ServerOptions::production(binary)
        .with_sandboxes(POOL, 0)
        .with_setting("hydrate.mode", mode);
    let server = TestServer::start(options).await;
    server.wait_for_pool(POOL).await;
    server
}

/// Bytes in use on the filesystem holding `dir`, after a sync.
fn disk_used(dir: &Path) -> anyhow::Result<u64> {
    std::process::Command::new("sync").status()?;
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=used"])
        .arg(dir)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().nth(1).unwrap_or("0").trim().parse()?)
}

const MIB: f64 = (1 << 20) as f64;

/// One hydrate (create with a fresh volume minus a create without), best
/// of 3, next to `tar xzf` runs interleaved with it.
async fn first_hydrate(
    server: &TestServer,
    archive: &Path,
) -> anyhow::Result<(Duration, Duration)> {
    let mut extra = Vec::new();
    let mut tar_runs = Vec::new();
    for _ in 0..3 {
        tar_runs.push(tar_xzf(archive)?);
        let volume = upload(server, archive).await?; // fresh id: uncached
        server.wait_for_pool(POOL).await;
        let (plain, a) = create(server, None).await?;
        let (with_volume, b) = create(server, Some(&volume)).await?;
        extra.push(with_volume.saturating_sub(plain));
        kill_all(server, &[a, b]).await;
    }
    let best = |d: &[Duration]| d.iter().min().copied().unwrap();
    Ok((best(&extra), best(&tar_runs)))
}

/// Creates on a node that already holds the volume's layer: each create
/// with the volume minus the create without it just before.
pub(crate) async fn warm_creates(
    server: &TestServer,
    volume: &str,
) -> anyhow::Result<crate::stats::Summary> {
    let (_, builder) = create(server, Some(volume)).await?;
    kill_all(server, &[builder]).await;
    let mut added = Vec::new();
    for _ in 0..24 {
        server.wait_for_pool(2).await;
        let (plain, a) = create(server, None).await?;
        let (with_volume, b) = create(server, Some(volume)).await?;
        added.push(with_volume.saturating_sub(plain));
        kill_all(server, &[a, b]).await;
    }
    Ok(summarize(&added))
}

struct FanOut {
    wall: Duration,
    gets: f64,
    disk: u64,
    /// What the layer store grew by (layer mode).
    layers: u64,
    latencies: crate::stats::Summary,
}

/// `n` concurrent creates over a volume this node has never seen.
async fn fan_out(server: &TestServer, archive: &Path, n: usize) -> anyhow::Result<FanOut> {
    let volume = upload(server, archive).await?;
    server.wait_for_pool(POOL).await;
    let gets = server.metric("blob_store_gets_total").await;
    let disk = disk_used(server.data_dir.path())?;
    let layers = layer_bytes(server).await?;
    let started = Instant::now();
    let creates = futures::future::join_all((0..n).map(|_| create(server, Some(&volume)))).await;
    let wall = started.elapsed();
    let mut ids = Vec::new();
    let mut latencies = Vec::new();
    for result in creates {
        let (latency, id) = result?;
        latencies.push(latency);
        ids.push(id);
    }
    let result = FanOut {
        wall,
        gets: server.metric("blob_store_gets_total").await - gets,
        disk: disk_used(server.data_dir.path())?.saturating_sub(disk),
        layers: layer_bytes(server).await?.saturating_sub(layers),
        latencies: summarize(&latencies),
    };
    kill_all(server, &ids).await;
    Ok(result)
}

async fn layer_bytes(server: &TestServer) -> anyhow::Result<u64> {
    let health: Value = server.get("/health").send().await?.json().await?;
    Ok(health["hydrate"]["layers"]["disk_bytes"]
        .as_u64()
        .unwrap_or(0))
}

pub async fn run(binary: &Path, work_dir: &Path) -> anyhow::Result<()> {
    let small = archive(work_dir)?;
    let large = large_archive(work_dir)?;
    let compressed = std::fs::metadata(&small)?.len();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "volume hydration, namespace runtime: 256 MiB in {FILES} files ({:.0} MiB gzipped); \
         layer = hydrate.mode \"layer\" (default), copy = \"copy\"",
        compressed as f64 / MIB
    );

    let copy = server(binary, "copy").await;
    let (copy_first, copy_tar) = first_hydrate(&copy, &small).await?;
    let copy_one = fan_out(&copy, &small, 1).await?;
    let copy_sixteen = fan_out(&copy, &small, 16).await?;
    drop(copy);

    let layer = server(binary, "layer").await;
    let (layer_first, layer_tar) = first_hydrate(&layer, &small).await?;
    let layer_one = fan_out(&layer, &small, 1).await?;
    let layer_sixteen = fan_out(&layer, &small, 16).await?;
    let small_volume = upload(&layer, &small).await?;
    let warm_small = warm_creates(&layer, &small_volume).await?;
    let large_volume = upload(&layer, &large).await?;
    let warm_large = warm_creates(&layer, &large_volume).await?;

    println!("  first hydrate (create with volume - create without), best of 3:");
    for (mode, first, tar) in [
        ("copy ", copy_first, copy_tar),
        ("layer", layer_first, layer_tar),
    ] {
        println!(
            "    {mode}: {:>8.1} ms   tar xzf {:>8.1} ms   ratio {:>5.2}",
            ms(first),
            ms(tar),
            first.as_secs_f64() / tar.as_secs_f64()
        );
    }
    println!("  fan-out of 16 concurrent creates over one volume on a cold node:");
    for (mode, one, sixteen) in [
        ("copy ", &copy_one, &copy_sixteen),
        ("layer", &layer_one, &layer_sixteen),
    ] {
        println!(
            "    {mode}: wall {:>8.1} ms = {:>5.2}x one hydrate ({:.1} ms); S3 GETs {:.0}; \
             disk written {:>7.1} MiB = {:>5.2}x the unpacked size",
            ms(sixteen.wall),
            sixteen.wall.as_secs_f64() / one.wall.as_secs_f64(),
            ms(one.wall),
            sixteen.gets,
            sixteen.disk as f64 / MIB,
            sixteen.disk as f64 / TOTAL as f64,
        );
        if sixteen.layers > 0 {
            println!(
                "           of which the volume's layer: {:.1} MiB = {:.2}x the unpacked size; \
                 the rest is the cached blob and the sandboxes' own disks",
                sixteen.layers as f64 / MIB,
                sixteen.layers as f64 / TOTAL as f64
            );
        }
        println!("           create latency {}", sixteen.latencies);
    }
    println!(
        "  later creates on a node that holds the layer (create with volume - create without):"
    );
    println!("    256 MiB / {FILES} files: {warm_small}");
    println!("    2 GiB / {LARGE_FILES} files : {warm_large}");
    println!(
        "  targets: later create p50/p99 <= 20 ms and the same for both sizes; \
         fan-out 16 <= 1.3x one hydrate with 1 S3 GET and ~1x the unpacked size on disk"
    );
    Ok(())
}

const LARGE_FILES: usize = 2048;

/// 2 GiB in 2,048 files of 1 MiB, a quarter of them noise.
pub(crate) fn large_archive(work_dir: &Path) -> anyhow::Result<PathBuf> {
    let size = 1 << 20;
    let text: Vec<u8> = (0..size).map(|j| b"0123456789,abcdef\n"[j % 18]).collect();
    let noise = testkit::noise(size, 7);
    let files = (0..LARGE_FILES).map(|i| {
        let data = if i % 4 == 0 { &noise } else { &text };
        (format!("d{:02}/f{i:05}.dat", i % 32), data)
    });
    cached_archive(work_dir.join("hydrate-2GiB-2048files.tar.gz"), files)
}

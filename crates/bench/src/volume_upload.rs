use anyhow::Context;
use futures::StreamExt;
use sandbox_blobs::{BlobStore, S3BlobStore, S3Settings};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::{garage, ServerOptions, TestServer};
use tokio_util::io::ReaderStream;

/// A tar.gz of incompressible data, so the compressed size is the figure
/// asked for; cached across runs.
fn archive(work_dir: &Path, size_mib: usize) -> anyhow::Result<PathBuf> {
    let path = work_dir.join(format!("upload-{size_mib}MiB.tar.gz"));
    if path.exists() {
        return Ok(path);
    }
    eprintln!("generating {}", path.display());
    let partial = path.with_extension("partial");
    let file = std::fs::File::create(&partial)?;
    let gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let chunk_mib = 16;
    for i in 0..size_mib.div_ceil(chunk_mib) {
        let data = testkit::noise(chunk_mib << 20, i as u64 + 1);
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("part-{i:04}.bin"), data.as_slice())?;
    }
    tar.into_inner()?.finish()?.flush()?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// Peak resident set of a process, from /proc (VmHWM).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

async fn file_stream(path: &Path) -> anyhow::Result<ReaderStream<tokio::fs::File>> {
    Ok(ReaderStream::with_capacity(
        tokio::fs::File::open(path).await?,
        1 << 20,
    ))
}

async fn direct_put(path: &Path, key: &str) -> anyhow::Result<Duration> {
    let g = garage();
    // The same part size and concurrency the server is configured with.
    let store = S3BlobStore::new(S3Settings {
        endpoint: Some(g["S3_ENDPOINT"].clone()),
        region: g["S3_REGION"].clone(),
        bucket: g["S3_BUCKET"].clone(),
        path_style: true,
        credentials: Some((
            g["AWS_ACCESS_KEY_ID"].clone(),
            g["AWS_SECRET_ACCESS_KEY"].clone(),
        )),
        part_size: 8 << 20,
        max_inflight_parts: 4,
    })?;
    let started = Instant::now();
    let mut upload = store.begin_upload(key).await?;
    let mut stream = file_stream(path).await?;
    while let Some(chunk) = stream.next().await {
        upload.write(chunk?).await?;
    }
    upload.complete().await?;
    let elapsed = started.elapsed();
    store.delete(key).await?;
    Ok(elapsed)
}

async fn through_server(server: &TestServer, path: &Path) -> anyhow::Result<Duration> {
    let size = std::fs::metadata(path)?.len();
    let started = Instant::now();
    let response = server
        .post("/volumes?name=bench")
        .header("content-type", "application/gzip")
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(file_stream(path).await?))
        .send()
        .await?;
    let elapsed = started.elapsed();
    anyhow::ensure!(
        response.status().as_u16() == 201,
        "upload failed: {}",
        response.text().await?
    );
    Ok(elapsed)
}

pub async fn run(binary: &Path, work_dir: &Path, size_mib: usize) -> anyhow::Result<()> {
    let path = archive(work_dir, size_mib)?;
    let size = std::fs::metadata(&path)?.len();
    let server = TestServer::start(ServerOptions::production(binary)).await;
    let pid = server.pid().context("server pid")?;
    let baseline_rss = peak_rss_kib(pid).unwrap_or(0);

    // Interleave the two so drift in machine load hits both alike.
    let mut direct = Vec::new();
    let mut served = Vec::new();
    for round in 0..2 {
        direct.push(direct_put(&path, &format!("bench/direct-{round}.tar.gz")).await?);
        served.push(through_server(&server, &path).await?);
    }
    let best = |runs: &[Duration]| runs.iter().min().copied().unwrap();
    let (direct, served) = (best(&direct), best(&served));
    let mib = size as f64 / (1 << 20) as f64;
    let peak = peak_rss_kib(pid).unwrap_or(0);
    println!("volume upload: {mib:.0} MiB tar.gz, best of 2");
    println!(
        "  direct multipart PUT to Garage : {:>7.2} s  {:>7.1} MiB/s",
        direct.as_secs_f64(),
        mib / direct.as_secs_f64()
    );
    println!(
        "  POST /volumes through server   : {:>7.2} s  {:>7.1} MiB/s",
        served.as_secs_f64(),
        mib / served.as_secs_f64()
    );
    println!(
        "  throughput ratio server/direct : {:.2}  (target >= 0.90)",
        direct.as_secs_f64() / served.as_secs_f64()
    );
    println!(
        "  server peak RSS                : {:.1} MiB (at start {:.1} MiB; target <= 64 MiB)",
        peak as f64 / 1024.0,
        baseline_rss as f64 / 1024.0
    );
    Ok(())
}

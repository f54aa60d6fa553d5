//! Unpack throughput of envd (over a unix socket, through the client) vs
//! `tar -x` of the same archive into a local directory, in the same run.
//!
//! ```text
//! cargo build --release -p envd
//! cargo run --release -p envd --example unpack_bench
//! ```
//! The envd binary is taken from `ENVD_BIN`, else next to this example's
//! target directory (`target/release/envd`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envd_protocol::client::EnvdClient;
use futures::TryStreamExt;
use tokio_util::io::ReaderStream;

const TOKEN: &str = "bench-token";

fn envd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ENVD_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    let candidate = exe.parent().unwrap().parent().unwrap().join("envd");
    assert!(
        candidate.exists(),
        "{} not found: run `cargo build --release -p envd` first or set ENVD_BIN",
        candidate.display()
    );
    candidate
}

/// Writes a tar of `files` files of `file_size` bytes, 100 per directory.
fn make_archive(path: &Path, files: usize, file_size: usize) {
    let out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut builder = tar::Builder::new(out);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut data = vec![0u8; file_size];
    for index in 0..files {
        for word in data.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(file_size as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(
                &mut header,
                format!("dir{:04}/file{index:06}.bin", index / 100),
                &data[..],
            )
            .unwrap();
    }
    builder.into_inner().unwrap();
}

fn time_tar(archive: &Path, dest: &Path) -> Duration {
    std::fs::create_dir_all(dest).unwrap();
    let started = Instant::now();
    let status = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(dest)
        .status()
        .unwrap();
    assert!(status.success());
    started.elapsed()
}

async fn time_envd(
    client: &EnvdClient,
    archive: &Path,
    dest: &str,
) -> (Duration, envd_protocol::UnpackReport) {
    let file = tokio::fs::File::open(archive).await.unwrap();
    let body = ReaderStream::with_capacity(file, 1 << 20).map_err(std::io::Error::other);
    let started = Instant::now();
    let report = client.unpack(dest, "user", body, false).await.unwrap();
    (started.elapsed(), report)
}

fn warm(path: &Path) {
    std::io::copy(
        &mut std::fs::File::open(path).unwrap(),
        &mut std::io::sink(),
    )
    .unwrap();
}

#[tokio::main]
async fn main() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )
    .unwrap();
    let socket = work.path().join("envd.sock");
    let mut envd = Command::new(envd_binary())
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .arg("--root")
        .arg(&root)
        .env("ENVD_ACCESS_TOKEN", TOKEN)
        .env("ENVD_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let client = EnvdClient::unix(&socket, TOKEN);
    while client.health().await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 256 MiB in 2,000 files.
    let big = work.path().join("big.tar");
    make_archive(&big, 2_000, 256 * 1024 * 1024 / 2_000 / 512 * 512);
    warm(&big);
    let tar_time = time_tar(&big, &work.path().join("tar-big"));
    let (envd_time, report) = time_envd(&client, &big, "/envd-big").await;
    let mib = report.bytes as f64 / (1024.0 * 1024.0);
    println!("large: {} files, {mib:.0} MiB", report.files);
    println!(
        "  tar -x : {:>8.3} s  ({:.0} MiB/s)",
        tar_time.as_secs_f64(),
        mib / tar_time.as_secs_f64()
    );
    println!(
        "  envd   : {:>8.3} s  ({:.0} MiB/s)",
        envd_time.as_secs_f64(),
        mib / envd_time.as_secs_f64()
    );
    println!(
        "  ratio envd/tar: {:.2} (target <= 1.2)",
        envd_time.as_secs_f64() / tar_time.as_secs_f64()
    );

    // 20,000 files of 1 KiB.
    let small = work.path().join("small.tar");
    make_archive(&small, 20_000, 1024);
    warm(&small);
    let tar_time = time_tar(&small, &work.path().join("tar-small"));
    let (envd_time, report) = time_envd(&client, &small, "/envd-small").await;
    println!("small: {} files of 1 KiB", report.files);
    println!(
        "  tar -x : {:>8.3} s  ({:.0} files/s)",
        tar_time.as_secs_f64(),
        20_000.0 / tar_time.as_secs_f64()
    );
    println!(
        "  envd   : {:>8.3} s  ({:.0} files/s)",
        envd_time.as_secs_f64(),
        20_000.0 / envd_time.as_secs_f64()
    );
    println!(
        "  ratio envd/tar: {:.2}",
        envd_time.as_secs_f64() / tar_time.as_secs_f64()
    );

    let _ = envd.kill();
    let _ = envd.wait();
}

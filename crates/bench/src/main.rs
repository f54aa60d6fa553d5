//! `sandbox-bench`: benchmarks that compare against a baseline measured in
//! the same run, because these machines are noisy. Run through
//! `scripts/bench.sh`, which builds everything in release mode first.

mod hydrate;
mod load;
mod microvm;
mod phase2;
mod sandbox_create;
mod stats;
mod volume_upload;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
struct Cli {
    /// The release `sandbox-manager` binary.
    #[arg(long, env = "SANDBOX_MANAGER_BIN")]
    server: PathBuf,
    /// Where generated inputs are cached between runs.
    #[arg(long, default_value = "/var/tmp/sandbox-bench")]
    work_dir: PathBuf,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// 1 GiB tar.gz through POST /volumes vs a direct multipart PUT to the
    /// same Garage; prints the throughput ratio and the server's peak RSS.
    VolumeUpload {
        #[arg(long, default_value_t = 1024)]
        size_mib: usize,
    },
    /// Create latency from the warm pool (sequential and a burst), cold
    /// create latency, and the `commands.run("true")` round trip.
    SandboxCreate {
        /// Another `sandbox-manager` build (e.g. before a change), measured
        /// in the same run; figures are then printed as ratios against it.
        #[arg(long, env = "BASELINE_SANDBOX_MANAGER_BIN")]
        baseline_server: Option<PathBuf>,
    },
    /// Hydrate cost vs `tar xzf` of the same archive, and fan-out of 1, 4
    /// and 16 creates over one volume (wall time, S3 GETs and bytes).
    Hydrate,
    /// K clients for M seconds mixing uploads, creates with a volume,
    /// commands, file reads and kills: throughput, p50/p99 per operation
    /// (against a 1-client pass), errors, RSS and fds, leaked machines.
    Load {
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Volume commit of a 256 MiB mount path vs `tar czf` of it, and pause
    /// and resume latency vs a command round trip.
    Phase2,
    /// microVM runtime: cold boot and snapshot restore to envd-ready, warm
    /// create, command round trip, idle PSS, hydrate vs tar xzf.
    Microvm,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.work_dir)?;
    match cli.bench {
        Bench::VolumeUpload { size_mib } => {
            volume_upload::run(&cli.server, &cli.work_dir, size_mib).await
        }
        Bench::SandboxCreate { baseline_server } => {
            sandbox_create::run(&cli.server, baseline_server.as_deref()).await
        }
        Bench::Hydrate => hydrate::run(&cli.server, &cli.work_dir).await,
        Bench::Load { clients, seconds } => load::run(&cli.server, clients, seconds).await,
        Bench::Microvm => microvm::run(&cli.server, &cli.work_dir).await,
        Bench::Phase2 => phase2::run(&cli.server, &cli.work_dir).await,
    }
}

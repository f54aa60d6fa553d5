//! Command line and environment. The access token is never a flag: it comes
//! from `--token-file` or `ENVD_ACCESS_TOKEN` (removed from our environment
//! right away so processes never inherit it).

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Context};
use clap::Parser;

pub const TOKEN_ENV: &str = "ENVD_ACCESS_TOKEN";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(String),
    Unix(PathBuf),
    /// A virtio-serial port inside a VM, by name (`/sys/class/virtio-ports/*/name`).
    VirtioPort(String),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if let Some(address) = value.strip_prefix("tcp:") {
            Ok(Listen::Tcp(address.to_string()))
        } else if let Some(path) = value.strip_prefix("unix:") {
            Ok(Listen::Unix(PathBuf::from(path)))
        } else if let Some(name) = value.strip_prefix("virtio-port:") {
            Ok(Listen::VirtioPort(name.to_string()))
        } else {
            Err(format!(
                "expected tcp:HOST:PORT, unix:/path or virtio-port:NAME, got {value:?}"
            ))
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "envd",
    version,
    about = "In-sandbox agent: file and process API"
)]
pub struct Args {
    /// Where to serve: `tcp:HOST:PORT` or `unix:/path/to.sock`.
    #[arg(long, env = "ENVD_LISTEN", default_value = "tcp:0.0.0.0:49983")]
    pub listen: Listen,

    /// Directory all file-API paths (and process working directories) resolve under.
    #[arg(long, env = "ENVD_ROOT", default_value = "/")]
    pub root: PathBuf,

    /// File holding the access token (read once at start).
    #[arg(long, env = "ENVD_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Delete the token file after reading it.
    #[arg(long)]
    pub delete_token_file: bool,

    /// Start without a token and take it (with the clock, entropy and
    /// hostname) from the first `POST /init`. For VMs cloned from one
    /// snapshot, whose memory is identical until that call.
    #[arg(long, env = "ENVD_AWAIT_INIT")]
    pub await_init: bool,

    /// envd is PID 1 of a VM: mount /proc, /sys, /dev and friends and bring
    /// up the network before serving.
    #[arg(long, env = "ENVD_GUEST_INIT")]
    pub guest_init: bool,

    /// Capture limit per output stream of a process, in bytes.
    #[arg(long, env = "ENVD_MAX_OUTPUT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_output_bytes: usize,
}

/// Reads the token from the file or the environment and clears the env var;
/// `None` with `--await-init` (the token then comes from `POST /init`).
pub fn take_token(args: &Args) -> anyhow::Result<Option<String>> {
    let from_env = std::env::var(TOKEN_ENV).ok();
    // Single-threaded still (called before the runtime starts), so editing
    // the environment is sound.
    std::env::remove_var(TOKEN_ENV);
    if args.await_init {
        return Ok(None);
    }
    let token = match &args.token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading token file {}", path.display()))?;
            if args.delete_token_file {
                std::fs::remove_file(path)
                    .with_context(|| format!("deleting token file {}", path.display()))?;
            }
            token
        }
        None => match from_env {
            Some(token) => token,
            None => bail!("no access token: pass --token-file PATH or set {TOKEN_ENV}"),
        },
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("the access token is empty");
    }
    Ok(Some(token))
}

//! envd: the agent inside every sandbox. Serves the file and process API
//! over HTTP/1.1 or HTTP/2 on TCP or a unix socket; see `envd-protocol` for
//! the wire types and the client.

mod auth;
mod block;
mod body;
mod config;
mod error;
mod extract;
mod files;
mod guest;
mod init;
mod pack;
mod paths;
mod process;
mod process_api;
mod pty;
mod reaper;
mod server;
mod sys;
mod unpack;
mod usage;
mod users;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = config::Args::parse();
    // Before any thread exists: the token is removed from our environment.
    let token = config::take_token(&args)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENVD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    // Files and directories get exactly the modes envd asks for; processes
    // get the usual 022 back (see process.rs).
    // SAFETY: plain syscall.
    unsafe { libc::umask(0) };

    if args.guest_init {
        guest::init_system().context("setting up the VM as its init")?;
    }

    let root = paths::SandboxRoot::new(&args.root)
        .with_context(|| format!("opening root {}", args.root.display()))?;
    // The sandbox env is the environment envd was started with, minus envd's own settings.
    let sandbox_env: BTreeMap<String, String> = std::env::vars()
        .filter(|(key, _)| !key.starts_with("ENVD_"))
        .collect();
    let reaper = Arc::new(reaper::Reaper::default());
    let state = Arc::new(server::AppState {
        root,
        users: users::Users::new(),
        processes: process::ProcessManager::new(sandbox_env, args.max_output_bytes, reaper.clone()),
        token: token.map(std::sync::OnceLock::from).unwrap_or_default(),
        init_lock: tokio::sync::Mutex::new(()),
        guest: args.guest_init,
    });
    if !state.users.can_switch() {
        tracing::warn!(
            "envd is not root: processes run as its own uid and file ownership is not changed"
        );
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        reaper.start_if_init();
        server::serve(&args.listen, server::router(state)).await
    })
}

//! Routes and the listener loop. One listener speaks HTTP/1.1 and HTTP/2
//! (prior knowledge) through hyper-util's auto builder, on TCP or a unix
//! socket.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::{delete, get, post, put};
use axum::{middleware, Json, Router};
use envd_protocol::{routes, Health, PROTOCOL_VERSION};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::Listen;
use crate::error::ApiError;
use crate::paths::SandboxRoot;
use crate::process::ProcessManager;
use crate::users::Users;
use crate::{auth, block, files, guest, init, pack, process_api, pty, unpack, usage};

pub struct AppState {
    pub root: SandboxRoot,
    pub users: Users,
    pub processes: ProcessManager,
    /// Set at start, or by the one `POST /init` (`--await-init`).
    pub token: std::sync::OnceLock<String>,
    pub init_lock: tokio::sync::Mutex<()>,
    /// envd is a VM's init (`--guest-init`): it may mount the VM's disks.
    pub guest: bool,
}

pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route(
            routes::FILES,
            put(files::write).get(files::read).delete(files::remove),
        )
        .route(routes::FILES_LIST, get(files::list))
        .route(routes::FILES_STAT, get(files::stat))
        .route(routes::FILES_EXISTS, get(files::exists))
        .route(routes::FILES_MKDIR, post(files::mkdir))
        .route(routes::FILES_RENAME, post(files::rename))
        .route(routes::FILES_UNPACK, post(unpack::unpack))
        .route(routes::FILES_ARCHIVE, get(pack::archive))
        .route(routes::USAGE, get(usage::usage))
        .route(routes::PTY, post(pty::start))
        .route("/pty/{pid}/stream", get(pty::stream))
        .route("/pty/{pid}/resize", post(pty::resize))
        .route(routes::VOLUMES_BLOCK_MOUNT, post(block::mount))
        .route(routes::VOLUMES_BLOCK_UNMOUNT, post(block::unmount))
        .route(routes::ENV, put(process_api::set_env))
        .route(routes::PROCESSES, get(process_api::list))
        .route(routes::PROCESSES_RUN, post(process_api::run))
        .route(routes::PROCESSES_START, post(process_api::start))
        .route(routes::PROCESSES_STREAM, post(process_api::stream))
        .route("/processes/{pid}", delete(process_api::kill))
        .route("/processes/{pid}/wait", post(process_api::wait))
        .route("/processes/{pid}/stdin", post(process_api::write_stdin))
        .route(
            "/processes/{pid}/stdin/close",
            post(process_api::close_stdin),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .route(routes::HEALTH, get(health))
        .route(routes::INIT, post(init::init))
        .merge(protected)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        // Uploads are streamed to disk, never buffered: no body size limit.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        protocol_version: PROTOCOL_VERSION,
        version: env!("CARGO_PKG_VERSION").into(),
        can_switch_users: state.users.can_switch(),
    })
}

pub async fn serve(listen: &Listen, app: Router) -> anyhow::Result<()> {
    match listen {
        Listen::Tcp(address) => {
            let listener = tokio::net::TcpListener::bind(address).await?;
            tracing::info!(address = %listener.local_addr()?, "envd listening on tcp");
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                serve_connection(stream, app.clone());
            }
        }
        Listen::Unix(path) => {
            // A socket file left by a previous run would make bind fail.
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path)?;
            tracing::info!(path = %path.display(), "envd listening on unix socket");
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => serve_connection(stream, app.clone()),
                    Err(error) => tracing::warn!(%error, "accept failed"),
                }
            }
        }
        Listen::VirtioPort(name) => {
            let path = guest::find_virtio_port(name)?;
            let port = guest::VirtioPort::open(&path)?;
            tracing::info!(path = %path.display(), "envd serving on virtio-serial port");
            // The host snapshots a template VM as soon as it reads this.
            eprintln!("{}", guest::READY_MARKER);
            loop {
                let app = app.clone();
                let ended = guest::serve_sessions(port.clone(), move |stream| {
                    serve_connection(stream, app.clone())
                })
                .await;
                // Only if the relay went away; a new one may come.
                tracing::warn!(?ended, "host channel ended; waiting for it to return");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

fn http2_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Large windows so one big h2 upload is not throttled by flow control.
    builder
        .http2()
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024);
    builder
}

fn serve_connection<S>(stream: S, app: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = TowerToHyperService::new(app);
        if let Err(error) = http2_builder()
            .serve_connection(TokioIo::new(stream), service)
            .await
        {
            tracing::debug!(%error, "connection ended with an error");
        }
    });
}

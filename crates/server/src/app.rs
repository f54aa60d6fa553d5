//! Wiring: state, router, start-up duties and the serve loop.

use crate::config::{BlobBackend, Config};
use crate::quotas::Quotas;
use crate::reconcile::{Reconciler, Uploads};
use crate::routes::{
    commands, files, health, pause, pty, sandboxes, snapshots, templates, usage, volumes, writeback,
};
use crate::{auth, metrics, node};
use anyhow::Context;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue, Version};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use sandbox_blobs::{BlobStore, LocalBlobStore, S3BlobStore, S3Settings};
use sandbox_orchestrator::Orchestrator;
use sandbox_store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    pub orchestrator: Arc<Orchestrator>,
    pub quotas: Arc<Quotas>,
    /// Volume uploads running in this process (the reconciler spares them).
    pub uploads: Uploads,
}

/// `data_dir` is `rwx--x--x`: nobody else may list or read it, but the
/// microVM runtime's unprivileged QEMU may pass through to its images.
/// What holds tenant data or secrets in it is private in its own right
/// (database 0600, blobs and blob cache 0700, api-key 0600).
const DATA_DIR_MODE: u32 = 0o711;

fn prepare_data_dir(config: &Config) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating data_dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DATA_DIR_MODE))
        .with_context(|| format!("restricting data_dir {}", dir.display()))?;
    if config.database.url.is_empty() {
        // Created 0600 before SQLite opens it; SQLite gives its -wal and
        // -shm files the database file's mode.
        let db = config.data_dir.join("sandbox-manager.db");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&db)
            .with_context(|| format!("creating {}", db.display()))?;
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    prepare_data_dir(config)?;
    let url = config.database_url();
    let store = sandbox_store::connect(&url, config.database.max_connections)
        .await
        .with_context(|| format!("connecting to the {} store", store_kind(&url)))?;
    store.migrate().await.context("running migrations")?;
    Ok(store)
}

fn store_kind(url: &str) -> &'static str {
    if url.starts_with("sqlite:") {
        "SQLite"
    } else {
        "Postgres"
    }
}

pub async fn open_blobs(config: &Config) -> anyhow::Result<Arc<dyn BlobStore>> {
    Ok(match config.blobs.backend {
        BlobBackend::Local => Arc::new(LocalBlobStore::open(config.blob_dir()).await?),
        BlobBackend::S3 => {
            let s3 = &config.blobs.s3;
            anyhow::ensure!(
                !s3.bucket.is_empty(),
                "blobs.s3.bucket must be set for the s3 backend"
            );
            let credentials = (!s3.access_key_id.is_empty())
                .then(|| (s3.access_key_id.clone(), s3.secret_access_key.clone()));
            Arc::new(S3BlobStore::new(S3Settings {
                endpoint: (!s3.endpoint.is_empty()).then(|| s3.endpoint.clone()),
                region: s3.region.clone(),
                bucket: s3.bucket.clone(),
                path_style: s3.path_style,
                credentials,
                part_size: s3.part_size_mib << 20,
                max_inflight_parts: s3.max_inflight_parts,
            })?)
        }
    })
}

/// The API router and its OpenAPI document, built from the same handler
/// list (`routes!` reads each handler's `#[utoipa::path]`), so a route is
/// served exactly when it is documented.
pub fn api_router(state: AppState) -> (Router, utoipa::openapi::OpenApi) {
    let (router, mut document) = api_routes().split_for_parts();
    crate::openapi::document_paused_answers(&mut document);
    (router.with_state(state), document)
}

/// The OpenAPI document alone (`sandbox-manager openapi` prints it).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let mut document = api_routes().split_for_parts().1;
    crate::openapi::document_paused_answers(&mut document);
    document
}

fn api_routes() -> OpenApiRouter<AppState> {
    let refused_upload_closes = || axum::middleware::from_fn(close_after_refused_upload);
    OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .routes(routes!(volumes::list, volumes::create).layer(refused_upload_closes()))
        .routes(routes!(volumes::get, volumes::delete))
        .routes(routes!(volumes::download))
        .routes(routes!(writeback::snapshot))
        .routes(routes!(writeback::commit))
        .routes(routes!(sandboxes::list, sandboxes::create))
        .routes(routes!(sandboxes::kill_many))
        .routes(routes!(sandboxes::get, sandboxes::kill))
        .routes(routes!(sandboxes::status))
        .routes(routes!(sandboxes::set_timeout))
        .routes(routes!(snapshots::create))
        .routes(routes!(snapshots::list_for_sandbox))
        .routes(routes!(snapshots::list_all))
        .routes(routes!(snapshots::delete))
        .routes(routes!(snapshots::restore))
        .routes(routes!(templates::build))
        .routes(routes!(templates::rebuild))
        .routes(routes!(templates::status))
        .routes(routes!(usage::metrics))
        .routes(routes!(pause::pause))
        .routes(routes!(pause::resume))
        .routes(routes!(commands::list, commands::run))
        .routes(routes!(commands::stream))
        .routes(routes!(commands::kill))
        .routes(routes!(commands::wait))
        .routes(routes!(commands::stdin))
        .routes(routes!(pty::create))
        .routes(routes!(pty::stream))
        .routes(routes!(pty::input))
        .routes(routes!(pty::resize, pty::kill))
        .routes(routes!(
            files::read,
            files::write,
            files::remove,
            files::rename
        ))
        .routes(routes!(files::read_raw, files::write_raw).layer(refused_upload_closes()))
        .routes(routes!(files::write_batch))
        .routes(routes!(files::list))
        .routes(routes!(files::exists))
        .routes(routes!(files::info))
        .routes(routes!(files::mkdir))
        .routes(routes!(files::watch))
        .routes(routes!(health::health))
}

pub fn router(state: AppState) -> Router {
    let http = state.config.http.clone();
    let (api, document) = api_router(state);
    let document = Arc::new(document);
    let api = api.route(
        "/openapi.json",
        get(move || {
            let document = document.clone();
            async move { axum::Json(document) }
        }),
    );
    let metrics_routes = Router::new()
        .route("/metrics", get(metrics::render))
        .with_state(metrics::recorder());
    api.merge(metrics_routes)
        .layer(axum::middleware::from_fn(metrics::track))
        // JSON bodies above the cap get 413 (the Declaw SDKs expect 413
        // there); raw uploads lift it and enforce their own.
        .layer(DefaultBodyLimit::max(http.max_json_body_bytes))
        // Every request body, uploads included, must keep data coming.
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(
            http.body_chunk_timeout_secs.max(1),
        )))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let request_id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", %request_id, method = %request.method(), path = %request.uri().path())
            }),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// An upload refused before its body was read (413 on a declared length,
/// a bad archive) leaves unread bytes on an HTTP/1 connection, which the
/// server then closes. Saying so in the response keeps clients from
/// reusing it for their next request (seen: httpx's next call failed with
/// "Server disconnected" when it raced the close).
async fn close_after_refused_upload(request: Request, next: axum::middleware::Next) -> Response {
    let http1 = request.version() < Version::HTTP_2;
    let mut response = next.run(request).await;
    let status = response.status();
    if http1 && (status.is_client_error() || status.is_server_error()) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// On first start (no keys at all) create owner `default` with a key, print
/// it once and keep it in `{data_dir}/api-key`, readable by us alone.
async fn bootstrap_default_key(config: &Config, store: &dyn Store) -> anyhow::Result<()> {
    if store.count_api_keys().await? > 0 {
        return Ok(());
    }
    let (_, key) = auth::create_key(store, "default").await?;
    std::fs::create_dir_all(&config.data_dir)?;
    let path = config.data_dir.join("api-key");
    write_private(&path, &format!("{key}\n"))?;
    println!(
        "created owner 'default'; its API key (also in {}):",
        path.display()
    );
    println!("{key}");
    Ok(())
}

fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    let store = open_store(&config).await?;
    let blobs = open_blobs(&config).await?;
    tracing::info!(store = store.backend(), blobs = %blobs.describe(), "storage ready");
    bootstrap_default_key(&config, store.as_ref()).await?;

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    let orchestrator = node::start(&config, store.clone(), blobs.clone()).await?;
    let limits = config.http.connection_limits();
    let uploads = Uploads::default();
    // Leftovers of an earlier run go before the first request is served,
    // then the same pass runs periodically.
    let reconciler = Arc::new(Reconciler {
        store: store.clone(),
        blobs: blobs.clone(),
        orchestrator: orchestrator.clone(),
        uploads: uploads.clone(),
        config: config.reconcile.clone(),
    });
    reconciler.run_once().await;
    reconciler.start();
    let state = AppState {
        quotas: Arc::new(Quotas::new(config.quotas.clone(), store.clone())),
        config: Arc::new(config),
        store,
        blobs,
        orchestrator: orchestrator.clone(),
        uploads,
    };
    tracing::info!(%address, "serving");
    // Tests and scripts read this line to learn the port when listening on :0.
    println!("listening on {address}");
    crate::serve::serve(listener, router(state), limits, shutdown_signal()).await;
    // A boot in flight may take its time; the process does not wait for it.
    if tokio::time::timeout(limits.shutdown_grace, orchestrator.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("warm pool teardown did not finish in the grace period");
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

//! `/volumes`: upload a tar.gz once, then list, fetch, download, delete.

use crate::app::AppState;
use crate::archive::{ArchiveError, ArchiveInspector, ArchiveSummary, Inspected, GZIP_MAGIC};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::views::{VolumeListView, VolumeView};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use rand::Rng;
use sandbox_blobs::{volume_key, BlobUpload};
use sandbox_store::{NewVolume, Volume};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

#[derive(Deserialize)]
pub struct CreateQuery {
    name: Option<String>,
}

const MAX_NAME_LEN: usize = 256;

fn new_volume_id() -> String {
    format!("vol-{:08x}", rand::rng().random::<u32>())
}

/// Why an upload stopped before its blob was committed.
pub(crate) enum UploadFailure {
    TooLarge(u64),
    Archive(ArchiveError),
    Storage(sandbox_blobs::BlobError),
    Body(String),
    /// The client stopped sending (the body-timeout layer cut it).
    Stalled,
    /// A sandbox's agent, packing the bytes, failed or stopped.
    Agent(String),
}

impl From<UploadFailure> for ApiError {
    fn from(failure: UploadFailure) -> Self {
        match failure {
            UploadFailure::TooLarge(cap) => ApiError::PayloadTooLarge(format!(
                "volume upload exceeds the {cap}-byte limit (upload cap or remaining storage quota)"
            )),
            UploadFailure::Archive(e) => ApiError::BadRequest(e.to_string()),
            UploadFailure::Storage(e) => e.into(),
            UploadFailure::Body(e) => ApiError::BadRequest(format!("reading request body: {e}")),
            UploadFailure::Stalled => {
                ApiError::RequestTimeout("the upload stopped sending data; nothing was kept".into())
            }
            UploadFailure::Agent(e) => ApiError::BadGateway(format!(
                "packing inside the sandbox failed: {e}; nothing was kept"
            )),
        }
    }
}

/// A body error caused by the body-timeout layer, told apart from others.
fn body_failure(error: axum::Error) -> UploadFailure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(cause) = source {
        if cause.is::<tower_http::timeout::TimeoutError>() {
            return UploadFailure::Stalled;
        }
        source = cause.source();
    }
    UploadFailure::Body(error.to_string())
}

struct StoredBlob {
    size: u64,
    sha256: String,
    summary: ArchiveSummary,
}

/// Streams the body into `upload` while checking the gzip magic, the size
/// cap and the archive itself, and hashing. Commits only a valid blob.
async fn stream_into<S>(
    mut chunks: S,
    mut upload: Box<dyn BlobUpload>,
    cap: u64,
    limits: sandbox_archive::Limits,
) -> Result<StoredBlob, UploadFailure>
where
    S: Stream<Item = Result<Bytes, UploadFailure>> + Send + Unpin,
{
    let mut inspector = ArchiveInspector::start(limits);
    let mut size: u64 = 0;
    let mut head: Vec<u8> = Vec::with_capacity(2);
    let outcome = async {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            if size > cap {
                return Err(UploadFailure::TooLarge(cap));
            }
            if head.len() < 2 {
                head.extend(chunk.iter().take(2 - head.len()));
                if head.len() == 2 && head != GZIP_MAGIC {
                    return Err(UploadFailure::Archive(ArchiveError::NotGzip));
                }
            }
            metrics::counter!("volume_upload_bytes_total").increment(chunk.len() as u64);
            if !inspector.feed(chunk.clone()).await {
                break; // The walker already rejected the archive.
            }
            upload.write(chunk).await.map_err(UploadFailure::Storage)?;
        }
        if size == 1 {
            return Err(UploadFailure::Archive(ArchiveError::NotGzip));
        }
        if size == 0 {
            // An empty body is an empty volume.
            return Ok(Inspected {
                summary: ArchiveSummary::default(),
                sha256: hex::encode(Sha256::digest(b"")),
            });
        }
        inspector.finish().await.map_err(UploadFailure::Archive)
    }
    .await;
    match outcome {
        Ok(Inspected { summary, sha256 }) => {
            let size = upload.complete().await.map_err(UploadFailure::Storage)?;
            Ok(StoredBlob {
                size,
                sha256,
                summary,
            })
        }
        Err(failure) => {
            if let Err(e) = upload.abort().await {
                tracing::warn!(error = %e, "could not abort a failed upload");
            }
            Err(failure)
        }
    }
}

/// A client's upload; see [`store_new_volume`].
#[utoipa::path(
    post, path = "/volumes", tag = "volumes",
    params(("name" = Option<String>, Query, description = "Volume name (default `volume`)")),
    request_body(content = Vec<u8>, content_type = "application/gzip", description = "A gzip-compressed tar archive, streamed"),
    responses((status = 201, description = "Stored", body = VolumeView), (status = 400, description = "Malformed request", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 408, description = "The body stopped arriving", body = crate::views::ErrorView), (status = 413, description = "Body or quota too large", body = crate::views::ErrorView), (status = 429, description = "Owner quota reached", body = crate::views::ErrorView), (status = 503, description = "A dependency is unavailable", body = crate::views::ErrorView))
)]
pub async fn create(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Query(query): Query<CreateQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let configured_cap = state.config.volumes.max_upload_bytes;
    if super::declared_length(&headers).is_some_and(|len| len > configured_cap) {
        return Err(UploadFailure::TooLarge(configured_cap).into());
    }
    let admission = state.quotas.admit_upload(&owner.id, configured_cap).await?;
    let cap = admission.byte_allowance;
    if super::declared_length(&headers).is_some_and(|len| len > cap) {
        return Err(UploadFailure::TooLarge(cap).into());
    }
    // The body is checked to be a gzip tarball, so that is what is stored,
    // whatever a client's defaults said (curl's --data-binary sends
    // application/x-www-form-urlencoded); a gzip flavour it named is kept.
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|ct| ct.len() <= 128 && ct.contains("gzip"))
        .unwrap_or("application/gzip")
        .to_string();
    let source = NewVolumeSource {
        name: query.name.unwrap_or_default(),
        content_type,
        metadata: BTreeMap::new(),
        cap,
    };
    let chunks = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(body_failure));
    let volume = store_new_volume(&state, &owner.id, source, chunks).await?;
    drop(admission);
    Ok((StatusCode::CREATED, Json(VolumeView::from(volume))).into_response())
}

/// What a new volume is called and how many bytes it may take.
pub(crate) struct NewVolumeSource {
    pub name: String,
    pub content_type: String,
    pub metadata: BTreeMap<String, String>,
    /// The caller's upload allowance (see `Quotas::admit_upload`).
    pub cap: u64,
}

/// Stores a tar.gz arriving as `chunks` as a new volume of `owner_id`: the
/// one path every volume's bytes take, whether a client uploads them or a
/// sandbox's agent packs them.
///
/// Order of events, so that no crash or failure leaves a blob without a
/// row or a row claiming a blob that is not there: a `pending` row first
/// (invisible to the API), then the blob, then the row turns `ready`. A
/// failed upload removes its row; a crashed one is removed by the
/// reconciler (see `crate::reconcile`).
pub(crate) async fn store_new_volume<S>(
    state: &AppState,
    owner_id: &str,
    source: NewVolumeSource,
    chunks: S,
) -> ApiResult<Volume>
where
    S: Stream<Item = Result<Bytes, UploadFailure>> + Send + Unpin,
{
    if source.name.len() > MAX_NAME_LEN {
        return Err(ApiError::BadRequest(format!(
            "volume name is limited to {MAX_NAME_LEN} bytes"
        )));
    }
    let mut id = new_volume_id();
    while state.store.volume_id_exists(&id).await? {
        id = new_volume_id();
    }
    let key = volume_key(owner_id, &id);
    let mut new = NewVolume {
        id: id.clone(),
        owner_id: owner_id.to_string(),
        name: source.name,
        blob_key: key.clone(),
        size_bytes: 0,
        sha256: String::new(),
        content_type: source.content_type,
        uncompressed_bytes: 0,
        entry_count: 0,
        metadata: source.metadata,
    };
    // Registered before the row exists, so the reconciler never takes a
    // live upload's row or partial blob for a crashed one.
    let _running = state.uploads.register(&id, &key);
    state.store.insert_pending_volume(&new).await?;
    let started = std::time::Instant::now();
    let stored = async {
        let upload = state.blobs.begin_upload(&key).await?;
        let limits = state.config.volumes.archive_limits();
        stream_into(chunks, upload, source.cap, limits)
            .await
            .map_err(ApiError::from)
    }
    .await;
    let blob = match stored {
        Ok(blob) => blob,
        Err(e) => {
            forget_pending(state, &id, &key).await;
            return Err(e);
        }
    };
    new.size_bytes = blob.size as i64;
    new.sha256 = blob.sha256;
    new.uncompressed_bytes = blob.summary.uncompressed_bytes as i64;
    new.entry_count = blob.summary.entries as i64;
    let volume = match state.store.finish_pending_volume(&new).await {
        Ok(Some(volume)) => volume,
        outcome => {
            // The row could not turn ready: take the blob back rather than
            // keep bytes nobody can reach (the reconciler retries if this
            // fails too).
            forget_pending(state, &id, &key).await;
            return Err(match outcome {
                Err(e) => e.into(),
                _ => ApiError::Unavailable("the upload's record vanished; retry".into()),
            });
        }
    };
    tracing::info!(
        volume_id = %volume.id, owner_id, bytes = blob.size,
        entries = blob.summary.entries, elapsed_ms = started.elapsed().as_millis() as u64,
        "volume stored"
    );
    Ok(volume)
}

/// Undoes a failed upload: its blob (if committed), then its pending row.
async fn forget_pending(state: &AppState, id: &str, key: &str) {
    if let Err(e) = state.blobs.delete(key).await {
        tracing::warn!(volume_id = id, error = %e, "could not remove a failed upload's blob; the reconciler will");
        return;
    }
    if let Err(e) = state
        .store
        .delete_volume_row(id, sandbox_store::VolumeState::Pending)
        .await
    {
        tracing::warn!(volume_id = id, error = %e, "could not remove a failed upload's row; the reconciler will");
    }
}

#[utoipa::path(
    get, path = "/volumes", tag = "volumes",
    responses((status = 200, description = "The caller's ready volumes", body = VolumeListView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView))
)]
pub async fn list(
    State(state): State<AppState>,
    Caller(owner): Caller,
) -> ApiResult<Json<VolumeListView>> {
    let volumes = state
        .store
        .list_volumes(&owner.id)
        .await?
        .into_iter()
        .map(VolumeView::from)
        .collect();
    Ok(Json(VolumeListView { volumes }))
}

async fn owned_volume(state: &AppState, owner_id: &str, id: &str) -> ApiResult<Volume> {
    state
        .store
        .get_volume(owner_id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("volume {id}")))
}

#[utoipa::path(
    get, path = "/volumes/{id}", tag = "volumes", params(("id" = String, Path, description = "Volume id (`vol-…`)")),
    responses((status = 200, description = "The volume", body = VolumeView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView))
)]
pub async fn get(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<VolumeView>> {
    Ok(Json(owned_volume(&state, &owner.id, &id).await?.into()))
}

#[utoipa::path(
    get, path = "/volumes/{id}/download", tag = "volumes", params(("id" = String, Path, description = "Volume id (`vol-…`)")),
    responses((status = 200, description = "The archive as uploaded", content_type = "application/gzip", body = Vec<u8>), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView), (status = 503, description = "A dependency is unavailable", body = crate::views::ErrorView))
)]
pub async fn download(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let volume = owned_volume(&state, &owner.id, &id).await?;
    let blob = state.blobs.get(&volume.blob_key).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/gzip".to_string()),
            (header::CONTENT_LENGTH, blob.size.to_string()),
        ],
        Body::from_stream(blob.stream),
    )
        .into_response())
}

#[utoipa::path(
    delete, path = "/volumes/{id}", tag = "volumes", params(("id" = String, Path, description = "Volume id (`vol-…`)")),
    responses((status = 204, description = "Deleted; copies in running sandboxes stay"), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown, or another owner's", body = crate::views::ErrorView))
)]
pub async fn delete(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let Some(volume) = state.store.get_volume_any_state(&owner.id, &id).await? else {
        return Err(ApiError::NotFound(format!("volume {id}")));
    };
    // Mark first so no new attach can start, then drop the blob. If the
    // blob removal fails (or the process dies here), the blob has no live
    // row and the reconciler removes it; deleting again retries it too.
    if state.store.mark_volume_deleted(&owner.id, &id).await? {
        tracing::info!(volume_id = %id, owner_id = %owner.id, "volume deleted");
    }
    state.orchestrator.forget_volume(&id).await;
    if let Err(e) = state.blobs.delete(&volume.blob_key).await {
        // The volume is gone for every caller already; its bytes go at the
        // reconciler's next pass (a blob without a live row).
        tracing::warn!(volume_id = %id, error = %e, "volume blob removal failed; left to the reconciler");
    }
    Ok(StatusCode::NO_CONTENT)
}

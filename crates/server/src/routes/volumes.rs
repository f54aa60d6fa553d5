//! `/volumes`: upload a tar.gz once, then list, fetch, download, delete.

use crate::app::AppState;
use crate::archive::{ArchiveError, ArchiveInspector, ArchiveSummary, GZIP_MAGIC};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::timefmt::iso_utc;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use rand::Rng;
use sandbox_blobs::{volume_key, BlobUpload};
use sandbox_store::{NewVolume, Volume};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The Volume JSON the SDKs parse (the shape in their `Volume` types). `size_bytes` is the
/// stored (compressed) blob size.
#[derive(Serialize)]
pub struct VolumeBody {
    volume_id: String,
    owner_id: String,
    name: String,
    blob_key: String,
    size_bytes: i64,
    content_type: String,
    metadata: BTreeMap<String, String>,
    created_at: String,
    updated_at: String,
    backend: &'static str,
    quota_bytes: i64,
    sha256: String,
    uncompressed_bytes: i64,
    entry_count: i64,
}

impl From<Volume> for VolumeBody {
    fn from(v: Volume) -> Self {
        VolumeBody {
            volume_id: v.id,
            owner_id: v.owner_id,
            name: v.name,
            blob_key: v.blob_key,
            size_bytes: v.size_bytes,
            content_type: v.content_type,
            metadata: v.metadata,
            created_at: iso_utc(v.created_at),
            updated_at: iso_utc(v.updated_at),
            backend: "tarball",
            quota_bytes: 0,
            sha256: v.sha256,
            uncompressed_bytes: v.uncompressed_bytes,
            entry_count: v.entry_count,
        }
    }
}

#[derive(Deserialize)]
pub struct CreateQuery {
    name: Option<String>,
}

fn new_volume_id() -> String {
    format!("vol-{:08x}", rand::rng().random::<u32>())
}

/// Why an upload stopped before its blob was committed.
enum UploadFailure {
    TooLarge(u64),
    Archive(ArchiveError),
    Storage(sandbox_blobs::BlobError),
    Body(String),
}

impl From<UploadFailure> for ApiError {
    fn from(failure: UploadFailure) -> Self {
        match failure {
            UploadFailure::TooLarge(cap) => {
                ApiError::PayloadTooLarge(format!("volume upload exceeds the {cap}-byte limit"))
            }
            UploadFailure::Archive(e) => ApiError::BadRequest(e.to_string()),
            UploadFailure::Storage(e) => e.into(),
            UploadFailure::Body(e) => ApiError::BadRequest(format!("reading request body: {e}")),
        }
    }
}

struct StoredBlob {
    size: u64,
    sha256: String,
    summary: ArchiveSummary,
}

/// Streams the body into `upload` while checking the gzip magic, the size
/// cap and the archive itself, and hashing. Commits only a valid blob.
async fn stream_into(
    body: Body,
    mut upload: Box<dyn BlobUpload>,
    cap: u64,
) -> Result<StoredBlob, UploadFailure> {
    let mut inspector = ArchiveInspector::start();
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    let mut head: Vec<u8> = Vec::with_capacity(2);
    let mut stream = body.into_data_stream();
    let outcome = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| UploadFailure::Body(e.to_string()))?;
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
            hasher.update(&chunk);
            metrics::counter!("volume_upload_bytes_total").increment(chunk.len() as u64);
            if !inspector.feed(chunk.clone()).await {
                break; // The walker already rejected the archive.
            }
            upload.write(chunk).await.map_err(UploadFailure::Storage)?;
        }
        if size == 1 {
            return Err(UploadFailure::Archive(ArchiveError::NotGzip));
        }
        let summary = if size == 0 {
            ArchiveSummary::default() // An empty body is an empty volume.
        } else {
            inspector.finish().await.map_err(UploadFailure::Archive)?
        };
        Ok(summary)
    }
    .await;
    match outcome {
        Ok(summary) => {
            let size = upload.complete().await.map_err(UploadFailure::Storage)?;
            Ok(StoredBlob {
                size,
                sha256: hex::encode(hasher.finalize()),
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

pub async fn create(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Query(query): Query<CreateQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let cap = state.config.volumes.max_upload_bytes;
    if super::declared_length(&headers).is_some_and(|len| len > cap) {
        return Err(UploadFailure::TooLarge(cap).into());
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|ct| !ct.is_empty() && !ct.starts_with("application/json"))
        .unwrap_or("application/gzip")
        .to_string();

    let mut id = new_volume_id();
    while state.store.volume_id_exists(&id).await? {
        id = new_volume_id();
    }
    let key = volume_key(&owner.id, &id);
    let upload = state.blobs.begin_upload(&key).await?;
    let started = std::time::Instant::now();
    let blob = stream_into(body, upload, cap)
        .await
        .map_err(ApiError::from)?;

    let new = NewVolume {
        id,
        owner_id: owner.id.clone(),
        name: query.name.unwrap_or_default(),
        blob_key: key.clone(),
        size_bytes: blob.size as i64,
        sha256: blob.sha256,
        content_type,
        uncompressed_bytes: blob.summary.uncompressed_bytes as i64,
        entry_count: blob.summary.entries as i64,
        metadata: BTreeMap::new(),
    };
    let volume = match state.store.insert_volume(&new).await {
        Ok(volume) => volume,
        Err(e) => {
            // No row, no blob: never leave an orphan behind.
            let _ = state.blobs.delete(&key).await;
            return Err(e.into());
        }
    };
    tracing::info!(
        volume_id = %volume.id, owner_id = %owner.id, bytes = blob.size,
        entries = blob.summary.entries, elapsed_ms = started.elapsed().as_millis() as u64,
        "volume uploaded"
    );
    Ok((StatusCode::CREATED, Json(VolumeBody::from(volume))).into_response())
}

pub async fn list(
    State(state): State<AppState>,
    Caller(owner): Caller,
) -> ApiResult<Json<serde_json::Value>> {
    let volumes: Vec<VolumeBody> = state
        .store
        .list_volumes(&owner.id)
        .await?
        .into_iter()
        .map(VolumeBody::from)
        .collect();
    Ok(Json(serde_json::json!({ "volumes": volumes })))
}

async fn owned_volume(state: &AppState, owner_id: &str, id: &str) -> ApiResult<Volume> {
    state
        .store
        .get_volume(owner_id, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("volume {id}")))
}

pub async fn get(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<VolumeBody>> {
    Ok(Json(owned_volume(&state, &owner.id, &id).await?.into()))
}

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

pub async fn delete(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let Some(volume) = state.store.get_volume_any_state(&owner.id, &id).await? else {
        return Err(ApiError::NotFound(format!("volume {id}")));
    };
    // Mark first so no new attach can start, then drop the blob. Deleting
    // again retries the blob removal (a no-op once it is gone) and succeeds.
    if state.store.mark_volume_deleted(&owner.id, &id).await? {
        tracing::info!(volume_id = %id, owner_id = %owner.id, "volume deleted");
    }
    state.orchestrator.forget_volume(&id);
    state.blobs.delete(&volume.blob_key).await?;
    Ok(StatusCode::NO_CONTENT)
}

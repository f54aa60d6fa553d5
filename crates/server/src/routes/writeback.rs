//! Volume write-back: a directory of a running sandbox packed into a **new**
//! volume (`commit` for an attached volume's mount path, `snapshot` for any
//! path). The sandbox's agent streams the tree as tar.gz; the bytes then
//! take the upload path (`volumes::store_new_volume`) with its checks, caps
//! and quota, so a hostile sandbox can hand us nothing a hostile client
//! could not. The source volume is never touched.

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::routes::volumes::{store_new_volume, NewVolumeSource, UploadFailure};
use crate::views::VolumeView;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use envd_protocol::client::EnvdClient;
use futures::StreamExt;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long the agent may go without sending a byte of the archive.
const AGENT_STALL: Duration = Duration::from_secs(60);

/// Top-level directories that are kernel views, not data.
const SYNTHETIC_ROOTS: [&str; 3] = ["proc", "sys", "dev"];

/// An absolute in-sandbox path fit to be packed: normalised, no `..`, not
/// a kernel view. (Symlinks are resolved by the agent inside the sandbox's
/// root, and it refuses pseudo filesystems itself.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackPath(String);

impl PackPath {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !raw.starts_with('/') {
            return Err(format!("path {raw:?} must be absolute"));
        }
        if raw.len() > 4096 || raw.contains('\0') {
            return Err("path is too long or contains a NUL byte".into());
        }
        let mut parts = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err(format!("path {raw:?} must not contain `..`")),
                part => parts.push(part),
            }
        }
        if parts
            .first()
            .is_some_and(|top| SYNTHETIC_ROOTS.contains(top))
        {
            return Err(format!(
                "{raw} is a kernel view (/proc, /sys, /dev), not data; pick a directory with files"
            ));
        }
        Ok(PackPath(format!("/{}", parts.join("/"))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Deserialize)]
pub struct SnapshotQuery {
    path: Option<String>,
    name: Option<String>,
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/volumes/snapshot", tag = "volumes",
    params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("path" = String, Query, description = "Absolute directory inside the sandbox"), ("name" = Option<String>, Query, description = "Name of the new volume (default `snapshot`)")),
    responses((status = 201, description = "The new volume", body = VolumeView), (status = 400, description = "Bad path, or not a directory", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown sandbox, or no such path", body = crate::views::ErrorView), (status = 409, description = "The sandbox is paused", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView), (status = 413, description = "Larger than the upload cap or the remaining quota", body = crate::views::ErrorView), (status = 429, description = "Owner quota reached", body = crate::views::ErrorView))
)]
pub async fn snapshot(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(id): Path<String>,
    Query(query): Query<SnapshotQuery>,
) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let raw = query
        .path
        .as_deref()
        .ok_or_else(|| ApiError::BadRequest("path is required".into()))?;
    let path = PackPath::parse(raw).map_err(ApiError::BadRequest)?;
    let agent = state.orchestrator.agent(&owner.id, &id).await?;
    let name = query
        .name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "snapshot".into());
    let metadata = BTreeMap::from([
        ("source".to_string(), "snapshot".to_string()),
        ("sandbox_id".to_string(), id.clone()),
        ("path".to_string(), path.as_str().to_string()),
    ]);
    pack_into_volume(&state, &owner.id, agent, &path, name, metadata).await
}

#[derive(Deserialize)]
pub struct CommitQuery {
    name: Option<String>,
}

/// The part of a sandbox's recorded attachments this needs.
#[derive(Deserialize)]
struct AttachedVolume {
    volume_id: String,
    mount_path: String,
}

#[utoipa::path(
    post, path = "/sandboxes/{id}/volumes/{volume_id}/commit", tag = "volumes",
    params(("id" = String, Path, description = "Sandbox id (`sbx-…`)"), ("volume_id" = String, Path, description = "An attached volume (`vol-…`)"), ("name" = Option<String>, Query, description = "Name of the new volume (default `<source name>-commit`)")),
    responses((status = 201, description = "The new volume; the source is unchanged", body = VolumeView), (status = 400, description = "The volume is not attached to the sandbox", body = crate::views::ErrorView), (status = 401, description = "Missing or invalid API key", body = crate::views::ErrorView), (status = 404, description = "Unknown sandbox or volume", body = crate::views::ErrorView), (status = 409, description = "The sandbox is paused", body = crate::views::ErrorView), (status = 410, description = "The sandbox was killed", body = crate::views::ErrorView), (status = 413, description = "Larger than the upload cap or the remaining quota", body = crate::views::ErrorView), (status = 429, description = "Owner quota reached", body = crate::views::ErrorView))
)]
pub async fn commit(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path((id, volume_id)): Path<(String, String)>,
    Query(query): Query<CommitQuery>,
) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let agent = state.orchestrator.agent(&owner.id, &id).await?;
    let sandbox = state.orchestrator.get(&owner.id, &id).await?;
    let source = state
        .store
        .get_volume(&owner.id, &volume_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("volume {volume_id}")))?;
    let attached: Vec<AttachedVolume> =
        serde_json::from_value(sandbox.volumes.clone()).unwrap_or_default();
    let mount_path = attached
        .into_iter()
        .find(|a| a.volume_id == volume_id)
        .map(|a| a.mount_path)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "volume {volume_id} is not attached to sandbox {id}"
            ))
        })?;
    let path = PackPath::parse(&mount_path).map_err(ApiError::BadRequest)?;
    let name = query
        .name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("{}-commit", source.name));
    let metadata = BTreeMap::from([
        ("source".to_string(), "commit".to_string()),
        ("sandbox_id".to_string(), id.clone()),
        ("source_volume_id".to_string(), volume_id.clone()),
    ]);
    pack_into_volume(&state, &owner.id, agent, &path, name, metadata).await
}

async fn pack_into_volume(
    state: &AppState,
    owner_id: &str,
    agent: EnvdClient,
    path: &PackPath,
    name: String,
    metadata: BTreeMap<String, String>,
) -> ApiResult<(StatusCode, Json<VolumeView>)> {
    let configured_cap = state.config.volumes.max_upload_bytes;
    let admission = state.quotas.admit_upload(owner_id, configured_cap).await?;
    let archive = agent.archive(path.as_str()).await?;
    let chunks = tokio_stream::StreamExt::timeout(archive, AGENT_STALL).map(|item| match item {
        Ok(Ok(chunk)) => Ok(chunk),
        Ok(Err(e)) => Err(UploadFailure::Agent(e.to_string())),
        Err(_) => Err(UploadFailure::Agent(format!(
            "the sandbox sent nothing for {}s",
            AGENT_STALL.as_secs()
        ))),
    });
    let source = NewVolumeSource {
        name,
        content_type: "application/gzip".into(),
        metadata,
        cap: admission.byte_allowance,
    };
    let volume = store_new_volume(state, owner_id, source, Box::pin(chunks)).await?;
    drop(admission);
    Ok((StatusCode::CREATED, Json(VolumeView::from(volume))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_paths_are_normalised_and_checked() {
        assert_eq!(
            PackPath::parse("/workspace/").unwrap().as_str(),
            "/workspace"
        );
        assert_eq!(PackPath::parse("//a/./b").unwrap().as_str(), "/a/b");
        assert_eq!(PackPath::parse("/").unwrap().as_str(), "/");
        for bad in [
            "relative",
            "/proc",
            "/sys/kernel",
            "//dev/",
            "/a/../proc",
            "",
            "/a\0b",
        ] {
            assert!(PackPath::parse(bad).is_err(), "{bad:?} accepted");
        }
        // A name that merely starts like a kernel view is data.
        assert!(PackPath::parse("/process").is_ok());
    }
}

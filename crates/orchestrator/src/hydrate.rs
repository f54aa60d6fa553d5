//! Volume hydration: each attachment's blob streams from the node-local
//! cache (or, once per node, from object storage) straight into the
//! sandbox's envd unpack call, still gzip-compressed; envd gunzips, keeps
//! regular files and directories only, and writes them under the mount
//! path. Nothing is buffered whole, and many files go as one stream.

use crate::cache::{BlobCache, BlobRef};
use envd_protocol::client::EnvdClient;
use futures::TryStreamExt;
use sandbox_store::Volume;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A volume attached to a create: copied into `mount_path` before the
/// create is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub volume_id: String,
    pub mount_path: String,
}

/// Whether an attachment's copy is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HydrateOutcome {
    /// The whole archive is unpacked under the mount path.
    Ready,
    /// It is not (`error` says why); the sandbox runs anyway unless strict.
    Failed,
}

impl HydrateOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            HydrateOutcome::Ready => "ready",
            HydrateOutcome::Failed => "failed",
        }
    }
}

/// Per-attachment outcome, reported on the sandbox (`volumes` in its JSON).
#[derive(Debug, Clone, Serialize)]
pub struct HydrateStatus {
    pub volume_id: String,
    pub mount_path: String,
    pub status: HydrateOutcome,
    pub files: u64,
    pub bytes: u64,
    pub skipped: u64,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HydrateStatus {
    pub fn failed(&self) -> bool {
        self.status == HydrateOutcome::Failed
    }
}

/// The owner that hydrated files belong to, so `user` can read and write
/// its private copy.
const HYDRATE_USER: &str = "user";

/// Archive limits the agent enforces while it unpacks: the same ones the
/// upload was checked against, so an archive that passed one passes both.
pub use envd_protocol::UnpackLimits;

pub async fn hydrate(
    agent: &EnvdClient,
    cache: &BlobCache,
    volume: &Volume,
    mount_path: &str,
    limits: UnpackLimits,
) -> HydrateStatus {
    let started = Instant::now();
    let mut status = HydrateStatus {
        volume_id: volume.id.clone(),
        mount_path: mount_path.to_string(),
        status: HydrateOutcome::Ready,
        files: 0,
        bytes: 0,
        skipped: 0,
        duration_ms: 0,
        error: None,
    };
    let outcome = if volume.size_bytes == 0 {
        // An empty volume has no archive at all: just the directory.
        agent
            .mkdir(mount_path, HYDRATE_USER)
            .await
            .map(|_| None)
            .map_err(|e| e.to_string())
    } else {
        let blob = BlobRef {
            volume_id: volume.id.clone(),
            sha256: volume.sha256.clone(),
            key: volume.blob_key.clone(),
            size: volume.size_bytes.max(0) as u64,
        };
        match cache.open(&blob).await {
            Ok(stream) => {
                // A failing source shows up on the agent's side only as a
                // cut-off stream (HTTP/2 says "stream reset"), so remember
                // the source's own error and report that instead.
                let source_error = Arc::new(Mutex::new(None::<String>));
                let seen = source_error.clone();
                let stream = stream.inspect_err(move |e| {
                    seen.lock().unwrap().get_or_insert_with(|| e.to_string());
                });
                agent
                    .unpack_limited(mount_path, HYDRATE_USER, stream, true, limits)
                    .await
                    .map(Some)
                    .map_err(|e| {
                        source_error
                            .lock()
                            .unwrap()
                            .take()
                            .unwrap_or_else(|| e.to_string())
                    })
            }
            Err(e) => Err(e.to_string()),
        }
    };
    match outcome {
        Ok(Some(report)) => {
            status.files = report.files;
            status.bytes = report.bytes;
            status.skipped = report.skipped;
        }
        Ok(None) => {}
        Err(error) => {
            status.status = HydrateOutcome::Failed;
            status.error = Some(error);
        }
    }
    status.duration_ms = started.elapsed().as_millis() as u64;
    let outcome = status.status.as_str();
    metrics::counter!("volume_hydrations_total", "status" => outcome).increment(1);
    metrics::histogram!("volume_hydrate_seconds").record(started.elapsed().as_secs_f64());
    tracing::info!(
        volume_id = %volume.id, mount_path, status = outcome, files = status.files, bytes = status.bytes,
        skipped = status.skipped, duration_ms = status.duration_ms, error = status.error.as_deref().unwrap_or(""),
        "volume hydrated"
    );
    status
}

//! Volume hydration: each attachment's blob streams from the node-local
//! cache (or, once per node, from object storage) straight into the
//! sandbox's envd unpack call, still gzip-compressed; envd gunzips, keeps
//! regular files and directories only, and writes them under the mount
//! path. Nothing is buffered whole, and many files go as one stream.

use crate::cache::{BlobCache, BlobRef};
use crate::layers::{Claim, LayerStore};
use envd_protocol::client::EnvdClient;
use futures::TryStreamExt;
use sandbox_runtime::Runtime;
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

/// How an attachment's copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HydrateSource {
    /// Unpacked for this sandbox (a copy, or the node's first layer build).
    Hydrated,
    /// A copy-on-write view of a layer already on the node.
    Layer,
}

/// Per-attachment outcome, reported on the sandbox (`volumes` in its JSON).
#[derive(Debug, Clone, Serialize)]
pub struct HydrateStatus {
    pub volume_id: String,
    pub mount_path: String,
    pub status: HydrateOutcome,
    pub source: HydrateSource,
    pub files: u64,
    pub bytes: u64,
    pub skipped: u64,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HydrateStatus {
    /// Ready, nothing counted yet.
    fn new(volume: &Volume, mount_path: &str, source: HydrateSource) -> Self {
        HydrateStatus {
            volume_id: volume.id.clone(),
            mount_path: mount_path.to_string(),
            status: HydrateOutcome::Ready,
            source,
            files: 0,
            bytes: 0,
            skipped: 0,
            duration_ms: 0,
            error: None,
        }
    }

    pub fn failed(&self) -> bool {
        self.status == HydrateOutcome::Failed
    }

    fn fail(mut self, error: String, started: Instant) -> Self {
        self.status = HydrateOutcome::Failed;
        self.error = Some(error);
        self.duration_ms = started.elapsed().as_millis() as u64;
        self
    }
}

/// The owner that hydrated files belong to, so `user` can read and write
/// its private copy.
const HYDRATE_USER: &str = "user";

/// Archive limits the agent enforces while it unpacks: the same ones the
/// upload was checked against, so an archive that passed one passes both.
pub use envd_protocol::UnpackLimits;

/// Unpacks the volume into this sandbox's own filesystem.
pub async fn hydrate(
    agent: &EnvdClient,
    cache: &BlobCache,
    volume: &Volume,
    mount_path: &str,
    limits: UnpackLimits,
) -> HydrateStatus {
    let started = Instant::now();
    let mut status = HydrateStatus::new(volume, mount_path, HydrateSource::Hydrated);
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

/// What a layered hydrate works on.
pub struct LayerTarget<'a> {
    pub runtime: &'a dyn Runtime,
    pub layers: &'a Arc<LayerStore>,
    pub sandbox_id: &'a str,
    /// The sandbox's disk quota: a volume is shared only with a sandbox
    /// whose disk could hold it as a copy, so a layer never lets a tenant
    /// past the disk bound it would have without layers.
    pub disk_bytes: u64,
}

/// The volume as a copy-on-write view of the node's layer of it: built
/// first (unpacked through this sandbox's agent into a fresh layer, then
/// sealed) if no sandbox here has it yet, else shared in constant time.
pub async fn hydrate_layered(
    target: LayerTarget<'_>,
    agent: &EnvdClient,
    cache: &BlobCache,
    volume: &Volume,
    mount_path: &str,
    limits: UnpackLimits,
) -> HydrateStatus {
    if volume.size_bytes == 0 {
        return hydrate(agent, cache, volume, mount_path, limits).await;
    }
    let started = Instant::now();
    let blank = HydrateStatus::new(volume, mount_path, HydrateSource::Layer);
    let unpacked = volume.uncompressed_bytes.max(0) as u64;
    if unpacked > target.disk_bytes {
        let why = format!(
            "no space left on device: the volume unpacks to {unpacked} bytes, more than this sandbox's {}-byte disk",
            target.disk_bytes
        );
        return blank.fail(why, started);
    }
    // The mount point, made by the agent as `user`, as a copy's dir is.
    if let Err(e) = agent.mkdir(mount_path, HYDRATE_USER).await {
        return blank.fail(e.to_string(), started);
    }
    let LayerTarget {
        runtime,
        layers,
        sandbox_id,
        ..
    } = target;
    let claim = match layers.claim(&volume.id, &volume.sha256, sandbox_id).await {
        Ok(claim) => claim,
        Err(e) => return blank.fail(format!("volume layer: {e}"), started),
    };
    let status = match claim {
        Claim::Failed(why) => blank.fail(why, started),
        Claim::Share { dir, info } => {
            match runtime.layer_share(sandbox_id, &dir, mount_path).await {
                Ok(()) => HydrateStatus {
                    files: info.files,
                    bytes: info.bytes,
                    skipped: info.skipped,
                    duration_ms: started.elapsed().as_millis() as u64,
                    ..blank
                },
                Err(e) => {
                    layers.drop_user(&info.key, sandbox_id).await;
                    blank.fail(format!("mounting the volume layer: {e}"), started)
                }
            }
        }
        Claim::Build(build) => {
            if let Err(e) = runtime
                .layer_build(sandbox_id, build.dir(), mount_path)
                .await
            {
                let why = format!("preparing the volume layer: {e}");
                build.fail(why.clone());
                return HydrateStatus {
                    source: HydrateSource::Hydrated,
                    ..blank.fail(why, started)
                };
            }
            let copied = hydrate(agent, cache, volume, mount_path, limits).await;
            let sealed = if copied.failed() {
                Err(copied.error.clone().unwrap_or_default())
            } else {
                runtime
                    .layer_seal(sandbox_id, build.dir(), mount_path)
                    .await
                    .map_err(|e| format!("sealing the volume layer: {e}"))
            };
            match sealed {
                Ok(()) => match build
                    .succeed(sandbox_id, copied.files, copied.bytes, copied.skipped)
                    .await
                {
                    Ok(_) => HydrateStatus {
                        duration_ms: started.elapsed().as_millis() as u64,
                        ..copied
                    },
                    Err(e) => blank.fail(format!("recording the volume layer: {e}"), started),
                },
                Err(why) => {
                    // The sandbox must not keep a writable view of a layer
                    // that is about to be deleted.
                    if let Err(e) = runtime
                        .layer_detach(sandbox_id, build.dir(), mount_path)
                        .await
                    {
                        tracing::warn!(sandbox_id, mount_path, error = %e, "cannot detach a failed layer build");
                    }
                    build.fail(why.clone());
                    HydrateStatus {
                        source: HydrateSource::Hydrated,
                        ..blank.fail(why, started)
                    }
                }
            }
        }
    };
    if status.source == HydrateSource::Layer {
        metrics::histogram!("volume_layer_share_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(
            volume_id = %volume.id, mount_path, status = status.status.as_str(), duration_ms = status.duration_ms,
            error = status.error.as_deref().unwrap_or(""), "volume layer shared"
        );
    }
    status
}

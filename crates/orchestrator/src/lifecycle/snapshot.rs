//! Sandbox snapshots and restore, at the filesystem level on both runtimes
//! (a sandbox's memory is not kept, so processes start afresh).
//!
//! A snapshot is the sandbox's `/` (one filesystem: volumes mounted as
//! layers are not in it) packed by its agent and streamed into object
//! storage under `snapshots/OWNER/ID.tar.gz`, so it outlives the sandbox
//! and its node. A restore fetches it, unpacks it on this node with
//! `rootfs_unpack` (the archive is hostile) into a directory of its own,
//! lets the driver prepare it like a template, replaces the sandbox's
//! machine (if one runs) with one booted from it under the **same id**, and
//! brings the row back to running with a fresh deadline.

use super::{deadline, Orchestrator, Result};
use crate::error::OrchestratorError;
use crate::ids::{new_sandbox_id, new_token};
use chrono::Utc;
use futures::StreamExt;
use sandbox_runtime::{BootSpec, Limits};
use sandbox_store::{Sandbox, SandboxSnapshot, SandboxState};
use std::path::PathBuf;
use std::time::Duration;

/// How long the agent may go without sending a byte of the archive.
const AGENT_STALL: Duration = Duration::from_secs(60);

/// Where a snapshot's blob lives (outside `owners/`, which the volume
/// reconciler sweeps for blobs without a volume row).
pub fn snapshot_key(owner_id: &str, snapshot_id: &str) -> String {
    format!("snapshots/{owner_id}/{snapshot_id}.tar.gz")
}

impl Orchestrator {
    /// The limits a sandbox of `template` (built-in name or custom id) runs with.
    async fn limits_of(&self, owner_id: &str, template: &str) -> Result<Limits> {
        match self.templates.get(template) {
            Some(def) => Ok(def.limits()),
            None => Ok(self.custom_template(owner_id, template).await?.limits),
        }
    }

    /// Packs the running sandbox's `/` into a new snapshot.
    pub async fn snapshot(&self, owner_id: &str, id: &str) -> Result<SandboxSnapshot> {
        let agent = self.agent(owner_id, id).await?;
        let sandbox = self.get(owner_id, id).await?;
        // Each snapshot can be as large as the sandbox's disk.
        let most = self.config.max_snapshots_per_sandbox;
        let kept = self
            .store
            .list_snapshots(owner_id, Some(id), most as i64)
            .await?;
        if kept.len() >= most {
            return Err(OrchestratorError::QuotaExceeded(format!(
                "sandbox {id} keeps {most} snapshots, the most it may; delete one first"
            )));
        }
        let cap = self
            .limits_of(owner_id, &sandbox.template)
            .await?
            .disk_mib
            .saturating_mul(1 << 20);
        let snapshot_id = format!("snap-{}", &new_sandbox_id()[4..]);
        let key = snapshot_key(owner_id, &snapshot_id);
        let blobs = self.blob_cache.store();
        let mut upload = blobs
            .begin_upload(&key)
            .await
            .map_err(|e| OrchestratorError::StorageUnavailable(e.to_string()))?;
        let archive = agent.archive("/").await?;
        let mut chunks = Box::pin(tokio_stream::StreamExt::timeout(archive, AGENT_STALL));
        let mut size = 0u64;
        let streamed = async {
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk
                    .map_err(|_| "the sandbox stopped sending its filesystem".to_string())?
                    .map_err(|e| e.to_string())?;
                size += chunk.len() as u64;
                if size > cap {
                    return Err(format!(
                        "the filesystem is larger than the sandbox's disk ({cap} bytes)"
                    ));
                }
                upload.write(chunk).await.map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        .await;
        if let Err(why) = streamed {
            let _ = upload.abort().await;
            return Err(OrchestratorError::InvalidRequest(format!(
                "snapshot failed: {why}"
            )));
        }
        upload
            .complete()
            .await
            .map_err(|e| OrchestratorError::StorageUnavailable(e.to_string()))?;
        let snapshot = SandboxSnapshot {
            id: snapshot_id,
            owner_id: owner_id.to_string(),
            sandbox_id: id.to_string(),
            template: sandbox.template,
            source: "manual".into(),
            blob_key: key.clone(),
            size_bytes: size as i64,
            created_at: Utc::now(),
        };
        if let Err(e) = self.store.insert_snapshot(&snapshot).await {
            let _ = blobs.delete(&key).await;
            return Err(e.into());
        }
        tracing::info!(sandbox_id = id, snapshot_id = %snapshot.id, bytes = size, "snapshot taken");
        Ok(snapshot)
    }

    /// Deletes the owner's snapshot (row, then blob); absent is fine.
    pub async fn delete_snapshot(&self, owner_id: &str, snapshot_id: &str) -> Result<()> {
        if let Some(snapshot) = self.store.delete_snapshot(owner_id, snapshot_id).await? {
            if let Err(e) = self.blob_cache.store().delete(&snapshot.blob_key).await {
                tracing::warn!(snapshot_id, error = %e, "snapshot blob removal failed");
            }
        }
        Ok(())
    }

    /// Restores the owner's sandbox `id` from `snapshot_id` (or its newest
    /// snapshot): same id, the snapshot's files, processes started afresh.
    pub async fn restore(
        &self,
        owner_id: &str,
        id: &str,
        snapshot_id: Option<&str>,
    ) -> Result<(Sandbox, SandboxSnapshot)> {
        let sandbox = self.get(owner_id, id).await?;
        let snapshots = self.store.list_snapshots(owner_id, Some(id), 1000).await?;
        let snapshot = match snapshot_id {
            Some(wanted) => snapshots.into_iter().find(|s| s.id == wanted),
            None => snapshots.into_iter().next(),
        }
        .ok_or_else(|| {
            OrchestratorError::SnapshotNotFound(
                snapshot_id.map_or(format!("of {id}"), str::to_string),
            )
        })?;
        let limits = self.limits_of(owner_id, &sandbox.template).await?;
        let rootfs = self.snapshot_rootfs(&snapshot, limits).await?;
        let runtime = self.runtime()?.clone();
        runtime
            .prepare(&rootfs, limits)
            .await
            .map_err(OrchestratorError::runtime("preparing the snapshot"))?;

        // The old machine goes; the row stays (it is revived below).
        let _held = self.unrecorded.hold(id);
        self.deadlines.cancel(id);
        self.agents.lock().unwrap().remove(id);
        self.forget_usage(id);
        if sandbox.state == SandboxState::Running {
            self.destroy_quietly(id).await;
        }
        let token = new_token();
        runtime
            .boot(BootSpec {
                id: id.to_string(),
                rootfs,
                token: token.clone(),
                hostname: id.to_string(),
                limits,
            })
            .await
            .map_err(OrchestratorError::NoCapacity)?;
        let started_at = Utc::now();
        let end_at = deadline(started_at, sandbox.timeout_secs.max(0) as u64);
        let revived = self
            .store
            .revive_sandbox(owner_id, id, &sandbox.template, &token, started_at, end_at)
            .await;
        if !matches!(revived, Ok(true)) {
            self.destroy_quietly(id).await;
            revived?;
            return Err(OrchestratorError::SandboxNotFound(id.to_string()));
        }
        let client = runtime.agent(id, &token);
        if !sandbox.envs.is_empty() {
            client.set_env(sandbox.envs.clone()).await?;
        }
        self.agents.lock().unwrap().insert(id.to_string(), client);
        if let Some(at) = end_at {
            self.arm_deadline(id, at);
        }
        tracing::info!(sandbox_id = id, snapshot_id = %snapshot.id, "sandbox restored");
        Ok((self.get(owner_id, id).await?, snapshot))
    }

    /// The snapshot's root filesystem on this node, fetched and unpacked
    /// once (kept beside custom template builds, under the same 0700 dir).
    async fn snapshot_rootfs(&self, snapshot: &SandboxSnapshot, limits: Limits) -> Result<PathBuf> {
        let dir = self.custom_dir().join(&snapshot.id);
        let rootfs = dir.join("rootfs");
        if dir.join("stamp").is_file() {
            return Ok(rootfs);
        }
        let blob = self
            .blob_cache
            .store()
            .get(&snapshot.blob_key)
            .await
            .map_err(|e| OrchestratorError::StorageUnavailable(e.to_string()))?;
        let max_bytes = limits.disk_mib.saturating_mul(1 << 20);
        self.unpack_build_rootfs(&snapshot.id, blob.stream, max_bytes)
            .await
            .map_err(|e| {
                OrchestratorError::InvalidRequest(format!("the snapshot cannot be restored: {e}"))
            })?;
        Ok(rootfs)
    }
}

//! The periodic reconciler: what a crash, a killed process or a failed
//! delete left behind is removed at start-up and then every
//! `reconcile.interval_secs`, and each removal is logged.
//!
//! - pending volume rows (written before their blob) whose upload is not
//!   running in this process: their partial blob, unfinished multipart
//!   upload and row;
//! - blobs under the volumes prefix with no ready or pending row (a crash
//!   between commit and row, or a delete whose blob removal failed);
//! - unfinished uploads that no upload of this process owns.
//!
//! Blobs and uploads are touched only under owners this database knows:
//! a bucket shared with another deployment (or another test) keeps theirs.
//! Uploads "running here" are this process's: one server process per
//! database is assumed (API replicas will need the registry in the database).
//! - blob-cache files of volumes that are no longer ready;
//! - idempotency keys past their 24 h, and killed sandboxes and deleted
//!   volume rows past the tombstone retention.

use crate::config::ReconcileConfig;
use chrono::Utc;
use sandbox_blobs::{BlobStore, VOLUMES_PREFIX};
use sandbox_orchestrator::Orchestrator;
use sandbox_store::{Store, VolumeState};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const IDEMPOTENCY_TTL: chrono::Duration = chrono::Duration::hours(24);

/// Volume uploads running in this process (volume id → blob key).
#[derive(Clone, Default)]
pub struct Uploads {
    running: Arc<Mutex<HashMap<String, String>>>,
}

/// Registered from before the upload's first byte until it ends.
pub struct UploadGuard {
    running: Arc<Mutex<HashMap<String, String>>>,
    id: String,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(&self.id);
    }
}

impl Uploads {
    pub fn register(&self, volume_id: &str, key: &str) -> UploadGuard {
        self.running
            .lock()
            .unwrap()
            .insert(volume_id.to_string(), key.to_string());
        UploadGuard {
            running: self.running.clone(),
            id: volume_id.to_string(),
        }
    }

    fn snapshot(&self) -> HashMap<String, String> {
        self.running.lock().unwrap().clone()
    }
}

/// What one pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub pending_volumes: usize,
    pub orphan_blobs: usize,
    pub stale_uploads: usize,
    pub cache_entries: usize,
    pub idempotency_keys: u64,
    pub killed_sandboxes: u64,
    pub deleted_volumes: u64,
}

pub struct Reconciler {
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    pub orchestrator: Arc<Orchestrator>,
    pub uploads: Uploads,
    pub config: ReconcileConfig,
}

impl Reconciler {
    /// Runs a pass now and then every interval, for as long as the process runs.
    pub fn start(self: Arc<Self>) {
        let every = Duration::from_secs(self.config.interval_secs.max(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                self.run_once().await;
            }
        });
    }

    /// One pass; each step logs and skips on its own failure (a database or
    /// object-store outage makes the pass partial, never fatal).
    pub async fn run_once(&self) -> Report {
        let mut report = Report::default();
        match self.remove_pending_volumes().await {
            Ok(n) => report.pending_volumes = n,
            Err(e) => tracing::warn!(error = %e, "reconcile: pending volumes"),
        }
        // Owners only ever appear: one read serves the pass (an owner created
        // meanwhile just keeps its blobs until the next one).
        match self.store.owner_ids().await {
            Ok(owners) => {
                let owners: HashSet<String> = owners.into_iter().collect();
                match self.remove_orphan_blobs(&owners).await {
                    Ok((n, live)) => {
                        report.orphan_blobs = n;
                        report.cache_entries = self.prune_cache(&live).await;
                    }
                    Err(e) => tracing::warn!(error = %e, "reconcile: orphan blobs"),
                }
                match self.abort_foreign_uploads(&owners).await {
                    Ok(n) => report.stale_uploads = n,
                    Err(e) => tracing::warn!(error = %e, "reconcile: unfinished uploads"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "reconcile: listing owners"),
        }
        let now = Utc::now();
        let retention = chrono::Duration::seconds(
            i64::try_from(self.config.tombstone_retention_secs).unwrap_or(i64::MAX / 2),
        );
        match self
            .store
            .sweep(now - IDEMPOTENCY_TTL, now - retention)
            .await
        {
            Ok(swept) => {
                report.idempotency_keys = swept.idempotency_keys;
                report.killed_sandboxes = swept.killed_sandboxes;
                report.deleted_volumes = swept.deleted_volumes;
            }
            Err(e) => tracing::warn!(error = %e, "reconcile: sweeping old rows"),
        }
        if report != Report::default() {
            tracing::info!(?report, "reconcile removed leftovers");
        }
        report
    }

    async fn remove_pending_volumes(&self) -> anyhow::Result<usize> {
        let pending = self
            .store
            .volumes_in_state(VolumeState::Pending, Utc::now())
            .await?;
        // Taken after the listing: an upload registers before it writes its
        // row, so every row listed above whose upload runs here is in it.
        let ours = self.uploads.snapshot();
        let mut removed = 0;
        for volume in pending.into_iter().filter(|v| !ours.contains_key(&v.id)) {
            // The row goes first, and only if still pending: an upload that
            // finished meanwhile keeps its row and blob. A crash after this
            // leaves a blob without a row, which the next step removes.
            if !self
                .store
                .delete_volume_row(&volume.id, VolumeState::Pending)
                .await?
            {
                continue;
            }
            self.blobs.delete(&volume.blob_key).await?;
            self.blobs.abort_uploads(&volume.blob_key).await?;
            tracing::info!(volume_id = %volume.id, owner_id = %volume.owner_id, "removed an unfinished upload's volume");
            removed += 1;
        }
        Ok(removed)
    }

    /// Returns how many it removed and the blob keys of live volumes.
    async fn remove_orphan_blobs(
        &self,
        owners: &HashSet<String>,
    ) -> anyhow::Result<(usize, HashSet<String>)> {
        // Keys are listed before rows: a blob committed in between belongs
        // to a row that is already pending (rows are written first).
        let keys = self.blobs.list_keys(VOLUMES_PREFIX).await?;
        let live: HashSet<String> = self.store.live_volume_keys().await?.into_iter().collect();
        let mut removed = 0;
        for key in keys
            .into_iter()
            .filter(|key| !live.contains(key) && owned_by_one_of(key, owners))
        {
            self.blobs.delete(&key).await?;
            tracing::info!(key, "removed a blob without a volume");
            removed += 1;
        }
        Ok((removed, live))
    }

    async fn abort_foreign_uploads(&self, owners: &HashSet<String>) -> anyhow::Result<usize> {
        let unfinished = self.blobs.pending_uploads(VOLUMES_PREFIX).await?;
        // After the listing, as above: uploads register before they start.
        let ours = self.uploads.snapshot();
        let our_keys: HashSet<&String> = ours.values().collect();
        let mut aborted = 0;
        for key in unfinished {
            if our_keys.contains(&key) || !owned_by_one_of(&key, owners) {
                continue;
            }
            aborted += self.blobs.abort_uploads(&key).await?;
            tracing::info!(key, "aborted an unfinished upload no request owns");
        }
        Ok(aborted)
    }

    /// Drops cached blobs and unused layers of volumes whose blob key is
    /// not in `live_keys`; returns how many blobs went.
    async fn prune_cache(&self, live_keys: &HashSet<String>) -> usize {
        let live: HashSet<String> = live_keys.iter().filter_map(|k| volume_id_of(k)).collect();
        let (blobs, layers) = self.orchestrator.prune_volume_caches(&live).await;
        if layers > 0 {
            tracing::info!(layers, "volume layers of deleted volumes released");
        }
        blobs
    }
}

/// Whether `owners/{owner}/…` names one of `owners`.
fn owned_by_one_of(key: &str, owners: &HashSet<String>) -> bool {
    key.strip_prefix(VOLUMES_PREFIX)
        .and_then(|rest| rest.split('/').next())
        .is_some_and(|owner| owners.contains(owner))
}

/// `owners/{owner}/volumes/{id}.tar.gz` → `id`.
fn volume_id_of(key: &str) -> Option<String> {
    key.rsplit('/')
        .next()?
        .strip_suffix(".tar.gz")
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_come_from_their_keys() {
        let key = sandbox_blobs::volume_key("own-1", "vol-abc");
        assert_eq!(volume_id_of(&key).as_deref(), Some("vol-abc"));
        assert_eq!(volume_id_of("owners/x/other"), None);
        let ours = HashSet::from(["own-1".to_string()]);
        assert!(owned_by_one_of(&key, &ours));
        let theirs = sandbox_blobs::volume_key("own-2", "vol-abc");
        assert!(!owned_by_one_of(&theirs, &ours));
    }

    #[test]
    fn an_upload_is_registered_until_its_guard_drops() {
        let uploads = Uploads::default();
        let guard = uploads.register("vol-1", "k1");
        assert_eq!(
            uploads.snapshot().get("vol-1").map(String::as_str),
            Some("k1")
        );
        drop(guard);
        assert!(uploads.snapshot().is_empty());
    }
}

//! Per-owner quotas: running sandboxes, volumes and stored volume bytes,
//! with defaults from config and per-owner overrides in the database (set
//! with `sandbox-manager quotas set`). Admission is checked and counted
//! under a per-owner lock together with what this process has in flight
//! (creates not yet recorded, uploads and the bytes granted to them), so
//! concurrent requests of one owner cannot race past a limit.

use crate::config::QuotasConfig;
use crate::error::ApiError;
use sandbox_store::{QuotaOverride, Store};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The limits that apply to one owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_running_sandboxes: i64,
    pub max_volumes: i64,
    pub max_volume_bytes: i64,
}

impl Limits {
    pub fn resolve(defaults: &QuotasConfig, over: &QuotaOverride) -> Self {
        Limits {
            max_running_sandboxes: over
                .max_running_sandboxes
                .unwrap_or(defaults.max_running_sandboxes),
            max_volumes: over.max_volumes.unwrap_or(defaults.max_volumes),
            max_volume_bytes: over.max_volume_bytes.unwrap_or(defaults.max_volume_bytes),
        }
    }
}

#[derive(Default)]
struct InFlight {
    creates: usize,
    uploads: usize,
    granted_bytes: u64,
}

pub struct Quotas {
    defaults: QuotasConfig,
    store: Arc<dyn Store>,
    in_flight: Arc<Mutex<HashMap<String, InFlight>>>,
    /// One lock per owner: admission of one owner never waits on another's.
    owner_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// An admitted create or upload; releases its in-flight count on drop.
pub struct Admission {
    in_flight: Arc<Mutex<HashMap<String, InFlight>>>,
    owner_id: String,
    upload: bool,
    /// For uploads: the most bytes this upload may store.
    pub byte_allowance: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&self.owner_id) {
            if self.upload {
                entry.uploads -= 1;
                entry.granted_bytes -= self.byte_allowance;
            } else {
                entry.creates -= 1;
            }
            if entry.creates == 0 && entry.uploads == 0 {
                map.remove(&self.owner_id);
            }
        }
    }
}

impl Quotas {
    pub fn new(defaults: QuotasConfig, store: Arc<dyn Store>) -> Self {
        Quotas {
            defaults,
            store,
            in_flight: Arc::default(),
            owner_locks: Mutex::default(),
        }
    }

    fn owner_lock(&self, owner_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.owner_locks
            .lock()
            .unwrap()
            .entry(owner_id.to_string())
            .or_default()
            .clone()
    }

    async fn limits(&self, owner_id: &str) -> Result<Limits, ApiError> {
        let over = self.store.quota_override(owner_id).await?;
        Ok(Limits::resolve(&self.defaults, &over))
    }

    fn admitted(&self, owner_id: &str, upload: bool, byte_allowance: u64) -> Admission {
        let mut map = self.in_flight.lock().unwrap();
        let entry = map.entry(owner_id.to_string()).or_default();
        if upload {
            entry.uploads += 1;
            entry.granted_bytes += byte_allowance;
        } else {
            entry.creates += 1;
        }
        Admission {
            in_flight: self.in_flight.clone(),
            owner_id: owner_id.to_string(),
            upload,
            byte_allowance,
        }
    }

    /// (creates, uploads, bytes granted to those uploads) in flight.
    fn in_flight(&self, owner_id: &str) -> (usize, usize, u64) {
        let map = self.in_flight.lock().unwrap();
        map.get(owner_id).map_or((0, 0, 0), |entry| {
            (entry.creates, entry.uploads, entry.granted_bytes)
        })
    }

    /// Admits one more sandbox create for this owner, or 429.
    pub async fn admit_sandbox(&self, owner_id: &str) -> Result<Admission, ApiError> {
        let lock = self.owner_lock(owner_id);
        let _serial = lock.lock().await;
        let limits = self.limits(owner_id).await?;
        let usage = self.store.usage(owner_id).await?;
        let (creates, _, _) = self.in_flight(owner_id);
        if usage.running_sandboxes + creates as i64 >= limits.max_running_sandboxes {
            return Err(ApiError::QuotaExceeded(format!(
                "sandbox quota reached: at most {} running sandboxes per owner; kill one first",
                limits.max_running_sandboxes
            )));
        }
        Ok(self.admitted(owner_id, false, 0))
    }

    /// Admits one more volume upload for this owner: 413 past the volume
    /// count or stored-bytes quota (the status the SDKs map to a quota
    /// error), 429 past the concurrent uploads allowed per owner. Uploads in
    /// flight count as volumes and hold the bytes granted to them; the
    /// admission carries how many bytes this one may store (at most `cap`).
    pub async fn admit_upload(&self, owner_id: &str, cap: u64) -> Result<Admission, ApiError> {
        let lock = self.owner_lock(owner_id);
        let _serial = lock.lock().await;
        let limits = self.limits(owner_id).await?;
        let usage = self.store.usage(owner_id).await?;
        let (_, uploads, granted) = self.in_flight(owner_id);
        if uploads >= self.defaults.max_concurrent_uploads {
            return Err(ApiError::QuotaExceeded(format!(
                "at most {} uploads per owner may run at once",
                self.defaults.max_concurrent_uploads
            )));
        }
        if usage.volumes + uploads as i64 >= limits.max_volumes {
            return Err(ApiError::PayloadTooLarge(format!(
                "volume quota reached: at most {} volumes per owner; delete one first",
                limits.max_volumes
            )));
        }
        let room = limits.max_volume_bytes - usage.volume_bytes - granted as i64;
        if room <= 0 {
            return Err(ApiError::PayloadTooLarge(format!(
                "storage quota reached: at most {} stored bytes per owner; delete a volume first",
                limits.max_volume_bytes
            )));
        }
        Ok(self.admitted(owner_id, true, (room as u64).min(cap)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_over_defaults_column_by_column() {
        let defaults = QuotasConfig {
            max_running_sandboxes: 10,
            max_volumes: 20,
            max_volume_bytes: 30,
            max_concurrent_uploads: 4,
        };
        let over = QuotaOverride {
            max_running_sandboxes: Some(1),
            max_volumes: None,
            max_volume_bytes: Some(0),
        };
        assert_eq!(
            Limits::resolve(&defaults, &over),
            Limits {
                max_running_sandboxes: 1,
                max_volumes: 20,
                max_volume_bytes: 0
            }
        );
    }
}

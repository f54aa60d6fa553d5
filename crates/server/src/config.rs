//! All configuration is read here, once. Layers, later wins: the built-in
//! `config/default.toml`, the `--config` file, then `SANDBOX_MANAGER__…`
//! environment variables (`__` separates sections).

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");
const ENV_PREFIX: &str = "SANDBOX_MANAGER__";

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database: DatabaseConfig,
    pub blobs: BlobsConfig,
    pub volumes: VolumesConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    pub pool: PoolConfig,
    pub builds: BuildsConfig,
    pub sandboxes: SandboxesConfig,
    pub hydrate: HydrateConfig,
    pub http: HttpConfig,
    pub quotas: QuotasConfig,
    pub reconcile: ReconcileConfig,
}

/// Per-owner defaults; `sandbox-manager quotas set` overrides them per owner.
#[derive(Debug, Clone, Deserialize)]
pub struct QuotasConfig {
    pub max_running_sandboxes: i64,
    pub max_volumes: i64,
    /// Stored (compressed) bytes across an owner's volumes.
    pub max_volume_bytes: i64,
    pub max_concurrent_uploads: usize,
}

/// The periodic reconciler of volumes, blobs and old rows.
#[derive(Debug, Clone, Deserialize)]
pub struct ReconcileConfig {
    pub interval_secs: u64,
    /// Killed sandboxes and deleted volumes are kept this long (so repeated
    /// kills and deletes stay idempotent), then removed.
    pub tombstone_retention_secs: u64,
}

/// Bounds on what one client can hold of the HTTP server.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpConfig {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub header_read_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    /// An upload (or any request body) that sends nothing for this long is cut.
    pub body_chunk_timeout_secs: u64,
    pub shutdown_grace_secs: u64,
    /// Cap on a JSON request body; above it: 413.
    pub max_json_body_bytes: usize,
    /// Cap on list-valued inputs: volume attachments, kill-many ids, batch files.
    pub max_list_items: usize,
}

impl HttpConfig {
    pub fn connection_limits(&self) -> crate::serve::ConnectionLimits {
        use std::time::Duration;
        crate::serve::ConnectionLimits {
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct HydrateConfig {
    pub strict: bool,
    pub cache_dir: String,
    pub cache_max_bytes: u64,
    pub mode: HydrateMode,
    pub layers_dir: String,
    pub layers_max_bytes: u64,
}

/// `hydrate.mode`: share one layer per node, or copy per sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HydrateMode {
    Layer,
    Copy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Auto,
    Microvm,
    Namespace,
    Disabled,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RuntimeConfig {
    pub kind: RuntimeKind,
    pub state_dir: String,
    pub templates_dir: String,
    pub template_definitions_dir: String,
    pub envd_path: String,
    pub build_templates_on_start: bool,
    pub namespace: NamespaceSettings,
    pub microvm: MicrovmSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NamespaceSettings {
    pub uid_base: u32,
    pub uid_slots: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MicrovmSettings {
    pub accel: sandbox_runtime::AccelChoice,
    pub images_dir: String,
    pub qemu: String,
    pub qemu_img: String,
    pub kernel_source: String,
    pub snapshots: bool,
    pub fast_restore: bool,
    /// Spare disks per VM for volume layers (0: volumes are copied).
    pub volume_slots: usize,
    pub disk_gib: u64,
    pub boot_timeout_secs: u64,
    pub vm_user: String,
    pub vm_gid_base: u32,
    pub vm_gid_slots: u32,
    /// CIDRs in the blocked ranges that every guest may still reach.
    pub egress_allow: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PoolConfig {
    pub sizes: std::collections::BTreeMap<String, usize>,
    pub max_cold_boots: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BuildsConfig {
    pub dir: String,
    pub max_concurrent: usize,
    pub timeout_secs: u64,
    pub max_vcpus: u32,
    pub max_memory_mb: u64,
    pub max_disk_mb: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SandboxesConfig {
    pub default_timeout_secs: u64,
    /// Longer requested timeouts are clamped to this.
    pub max_timeout_secs: u64,
    /// Whether `timeout: 0` may mean "no deadline" (else it means the default).
    pub allow_no_timeout: bool,
    /// Most volumes one sandbox may attach.
    pub max_attachments: usize,
    /// Most snapshots one sandbox may keep (each up to its disk's size).
    pub max_snapshots: usize,
    pub node_id: String,
}

impl SandboxesConfig {
    /// The deadline a requested timeout gets: absent or 0 → the default
    /// (or none, if allowed), anything above the maximum → the maximum.
    pub fn effective_timeout(&self, requested: Option<u64>) -> u64 {
        match requested {
            Some(0) if self.allow_no_timeout => 0,
            None | Some(0) => self.default_timeout_secs.min(self.max_timeout_secs),
            Some(secs) => secs.min(self.max_timeout_secs),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobBackend {
    Local,
    S3,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlobsConfig {
    pub backend: BlobBackend,
    pub dir: String,
    pub s3: S3Config,
}

#[derive(Debug, Clone, Deserialize)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub part_size_mib: usize,
    pub max_inflight_parts: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VolumesConfig {
    pub max_upload_bytes: u64,
    /// Archive limits, enforced at upload and again when a sandbox unpacks.
    pub max_uncompressed_bytes: u64,
    pub max_entries: u64,
    pub max_header_bytes: u64,
    pub max_expansion_ratio: u64,
}

impl VolumesConfig {
    pub fn archive_limits(&self) -> sandbox_archive::Limits {
        sandbox_archive::Limits {
            max_bytes: self.max_uncompressed_bytes,
            max_entries: self.max_entries,
            max_header_bytes: self.max_header_bytes,
            max_ratio: self.max_expansion_ratio,
            ..sandbox_archive::Limits::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogConfig {
    pub format: LogFormat,
}

impl Config {
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::new().merge(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "config file {} does not exist",
                file.display()
            );
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        Ok(figment.extract()?)
    }

    /// `database.url`, or the embedded SQLite file under `data_dir`.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!(
                "sqlite:{}",
                self.data_dir.join("sandbox-manager.db").display()
            )
        } else {
            self.database.url.clone()
        }
    }

    fn under_data_dir(&self, configured: &str, default: &str) -> PathBuf {
        if configured.is_empty() {
            self.data_dir.join(default)
        } else {
            PathBuf::from(configured)
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.under_data_dir(&self.runtime.state_dir, "sandboxes")
    }

    pub fn images_dir(&self) -> PathBuf {
        self.under_data_dir(&self.runtime.microvm.images_dir, "images")
    }

    pub fn blob_cache_dir(&self) -> PathBuf {
        self.under_data_dir(&self.hydrate.cache_dir, "blob-cache")
    }

    pub fn layers_dir(&self) -> PathBuf {
        self.under_data_dir(&self.hydrate.layers_dir, "layers")
    }

    pub fn templates_dir(&self) -> PathBuf {
        self.under_data_dir(&self.runtime.templates_dir, "templates")
    }

    /// Root filesystems of custom template builds and restored snapshots.
    pub fn builds_dir(&self) -> PathBuf {
        self.under_data_dir(&self.builds.dir, "builds")
    }

    pub fn envd_path(&self) -> PathBuf {
        if !self.runtime.envd_path.is_empty() {
            return PathBuf::from(&self.runtime.envd_path);
        }
        let exe = std::env::current_exe().unwrap_or_default();
        exe.with_file_name("envd")
    }

    pub fn node_id(&self) -> String {
        if !self.sandboxes.node_id.is_empty() {
            return self.sandboxes.node_id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "local".into())
    }

    pub fn blob_dir(&self) -> PathBuf {
        if self.blobs.dir.is_empty() {
            self.data_dir.join("blobs")
        } else {
            PathBuf::from(&self.blobs.dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // figment's Jail API fixes the closure's error type.
    #[allow(clippy::result_large_err)]
    fn defaults_are_the_embedded_mode() {
        // Inside a Jail too: Jails run one at a time, so the other test's
        // environment variables cannot leak in.
        figment::Jail::expect_with(|_| {
            let config = Config::load(None).unwrap();
            assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
            assert_eq!(config.blobs.backend, BlobBackend::Local);
            assert!(config.database_url().starts_with("sqlite:"));
            assert_eq!(config.volumes.max_upload_bytes, 4 << 30);
            assert_eq!(config.runtime.kind, RuntimeKind::Auto);
            assert_eq!(config.pool.sizes.get("python"), Some(&2));
            let sandboxes = &config.sandboxes;
            assert_eq!(sandboxes.effective_timeout(None), 300);
            assert_eq!(sandboxes.effective_timeout(Some(0)), 300);
            assert_eq!(
                sandboxes.effective_timeout(Some(100_000_000_000_000)),
                86_400
            );
            assert_eq!(sandboxes.effective_timeout(Some(60)), 60);
            Ok(())
        });
    }

    #[test]
    // figment's Jail API fixes the closure's error type.
    #[allow(clippy::result_large_err)]
    fn environment_overrides_nested_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SANDBOX_MANAGER__LISTEN", "127.0.0.1:9999");
            jail.set_env("SANDBOX_MANAGER__BLOBS__S3__BUCKET", "from-env");
            jail.set_env("SANDBOX_MANAGER__VOLUMES__MAX_UPLOAD_BYTES", "1024");
            let config = Config::load(None).unwrap();
            assert_eq!(config.listen.port(), 9999);
            assert_eq!(config.blobs.s3.bucket, "from-env");
            assert_eq!(config.volumes.max_upload_bytes, 1024);
            Ok(())
        });
    }
}

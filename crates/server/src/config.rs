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
    pub sandboxes: SandboxesConfig,
    pub hydrate: HydrateConfig,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HydrateConfig {
    pub strict: bool,
    pub cache_dir: String,
    pub cache_max_bytes: u64,
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
pub struct SandboxesConfig {
    pub default_timeout_secs: u64,
    pub node_id: String,
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
    pub stale_upload_secs: u64,
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

    pub fn templates_dir(&self) -> PathBuf {
        self.under_data_dir(&self.runtime.templates_dir, "templates")
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

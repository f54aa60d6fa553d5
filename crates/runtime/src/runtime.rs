//! The driver-independent runtime interface.

use std::path::{Path, PathBuf};

use envd_protocol::client::EnvdClient;

use async_trait::async_trait;

/// Resource limits applied to one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub vcpus: u32,
    pub memory_mb: u64,
    pub pids_max: u64,
    /// The sandbox's disk: writes past it fail with `ENOSPC` inside.
    pub disk_mib: u64,
}

/// Everything a driver needs to boot one sandbox.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// Unique sandbox id: `[A-Za-z0-9_-]`, 1..=64 chars (used in paths and cgroup names).
    pub id: String,
    /// Template root filesystem (read-only lower layer).
    pub rootfs: PathBuf,
    /// Access token envd will require on every call but `/health`.
    pub token: String,
    pub hostname: String,
    pub limits: Limits,
}

/// What the host has counted of one sandbox (see [`Runtime::host_usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostUsage {
    /// CPU time of all its processes so far, in microseconds.
    pub cpu_usec: u64,
    pub memory_bytes: u64,
}

/// A sandbox whose envd answered `/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booted {
    pub id: String,
    /// Host path of the unix socket envd listens on.
    pub envd_socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime unavailable on this host: {0}")]
    Unsupported(String),
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    #[error("sandbox {0} already exists")]
    AlreadyExists(String),
    #[error("cgroup setup for sandbox {id} failed: {message}")]
    Cgroup { id: String, message: String },
    #[error("failed to start the launcher for sandbox {id}: {source}")]
    Launch {
        id: String,
        #[source]
        source: std::io::Error,
    },
    /// Something the driver builds in the background (kernel, image,
    /// snapshot) is not there yet; try again later.
    #[error("not ready: {0}")]
    NotReady(String),
    /// Building what a template boots from (kernel, image, snapshot) failed.
    #[error("preparing the template failed: {0}")]
    Prepare(String),
    #[error("sandbox {id} did not become healthy: {message}")]
    BootFailed { id: String, message: String },
    #[error("failed to destroy sandbox {id}: {message}")]
    Destroy { id: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RuntimeError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A sandbox driver. Object-safe: the server holds an `Arc<dyn Runtime>`.
#[async_trait]
pub trait Runtime: Send + Sync {
    /// Short driver name, e.g. `"namespace"`.
    fn kind(&self) -> &'static str;

    /// What `/health` and the start-up log say about the driver.
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "kind": self.kind() })
    }

    /// Builds whatever booting `rootfs` needs beyond the rootfs itself
    /// (images, snapshots); returns once done.
    async fn prepare(&self, _rootfs: &Path, _limits: Limits) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Boots a sandbox; returns once its envd answers `/health`.
    async fn boot(&self, spec: BootSpec) -> Result<Booted, RuntimeError>;

    /// Tears a sandbox down completely (processes, mounts, directories,
    /// cgroups). Destroying an unknown or already destroyed id succeeds.
    async fn destroy(&self, id: &str) -> Result<(), RuntimeError>;

    /// Ids of sandboxes present on this node (alive or not), from the
    /// driver's state directory; used to reconcile after a server restart.
    async fn list(&self) -> Result<Vec<String>, RuntimeError>;

    /// Whether the sandbox's processes are running and envd answers `/health`.
    async fn is_alive(&self, id: &str) -> bool;

    /// Host path of the sandbox's envd unix socket.
    fn envd_socket(&self, id: &str) -> PathBuf;

    /// Whether the sandbox's processes exist (cheap: no call into it).
    fn is_running(&self, id: &str) -> bool;

    /// A client for the sandbox's envd. Drivers whose channel takes one
    /// connection at a time hand out clones of one shared client.
    fn agent(&self, id: &str, token: &str) -> EnvdClient {
        EnvdClient::unix(self.envd_socket(id), token)
    }

    /// Proportional set size of the sandbox's machine, where measurable.
    fn memory_pss_bytes(&self, _id: &str) -> Option<u64> {
        None
    }

    /// CPU time and memory of the sandbox as the host counts them (its
    /// cgroup), where the driver can; `None` where the sandbox's own kernel
    /// is the one to ask (a VM's, through its agent).
    fn host_usage(&self, _id: &str) -> Option<HostUsage> {
        None
    }

    /// Whether the driver's sandboxes can reach the internet (a template
    /// build then installs packages inside its build sandbox; otherwise
    /// the host installs them into a private copy of the base first).
    fn outbound_network(&self) -> bool {
        false
    }

    /// Stops every process of the sandbox where it stands, memory kept
    /// (its agent too, so no call reaches it until [`Self::resume`]).
    async fn pause(&self, _id: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported(format!(
            "{} sandboxes cannot be paused",
            self.kind()
        )))
    }

    /// Lets a paused sandbox run on from where it stopped.
    async fn resume(&self, _id: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::Unsupported(format!(
            "{} sandboxes cannot be paused",
            self.kind()
        )))
    }

    /// Whether this driver can share volume layers kept in `store_dir` (an
    /// existing directory): a volume unpacked once per node into a layer,
    /// then mounted copy-on-write into every sandbox that attaches it.
    /// Checked at start; on an error the orchestrator copies volumes per
    /// sandbox instead (drivers without layers leave all `layer_*` alone).
    fn check_layer_store(&self, _store_dir: &Path) -> Result<(), RuntimeError> {
        Err(no_layers(self.kind()))
    }

    /// How many layers one sandbox can mount (drivers with a fixed number
    /// of mount slots); further volumes of that sandbox are copied.
    fn layer_slots(&self) -> usize {
        usize::MAX
    }

    /// Makes the empty `layer_dir` (the store's, on this node) writable at
    /// `mount_path` (an existing directory) in sandbox `id`, for its agent
    /// to unpack the volume into.
    async fn layer_build(
        &self,
        _id: &str,
        _layer_dir: &Path,
        _mount_path: &str,
    ) -> Result<(), RuntimeError> {
        Err(no_layers(self.kind()))
    }

    /// After the unpack: makes the layer durable and read-only for good, and
    /// gives sandbox `id` a private copy-on-write view of it at `mount_path`
    /// in place of the writable one.
    async fn layer_seal(
        &self,
        _id: &str,
        _layer_dir: &Path,
        _mount_path: &str,
    ) -> Result<(), RuntimeError> {
        Err(no_layers(self.kind()))
    }

    /// Mounts a private copy-on-write view of the sealed layer at
    /// `mount_path` (an existing directory) in sandbox `id`.
    async fn layer_share(
        &self,
        _id: &str,
        _layer_dir: &Path,
        _mount_path: &str,
    ) -> Result<(), RuntimeError> {
        Err(no_layers(self.kind()))
    }

    /// Takes a failed build's writable mount away from sandbox `id`.
    async fn layer_detach(
        &self,
        _id: &str,
        _layer_dir: &Path,
        _mount_path: &str,
    ) -> Result<(), RuntimeError> {
        Err(no_layers(self.kind()))
    }

    /// Cuts (or restores) the sandbox's outbound network. Drivers without
    /// outbound networking accept both.
    async fn set_network(&self, _id: &str, _enabled: bool) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Enforces the sandbox's own outbound rules (on top of the operator's).
    /// Drivers without outbound networking have nothing to open or close.
    async fn set_egress(
        &self,
        _id: &str,
        _policy: &crate::egress::EgressPolicy,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }
}

fn no_layers(kind: &str) -> RuntimeError {
    RuntimeError::Unsupported(format!("{kind} sandboxes do not share volume layers"))
}

/// Ids become path components and cgroup names: keep them boring.
pub(crate) fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidSpec(format!(
            "sandbox id {id:?} must be 1..=64 chars of [A-Za-z0-9_-]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("sbx-1_a").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn runtime_is_object_safe() {
        fn _takes(_: &dyn Runtime) {}
    }
}

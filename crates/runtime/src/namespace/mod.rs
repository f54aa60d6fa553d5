//! The namespace driver: overlayfs over the template rootfs, fresh
//! user/mount/pid/uts/ipc/net/cgroup namespaces, cgroup limits, envd bind-mounted in and
//! reached over a unix socket in the sandbox's `agent/` directory.
//!
//! Per sandbox, `state_dir/ID/` holds:
//! - `disk.img`: a sparse ext4 image of the template's `disk_gib`, the
//!   sandbox's disk quota; mounted (inside the sandbox only) on `disk/`,
//!   which holds the overlay's `upper/` and `work/`;
//! - `lower/`: mount point of the template seen through the sandbox's id
//!   mapping (an idmapped mount);
//! - `merged/`: the overlay mount point (mounted only inside the sandbox);
//! - `agent/`: seen as `/.envd` inside; envd's socket `envd.sock`, the
//!   one-shot `token` file, and `envd` (mount point for the binary);
//! - `launcher.pid`: `PID STARTTIME` of the launcher (start time guards
//!   against pid reuse when re-adopting after a server restart);
//! - `launcher.log`: stderr of the launcher and of envd.

pub mod caps;
pub mod cgroups;
pub mod disk;
pub mod launcher;
pub mod layers;
pub mod mounts;
pub mod protections;
pub mod seccomp;
pub mod userns;

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use envd_protocol::client::EnvdClient;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::process::{self, LauncherCommand};
use crate::runtime::{validate_id, BootSpec, Booted, HostUsage, Runtime, RuntimeError};
use crate::slots::{IdRange, SlotAllocator, SLOTS_ROOT};
use cgroups::SandboxCgroup;
use launcher::{LaunchArgs, DISK_IMAGE};
use layers::LayerAction;
use protections::Protections;

/// Unix socket paths are limited to 108 bytes including the NUL.
const MAX_SOCKET_PATH: usize = 107;
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(10);
const HEALTH_POLL_INTERVAL: Duration = Duration::from_millis(5);
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long freezing or thawing a sandbox's processes may take.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct NamespaceConfig {
    /// Per-sandbox state lives in `state_dir/ID/` (must not be on overlayfs).
    pub state_dir: PathBuf,
    /// Host envd binary, bind-mounted read-only into every sandbox. It runs
    /// against the sandbox's libc, so it must be static or built for a libc
    /// no newer than the templates'.
    pub envd_binary: PathBuf,
    /// How to exec the launcher (see [`launcher::launcher_main`]).
    pub launcher: LauncherCommand,
    /// First host id of the per-sandbox ranges (each 65,536 ids).
    pub uid_base: u32,
    /// How many sandboxes may hold a range at once.
    pub uid_slots: u32,
}

impl NamespaceConfig {
    /// Defaults for the id ranges: 4,096 slots from 1,000,000,000, far above
    /// the ranges distributions hand out in /etc/subuid.
    pub const DEFAULT_UID_BASE: u32 = 1_000_000_000;
    pub const DEFAULT_UID_SLOTS: u32 = 4_096;
}

#[derive(Clone)]
pub struct NamespaceRuntime {
    config: NamespaceConfig,
    boot_timeout: Duration,
    slots: SlotAllocator,
    /// Serialises slot claims within this process.
    slot_lock: Arc<Mutex<()>>,
    /// The private envd copy sandboxes get (made on first boot).
    envd_copy: Arc<OnceLock<PathBuf>>,
    protections: Arc<OnceLock<Protections>>,
    /// Why this runtime was chosen, when not by name (shown in `/health`).
    selected_by: Option<String>,
}

impl NamespaceRuntime {
    pub fn new(config: NamespaceConfig) -> Self {
        Self {
            slots: SlotAllocator::new(
                Path::new(SLOTS_ROOT).join("uid-slots"),
                config.uid_base,
                userns::IDS_PER_SANDBOX,
                config.uid_slots,
            ),
            config,
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            slot_lock: Arc::new(Mutex::new(())),
            envd_copy: Arc::new(OnceLock::new()),
            protections: Arc::new(OnceLock::new()),
            selected_by: None,
        }
    }

    pub fn with_selection_note(mut self, note: Option<String>) -> Self {
        self.selected_by = note;
        self
    }

    pub fn with_boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// Checks that this host can run the namespace driver with every
    /// protection it promises (root, overlayfs, cgroups, user namespaces
    /// with idmapped mounts, seccomp, loop devices); returns what is
    /// enforced. A missing required protection is an error: the driver
    /// never runs sandboxes weaker than it says.
    pub fn probe(&self) -> Result<Protections, RuntimeError> {
        let found = protections::probe(&self.config)?;
        let _ = self.protections.set(found.clone());
        Ok(found)
    }

    pub fn config(&self) -> &NamespaceConfig {
        &self.config
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join(id)
    }

    fn agent_dir(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("agent")
    }

    /// The launcher recorded for `id`, if it is still that same process.
    fn running_launcher(&self, id: &str) -> Option<i32> {
        process::running(&self.sandbox_dir(id).join("launcher.pid"))
    }

    /// Creates `state_dir/ID/...`, the token file and the cgroup; returns
    /// the sandbox's id range.
    fn prepare(&self, spec: &BootSpec) -> Result<IdRange, RuntimeError> {
        let dir = self.sandbox_dir(&spec.id);
        fs::create_dir_all(&self.config.state_dir).map_err(|e| {
            RuntimeError::io(format!("creating {}", self.config.state_dir.display()), e)
        })?;
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(spec.id.clone()))
            }
            Err(e) => return Err(RuntimeError::io(format!("creating {}", dir.display()), e)),
        }
        // Nothing in here is for other host users (the disk image holds
        // the tenant's files).
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| RuntimeError::io("chmod sandbox dir", e))?;
        for sub in ["lower", "disk", "merged", "agent"] {
            let path = dir.join(sub);
            fs::create_dir(&path)
                .map_err(|e| RuntimeError::io(format!("creating {}", path.display()), e))?;
        }
        disk::create_image(&dir.join(DISK_IMAGE), spec.limits.disk_mib << 20)
            .map_err(|e| RuntimeError::io("creating the sandbox disk", e))?;
        let ids = {
            let _guard = self.slot_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.slots
                .claim(&self.slot_owner(&spec.id))
                .map_err(|e| RuntimeError::io("claiming a user-id range", e))?
        };
        // Only root (envd) inside the sandbox may touch the agent dir: the
        // token is in there until envd has read it.
        let agent = dir.join("agent");
        fs::set_permissions(&agent, fs::Permissions::from_mode(0o700))
            .map_err(|e| RuntimeError::io("chmod agent dir", e))?;
        let mut token = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(agent.join("token"))
            .map_err(|e| RuntimeError::io("writing the token file", e))?;
        token
            .write_all(spec.token.as_bytes())
            .map_err(|e| RuntimeError::io("writing the token file", e))?;
        fs::File::create(agent.join("envd"))
            .map_err(|e| RuntimeError::io("creating the envd mount point", e))?;
        // Mount point of the disk's volume-layer dirs: stays host-root 0700.
        fs::create_dir(agent.join(mounts::VOLUMES_DIR))
            .and_then(|()| {
                fs::set_permissions(
                    agent.join(mounts::VOLUMES_DIR),
                    fs::Permissions::from_mode(0o700),
                )
            })
            .map_err(|e| RuntimeError::io("creating the volumes mount point", e))?;
        let root = ids.host_id(0);
        for path in [agent.clone(), agent.join("token")] {
            std::os::unix::fs::chown(&path, Some(root), Some(root))
                .map_err(|e| RuntimeError::io(format!("chown {}", path.display()), e))?;
        }

        let cgroup = SandboxCgroup::for_sandbox(&spec.id).map_err(|e| RuntimeError::Cgroup {
            id: spec.id.clone(),
            message: e.to_string(),
        })?;
        cgroup
            .create(&spec.limits)
            .map_err(|e| RuntimeError::Cgroup {
                id: spec.id.clone(),
                message: e.to_string(),
            })?;
        Ok(ids)
    }

    /// What an id-slot claim names as its holder: the sandbox dir, made
    /// absolute (the claims are host-wide).
    fn slot_owner(&self, id: &str) -> PathBuf {
        let dir = self.sandbox_dir(id);
        std::path::absolute(&dir).unwrap_or(dir)
    }

    /// A root-owned, read-only copy of the envd binary under the state dir,
    /// named by its content hash: sandboxes never see the build tree or an
    /// install path an operator might later replace while they run.
    fn envd_copy(&self) -> Result<PathBuf, RuntimeError> {
        if let Some(path) = self.envd_copy.get() {
            return Ok(path.clone());
        }
        use sha2::Digest;
        let bytes = fs::read(&self.config.envd_binary)
            .map_err(|e| RuntimeError::io("reading the envd binary", e))?;
        let hash = hex::encode(sha2::Sha256::digest(&bytes));
        let dir = self.config.state_dir.join(".envd");
        fs::create_dir_all(&dir).map_err(|e| RuntimeError::io("creating .envd", e))?;
        let path = dir.join(format!("envd-{}", &hash[..16]));
        if !path.exists() {
            // Concurrent boots may race here: each writes its own partial.
            static COPIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let partial = dir.join(format!(".envd-{}.{}.{n}", &hash[..16], std::process::id()));
            fs::write(&partial, &bytes).map_err(|e| RuntimeError::io("copying envd", e))?;
            fs::set_permissions(&partial, fs::Permissions::from_mode(0o555))
                .map_err(|e| RuntimeError::io("chmod envd copy", e))?;
            fs::rename(&partial, &path).map_err(|e| RuntimeError::io("placing envd copy", e))?;
        }
        Ok(self.envd_copy.get_or_init(|| path).clone())
    }

    /// Spawns the launcher; the returned receiver fires when it exits.
    fn spawn_launcher(
        &self,
        spec: &BootSpec,
        ids: IdRange,
    ) -> Result<oneshot::Receiver<io::Result<std::process::ExitStatus>>, RuntimeError> {
        let dir = self.sandbox_dir(&spec.id);
        let launch = LaunchArgs {
            id: spec.id.clone(),
            sandbox_dir: dir.clone(),
            rootfs: spec.rootfs.clone(),
            envd_binary: self.envd_copy()?,
            hostname: spec.hostname.clone(),
            ids,
        };
        let log = fs::File::create(dir.join("launcher.log"))
            .map_err(|e| RuntimeError::io("creating launcher.log", e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| RuntimeError::io("cloning the launcher.log fd", e))?;
        let mut command = tokio::process::Command::new(&self.config.launcher.program);
        command
            .args(&self.config.launcher.args_prefix)
            .args(launch.to_args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // The sandbox must outlive a server restart.
            .kill_on_drop(false);
        let mut child = command.spawn().map_err(|source| RuntimeError::Launch {
            id: spec.id.clone(),
            source,
        })?;
        let pid = child.id().expect("a just-spawned child has a pid") as i32;
        process::record(&dir.join("launcher.pid"), pid)
            .map_err(|e| RuntimeError::io("recording the launcher", e.into()))?;

        // Reap the launcher whenever it exits so it never lingers as a zombie.
        let (exited_tx, exited_rx) = oneshot::channel();
        let id = spec.id.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            debug!(sandbox = %id, ?status, "launcher exited");
            let _ = exited_tx.send(status);
        });
        Ok(exited_rx)
    }

    async fn wait_healthy(
        &self,
        spec: &BootSpec,
        mut launcher_exited: oneshot::Receiver<io::Result<std::process::ExitStatus>>,
    ) -> Result<(), RuntimeError> {
        let client = EnvdClient::unix(self.envd_socket(&spec.id), spec.token.clone());
        let deadline = Instant::now() + self.boot_timeout;
        loop {
            if let Ok(status) = launcher_exited.try_recv() {
                return Err(RuntimeError::BootFailed {
                    id: spec.id.clone(),
                    message: format!(
                        "launcher exited ({status:?}); log: {}",
                        self.log_tail(&spec.id)
                    ),
                });
            }
            if self.envd_socket(&spec.id).exists() {
                match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, client.health()).await {
                    Ok(Ok(_)) => {
                        // envd deletes it itself (--delete-token-file); this
                        // covers an agent that does not.
                        let _ = fs::remove_file(self.agent_dir(&spec.id).join("token"));
                        return Ok(());
                    }
                    Ok(Err(e)) => debug!(sandbox = %spec.id, error = %e, "envd not ready"),
                    Err(_) => debug!(sandbox = %spec.id, "envd health probe timed out"),
                }
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::BootFailed {
                    id: spec.id.clone(),
                    message: format!(
                        "envd did not answer /health within {:?}; log: {}",
                        self.boot_timeout,
                        self.log_tail(&spec.id)
                    ),
                });
            }
            tokio::time::sleep(HEALTH_POLL_INTERVAL).await;
        }
    }

    fn log_tail(&self, id: &str) -> String {
        process::tail(&self.sandbox_dir(id).join("launcher.log"), 10)
    }

    fn validate_spec(&self, spec: &BootSpec) -> Result<(), RuntimeError> {
        validate_id(&spec.id)?;
        if !spec.rootfs.join("etc/passwd").is_file() {
            return Err(RuntimeError::InvalidSpec(format!(
                "rootfs {} is not a root filesystem",
                spec.rootfs.display()
            )));
        }
        if !self.config.envd_binary.is_file() {
            return Err(RuntimeError::InvalidSpec(format!(
                "envd binary {} not found",
                self.config.envd_binary.display()
            )));
        }
        let hostname_ok = !spec.hostname.is_empty()
            && spec.hostname.len() <= 64
            && spec
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !hostname_ok {
            return Err(RuntimeError::InvalidSpec(format!(
                "invalid hostname {:?}",
                spec.hostname
            )));
        }
        let socket = self.envd_socket(&spec.id);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(RuntimeError::InvalidSpec(format!(
                "envd socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter state_dir",
                socket.display()
            )));
        }
        Ok(())
    }

    /// Pause and resume: the cgroup freezer stops every process of the
    /// sandbox (its envd too) without them noticing, memory kept.
    async fn freeze(&self, id: &str, frozen: bool) -> Result<(), RuntimeError> {
        validate_id(id)?;
        let cgroup = SandboxCgroup::for_sandbox(id).map_err(|e| RuntimeError::Cgroup {
            id: id.to_string(),
            message: e.to_string(),
        })?;
        if !cgroup.exists() {
            return Err(RuntimeError::InvalidSpec(format!(
                "sandbox {id} is not running"
            )));
        }
        tokio::task::spawn_blocking(move || cgroup.set_frozen(frozen, FREEZE_TIMEOUT))
            .await
            .map_err(|e| RuntimeError::io("freezer task", io::Error::other(e)))?
            .map_err(|e| RuntimeError::Cgroup {
                id: id.to_string(),
                message: format!("freezer: {e}"),
            })
    }

    /// Blocking [`Runtime::destroy`], for contexts without an async runtime
    /// (shutdown hooks, `Drop` guards in tests).
    pub fn destroy_sync(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id)?;
        self.destroy_blocking(id)
    }

    fn destroy_blocking(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.sandbox_dir(id);
        let fail = |message: String| RuntimeError::Destroy {
            id: id.to_string(),
            message,
        };
        let launcher = self.running_launcher(id);
        if let Some(pid) = launcher {
            // PID 1 of the sandbox has PDEATHSIG=SIGKILL, so this takes the
            // whole pid namespace (and with it the mount namespace) down.
            process::kill(pid);
        }
        // Sweep the cgroup too: it also catches processes from a launcher that
        // died before we could record it, and waits until all have exited.
        match SandboxCgroup::for_sandbox(id) {
            Ok(cgroup) => cgroup
                .kill_all_and_remove(DESTROY_TIMEOUT)
                .map_err(|e| fail(format!("cgroup cleanup: {e}")))?,
            Err(e) => warn!(sandbox = id, error = %e, "no cgroups to clean up"),
        }
        if let Some(pid) = launcher {
            process::wait_until_gone(pid, DESTROY_TIMEOUT)
                .map_err(|_| fail(format!("launcher {pid} did not exit")))?;
        }
        // Mounts live in the sandbox's own namespace, so the host should see
        // none; detach any that do exist (e.g. from a bug or an older version)
        // before deleting, so the delete never walks into a lower layer.
        // remove_tree would refuse to cross one anyway (second line of
        // defence: it fails naming the mount instead of deleting through it).
        for mount_point in host_mounts_under(&dir) {
            warn!(sandbox = id, mount = %mount_point.display(), "detaching leftover host mount");
            if let Ok(c) = std::ffi::CString::new(mount_point.as_os_str().as_encoded_bytes()) {
                // SAFETY: valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if !host_mounts_under(&dir).is_empty() {
            return Err(fail("mounts remain under the sandbox dir".into()));
        }
        match crate::remove_tree(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(format!("removing {}: {e}", dir.display()))),
        }
        self.slots.release(&self.slot_owner(id));
        Ok(())
    }
}

#[async_trait]
impl Runtime for NamespaceRuntime {
    fn kind(&self) -> &'static str {
        "namespace"
    }

    fn describe(&self) -> serde_json::Value {
        let mut description = serde_json::json!({ "kind": "namespace" });
        if let Some(protections) = self.protections.get() {
            description["isolation"] = protections.to_json();
        }
        if let Some(note) = &self.selected_by {
            description["selected_by"] = note.clone().into();
        }
        description
    }

    async fn boot(&self, spec: BootSpec) -> Result<Booted, RuntimeError> {
        let started = Instant::now();
        self.validate_spec(&spec)?;
        let result = async {
            let ids = self.prepare(&spec)?;
            let exited = self.spawn_launcher(&spec, ids)?;
            self.wait_healthy(&spec, exited).await
        }
        .await;
        match result {
            Ok(()) => {
                info!(sandbox = %spec.id, elapsed = ?started.elapsed(), "sandbox booted");
                Ok(Booted {
                    id: spec.id.clone(),
                    envd_socket: self.envd_socket(&spec.id),
                })
            }
            // Never clean up someone else's sandbox.
            Err(e @ RuntimeError::AlreadyExists(_)) => Err(e),
            Err(e) => {
                warn!(sandbox = %spec.id, error = %e, "boot failed; cleaning up");
                if let Err(cleanup) = self.destroy(&spec.id).await {
                    warn!(sandbox = %spec.id, error = %cleanup, "cleanup after failed boot failed");
                }
                Err(e)
            }
        }
    }

    fn host_usage(&self, id: &str) -> Option<HostUsage> {
        validate_id(id).ok()?;
        let usage = SandboxCgroup::for_sandbox(id).ok()?.usage()?;
        Some(HostUsage {
            cpu_usec: usage.cpu_usec,
            memory_bytes: usage.memory_bytes,
        })
    }

    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.freeze(id, true).await
    }

    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.freeze(id, false).await
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id)?;
        let started = Instant::now();
        let this = self.clone();
        let owned_id = id.to_string();
        tokio::task::spawn_blocking(move || this.destroy_blocking(&owned_id))
            .await
            .map_err(|e| RuntimeError::Destroy {
                id: id.to_string(),
                message: format!("destroy task failed: {e}"),
            })??;
        info!(sandbox = id, elapsed = ?started.elapsed(), "sandbox destroyed");
        Ok(())
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let entries = match fs::read_dir(&self.config.state_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(RuntimeError::io(
                    format!("reading {}", self.config.state_dir.display()),
                    e,
                ))
            }
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| validate_id(name).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn is_running(&self, id: &str) -> bool {
        validate_id(id).is_ok() && self.running_launcher(id).is_some()
    }

    async fn is_alive(&self, id: &str) -> bool {
        if validate_id(id).is_err() || self.running_launcher(id).is_none() {
            return false;
        }
        // /health needs no token.
        let client = EnvdClient::unix(self.envd_socket(id), "");
        matches!(
            tokio::time::timeout(HEALTH_PROBE_TIMEOUT, client.health()).await,
            Ok(Ok(_))
        )
    }

    fn envd_socket(&self, id: &str) -> PathBuf {
        self.agent_dir(id).join("envd.sock")
    }

    /// Layer trees are mounted idmapped, like templates: the store's
    /// filesystem must support that.
    fn check_layer_store(&self, store_dir: &Path) -> Result<(), RuntimeError> {
        protections::probe_idmap(&self.config, store_dir)
    }

    async fn layer_build(
        &self,
        id: &str,
        dir: &Path,
        mount_path: &str,
    ) -> Result<(), RuntimeError> {
        self.mount_layer_for_build(id, dir, mount_path).await
    }

    async fn layer_seal(&self, id: &str, dir: &Path, mount_path: &str) -> Result<(), RuntimeError> {
        self.seal_layer(id, dir, mount_path).await
    }

    async fn layer_share(
        &self,
        id: &str,
        dir: &Path,
        mount_path: &str,
    ) -> Result<(), RuntimeError> {
        let share = LayerAction::Share { replace: false };
        self.run_layer_helper(id, share, dir, mount_path).await
    }

    async fn layer_detach(
        &self,
        id: &str,
        dir: &Path,
        mount_path: &str,
    ) -> Result<(), RuntimeError> {
        self.run_layer_helper(id, LayerAction::Detach, dir, mount_path)
            .await
    }
}

/// The last OS error, with what was being done.
pub(crate) fn os_error(what: &str) -> io::Error {
    let err = io::Error::last_os_error();
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// Mount points in the host (our) mount namespace at or below `dir`,
/// deepest first.
pub fn host_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mount_point| mount_point.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescaping() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}

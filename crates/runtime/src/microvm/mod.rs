//! The microVM driver: every sandbox is a QEMU `microvm` guest with its own
//! kernel, booted from the template's ext4 image behind a private qcow2
//! overlay, with envd as init reached over a virtio-serial port (HTTP/2 on
//! that one stream, so concurrent calls do not queue).
//!
//! Warm boots are snapshot restores: per template, one VM is booted with
//! its RAM in a file, stopped once envd waits for the host, and migrated to
//! a state file (`x-ignore-shared`: the RAM stays in its file). A clone maps
//! that RAM file copy-on-write, loads the state and continues; the token,
//! clock, entropy and hostname then arrive through envd's `POST /init`, so
//! no secret ever appears on a QEMU command line.
//!
//! Per sandbox, `state_dir/ID/` holds `disk.qcow2`, `agent.sock`,
//! `qmp.sock`, `console.log`, `qemu.pid` and `vm.pid` (`PID STARTTIME`).

pub mod accel;
mod hostguard;
pub mod images;
mod qemu;
pub mod qmp;
pub mod relay;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use envd_protocol::client::{EnvdClient, Target};
use envd_protocol::InitRequest;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::egress::EgressPolicy;
use crate::namespace::userns::SlotAllocator;
use crate::namespace::{wait_until_gone, ProcessInfo};
use crate::runtime::{validate_id, BootSpec, Booted, Limits, Runtime, RuntimeError};
pub use accel::{Accel, AccelChoice, AccelDecision};
use images::Images;
use qemu::{Memory, VmFiles, VmLaunch};
use qmp::Qmp;

const MAX_SOCKET_PATH: usize = 107;
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct MicrovmConfig {
    /// Per-sandbox state: `state_dir/ID/`.
    pub state_dir: PathBuf,
    /// Kernel, template images and snapshots (see [`images`]).
    pub images_dir: PathBuf,
    pub envd_binary: PathBuf,
    pub qemu_binary: PathBuf,
    pub qemu_img_binary: PathBuf,
    /// `linux-source-6.1.tar.xz`.
    pub kernel_source: PathBuf,
    pub accel: AccelChoice,
    /// Warm boots restore the template's snapshot; off: every boot is cold.
    pub snapshots: bool,
    /// Size of each guest's root disk (sparse; only written blocks use space).
    pub disk_bytes: u64,
    /// Cold boot to envd-ready, and snapshot builds.
    pub boot_timeout: Duration,
    /// How to exec the relay ([`relay::relay_main`]): the server passes its
    /// own binary and `["__vm-relay"]`.
    pub relay: crate::LauncherCommand,
    /// System user whose group the template VMs' QEMU runs with (see
    /// [`hostguard`]). Empty: no egress guard at all, guests reach host
    /// services and private networks (only for trusted workloads).
    pub vm_user: String,
    /// Per-VM gids `[vm_gid_base, + vm_gid_slots)`: the egress policy's
    /// handle on each sandbox's traffic.
    pub vm_gid_base: u32,
    pub vm_gid_slots: u32,
    /// Private destinations every guest may reach (e.g. a package mirror).
    pub egress_allow: Vec<crate::egress::Cidr>,
}

#[derive(Clone)]
pub struct MicrovmRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    config: MicrovmConfig,
    accel: AccelDecision,
    images: Images,
    /// The gid template VMs' QEMU runs with, if guarded (see [`hostguard`]).
    vm_gid: Option<u32>,
    /// Per-sandbox gids, if guarded.
    vm_gids: Option<SlotAllocator>,
    /// Whether a sandbox's QEMU can run as its own uid: it opens the
    /// snapshot's state file after dropping root, so every directory above
    /// `images_dir` must be searchable by other users.
    unprivileged_qemu: Result<(), String>,
    /// One client (one HTTP/2 connection) per VM: QEMU's chardev socket
    /// takes a single connection, so every caller must share it.
    agents: Mutex<HashMap<String, EnvdClient>>,
    /// Background builds in flight (kernel, template images + snapshots).
    building: Mutex<HashSet<PathBuf>>,
    /// The last failure of each background build, reported by `boot`.
    build_failures: Mutex<HashMap<PathBuf, String>>,
}

/// A template's snapshot: `templates/NAME/KEY/snapshot-KERNEL-ACCEL-SHAPE/`.
struct Snapshot {
    dir: PathBuf,
}

impl Snapshot {
    fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    fn complete_marker(&self) -> PathBuf {
        self.dir.join("complete")
    }
    fn is_complete(&self) -> bool {
        self.complete_marker().is_file()
    }
}

impl MicrovmRuntime {
    /// Checks QEMU and the accelerator; the kernel and images are built on
    /// demand ([`Runtime::prepare`]).
    pub fn new(mut config: MicrovmConfig) -> Result<Self, RuntimeError> {
        // QEMU daemonizes into `/`, so every path it is given must be absolute.
        for dir in [&mut config.state_dir, &mut config.images_dir] {
            *dir = std::path::absolute(&*dir)
                .map_err(|e| RuntimeError::io(format!("resolving {}", dir.display()), e))?;
        }
        let version = std::process::Command::new(&config.qemu_binary)
            .arg("--version")
            .output()
            .map_err(|e| {
                RuntimeError::Unsupported(format!(
                    "{} cannot run ({e}); install QEMU with scripts/microvm-deps.sh",
                    config.qemu_binary.display()
                ))
            })?;
        if !version.status.success() {
            return Err(RuntimeError::Unsupported(format!(
                "{} --version failed",
                config.qemu_binary.display()
            )));
        }
        if !config.envd_binary.is_file() {
            return Err(RuntimeError::Unsupported(format!(
                "envd binary {} not found",
                config.envd_binary.display()
            )));
        }
        let accel = accel::decide(config.accel).map_err(RuntimeError::Unsupported)?;
        let vm_gid = if config.vm_user.is_empty() {
            warn!("runtime.microvm.vm_user is empty: guests can reach services on the host and private networks");
            None
        } else {
            let unguarded = |e: String| {
                RuntimeError::Unsupported(format!(
                    "cannot enforce the VMs' egress policy: {e} (or set runtime.microvm.vm_user = \"\")"
                ))
            };
            let gid = hostguard::ensure_group(&config.vm_user).map_err(unguarded)?;
            hostguard::install(&hostguard::GuardSettings {
                guard_gid: gid,
                first_vm_gid: config.vm_gid_base,
                vm_gids: config.vm_gid_slots,
            })
            .map_err(unguarded)?;
            Some(gid)
        };
        let vm_gids = vm_gid.map(|_| {
            SlotAllocator::new(
                Path::new(crate::namespace::userns::SLOTS_ROOT).join("gid-slots"),
                config.vm_gid_base,
                1,
                config.vm_gid_slots,
            )
        });
        if accel.accel == Accel::Tcg {
            warn!(reason = %accel.reason, "microVMs run under TCG software emulation");
        }
        let unprivileged_qemu = match vm_gid {
            None => Err("no egress guard (runtime.microvm.vm_user is empty)".to_string()),
            Some(_) => searchable_by_others(&config.images_dir),
        };
        if let Err(why) = &unprivileged_qemu {
            warn!(reason = %why, "sandbox QEMU processes will run as root");
        }
        let images = Images::new(
            config.images_dir.clone(),
            config.kernel_source.clone(),
            config.envd_binary.clone(),
            config.disk_bytes,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                accel,
                images,
                vm_gid,
                vm_gids,
                unprivileged_qemu,
                agents: Mutex::new(HashMap::new()),
                building: Mutex::new(HashSet::new()),
                build_failures: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn accel(&self) -> &AccelDecision {
        &self.inner.accel
    }

    fn files(&self, id: &str) -> VmFiles {
        VmFiles::new(self.inner.config.state_dir.join(id))
    }
}

impl Inner {
    fn snapshot(&self, template_dir: &Path, limits: Limits) -> Snapshot {
        let name = format!(
            "snapshot-{}-{}-{}-{}x{}",
            self.images.kernel_key(),
            images::short_hash(qemu::fingerprint().as_bytes()),
            self.accel.accel.name(),
            limits.vcpus,
            limits.memory_mb
        );
        Snapshot {
            dir: template_dir.join(name),
        }
    }

    /// Kernel, image and (if enabled) snapshot for a template; blocks until
    /// all exist.
    async fn prepare(self: &Arc<Self>, rootfs: &Path, limits: Limits) -> Result<(), String> {
        let this = self.clone();
        let kernel = tokio::task::spawn_blocking(move || this.images.build_kernel())
            .await
            .map_err(|e| e.to_string())??;
        let this = self.clone();
        let rootfs_owned = rootfs.to_path_buf();
        let image =
            tokio::task::spawn_blocking(move || this.images.build_template_image(&rootfs_owned))
                .await
                .map_err(|e| e.to_string())??;
        if self.config.snapshots {
            let template_dir = image.parent().expect("image in a dir").to_path_buf();
            let snapshot = self.snapshot(&template_dir, limits);
            if !snapshot.is_complete() {
                self.build_snapshot(&kernel, &image, &snapshot, limits)
                    .await?;
            }
        }
        Ok(())
    }

    /// Starts `prepare` in the background unless it is already running;
    /// returns the last failure, if any, for the caller's error.
    fn prepare_in_background(self: &Arc<Self>, rootfs: &Path, limits: Limits) -> Option<String> {
        let key = rootfs.to_path_buf();
        let failure = self.build_failures.lock().unwrap().get(&key).cloned();
        if !self.building.lock().unwrap().insert(key.clone()) {
            return failure;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = this.prepare(&key, limits).await;
            match &result {
                Ok(()) => {
                    info!(rootfs = %key.display(), elapsed = ?started.elapsed(), "microVM images ready");
                    this.build_failures.lock().unwrap().remove(&key);
                }
                Err(e) => {
                    warn!(rootfs = %key.display(), error = %e, "preparing microVM images failed");
                    this.build_failures
                        .lock()
                        .unwrap()
                        .insert(key.clone(), e.clone());
                }
            }
            this.building.lock().unwrap().remove(&key);
        });
        failure
    }

    /// Boots the template VM with its RAM in a file, waits for envd, and
    /// saves the snapshot the pool's clones restore from.
    async fn build_snapshot(
        &self,
        kernel: &Path,
        image: &Path,
        snapshot: &Snapshot,
        limits: Limits,
    ) -> Result<(), String> {
        let lock_path = snapshot.dir.with_extension("lock");
        let _lock = tokio::task::spawn_blocking(move || images::lock_exclusive(&lock_path))
            .await
            .map_err(|e| e.to_string())??;
        if snapshot.is_complete() {
            return Ok(());
        }
        let started = Instant::now();
        let _ = crate::remove_tree(&snapshot.dir);
        fs::create_dir_all(&snapshot.dir).map_err(|e| e.to_string())?;
        // Sockets need short paths: the template VM's live in the state dir.
        let run_dir = self.config.state_dir.join(format!(
            ".snapshot-{}-{}",
            std::process::id(),
            next_run_number()
        ));
        let _ = crate::remove_tree(&run_dir);
        fs::create_dir_all(&run_dir).map_err(|e| e.to_string())?;
        let files = VmFiles::new(run_dir.clone());
        let result = async {
            self.create_overlay(image, "raw", &snapshot.disk()).await?;
            // The VM writes through to the snapshot's own disk.
            std::os::unix::fs::symlink(snapshot.disk(), files.disk()).map_err(|e| e.to_string())?;
            spawn_relay(&self.config.relay, &files, None).await?;
            let launch = VmLaunch {
                name: "sandbox-template",
                files: &files,
                kernel,
                limits,
                memory: Memory::SharedFile(snapshot.memory()),
                incoming: false,
                run_as: None,
            };
            self.spawn_qemu(&launch, self.vm_gid).await?;
            self.wait_for_console(
                &files,
                crate::microvm::READY_MARKER,
                self.config.boot_timeout,
            )
            .await?;
            let mut qmp = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            let step = |e: qmp::QmpError| e.to_string();
            qmp.execute("stop", json!({})).await.map_err(step)?;
            qmp.migrate_file("migrate", &snapshot.state(), self.config.boot_timeout)
                .await
                .map_err(step)?;
            let _ = qmp.execute("quit", json!({})).await;
            if let Some(pid) = read_pid(&files) {
                let _ = tokio::task::spawn_blocking(move || wait_until_gone(pid, DESTROY_TIMEOUT))
                    .await;
            }
            Ok::<(), String>(())
        }
        .await;
        if let Err(error) = result {
            kill_vm_processes(&files);
            let log = tail(&files.console_log());
            let _ = crate::remove_tree(&run_dir);
            let _ = crate::remove_tree(&snapshot.dir);
            return Err(format!("{error}; console: {log}"));
        }
        let _ = crate::remove_tree(&run_dir);
        fs::write(snapshot.complete_marker(), "").map_err(|e| e.to_string())?;
        info!(snapshot = %snapshot.dir.display(), elapsed = ?started.elapsed(), "template snapshot saved");
        Ok(())
    }

    async fn create_overlay(
        &self,
        backing: &Path,
        format: &str,
        overlay: &Path,
    ) -> Result<(), String> {
        let output = tokio::process::Command::new(&self.config.qemu_img_binary)
            .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
            .arg(backing)
            .arg(overlay)
            .output()
            .await
            .map_err(|e| format!("running qemu-img: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Runs QEMU, which daemonizes once the VM is set up (so it outlives a
    /// server restart and is never our zombie); records `PID STARTTIME`.
    async fn spawn_qemu(&self, launch: &VmLaunch<'_>, gid: Option<u32>) -> Result<i32, String> {
        let mut command = tokio::process::Command::new(&self.config.qemu_binary);
        if let Some(gid) = gid {
            command.gid(gid);
            // SAFETY: setgroups is async-signal-safe; drops root's
            // supplementary groups so the guard's gid is the only one.
            unsafe {
                command.pre_exec(|| {
                    if libc::setgroups(0, std::ptr::null()) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // The overlay disk on fds 3 (read-write) and 4 (read-only), see
        // `VmLaunch::disk_path`; QEMU keeps them, ours close on return.
        let disk_fds = match launch.run_as {
            Some(_) => {
                let open = |write: bool| {
                    fs::OpenOptions::new()
                        .read(true)
                        .write(write)
                        .open(launch.files.disk())
                        .map_err(|e| format!("opening {}: {e}", launch.files.disk().display()))
                };
                vec![open(true)?, open(false)?]
            }
            None => Vec::new(),
        };
        if !disk_fds.is_empty() {
            let sources: Vec<i32> = disk_fds
                .iter()
                .map(std::os::fd::AsRawFd::as_raw_fd)
                .collect();
            // SAFETY: only dup/dup2/fcntl (async-signal-safe) between fork
            // and exec. Sources are first moved above the targets so that
            // placing one cannot overwrite another.
            unsafe {
                command.pre_exec(move || {
                    let mut high = Vec::with_capacity(sources.len());
                    for fd in &sources {
                        let moved = libc::fcntl(*fd, libc::F_DUPFD, 10);
                        if moved < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        high.push(moved);
                    }
                    for (fd, target) in high.iter().zip(qemu::DISK_FDS) {
                        if libc::dup2(*fd, target) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        libc::close(*fd);
                    }
                    Ok(())
                });
            }
        }
        let output = command
            .args(launch.args(self.accel.accel))
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| format!("running {}: {e}", self.config.qemu_binary.display()))?;
        if !output.status.success() {
            return Err(format!(
                "QEMU failed to start ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let pid = fs::read_to_string(launch.files.pid_file())
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
            .ok_or("QEMU wrote no pid file")?;
        let start_time = ProcessInfo::read(pid)
            .map(|p| p.start_time)
            .ok_or("QEMU exited right after starting")?;
        fs::write(
            launch.files.identity_file(),
            format!("{pid} {start_time}\n"),
        )
        .map_err(|e| format!("writing vm.pid: {e}"))?;
        Ok(pid)
    }

    async fn wait_for_console(
        &self,
        files: &VmFiles,
        marker: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let console = fs::read(files.console_log()).unwrap_or_default();
            if String::from_utf8_lossy(&console).contains(marker) {
                return Ok(());
            }
            if read_pid(files).is_none() {
                return Err("QEMU exited during boot".into());
            }
            if Instant::now() > deadline {
                return Err(format!("no {marker:?} on the console within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn agent(&self, id: &str, token: &str) -> EnvdClient {
        let mut agents = self.agents.lock().unwrap();
        agents
            .entry(id.to_string())
            .or_insert_with(|| {
                let socket = self.config.state_dir.join(id).join("agent.sock");
                EnvdClient::builder(Target::Unix(socket), token)
                    .http2(true)
                    .build()
            })
            .clone()
    }

    /// Waits for envd over the agent channel, then hands it its token.
    async fn initialise(
        &self,
        spec: &BootSpec,
        files: &VmFiles,
        timeout: Duration,
    ) -> Result<(), String> {
        let client = self.agent(&spec.id, &spec.token);
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout(Duration::from_secs(2), client.health()).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => debug!(sandbox = %spec.id, error = %e, "envd not ready"),
                Err(_) => debug!(sandbox = %spec.id, "envd health timed out"),
            }
            if read_pid(files).is_none() {
                return Err("QEMU exited during boot".into());
            }
            if Instant::now() > deadline {
                return Err(format!("envd did not answer within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut seed = [0u8; 32];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
            .map_err(|e| format!("reading /dev/urandom: {e}"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        client
            .init(&InitRequest {
                token: spec.token.clone(),
                unix_time_ns: Some(now.as_nanos() as u64),
                entropy: Some(base64::engine::general_purpose::STANDARD.encode(seed)),
                hostname: Some(spec.hostname.clone()),
            })
            .await
            .map_err(|e| format!("envd init: {e}"))
    }

    /// The sandbox's own gid (recorded in its dir), when guarded.
    fn claim_gid(&self, id: &str) -> Result<Option<u32>, String> {
        let Some(slots) = &self.vm_gids else {
            return Ok(None);
        };
        let gid = slots
            .claim(&self.config.state_dir.join(id))
            .map_err(|e| format!("claiming a VM gid: {e}"))?
            .base;
        fs::write(self.config.state_dir.join(id).join("gid"), gid.to_string())
            .map_err(|e| format!("recording the VM gid: {e}"))?;
        // The default policy (with this server's allow list) is in place
        // before QEMU opens a single socket.
        hostguard::apply(gid, &self.config.egress_allow, &EgressPolicy::default())?;
        Ok(Some(gid))
    }

    fn recorded_gid(&self, id: &str) -> Option<u32> {
        fs::read_to_string(self.config.state_dir.join(id).join("gid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    async fn boot_vm(
        &self,
        spec: &BootSpec,
        kernel: &Path,
        image: &Path,
        snapshot: Option<&Snapshot>,
    ) -> Result<(), String> {
        let files = VmFiles::new(self.config.state_dir.join(&spec.id));
        let gid = self.claim_gid(&spec.id)?;
        // A sandbox's QEMU (and relay) drop to uid = gid = its own id once
        // set up; its dir becomes theirs. The overlay needs no chown: QEMU
        // gets it as inherited fds (`VmLaunch::disk_path`).
        let run_as = gid
            .filter(|_| self.unprivileged_qemu.is_ok())
            .map(|gid| (gid, gid));
        if let Some((uid, gid)) = run_as {
            chown(&files.dir, uid, gid)?;
        }
        match snapshot {
            Some(snapshot) => {
                self.create_overlay(&snapshot.disk(), "qcow2", &files.disk())
                    .await?;
                if run_as.is_some() {
                    // QEMU opens the state file on migrate-incoming, after
                    // it dropped to the sandbox's uid. It holds the template
                    // VM's device state, nothing secret.
                    readable_by_all(&snapshot.state())?;
                }
                spawn_relay(&self.config.relay, &files, run_as).await?;
                let launch = VmLaunch {
                    name: &spec.id,
                    files: &files,
                    kernel,
                    limits: spec.limits,
                    memory: Memory::PrivateFile(snapshot.memory()),
                    incoming: true,
                    run_as,
                };
                self.spawn_qemu(&launch, gid).await?;
                let mut qmp = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string())?;
                let step = |e: qmp::QmpError| e.to_string();
                qmp.migrate_file(
                    "migrate-incoming",
                    &snapshot.state(),
                    self.config.boot_timeout,
                )
                .await
                .map_err(step)?;
                qmp.execute("cont", json!({})).await.map_err(step)?;
                self.initialise(spec, &files, Duration::from_secs(10)).await
            }
            None => {
                self.create_overlay(image, "raw", &files.disk()).await?;
                spawn_relay(&self.config.relay, &files, run_as).await?;
                let launch = VmLaunch {
                    name: &spec.id,
                    files: &files,
                    kernel,
                    limits: spec.limits,
                    memory: Memory::Anonymous,
                    incoming: false,
                    run_as,
                };
                self.spawn_qemu(&launch, gid).await?;
                self.initialise(spec, &files, self.config.boot_timeout)
                    .await
            }
        }
    }
}

/// Every directory from `/` down to `path` lets other users through.
fn searchable_by_others(path: &Path) -> Result<(), String> {
    let mut dir = PathBuf::new();
    for part in path.components() {
        dir.push(part);
        let Ok(meta) = fs::metadata(&dir) else {
            break; // Not created yet: we create it 0755.
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(format!(
                "{} is not searchable by other users (mode {:o}), so an unprivileged QEMU cannot \
                 reach the snapshots in {}; put runtime.microvm.images_dir elsewhere (e.g. under \
                 /var/lib) or chmod o+x that directory",
                dir.display(),
                meta.permissions().mode() & 0o7777,
                path.display()
            ));
        }
    }
    Ok(())
}

fn readable_by_all(path: &Path) -> Result<(), String> {
    let mode = fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o444 != 0o444 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o444))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("chown {}: {e}", path.display()))
}

/// Starts the VM's relay and waits until it listens (QEMU connects to it
/// on start-up, so it must come first).
async fn spawn_relay(
    relay: &crate::LauncherCommand,
    files: &VmFiles,
    run_as: Option<(u32, u32)>,
) -> Result<(), String> {
    use tokio::io::AsyncBufReadExt;
    let mut command = tokio::process::Command::new(&relay.program);
    command
        .args(&relay.args_prefix)
        .arg("--serial")
        .arg(files.serial_socket())
        .arg("--agent")
        .arg(files.agent_socket());
    if let Some((uid, gid)) = run_as {
        command.arg("--run-as").arg(format!("{uid}:{gid}"));
    }
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(false);
    // Its own session: a terminal's Ctrl-C to the server must not reach it.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("starting the relay: {e}"))?;
    let pid = child.id().ok_or("the relay exited at once")? as i32;
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    let mut stdout = tokio::io::BufReader::new(stdout);
    let read = stdout.read_line(&mut line);
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(_)) if line.trim() == relay::READY_LINE => {}
        _ => {
            let _ = child.start_kill();
            return Err(format!("the relay did not start (said {line:?})"));
        }
    }
    let start_time = ProcessInfo::read(pid).map(|p| p.start_time).unwrap_or(0);
    fs::write(files.relay_identity_file(), format!("{pid} {start_time}\n"))
        .map_err(|e| format!("writing relay.pid: {e}"))?;
    // Reap it whenever it exits so it never lingers as our zombie.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(())
}

/// Kills the VM's QEMU and relay (verified by start time); does not wait.
fn kill_vm_processes(files: &VmFiles) {
    for identity in [files.identity_file(), files.relay_identity_file()] {
        if let Some(pid) = read_identity(&identity) {
            // SAFETY: kill of a process we verified by start time.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Distinguishes template VMs snapshotted at once by one process.
fn next_run_number() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The VM's QEMU, if it is still that same process.
fn read_pid(files: &VmFiles) -> Option<i32> {
    read_identity(&files.identity_file())
}

/// The process recorded as `PID STARTTIME` in `path`, if still alive.
fn read_identity(path: &Path) -> Option<i32> {
    let text = fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace();
    let pid: i32 = fields.next()?.parse().ok()?;
    let start_time: u64 = fields.next()?.parse().ok()?;
    let info = ProcessInfo::read(pid)?;
    (info.start_time == start_time && !info.is_zombie()).then_some(pid)
}

fn tail(path: &Path) -> String {
    let text = String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(12)..].join(" | ")
}

/// Proportional set size of a process, from `smaps_rollup`.
fn pss_bytes(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What envd prints once it waits for the host (see envd's `guest.rs`).
pub const READY_MARKER: &str = "ENVD-READY";

#[async_trait]
impl Runtime for MicrovmRuntime {
    fn kind(&self) -> &'static str {
        "microvm"
    }

    fn describe(&self) -> serde_json::Value {
        json!({
            "kind": "microvm",
            "accel": self.inner.accel.accel.name(),
            "accel_reason": self.inner.accel.reason,
            "snapshots": self.inner.config.snapshots,
            "qemu_user": match &self.inner.unprivileged_qemu {
                Ok(()) => json!("a uid of its own per sandbox, no capabilities, no_new_privs, QEMU seccomp sandbox"),
                Err(why) => json!({ "missing": format!("QEMU runs as root: {why}") }),
            },
            "egress": if self.inner.vm_gid.is_some() {
                json!({
                    "default": "public internet only: host addresses, loopback, link-local (cloud metadata), private, shared and reserved ranges rejected",
                    "operator_allow": self.inner.config.egress_allow.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "per_sandbox": "network.allow_out / deny_out enforced per VM (nftables, by QEMU's per-VM gid)",
                })
            } else {
                json!({ "missing": "runtime.microvm.vm_user is empty: no egress guard" })
            },
        })
    }

    async fn prepare(&self, rootfs: &Path, limits: Limits) -> Result<(), RuntimeError> {
        self.inner
            .prepare(rootfs, limits)
            .await
            .map_err(RuntimeError::Prepare)
    }

    async fn boot(&self, spec: BootSpec) -> Result<Booted, RuntimeError> {
        validate_id(&spec.id)?;
        let started = Instant::now();
        let inner = &self.inner;
        let files = self.files(&spec.id);
        if files.agent_socket().as_os_str().len() > MAX_SOCKET_PATH {
            return Err(RuntimeError::InvalidSpec(format!(
                "agent socket path {} is too long; use a shorter state_dir",
                files.agent_socket().display()
            )));
        }
        // Everything slow (kernel build, image, snapshot) happens in the
        // background; until it is done a boot says "not ready".
        let not_ready = |what: &str| {
            let failure = inner.prepare_in_background(&spec.rootfs, spec.limits);
            RuntimeError::NotReady(match failure {
                Some(failure) => format!("{what}; the last attempt failed: {failure}"),
                None => format!("{what} (building in the background)"),
            })
        };
        let kernel = inner.images.kernel_path();
        if !kernel.is_file() {
            return Err(not_ready("the guest kernel is not built yet"));
        }
        let template_dir = inner
            .images
            .template_dir(&spec.rootfs)
            .map_err(RuntimeError::InvalidSpec)?;
        let image = template_dir.join("base.ext4");
        if !image.is_file() {
            return Err(not_ready("the template's VM image is not built yet"));
        }
        let snapshot = inner
            .config
            .snapshots
            .then(|| inner.snapshot(&template_dir, spec.limits));
        if snapshot.as_ref().is_some_and(|s| !s.is_complete()) {
            return Err(not_ready("the template's VM snapshot is not taken yet"));
        }
        match fs::create_dir(&files.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(spec.id.clone()))
            }
            Err(e) => {
                let _ = fs::create_dir_all(&inner.config.state_dir);
                fs::create_dir(&files.dir).map_err(|_| {
                    RuntimeError::io(format!("creating {}", files.dir.display()), e)
                })?;
            }
        }
        let _ = fs::set_permissions(&files.dir, fs::Permissions::from_mode(0o700));
        match inner
            .boot_vm(&spec, &kernel, &image, snapshot.as_ref())
            .await
        {
            Ok(()) => {
                info!(sandbox = %spec.id, elapsed = ?started.elapsed(), restored = snapshot.is_some(), "microVM booted");
                Ok(Booted {
                    id: spec.id.clone(),
                    envd_socket: files.agent_socket(),
                })
            }
            Err(message) => {
                let message = format!("{message}; console: {}", tail(&files.console_log()));
                warn!(sandbox = %spec.id, error = %message, "microVM boot failed; cleaning up");
                let _ = self.destroy(&spec.id).await;
                Err(RuntimeError::BootFailed {
                    id: spec.id,
                    message,
                })
            }
        }
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id)?;
        self.inner.agents.lock().unwrap().remove(id);
        let files = self.files(id);
        let gid = self.inner.recorded_gid(id);
        let pids: Vec<i32> = [files.identity_file(), files.relay_identity_file()]
            .iter()
            .filter_map(|path| read_identity(path))
            .collect();
        kill_vm_processes(&files);
        for pid in pids {
            tokio::task::spawn_blocking(move || wait_until_gone(pid, DESTROY_TIMEOUT))
                .await
                .ok()
                .and_then(Result::ok)
                .ok_or_else(|| RuntimeError::Destroy {
                    id: id.to_string(),
                    message: format!("process {pid} (QEMU or relay) did not exit"),
                })?;
        }
        match crate::remove_tree(&files.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(RuntimeError::Destroy {
                    id: id.to_string(),
                    message: format!("removing {}: {e}", files.dir.display()),
                })
            }
        }
        if let (Some(gid), Some(slots)) = (gid, &self.inner.vm_gids) {
            tokio::task::spawn_blocking(move || hostguard::clear(gid))
                .await
                .ok();
            slots.release(&files.dir);
        }
        Ok(())
    }

    async fn set_egress(&self, id: &str, policy: &EgressPolicy) -> Result<(), RuntimeError> {
        let Some(gid) = self.inner.recorded_gid(id) else {
            return Err(RuntimeError::Unsupported(
                "this node runs microVMs without an egress guard (runtime.microvm.vm_user = \"\"); \
                 network.allow_out/deny_out cannot be enforced"
                    .into(),
            ));
        };
        let policy = policy.clone();
        let allow = self.inner.config.egress_allow.clone();
        tokio::task::spawn_blocking(move || hostguard::apply(gid, &allow, &policy))
            .await
            .map_err(|e| RuntimeError::io("egress task", std::io::Error::other(e.to_string())))?
            .map_err(|e| RuntimeError::io("applying the egress policy", std::io::Error::other(e)))
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let entries = match fs::read_dir(&self.inner.config.state_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io("reading the state dir", e)),
        };
        Ok(entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str().map(str::to_string))
            .filter(|name| validate_id(name).is_ok())
            .collect())
    }

    fn is_running(&self, id: &str) -> bool {
        read_pid(&self.files(id)).is_some()
    }

    async fn is_alive(&self, id: &str) -> bool {
        if !self.is_running(id) {
            return false;
        }
        let client = self.inner.agents.lock().unwrap().get(id).cloned();
        let client = client.unwrap_or_else(|| {
            EnvdClient::builder(Target::Unix(self.files(id).agent_socket()), "")
                .http2(true)
                .build()
        });
        matches!(
            tokio::time::timeout(Duration::from_secs(5), client.health()).await,
            Ok(Ok(_))
        )
    }

    fn agent(&self, id: &str, token: &str) -> EnvdClient {
        self.inner.agent(id, token)
    }

    fn memory_pss_bytes(&self, id: &str) -> Option<u64> {
        read_pid(&self.files(id)).and_then(pss_bytes)
    }

    async fn set_network(&self, id: &str, enabled: bool) -> Result<(), RuntimeError> {
        let files = self.files(id);
        let mut qmp = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT)
            .await
            .map_err(|e| {
                RuntimeError::io("connecting to QMP", std::io::Error::other(e.to_string()))
            })?;
        qmp.execute("set_link", json!({ "name": "net0", "up": enabled }))
            .await
            .map_err(|e| RuntimeError::io("set_link", std::io::Error::other(e.to_string())))?;
        Ok(())
    }

    fn envd_socket(&self, id: &str) -> PathBuf {
        self.files(id).agent_socket()
    }
}

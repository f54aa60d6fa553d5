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
//! Volumes attached to a sandbox are shared copy-on-write from the node's
//! volume layers through spare disks, see [`layers`].
//!
//! Per sandbox, `state_dir/ID/` holds `disk.qcow2`, the volume slots'
//! `slotN.qcow2` (and `slotN.mount` once taken), `agent.sock` (the
//! relay's), `serial.sock` (QEMU's end of the agent port), `qmp.sock`,
//! `console.log`, `qemu.pid`, `vm.pid` and `relay.pid` (`PID STARTTIME`)
//! and `gid` (the uid/gid its QEMU runs as).

pub mod accel;
mod error;
mod hostguard;
pub mod images;
mod layers;
mod qcow2;
mod qemu;
pub mod qmp;
pub mod relay;
mod snapshot;
mod vm;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use envd_protocol::client::{EnvdClient, Target};
use serde_json::json;
use tracing::warn;

use crate::egress::EgressPolicy;
use crate::process::{self, LauncherCommand};
use crate::runtime::{validate_id, BootSpec, Booted, Limits, Runtime, RuntimeError};
use crate::slots::{SlotAllocator, SLOTS_ROOT};
pub use accel::{Accel, AccelChoice, AccelDecision, KvmUnusable};
pub use error::MicrovmError;
use images::Images;
use qmp::Qmp;

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

/// What envd prints once it waits for the host (see envd's `guest.rs`).
pub const READY_MARKER: &str = "ENVD-READY";

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
    /// Boots write their overlay's qcow2 header in-process and take a relay
    /// started ahead of time; off: `qemu-img create` and a relay exec'd on
    /// the boot path (kept to measure the difference).
    pub fast_restore: bool,
    /// Spare disks per VM for volume layers ([`layers`]); 0: volumes are
    /// copied. At most [`layers::MAX_VOLUME_SLOTS`].
    pub volume_slots: usize,
    /// Size of each guest's root disk (sparse; only written blocks use space).
    pub disk_bytes: u64,
    /// Cold boot to envd-ready, and snapshot builds.
    pub boot_timeout: Duration,
    /// How to exec the relay ([`relay::relay_main`]): the server passes its
    /// own binary and `["__vm-relay"]`.
    pub relay: LauncherCommand,
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
    unprivileged_qemu: Result<(), MicrovmError>,
    /// One client (one HTTP/2 connection to the VM's relay) per VM, reused
    /// by every caller so calls share one session instead of opening one
    /// each (the relay frames each connection as its own session).
    agents: Mutex<HashMap<String, EnvdClient>>,
    /// Background builds in flight (kernel, template images + snapshots).
    building: Mutex<HashSet<PathBuf>>,
    /// The last failure of each background build, reported by `boot`.
    build_failures: Mutex<HashMap<PathBuf, Arc<MicrovmError>>>,
    /// A relay already exec'd for the next boot (`fast_restore`).
    spare_relay: Mutex<Option<relay::Spare>>,
}

impl MicrovmRuntime {
    /// Checks QEMU and the accelerator; the kernel and images are built on
    /// demand ([`Runtime::prepare`]).
    pub fn new(config: MicrovmConfig) -> Result<Self, RuntimeError> {
        Ok(Self {
            inner: Arc::new(Inner::new(config)?),
        })
    }

    pub fn accel(&self) -> &AccelDecision {
        &self.inner.accel
    }

    /// One QMP command to VM `id`, its answer dropped.
    async fn qmp_command(
        &self,
        id: &str,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<(), RuntimeError> {
        validate_id(id)?;
        let mut qmp = Qmp::connect(&self.inner.files(id).qmp_socket(), QMP_TIMEOUT)
            .await
            .map_err(|e| RuntimeError::io("connecting to QMP", io::Error::other(e)))?;
        qmp.execute(command, arguments)
            .await
            .map_err(|e| RuntimeError::io(command, io::Error::other(e)))?;
        Ok(())
    }
}

impl Inner {
    fn new(mut config: MicrovmConfig) -> Result<Self, MicrovmError> {
        // QEMU daemonizes into `/`, so every path it is given must be absolute.
        for dir in [&mut config.state_dir, &mut config.images_dir] {
            *dir = std::path::absolute(&*dir).map_err(MicrovmError::file("resolving", &*dir))?;
        }
        process::output(Command::new(&config.qemu_binary).arg("--version")).map_err(|source| {
            MicrovmError::QemuUnusable {
                binary: config.qemu_binary.clone(),
                source,
            }
        })?;
        if !config.envd_binary.is_file() {
            return Err(MicrovmError::EnvdMissing(config.envd_binary.clone()));
        }
        if config.volume_slots > layers::MAX_VOLUME_SLOTS {
            return Err(MicrovmError::TooManySlots(config.volume_slots));
        }
        let accel = accel::decide(config.accel)?;
        let vm_gid = if config.vm_user.is_empty() {
            warn!("runtime.microvm.vm_user is empty: guests can reach services on the host and private networks");
            None
        } else {
            let unguarded = |e| MicrovmError::EgressGuard(Box::new(e));
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
                Path::new(SLOTS_ROOT).join("gid-slots"),
                config.vm_gid_base,
                1,
                config.vm_gid_slots,
            )
        });
        if accel.accel == Accel::Tcg {
            warn!(reason = %accel.reason, "microVMs run under TCG software emulation");
        }
        let unprivileged_qemu = match vm_gid {
            None => Err(MicrovmError::Unguarded),
            Some(_) => snapshot::searchable_by_others(&config.images_dir),
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
            config,
            accel,
            images,
            vm_gid,
            vm_gids,
            unprivileged_qemu,
            agents: Mutex::new(HashMap::new()),
            building: Mutex::new(HashSet::new()),
            build_failures: Mutex::new(HashMap::new()),
            spare_relay: Mutex::new(None),
        })
    }
}

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
            .map_err(|e| RuntimeError::Prepare(e.to_string()))
    }

    async fn boot(&self, spec: BootSpec) -> Result<Booted, RuntimeError> {
        validate_id(&spec.id)?;
        Ok(self.inner.boot(spec).await?)
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id)?;
        Ok(self.inner.destroy(id).await?)
    }

    async fn set_egress(&self, id: &str, policy: &EgressPolicy) -> Result<(), RuntimeError> {
        let gid = self
            .inner
            .recorded_gid(id)
            .ok_or(MicrovmError::NoEgressGuard)?;
        let policy = policy.clone();
        let allow = self.inner.config.egress_allow.clone();
        tokio::task::spawn_blocking(move || hostguard::apply(gid, &allow, &policy))
            .await
            .map_err(|e| RuntimeError::io("egress task", io::Error::other(e)))?
            .map_err(|e| RuntimeError::io("applying the egress policy", io::Error::other(e)))
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
        vm::read_pid(&self.inner.files(id)).is_some()
    }

    async fn is_alive(&self, id: &str) -> bool {
        if !self.is_running(id) {
            return false;
        }
        let client = self.inner.agents.lock().unwrap().get(id).cloned();
        let client = client.unwrap_or_else(|| {
            EnvdClient::builder(Target::Unix(self.envd_socket(id)), "")
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
        vm::read_pid(&self.inner.files(id)).and_then(process::pss_bytes)
    }

    async fn set_network(&self, id: &str, enabled: bool) -> Result<(), RuntimeError> {
        self.qmp_command(id, "set_link", json!({ "name": "net0", "up": enabled }))
            .await
    }

    fn outbound_network(&self) -> bool {
        true
    }

    /// The VM's vCPUs stop (QMP `stop`); its memory stays where it is.
    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.qmp_command(id, "stop", json!({})).await
    }

    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.qmp_command(id, "cont", json!({})).await
    }

    fn envd_socket(&self, id: &str) -> PathBuf {
        self.inner.files(id).agent_socket()
    }

    fn check_layer_store(&self, _store_dir: &Path) -> Result<(), RuntimeError> {
        if self.inner.config.volume_slots == 0 {
            return Err(RuntimeError::Unsupported(
                "runtime.microvm.volume_slots = 0: VMs have no disks to share layers through"
                    .into(),
            ));
        }
        let mkfs = crate::ext4::mkfs_ext4();
        if !mkfs.is_file() {
            return Err(RuntimeError::Unsupported(format!(
                "{} not found (install e2fsprogs): it makes each volume layer's filesystem",
                mkfs.display()
            )));
        }
        Ok(())
    }

    fn layer_slots(&self) -> usize {
        self.inner.config.volume_slots
    }

    async fn layer_build(
        &self,
        id: &str,
        layer_dir: &Path,
        mount_path: &str,
    ) -> Result<(), RuntimeError> {
        validate_id(id)?;
        Ok(self.inner.layer_build(id, layer_dir, mount_path).await?)
    }

    async fn layer_seal(
        &self,
        id: &str,
        layer_dir: &Path,
        mount_path: &str,
    ) -> Result<(), RuntimeError> {
        validate_id(id)?;
        Ok(self.inner.layer_seal(id, layer_dir, mount_path).await?)
    }

    async fn layer_share(
        &self,
        id: &str,
        layer_dir: &Path,
        mount_path: &str,
    ) -> Result<(), RuntimeError> {
        validate_id(id)?;
        Ok(self.inner.layer_share(id, layer_dir, mount_path).await?)
    }

    async fn layer_detach(
        &self,
        id: &str,
        _layer_dir: &Path,
        mount_path: &str,
    ) -> Result<(), RuntimeError> {
        validate_id(id)?;
        Ok(self.inner.layer_detach(id, mount_path).await?)
    }
}

//! One sandbox's VM: booting it (cold, or restored from its template's
//! snapshot) behind its own overlay disk, handing envd its token, its gid
//! and PID records, and tearing it all down again.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use envd_protocol::client::{EnvdClient, Target};
use envd_protocol::InitRequest;
use serde_json::json;
use tracing::{debug, info, warn};

use super::qemu::{Memory, VmFiles, VmLaunch};
use super::qmp::Qmp;
use super::snapshot::{readable_by_all, Snapshot};
use super::{hostguard, relay, Inner, MicrovmError, DESTROY_TIMEOUT, QMP_TIMEOUT};
use crate::egress::EgressPolicy;
use crate::process;
use crate::runtime::{BootSpec, Booted};

/// Unix socket paths are limited to 108 bytes including the NUL.
const MAX_SOCKET_PATH: usize = 107;

impl Inner {
    pub(super) fn files(&self, id: &str) -> VmFiles {
        VmFiles::new(self.config.state_dir.join(id))
    }

    /// Boots the sandbox once everything it boots from is built; until then
    /// starts building that in the background and says "not ready".
    pub(super) async fn boot(self: &Arc<Self>, spec: BootSpec) -> Result<Booted, MicrovmError> {
        let started = Instant::now();
        let files = self.files(&spec.id);
        if files.agent_socket().as_os_str().len() > MAX_SOCKET_PATH {
            return Err(MicrovmError::SocketPathTooLong(files.agent_socket()));
        }
        let not_ready = |what| match self.prepare_in_background(&spec.rootfs, spec.limits) {
            Some(failure) => MicrovmError::BuildFailed { what, failure },
            None => MicrovmError::Building { what },
        };
        let kernel = self.images.kernel_path();
        if !kernel.is_file() {
            return Err(not_ready("the guest kernel is not built yet"));
        }
        let template_dir = self.images.template_dir(&spec.rootfs)?;
        let image = template_dir.join("base.ext4");
        if !image.is_file() {
            return Err(not_ready("the template's VM image is not built yet"));
        }
        let snapshot = self
            .config
            .snapshots
            .then(|| self.snapshot(&template_dir, spec.limits));
        if snapshot.as_ref().is_some_and(|s| !s.is_complete()) {
            return Err(not_ready("the template's VM snapshot is not taken yet"));
        }
        match fs::create_dir(&files.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(MicrovmError::AlreadyExists(spec.id.clone()))
            }
            Err(e) => {
                let _ = fs::create_dir_all(&self.config.state_dir);
                fs::create_dir(&files.dir)
                    .map_err(|_| MicrovmError::file("creating", &files.dir)(e))?;
            }
        }
        let _ = fs::set_permissions(&files.dir, fs::Permissions::from_mode(0o700));
        match self
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
            Err(error) => {
                let error = MicrovmError::BootFailed {
                    id: spec.id.clone(),
                    console: console_tail(&files),
                    source: Box::new(error),
                };
                warn!(sandbox = %spec.id, error = %error, "microVM boot failed; cleaning up");
                let _ = self.destroy(&spec.id).await;
                Err(error)
            }
        }
    }

    /// Kills the VM's processes, removes its files and releases its gid.
    pub(super) async fn destroy(&self, id: &str) -> Result<(), MicrovmError> {
        self.agents.lock().unwrap().remove(id);
        let files = self.files(id);
        let gid = self.recorded_gid(id);
        let failed = |source: MicrovmError| MicrovmError::Destroy {
            id: id.to_string(),
            source: Box::new(source),
        };
        let pids = vm_processes(&files);
        pids.iter().copied().for_each(process::kill);
        for pid in pids {
            tokio::task::spawn_blocking(move || process::wait_until_gone(pid, DESTROY_TIMEOUT))
                .await
                .map_err(|e| failed(e.into()))?
                .map_err(|e| failed(e.into()))?;
        }
        match crate::remove_tree(&files.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(failed(MicrovmError::file("removing", &files.dir)(e))),
        }
        if let (Some(gid), Some(slots)) = (gid, &self.vm_gids) {
            tokio::task::spawn_blocking(move || hostguard::clear(gid))
                .await
                .ok();
            slots.release(&files.dir);
        }
        Ok(())
    }

    pub(super) async fn create_overlay(
        &self,
        backing: &Path,
        format: &str,
        overlay: &Path,
    ) -> Result<(), MicrovmError> {
        if self.config.fast_restore {
            let (backing, format, path) = (
                backing.to_path_buf(),
                format.to_string(),
                overlay.to_path_buf(),
            );
            return tokio::task::spawn_blocking(move || {
                super::qcow2::create_overlay(&backing, &format, &path)
            })
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|created| created)
            .map_err(MicrovmError::file("writing the overlay", overlay));
        }
        process::output_async(
            tokio::process::Command::new(&self.config.qemu_img_binary)
                .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
                .arg(backing)
                .arg(overlay),
        )
        .await
        .map(drop)
        .map_err(|source| MicrovmError::Overlay {
            overlay: overlay.to_path_buf(),
            source,
        })
    }

    pub(super) fn agent(&self, id: &str, token: &str) -> EnvdClient {
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

    /// The VM's relay: the spare one when there is one (then another spare
    /// is started for the next boot), else one started now.
    async fn start_relay(
        &self,
        files: &VmFiles,
        run_as: Option<(u32, u32)>,
    ) -> Result<(), MicrovmError> {
        if !self.config.fast_restore {
            return relay::spawn(&self.config.relay, files, run_as).await;
        }
        let spare = self.spare_relay.lock().unwrap().take();
        let spare = match spare {
            Some(spare) => spare,
            None => relay::Spare::start(&self.config.relay)?,
        };
        spare.take_on(files, run_as).await
    }

    /// Starts the spare relay the next boot takes, off this boot's path.
    fn keep_a_spare_relay(&self) {
        if !self.config.fast_restore || self.spare_relay.lock().unwrap().is_some() {
            return;
        }
        match relay::Spare::start(&self.config.relay) {
            Ok(spare) => *self.spare_relay.lock().unwrap() = Some(spare),
            Err(e) => warn!(error = %e, "cannot start a spare relay"),
        }
    }

    /// Waits for envd over the agent channel, then hands it its token.
    async fn initialise(
        &self,
        spec: &BootSpec,
        files: &VmFiles,
        timeout: Duration,
    ) -> Result<(), MicrovmError> {
        let client = self.agent(&spec.id, &spec.token);
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout(Duration::from_secs(2), client.health()).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => debug!(sandbox = %spec.id, error = %e, "envd not ready"),
                Err(_) => debug!(sandbox = %spec.id, "envd health timed out"),
            }
            if read_pid(files).is_none() {
                return Err(MicrovmError::QemuExited);
            }
            if Instant::now() > deadline {
                return Err(MicrovmError::EnvdTimeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut seed = [0u8; 32];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(MicrovmError::file("reading", Path::new("/dev/urandom")))?;
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
            .map_err(MicrovmError::EnvdInit)
    }

    /// The sandbox's own gid (recorded in its dir), when guarded.
    fn claim_gid(&self, id: &str) -> Result<Option<u32>, MicrovmError> {
        let Some(slots) = &self.vm_gids else {
            return Ok(None);
        };
        let dir = self.config.state_dir.join(id);
        let gid = slots.claim(&dir).map_err(MicrovmError::GidSlot)?.base;
        let record = dir.join("gid");
        fs::write(&record, gid.to_string()).map_err(MicrovmError::file("recording", &record))?;
        // The default policy (with this server's allow list) is in place
        // before QEMU opens a single socket.
        hostguard::apply(gid, &self.config.egress_allow, &EgressPolicy::default())?;
        Ok(Some(gid))
    }

    pub(super) fn recorded_gid(&self, id: &str) -> Option<u32> {
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
    ) -> Result<(), MicrovmError> {
        let files = self.files(&spec.id);
        let gid = self.claim_gid(&spec.id)?;
        // A sandbox's QEMU (and relay) drop to uid = gid = its own id once
        // set up; its dir becomes theirs. The overlay needs no chown: QEMU
        // gets it as inherited fds (`VmLaunch::disk_path`).
        let run_as = gid
            .filter(|_| self.unprivileged_qemu.is_ok())
            .map(|gid| (gid, gid));
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&files.dir, Some(uid), Some(gid))
                .map_err(MicrovmError::file("chown", &files.dir))?;
        }
        let (backing, format) = match snapshot {
            Some(snapshot) => (snapshot.disk(), "qcow2"),
            None => (image.to_path_buf(), "raw"),
        };
        self.create_overlay(&backing, format, &files.disk()).await?;
        super::layers::create_slots(&files, self.config.volume_slots)?;
        if let (Some(snapshot), Some(_)) = (snapshot, run_as) {
            // QEMU opens the state file on migrate-incoming, after it
            // dropped to the sandbox's uid. It holds the template VM's
            // device state, nothing secret.
            readable_by_all(&snapshot.state())?;
        }
        self.start_relay(&files, run_as).await?;
        let launch = VmLaunch {
            name: &spec.id,
            files: &files,
            kernel,
            limits: spec.limits,
            memory: match snapshot {
                Some(snapshot) => Memory::PrivateFile(snapshot.memory()),
                None => Memory::Anonymous,
            },
            incoming: snapshot.is_some(),
            run_as,
            volume_slots: self.config.volume_slots,
        };
        launch
            .spawn(&self.config.qemu_binary, self.accel.accel, gid)
            .await?;
        let Some(snapshot) = snapshot else {
            let ready = self
                .initialise(spec, &files, self.config.boot_timeout)
                .await;
            self.keep_a_spare_relay();
            return ready;
        };
        let mut qmp = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await?;
        qmp.migrate_file(
            "migrate-incoming",
            &snapshot.state(),
            self.config.boot_timeout,
        )
        .await?;
        qmp.execute("cont", json!({})).await?;
        let ready = self.initialise(spec, &files, Duration::from_secs(10)).await;
        self.keep_a_spare_relay();
        ready
    }
}

/// Waits until `marker` appears on the VM's console.
pub(super) async fn wait_for_console(
    files: &VmFiles,
    marker: &'static str,
    timeout: Duration,
) -> Result<(), MicrovmError> {
    let deadline = Instant::now() + timeout;
    loop {
        let console = fs::read(files.console_log()).unwrap_or_default();
        if String::from_utf8_lossy(&console).contains(marker) {
            return Ok(());
        }
        if read_pid(files).is_none() {
            return Err(MicrovmError::QemuExited);
        }
        if Instant::now() > deadline {
            return Err(MicrovmError::NoReadyMarker { marker, timeout });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The VM's QEMU and relay, as far as they are still the processes
/// recorded (verified by start time).
fn vm_processes(files: &VmFiles) -> Vec<i32> {
    [files.identity_file(), files.relay_identity_file()]
        .iter()
        .filter_map(|path| process::running(path))
        .collect()
}

/// Kills the VM's QEMU and relay; does not wait.
pub(super) fn kill_vm_processes(files: &VmFiles) {
    vm_processes(files).into_iter().for_each(process::kill);
}

/// The VM's QEMU, if it is still that same process.
pub(super) fn read_pid(files: &VmFiles) -> Option<i32> {
    process::running(&files.identity_file())
}

/// The end of the VM's console, for an error message.
pub(super) fn console_tail(files: &VmFiles) -> String {
    process::tail(&files.console_log(), 12)
}

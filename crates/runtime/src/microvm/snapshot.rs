//! What a template boots from, built in the background: the kernel, the
//! template's image and, with snapshots on, its snapshot (see the module
//! docs of [`super`] for how clones restore from it).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tracing::{info, warn};

use super::qemu::{self, Memory, VmFiles, VmLaunch};
use super::qmp::Qmp;
use super::vm::{console_tail, kill_vm_processes, read_pid, wait_for_console};
use super::{images, relay, Inner, MicrovmError, DESTROY_TIMEOUT, QMP_TIMEOUT, READY_MARKER};
use crate::process::{self, FileLock};
use crate::runtime::Limits;

/// A template's snapshot: `templates/NAME/KEY/snapshot-KERNEL-ACCEL-SHAPE/`.
pub(super) struct Snapshot {
    dir: PathBuf,
}

impl Snapshot {
    pub(super) fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }
    pub(super) fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub(super) fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    fn complete_marker(&self) -> PathBuf {
        self.dir.join("complete")
    }
    pub(super) fn is_complete(&self) -> bool {
        self.complete_marker().is_file()
    }
}

impl Inner {
    pub(super) fn snapshot(&self, template_dir: &Path, limits: Limits) -> Snapshot {
        let name = format!(
            "snapshot-{}-{}-{}-{}x{}",
            self.images.kernel_key(),
            images::short_hash(qemu::fingerprint(self.config.volume_slots).as_bytes()),
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
    pub(super) async fn prepare(
        self: &Arc<Self>,
        rootfs: &Path,
        limits: Limits,
    ) -> Result<(), MicrovmError> {
        let this = self.clone();
        let kernel = tokio::task::spawn_blocking(move || this.images.build_kernel()).await??;
        let this = self.clone();
        let rootfs_owned = rootfs.to_path_buf();
        let image =
            tokio::task::spawn_blocking(move || this.images.build_template_image(&rootfs_owned))
                .await??;
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
    pub(super) fn prepare_in_background(
        self: &Arc<Self>,
        rootfs: &Path,
        limits: Limits,
    ) -> Option<Arc<MicrovmError>> {
        let key = rootfs.to_path_buf();
        let failure = self.build_failures.lock().unwrap().get(&key).cloned();
        if !self.building.lock().unwrap().insert(key.clone()) {
            return failure;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            match this.prepare(&key, limits).await {
                Ok(()) => {
                    info!(rootfs = %key.display(), elapsed = ?started.elapsed(), "microVM images ready");
                    this.build_failures.lock().unwrap().remove(&key);
                }
                Err(e) => {
                    warn!(rootfs = %key.display(), error = %e, "preparing microVM images failed");
                    this.build_failures
                        .lock()
                        .unwrap()
                        .insert(key.clone(), Arc::new(e));
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
    ) -> Result<(), MicrovmError> {
        let lock_path = snapshot.dir.with_extension("lock");
        let _lock = tokio::task::spawn_blocking(move || FileLock::acquire(&lock_path)).await??;
        if snapshot.is_complete() {
            return Ok(());
        }
        let started = Instant::now();
        let _ = crate::remove_tree(&snapshot.dir);
        fs::create_dir_all(&snapshot.dir).map_err(MicrovmError::file("creating", &snapshot.dir))?;
        // Sockets need short paths: the template VM's live in the state dir.
        let run_dir = self.config.state_dir.join(format!(
            ".snapshot-{}-{}",
            std::process::id(),
            next_run_number()
        ));
        let _ = crate::remove_tree(&run_dir);
        fs::create_dir_all(&run_dir).map_err(MicrovmError::file("creating", &run_dir))?;
        let files = VmFiles::new(run_dir.clone());
        let result = async {
            self.create_overlay(image, "raw", &snapshot.disk()).await?;
            // The VM writes through to the snapshot's own disk.
            std::os::unix::fs::symlink(snapshot.disk(), files.disk())
                .map_err(MicrovmError::file("linking", &files.disk()))?;
            super::layers::create_slots(&files, self.config.volume_slots)?;
            relay::spawn(&self.config.relay, &files, None).await?;
            let launch = VmLaunch {
                name: "sandbox-template",
                files: &files,
                kernel,
                limits,
                memory: Memory::SharedFile(snapshot.memory()),
                incoming: false,
                run_as: None,
                volume_slots: self.config.volume_slots,
            };
            launch
                .spawn(&self.config.qemu_binary, self.accel.accel, self.vm_gid)
                .await?;
            wait_for_console(&files, READY_MARKER, self.config.boot_timeout).await?;
            let mut qmp = Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT).await?;
            qmp.execute("stop", json!({})).await?;
            qmp.migrate_file("migrate", &snapshot.state(), self.config.boot_timeout)
                .await?;
            let _ = qmp.execute("quit", json!({})).await;
            if let Some(pid) = read_pid(&files) {
                let _ = tokio::task::spawn_blocking(move || {
                    process::wait_until_gone(pid, DESTROY_TIMEOUT)
                })
                .await;
            }
            Ok::<(), MicrovmError>(())
        }
        .await;
        if let Err(error) = result {
            kill_vm_processes(&files);
            let console = console_tail(&files);
            let _ = crate::remove_tree(&run_dir);
            let _ = crate::remove_tree(&snapshot.dir);
            return Err(MicrovmError::SnapshotFailed {
                console,
                source: Box::new(error),
            });
        }
        let _ = crate::remove_tree(&run_dir);
        let marker = snapshot.complete_marker();
        fs::write(&marker, "").map_err(MicrovmError::file("writing", &marker))?;
        info!(snapshot = %snapshot.dir.display(), elapsed = ?started.elapsed(), "template snapshot saved");
        Ok(())
    }
}

/// Distinguishes template VMs snapshotted at once by one process.
fn next_run_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Every directory from `/` down to `path` lets other users through.
pub(super) fn searchable_by_others(path: &Path) -> Result<(), MicrovmError> {
    let mut dir = PathBuf::new();
    for part in path.components() {
        dir.push(part);
        let Ok(meta) = fs::metadata(&dir) else {
            break; // Not created yet: we create it 0755.
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(MicrovmError::NotSearchable {
                dir,
                mode: meta.permissions().mode() & 0o7777,
                images_dir: path.to_path_buf(),
            });
        }
    }
    Ok(())
}

pub(super) fn readable_by_all(path: &Path) -> Result<(), MicrovmError> {
    let mode = fs::metadata(path)
        .map_err(MicrovmError::file("reading the mode of", path))?
        .permissions()
        .mode();
    if mode & 0o444 != 0o444 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o444))
            .map_err(MicrovmError::file("chmod", path))?;
    }
    Ok(())
}

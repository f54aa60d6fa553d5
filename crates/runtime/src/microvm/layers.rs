//! Volume layers for microVMs: volume slots.
//!
//! Every VM (and so the template snapshot it is restored from) has
//! `runtime.microvm.volume_slots` (4 by default) spare virtio disks, each an empty qcow2 image of
//! [`EMPTY_SLOT_BYTES`] in the VM's own dir, with serial `slotN`. virtio-mmio
//! has no hot-plug and a restored VM keeps the snapshotted device list, so
//! the disks are there from the first boot; what changes is what is behind
//! them, over QMP:
//!
//! - **Build** (the node's first sandbox attaching a volume): the host makes
//!   the layer's `base.ext4` (sparse, empty ext4 of the VM's disk size),
//!   reopens the slot's qcow2 node with it as backing and grows the slot
//!   to its size; envd mounts the slot on the mount path and the volume is
//!   unpacked into it as always. To seal, envd syncs and unmounts, the host
//!   puts a fresh qcow2 on top of the slot (`blockdev-snapshot`: the
//!   builder's later writes go there, and QEMU reopens the filled image
//!   read-only, flushing its metadata), copies the filled image into the
//!   layer as `data.qcow2`, and envd mounts the slot again.
//! - **Share** (every later sandbox): QEMU opens the layer read-only
//!   (`data.qcow2` over `base.ext4`), the slot's node is reopened with it
//!   as backing and grown to its size, and envd mounts it. The slot's own
//!   image stays empty until the sandbox writes: reads fall through to the
//!   layer, writes land in the VM's own file. Nothing is copied, so this
//!   takes the same time for any volume size.
//!
//! QEMU runs as the sandbox's own uid and gets every layer file as an fd
//! (`add-fd`), read-only: it never opens a layer by path, and cannot write
//! one. The builder's QEMU only ever had its own slot image, which is
//! copied, not linked, into the layer.
//!
//! Bounds: an empty slot is 1 MiB, so a tenant cannot fill the slots it
//! does not use; a used slot holds at most the layer's size (the VM's disk
//! size) of the sandbox's own writes. A sandbox attaching more volumes
//! than there are slots gets the rest as copies.

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use envd_protocol::BlockMountRequest;
use serde_json::{json, Value};

use super::qcow2;
use super::qemu::VmFiles;
use super::qmp::Qmp;
use super::{Inner, MicrovmError, QMP_TIMEOUT};

/// Most spare disks per VM (virtio-mmio transports are few).
pub const MAX_VOLUME_SLOTS: usize = 8;
/// Virtual size of a slot nobody uses.
pub const EMPTY_SLOT_BYTES: u64 = 1 << 20;
/// Who owns a freshly built volume's root, as a copy's directory is owned.
const VOLUME_USER: &str = "user";

const BASE_IMAGE: &str = "base.ext4";
const DATA_IMAGE: &str = "data.qcow2";

pub fn slot_serial(n: usize) -> String {
    format!("slot{n}")
}
pub fn slot_node(n: usize) -> String {
    format!("slot{n}")
}
pub fn slot_file_node(n: usize) -> String {
    format!("slot{n}-file")
}

/// The `count` empty slot images of a VM about to be launched.
pub(super) fn create_slots(files: &VmFiles, count: usize) -> Result<(), MicrovmError> {
    for n in 0..count {
        let path = files.slot(n);
        qcow2::create_empty(&path, EMPTY_SLOT_BYTES)
            .map_err(MicrovmError::file("writing the volume slot", &path))?;
    }
    Ok(())
}

fn qmp_error(step: &'static str) -> impl Fn(super::qmp::QmpError) -> MicrovmError {
    move |e| MicrovmError::Layer {
        step,
        source: io::Error::other(e),
    }
}

fn io_error(step: &'static str) -> impl Fn(io::Error) -> MicrovmError {
    move |source| MicrovmError::Layer { step, source }
}

/// Opens `path` read-only for QEMU and returns the fd set holding it.
async fn hand_over(qmp: &mut Qmp, path: &Path) -> Result<u64, MicrovmError> {
    let file = fs::File::open(path).map_err(MicrovmError::file("opening", path))?;
    qmp.add_fd(file.as_fd(), None)
        .await
        .map_err(qmp_error("passing a layer file to QEMU"))
}

/// A read-only file node over fd set `set`.
fn read_only_file(set: u64) -> Value {
    json!({ "driver": "file", "filename": format!("/dev/fdset/{set}"), "read-only": true })
}

impl Inner {
    /// Takes the VM's first free slot for `mount_path`.
    fn claim_slot(&self, files: &VmFiles, mount_path: &str) -> Result<usize, MicrovmError> {
        for n in 0..self.config.volume_slots {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(files.slot_claim(n))
            {
                Ok(_) => {
                    let claim = files.slot_claim(n);
                    fs::write(&claim, mount_path).map_err(MicrovmError::file("writing", &claim))?;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(MicrovmError::file("claiming", &files.slot_claim(n))(e)),
            }
        }
        Err(MicrovmError::NoFreeSlot(self.config.volume_slots))
    }

    /// The slot serving `mount_path`.
    fn slot_of(&self, files: &VmFiles, mount_path: &str) -> Result<usize, MicrovmError> {
        (0..self.config.volume_slots)
            .find(|n| fs::read_to_string(files.slot_claim(*n)).is_ok_and(|p| p == mount_path))
            .ok_or_else(|| MicrovmError::NoSuchSlot(mount_path.to_string()))
    }

    async fn qmp(&self, files: &VmFiles) -> Result<Qmp, MicrovmError> {
        Qmp::connect(&files.qmp_socket(), QMP_TIMEOUT)
            .await
            .map_err(qmp_error("connecting to QMP"))
    }

    fn agent_of(&self, id: &str) -> Result<envd_protocol::client::EnvdClient, MicrovmError> {
        self.agents
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| MicrovmError::NoAgent(id.to_string()))
    }

    /// Grows slot `n` to `size` and puts `backing` (a node already added)
    /// under it. In that order: QEMU zeroes what a resize adds to an image
    /// that has a backing file (so the backing's data cannot show through),
    /// which would hide all of the layer past the empty slot's 1 MiB.
    async fn fill_slot(
        &self,
        qmp: &mut Qmp,
        n: usize,
        backing: &str,
        size: u64,
    ) -> Result<(), MicrovmError> {
        qmp.execute(
            "block_resize",
            json!({ "node-name": slot_node(n), "size": size }),
        )
        .await
        .map_err(qmp_error("growing the slot"))?;
        let options = json!({ "options": [{
            "driver": "qcow2",
            "node-name": slot_node(n),
            "file": slot_file_node(n),
            "backing": backing,
        }]});
        qmp.execute("blockdev-reopen", options)
            .await
            .map_err(qmp_error("putting the layer under the slot"))?;
        Ok(())
    }

    async fn mount_slot(
        &self,
        id: &str,
        n: usize,
        mount_path: &str,
        size: u64,
        fresh: bool,
    ) -> Result<(), MicrovmError> {
        let request = BlockMountRequest {
            serial: slot_serial(n),
            path: mount_path.to_string(),
            size_bytes: size,
            fresh,
            username: VOLUME_USER.into(),
        };
        self.agent_of(id)?
            .mount_block(&request)
            .await
            .map_err(|e| MicrovmError::Layer {
                step: "mounting the volume slot",
                source: io::Error::other(e),
            })
    }

    pub(super) async fn layer_build(
        &self,
        id: &str,
        layer_dir: &Path,
        mount_path: &str,
    ) -> Result<(), MicrovmError> {
        let files = self.files(id);
        let n = self.claim_slot(&files, mount_path)?;
        let base = layer_dir.join(BASE_IMAGE);
        let size = self.config.disk_bytes;
        let image = base.clone();
        tokio::task::spawn_blocking(move || crate::ext4::create_image(&image, size))
            .await
            .map_err(|e| io_error("making the layer's filesystem")(io::Error::other(e)))?
            .map_err(io_error("making the layer's filesystem"))?;
        let mut qmp = self.qmp(&files).await?;
        let set = hand_over(&mut qmp, &base).await?;
        let node = format!("layer{n}-base");
        let add = json!({ "driver": "raw", "node-name": node, "read-only": true, "file": read_only_file(set) });
        qmp.execute("blockdev-add", add)
            .await
            .map_err(qmp_error("opening the layer's filesystem"))?;
        self.fill_slot(&mut qmp, n, &node, size).await?;
        drop(qmp);
        self.mount_slot(id, n, mount_path, size, true).await
    }

    pub(super) async fn layer_seal(
        &self,
        id: &str,
        layer_dir: &Path,
        mount_path: &str,
    ) -> Result<(), MicrovmError> {
        let files = self.files(id);
        let n = self.slot_of(&files, mount_path)?;
        let agent = self.agent_of(id)?;
        agent
            .unmount_block(mount_path)
            .await
            .map_err(|e| io_error("unmounting the built volume")(io::Error::other(e)))?;
        let filled = files.slot(n);
        let size = qcow2::virtual_size(&filled, "qcow2")
            .map_err(MicrovmError::file("reading the size of", &filled))?;
        // The builder's own writes from now on: a fresh image on top.
        let top = files.slot_top(n);
        qcow2::create_empty(&top, size).map_err(MicrovmError::file("writing", &top))?;
        let mut qmp = self.qmp(&files).await?;
        let set = {
            let open = |write| {
                fs::OpenOptions::new()
                    .read(true)
                    .write(write)
                    .open(&top)
                    .map_err(MicrovmError::file("opening", &top))
            };
            let (rw, ro) = (open(true)?, open(false)?);
            let set = qmp
                .add_fd(rw.as_fd(), None)
                .await
                .map_err(qmp_error("passing the slot's new image to QEMU"))?;
            qmp.add_fd(ro.as_fd(), Some(set))
                .await
                .map_err(qmp_error("passing the slot's new image to QEMU"))?;
            set
        };
        let top_node = format!("slot{n}-top");
        let add = json!({
            "driver": "qcow2",
            "node-name": top_node,
            "file": { "driver": "file", "filename": format!("/dev/fdset/{set}") },
            "backing": null,
        });
        qmp.execute("blockdev-add", add)
            .await
            .map_err(qmp_error("opening the slot's new image"))?;
        qmp.execute(
            "blockdev-snapshot",
            json!({ "node": slot_node(n), "overlay": top_node }),
        )
        .await
        .map_err(qmp_error("freezing the built volume"))?;
        drop(qmp);
        let data = layer_dir.join(DATA_IMAGE);
        tokio::task::spawn_blocking(move || copy_durably(&filled, &data))
            .await
            .map_err(|e| io_error("copying the built volume")(io::Error::other(e)))?
            .map_err(io_error("copying the built volume"))?;
        self.mount_slot(id, n, mount_path, size, false).await
    }

    pub(super) async fn layer_share(
        &self,
        id: &str,
        layer_dir: &Path,
        mount_path: &str,
    ) -> Result<(), MicrovmError> {
        let files = self.files(id);
        let data = layer_dir.join(DATA_IMAGE);
        let size =
            qcow2::virtual_size(&data, "qcow2").map_err(MicrovmError::file("reading", &data))?;
        let n = self.claim_slot(&files, mount_path)?;
        let started = std::time::Instant::now();
        let mut qmp = self.qmp(&files).await?;
        let connected = started.elapsed();
        let data_set = hand_over(&mut qmp, &data).await?;
        let base_set = hand_over(&mut qmp, &layer_dir.join(BASE_IMAGE)).await?;
        let node = format!("layer{n}");
        let add = json!({
            "driver": "qcow2",
            "node-name": node,
            "read-only": true,
            "file": read_only_file(data_set),
            "backing": { "driver": "raw", "read-only": true, "file": read_only_file(base_set) },
        });
        qmp.execute("blockdev-add", add)
            .await
            .map_err(qmp_error("opening the volume layer"))?;
        self.fill_slot(&mut qmp, n, &node, size).await?;
        drop(qmp);
        let swapped = started.elapsed();
        self.mount_slot(id, n, mount_path, size, false).await?;
        tracing::debug!(sandbox = id, slot = n, qmp_connect = ?connected, qmp = ?swapped, total = ?started.elapsed(), "volume slot filled");
        Ok(())
    }

    /// Unmounts a failed build's slot; the slot stays taken (its image holds
    /// the half-built volume) until the VM goes.
    pub(super) async fn layer_detach(
        &self,
        id: &str,
        mount_path: &str,
    ) -> Result<(), MicrovmError> {
        let files = self.files(id);
        self.slot_of(&files, mount_path)?;
        self.agent_of(id)?
            .unmount_block(mount_path)
            .await
            .map_err(|e| io_error("unmounting the failed volume")(io::Error::other(e)))
    }
}

/// Copies `from` to the new file `to`, synced, read-only.
fn copy_durably(from: &Path, to: &PathBuf) -> io::Result<()> {
    fs::copy(from, to)?;
    let copy = fs::File::open(to)?;
    copy.sync_all()?;
    fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o400))
}

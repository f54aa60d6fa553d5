//! Block volumes (protocol 2, VM agents only): the host gives one of the
//! VM's spare virtio disks ("volume slots", named by their serial) the
//! content of a volume layer, and the agent mounts it on the volume's mount
//! path; or syncs and unmounts it so the host can freeze what was written.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use envd_protocol::{BlockMountRequest, BlockUnmountRequest, Empty};
use tokio::task::spawn_blocking;

use crate::error::{ApiError, ApiResult};
use crate::extract::JsonBody;
use crate::paths;
use crate::server::AppState;
use crate::sys;

/// How long the guest may take to see the size the host just gave a slot
/// (a virtio config-change interrupt; slow under software emulation).
const RESIZE_WAIT: Duration = Duration::from_secs(10);
/// `_IO(0x12, 97)`: drop the buffer cache of a block device.
const BLKFLSBUF: libc::c_ulong = 0x1261;

pub async fn mount(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<BlockMountRequest>,
) -> ApiResult<Json<Empty>> {
    if !state.guest {
        return Err(ApiError::not_found("block volumes exist only in VMs"));
    }
    let clean = paths::clean_path(&request.path);
    spawn_blocking(move || {
        let device = find_device(Path::new("/sys/block"), &request.serial)
            .map_err(|e| ApiError::from_io(e, &request.serial))?;
        wait_for_size(&device, request.size_bytes)?;
        let node = Path::new("/dev").join(&device);
        drop_cached_blocks(&node).map_err(|e| ApiError::from_io(e, &node.display().to_string()))?;
        // Mounted on the directory the resolver opened (never by a path a
        // symlink could redirect), through its /proc/self/fd entry.
        let target = state
            .root
            .open(&request.path, libc::O_PATH | libc::O_DIRECTORY)
            .map_err(|e| ApiError::from_io(e, &clean))?;
        let at = PathBuf::from(format!("/proc/self/fd/{}", target.as_raw_fd()));
        mount_ext4(&node, &at).map_err(|e| ApiError::from_io(e, &clean))?;
        drop(target);
        if request.fresh {
            let user = state.users.lookup(&state.root, &request.username)?;
            let root = state
                .root
                .open(&request.path, libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(|e| ApiError::from_io(e, &clean))?;
            if let Some(owner) = state.users.ownership(&user) {
                sys::fchown(root.as_fd(), owner.uid, owner.gid)
                    .map_err(|e| ApiError::from_io(e, &clean))?;
            }
            match sys::unlinkat(root.as_fd(), c"lost+found", true) {
                Err(e) if !sys::errno_is(&e, libc::ENOENT) => {
                    return Err(ApiError::from_io(e, &clean))
                }
                _ => {}
            }
        }
        Ok(Json(Empty {}))
    })
    .await?
}

pub async fn unmount(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<BlockUnmountRequest>,
) -> ApiResult<Json<Empty>> {
    if !state.guest {
        return Err(ApiError::not_found("block volumes exist only in VMs"));
    }
    let clean = paths::clean_path(&request.path);
    spawn_blocking(move || {
        let mounted = state
            .root
            .open(&request.path, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| ApiError::from_io(e, &clean))?;
        // SAFETY: a valid fd.
        if unsafe { libc::syncfs(mounted.as_raw_fd()) } != 0 {
            return Err(ApiError::from_io(io::Error::last_os_error(), &clean));
        }
        drop(mounted);
        let target = CString::new(
            state
                .root
                .host_path(&clean)
                .into_os_string()
                .into_encoded_bytes(),
        )
        .map_err(|_| ApiError::bad_request("path holds a NUL byte"))?;
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::umount2(target.as_ptr(), libc::UMOUNT_NOFOLLOW) } != 0 {
            return Err(ApiError::from_io(io::Error::last_os_error(), &clean));
        }
        Ok(Json(Empty {}))
    })
    .await?
}

/// The block device (`vdb`, …) whose virtio serial is `serial`.
fn find_device(sys_block: &Path, serial: &str) -> io::Result<String> {
    for entry in fs::read_dir(sys_block)?.flatten() {
        let found = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if found.trim() == serial {
            if let Some(name) = entry.file_name().to_str() {
                return Ok(name.to_string());
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no block device with serial {serial:?}"),
    ))
}

fn wait_for_size(device: &str, size_bytes: u64) -> ApiResult<()> {
    let path = Path::new("/sys/block").join(device).join("size");
    let deadline = Instant::now() + RESIZE_WAIT;
    loop {
        let sectors: u64 = fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if sectors * 512 == size_bytes {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ApiError::internal(format!(
                "{device} shows {} bytes, not the {size_bytes} the host gave it",
                sectors * 512
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The guest read the slot when it was empty (the boot's partition scan);
/// those cached blocks would hide what the host put there since.
fn drop_cached_blocks(node: &Path) -> io::Result<()> {
    let device = fs::File::open(node)?;
    // SAFETY: BLKFLSBUF takes no argument.
    if unsafe { libc::ioctl(device.as_raw_fd(), BLKFLSBUF as _, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn mount_ext4(device: &Path, at: &Path) -> io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other);
    let (source, target) = (c(device)?, c(at)?);
    // noinit_itable: the host made the filesystem with lazy inode tables;
    // zeroing them would write the whole table into every sandbox's copy.
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    // SAFETY: NUL-terminated strings that outlive the call.
    let mounted = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"ext4".as_ptr(),
            flags,
            c"noinit_itable".as_ptr().cast(),
        )
    };
    if mounted != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_device_by_its_serial() {
        let dir = tempfile::tempdir().unwrap();
        for (name, serial) in [("vda", ""), ("vdb", "slot0\n"), ("vdc", "slot1\n")] {
            fs::create_dir(dir.path().join(name)).unwrap();
            fs::write(dir.path().join(name).join("serial"), serial).unwrap();
        }
        assert_eq!(find_device(dir.path(), "slot1").unwrap(), "vdc");
        let missing = find_device(dir.path(), "slot9").unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}

//! Per-sandbox disk quota: the overlay's writable layer lives on a sparse
//! ext4 image of the template's `disk_gib`, loop-mounted inside the
//! sandbox's mount namespace. Writing past it is `ENOSPC` inside the
//! sandbox; the host file never grows beyond the image size. (ext4 project
//! quotas would need the host filesystem mounted with `prjquota`, which an
//! operator rarely controls; a loop image works on any host filesystem.)
//!
//! The host side ([`create_image`], shared with the microVM volume slots) runs in the server; the launcher side
//! ([`attach_and_mount`]) runs as the sandbox's PID 1 before it pivots. The
//! loop device is set to auto-clear, so it detaches when the sandbox's mount
//! namespace (the only place it is mounted) dies.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::os_error;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

pub use crate::ext4::{create_image, mkfs_ext4};

/// Attaches `image` to a free loop device and mounts it on `target`
/// (`nosuid,nodev`). Launcher-only (runs in the sandbox's mount namespace).
pub fn attach_and_mount(image: &Path, target: &Path) -> io::Result<()> {
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", image.display())))?;
    let device = attach_loop(&backing)?;
    drop(backing);
    let result = super::mounts::mount_fs(
        &device.path,
        target,
        "ext4",
        libc::MS_NOSUID | libc::MS_NODEV,
        None,
    );
    // The mount holds the device now; with auto-clear, closing our fd (and,
    // later, the last unmount) releases it.
    drop(device);
    result
}

struct LoopDevice {
    path: std::path::PathBuf,
    _fd: OwnedFd,
}

fn attach_loop(backing: &fs::File) -> io::Result<LoopDevice> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/loop-control: {e}")))?;
    // Another sandbox may take the device between GET_FREE and CONFIGURE.
    for _ in 0..64 {
        // SAFETY: ioctl without arguments on our fd.
        let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if number < 0 {
            return Err(os_error("LOOP_CTL_GET_FREE"));
        }
        let path = std::path::PathBuf::from(format!("/dev/loop{number}"));
        let device = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(device) => device,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{} missing (no devtmpfs?)", path.display()),
                ))
            }
            Err(e) => return Err(e),
        };
        for flags in [LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO, LO_FLAGS_AUTOCLEAR] {
            // SAFETY: all-zero is a valid loop_config.
            let mut config: LoopConfig = unsafe { std::mem::zeroed() };
            config.fd = backing.as_raw_fd() as u32;
            config.info.flags = flags;
            // SAFETY: LOOP_CONFIGURE with a valid loop_config.
            let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) };
            if rc == 0 {
                return Ok(LoopDevice {
                    path,
                    _fd: device.into(),
                });
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // Direct I/O unsupported by the backing filesystem.
                Some(libc::EINVAL) if flags & LO_FLAGS_DIRECT_IO != 0 => continue,
                Some(libc::EBUSY) => break,
                _ => return Err(io::Error::new(err.kind(), format!("LOOP_CONFIGURE: {err}"))),
            }
        }
    }
    Err(io::Error::other("no free loop device after 64 attempts"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_config_matches_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}

//! User namespaces: every sandbox's uid/gid 0..65536 map to a host range of
//! its own, so root inside is an unprivileged, unique host id outside.
//!
//! Why a range per sandbox rather than one shared range: with a shared
//! range, root of sandbox A and root of sandbox B would be the same host
//! uid, so anything one of them could reach on the host (a leaked fd, a
//! shared path) the other could use too, and signals or ptrace between
//! two sandboxes would be stopped only by the pid namespace. Distinct ranges
//! make each sandbox a different stranger to the kernel.
//!
//! The template root filesystems stay owned by host root; each sandbox sees
//! them through an idmapped mount (see [`super::mounts`]), which shifts
//! ownership at no cost per boot. Chowning a copy of the rootfs per range
//! would cost a full tree walk per sandbox (or per slot) and disk per copy.
//!
//! Each sandbox's range is a slot of `/run/sandbox-manager/uid-slots`
//! (see [`crate::slots`]).

use std::fs;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

use super::os_error;
use crate::slots::IdRange;

/// Ids per sandbox: the full 16-bit range most distributions assume.
pub const IDS_PER_SANDBOX: u32 = 65_536;

/// The line of `uid_map`/`gid_map` mapping 0.. to `range`.
fn map_line(range: IdRange) -> String {
    format!("0 {} {}\n", range.base, range.count)
}

/// Creates a user namespace mapping 0.. to `range` and returns an fd for it.
///
/// A helper child unshares `CLONE_NEWUSER` and waits while we (host root)
/// write its maps; the fd keeps the namespace alive after the helper exits.
/// Launcher-only: forks, so the caller must be single-threaded.
pub fn create(range: IdRange) -> io::Result<OwnedFd> {
    let (ready_read, ready_write) = pipe()?;
    let (go_read, go_write) = pipe()?;
    // SAFETY: single-threaded caller; the child only makes async-signal-safe
    // calls before _exit.
    let helper = unsafe { libc::fork() };
    if helper < 0 {
        return Err(os_error("fork"));
    }
    if helper == 0 {
        drop(ready_read);
        drop(go_write);
        // SAFETY: plain syscalls on fds we own, then _exit.
        unsafe {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                libc::_exit(1);
            }
            let byte = 1u8;
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&ready_write),
                (&byte as *const u8).cast(),
                1,
            );
            let mut buf = 0u8;
            // Returns when the parent closes its end.
            libc::read(
                std::os::fd::AsRawFd::as_raw_fd(&go_read),
                (&mut buf as *mut u8).cast(),
                1,
            );
            libc::_exit(0);
        }
    }
    drop(ready_write);
    drop(go_read);
    let result = (|| {
        let mut ready = fs::File::from(ready_read);
        let mut byte = [0u8; 1];
        if ready.read(&mut byte)? != 1 {
            return Err(io::Error::other(
                "unshare(CLONE_NEWUSER) failed (user namespaces disabled on this host?)",
            ));
        }
        let proc_dir = PathBuf::from(format!("/proc/{helper}"));
        fs::write(proc_dir.join("uid_map"), map_line(range))
            .map_err(|e| io::Error::new(e.kind(), format!("writing uid_map: {e}")))?;
        fs::write(proc_dir.join("gid_map"), map_line(range))
            .map_err(|e| io::Error::new(e.kind(), format!("writing gid_map: {e}")))?;
        let ns = fs::File::open(proc_dir.join("ns/user"))
            .map_err(|e| io::Error::new(e.kind(), format!("opening the user namespace: {e}")))?;
        Ok(OwnedFd::from(ns))
    })();
    drop(go_write);
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(helper, &mut status, 0) };
    result
}

/// Moves the calling (single-threaded) process into `userns` as its root.
/// Every other namespace of the caller stays owned by the host's user
/// namespace, so this root holds no capability over its own mounts,
/// network, hostname or IPC: it cannot remount, unmount or reconfigure
/// anything the launcher set up.
pub fn enter_as_root(userns: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscalls.
    unsafe {
        if libc::setns(userns.as_raw_fd(), libc::CLONE_NEWUSER) != 0 {
            return Err(os_error("setns(user namespace)"));
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(os_error("setgroups"));
        }
        if libc::setresgid(0, 0, 0) != 0 {
            return Err(os_error("setresgid"));
        }
        if libc::setresuid(0, 0, 0) != 0 {
            return Err(os_error("setresuid"));
        }
    }
    Ok(())
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_error("pipe2"));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

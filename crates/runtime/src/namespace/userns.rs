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
//! Slots are claimed host-side by creating `/run/sandbox-manager/uid-slots/N`
//! (`O_EXCL`), holding the sandbox's state directory; a slot whose
//! directory is gone is stale and reclaimed. The claims are host-wide (two
//! servers on one host never hand out the same ids) and live on a tmpfs,
//! so they end with the host's boot, as the sandboxes do.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::os_error;

/// Ids per sandbox: the full 16-bit range most distributions assume.
pub const IDS_PER_SANDBOX: u32 = 65_536;

/// The host ids a sandbox's 0..IDS_PER_SANDBOX map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub base: u32,
    pub count: u32,
}

impl IdRange {
    /// The host id of `inside` (e.g. 0 for the sandbox's root).
    pub fn host_id(&self, inside: u32) -> u32 {
        self.base + inside
    }

    fn map_line(&self) -> String {
        format!("0 {} {}\n", self.base, self.count)
    }
}

/// Where the host-wide slot claims live.
pub const SLOTS_ROOT: &str = "/run/sandbox-manager";

/// Hands out per-sandbox id ranges `[base + slot × stride, + stride)` for
/// `slot < slots` (namespace sandboxes: uid ranges; microVMs: one gid each).
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    dir: PathBuf,
    base: u32,
    stride: u32,
    slots: u32,
}

impl SlotAllocator {
    /// Claims live in `dir` (e.g. `/run/sandbox-manager/uid-slots`).
    pub fn new(dir: PathBuf, base: u32, stride: u32, slots: u32) -> Self {
        Self {
            dir,
            base,
            stride,
            slots,
        }
    }

    fn range(&self, slot: u32) -> IdRange {
        IdRange {
            base: self.base + slot * self.stride,
            count: self.stride,
        }
    }

    /// Claims a free slot for the sandbox whose state lives in `owner` (an
    /// absolute path). Callers serialise claims within one process;
    /// `O_EXCL` keeps two processes from sharing a slot.
    pub fn claim(&self, owner: &Path) -> io::Result<IdRange> {
        let id = owner.to_string_lossy();
        let id = id.as_ref();
        fs::create_dir_all(&self.dir)?;
        for slot in 0..self.slots {
            let path = self.dir.join(slot.to_string());
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(id.as_bytes())?;
                    return Ok(self.range(slot));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let holder = fs::read_to_string(&path).unwrap_or_default();
                    let holder_gone = !holder.is_empty() && !Path::new(&holder).exists();
                    if holder_gone && holder != id {
                        // Stale: its sandbox was removed without releasing.
                        fs::write(&path, id)?;
                        return Ok(self.range(slot));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!(
            "all {} id slots in {} are in use",
            self.slots,
            self.dir.display()
        )))
    }

    /// Releases every slot held by `owner`.
    pub fn release(&self, owner: &Path) {
        let id = owner.to_string_lossy();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if fs::read_to_string(entry.path()).is_ok_and(|holder| holder == id) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
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
        fs::write(proc_dir.join("uid_map"), range.map_line())
            .map_err(|e| io::Error::new(e.kind(), format!("writing uid_map: {e}")))?;
        fs::write(proc_dir.join("gid_map"), range.map_line())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_exclusive_and_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let allocator = SlotAllocator::new(dir.path().join("slots"), 1_000_000, IDS_PER_SANDBOX, 2);
        let owner = |name: &str| {
            let path = dir.path().join(name);
            fs::create_dir_all(&path).unwrap();
            path
        };
        let (a, b, c, d) = (owner("a"), owner("b"), owner("c"), owner("d"));
        let range_a = allocator.claim(&a).unwrap();
        let range_b = allocator.claim(&b).unwrap();
        assert_eq!(range_a.base, 1_000_000);
        assert_eq!(range_b.base, 1_000_000 + IDS_PER_SANDBOX);
        assert!(allocator.claim(&c).is_err(), "only two slots");
        allocator.release(&a);
        assert_eq!(allocator.claim(&c).unwrap(), range_a);
        // b's directory disappears without a release: its slot is stale.
        fs::remove_dir(&b).unwrap();
        assert_eq!(allocator.claim(&d).unwrap(), range_b);
    }
}

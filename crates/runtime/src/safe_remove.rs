//! A recursive delete that never crosses a mount point.
//!
//! `std::fs::remove_dir_all` happily walks into whatever is mounted below
//! the tree it deletes. A template build that was killed mid-way left the
//! host's `/dev/shm` bind-mounted under `data/templates/...`, and deleting
//! the data dir then wiped the host's shared memory. [`remove_tree`] works
//! relative to directory fds (`openat`/`fstatat`/`unlinkat`, `O_NOFOLLOW`),
//! so nothing can be swapped under it, never follows a symlink, and leaves
//! every mount point (and everything below it) alone, reporting it instead.

use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The error [`remove_tree`] returns when it left mount points in place
/// (everything else it could reach is gone). Kind: `ResourceBusy`.
#[derive(Debug)]
pub struct MountPointsLeft {
    pub mount_points: Vec<PathBuf>,
}

impl fmt::Display for MountPointsLeft {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "left mount point(s) in place, not deleting below them:")?;
        for path in &self.mount_points {
            write!(f, " {}", path.display())?;
        }
        write!(f, " (unmount them, then delete again)")
    }
}

impl std::error::Error for MountPointsLeft {}

impl MountPointsLeft {
    /// The mount points, if `error` came from [`remove_tree`] refusing them.
    pub fn in_error(error: &io::Error) -> Option<&Self> {
        error.get_ref()?.downcast_ref()
    }
}

/// Deletes `path` and everything below it on the same mount. A symlink or
/// file at `path` is unlinked (a symlink's target is never touched). A
/// directory that is a mount point, or on another filesystem, is not entered
/// or removed: the walk continues with its siblings and then fails with
/// [`MountPointsLeft`]. A missing `path` is `NotFound`, as with std.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    // O_NOFOLLOW: if `path` was swapped for a symlink since the lstat, fail.
    let top = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    // Absolute, so messages are unambiguous and the mountinfo fallback can
    // compare paths (nothing below is followed, so joins stay canonical).
    let path = &fs::canonicalize(path)?;
    let mut walk = Walk {
        dev: fstat(top.as_raw_fd())?.st_dev,
        mountinfo: None,
        left: Vec::new(),
    };
    if !mount_root_attr_supported(top.as_raw_fd())? {
        walk.mountinfo = Some(crate::namespace::host_mounts_under(path));
    }
    if walk.is_mount_point(top.as_raw_fd(), path)? {
        walk.left.push(path.clone());
    } else {
        walk.remove_contents(&top, path)?;
    }
    if !walk.left.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            MountPointsLeft {
                mount_points: walk.left,
            },
        ));
    }
    drop(top);
    fs::remove_dir(path)
}

struct Walk {
    /// st_dev of the top: anything else is another filesystem.
    dev: u64,
    /// Mount points under the top, only on kernels without
    /// STATX_ATTR_MOUNT_ROOT (before 5.8).
    mountinfo: Option<Vec<PathBuf>>,
    /// Mount points refused so far.
    left: Vec<PathBuf>,
}

impl Walk {
    /// Empties the directory open as `dir` (at `path`).
    fn remove_contents(&mut self, dir: &File, path: &Path) -> io::Result<()> {
        // Names first, deletions after: changing a directory while readdir
        // walks it may skip or repeat entries.
        for name in read_names(dir.as_raw_fd())? {
            let child_path = path.join(OsStr::from_bytes(name.as_bytes()));
            let annotate =
                |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", child_path.display()));
            let st = fstatat_nofollow(dir.as_raw_fd(), &name).map_err(annotate)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                // Files, symlinks, sockets, devices: the entry itself goes.
                unlink_at(dir.as_raw_fd(), &name, 0).map_err(annotate)?;
                continue;
            }
            // Another filesystem mounted here already shows its own st_dev
            // (the lookup crosses into the mounted root): do not even open it.
            if st.st_dev != self.dev {
                self.left.push(child_path);
                continue;
            }
            let child = open_dir_at(dir.as_raw_fd(), &name).map_err(annotate)?;
            let opened = fstat(child.as_raw_fd()).map_err(annotate)?;
            // Re-check dev/ino in case the entry was replaced since the
            // fstatat; a bind mount of this same filesystem shares st_dev,
            // so only the mount-root check catches it.
            if opened.st_dev != self.dev
                || opened.st_ino != st.st_ino
                || self
                    .is_mount_point(child.as_raw_fd(), &child_path)
                    .map_err(annotate)?
            {
                self.left.push(child_path);
                continue;
            }
            let refused_before = self.left.len();
            self.remove_contents(&child, &child_path)?;
            drop(child);
            // A directory with a mount point left below it is not empty.
            if self.left.len() == refused_before {
                unlink_at(dir.as_raw_fd(), &name, libc::AT_REMOVEDIR).map_err(annotate)?;
            }
        }
        Ok(())
    }

    fn is_mount_point(&self, fd: RawFd, path: &Path) -> io::Result<bool> {
        match &self.mountinfo {
            Some(mount_points) => Ok(mount_points.iter().any(|m| m == path)),
            None => Ok(statx_attributes(fd)? & MOUNT_ROOT != 0),
        }
    }
}

const MOUNT_ROOT: u64 = libc::STATX_ATTR_MOUNT_ROOT as u64;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills `st` on success.
    cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: initialised by the successful call.
    Ok(unsafe { st.assume_init() })
}

fn fstatat_nofollow(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated; fstatat fills `st` on success.
    cvt(unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: initialised by the successful call.
    Ok(unsafe { st.assume_init() })
}

fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<File> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; the returned fd is ours.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags) })?;
    // SAFETY: a fresh fd nobody else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn unlink_at(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

/// Whether this kernel reports STATX_ATTR_MOUNT_ROOT (Linux 5.8+).
fn mount_root_attr_supported(fd: RawFd) -> io::Result<bool> {
    Ok(statx(fd)?.stx_attributes_mask & MOUNT_ROOT != 0)
}

/// statx attributes of `fd` itself, masked to the ones the kernel reports.
fn statx_attributes(fd: RawFd) -> io::Result<u64> {
    let stx = statx(fd)?;
    Ok(stx.stx_attributes & stx.stx_attributes_mask)
}

fn statx(fd: RawFd) -> io::Result<libc::statx> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: empty path + AT_EMPTY_PATH stats `fd` itself; fills `stx`.
    cvt(unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BASIC_STATS,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: zero-initialised and filled by the successful call.
    Ok(unsafe { stx.assume_init() })
}

/// The entry names of the directory open as `fd`, without `.` and `..`.
fn read_names(fd: RawFd) -> io::Result<Vec<CString>> {
    // fdopendir takes ownership of the fd it gets (closedir closes it), so
    // give it a duplicate; its offset starts at 0 on a freshly opened dir.
    // SAFETY: dup of an fd we hold open.
    let dup = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `dup` is ours; on failure we must close it ourselves.
    let dirp = unsafe { libc::fdopendir(dup) };
    if dirp.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: still ours, fdopendir failed.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: resetting errno tells end-of-directory from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dirp` is a valid DIR* until closedir below.
        let entry = unsafe { libc::readdir64(dirp) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: d_name is a NUL-terminated string inside the entry.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: closes `dirp` and `dup` exactly once.
    unsafe { libc::closedir(dirp) };
    result.map(|()| names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Unmounts (lazily) on drop, so a failed assertion leaves no mount.
    struct Mounted(PathBuf);

    impl Mounted {
        fn new(source: Option<&Path>, target: &Path) -> Self {
            let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap();
            let target_c = c(target);
            // SAFETY: valid NUL-terminated strings; root only.
            let ret = match source {
                Some(source) => unsafe {
                    libc::mount(
                        c(source).as_ptr(),
                        target_c.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                },
                None => unsafe {
                    libc::mount(
                        c"tmpfs".as_ptr(),
                        target_c.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        std::ptr::null(),
                    )
                },
            };
            assert_eq!(ret, 0, "mount: {}", io::Error::last_os_error());
            Self(target.to_path_buf())
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let target = CString::new(self.0.as_os_str().as_bytes()).unwrap();
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }

    #[test]
    fn removes_files_dirs_and_symlinks_but_not_their_targets() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), "x").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("tree");
        fs::create_dir_all(top.join("a/b/c")).unwrap();
        fs::write(top.join("a/b/c/file"), "x").unwrap();
        fs::write(top.join("a/file"), "x").unwrap();
        symlink(outside.path(), top.join("a/b/dir-link")).unwrap();
        symlink(outside.path().join("keep"), top.join("file-link")).unwrap();
        symlink("/nonexistent", top.join("dangling")).unwrap();

        remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert_eq!(
            fs::read_to_string(outside.path().join("keep")).unwrap(),
            "x"
        );

        // A symlink at the top is unlinked, never followed.
        let link = tmp.path().join("link");
        symlink(outside.path(), &link).unwrap();
        remove_tree(&link).unwrap();
        assert!(fs::symlink_metadata(&link).is_err());
        assert!(outside.path().join("keep").exists());

        let missing = remove_tree(&tmp.path().join("missing")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn leaves_bind_mounts_and_other_filesystems_alone() {
        if !is_root() {
            println!("SKIP: mounting needs root");
            return;
        }
        // Same filesystem as the tree, so st_dev alone would not notice it.
        let bound = tempfile::tempdir().unwrap();
        fs::write(bound.path().join("marker"), "host data").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("tree");
        fs::create_dir_all(top.join("x/bind")).unwrap();
        fs::create_dir_all(top.join("y/tmpfs")).unwrap();
        fs::create_dir_all(top.join("z/plain")).unwrap();
        fs::write(top.join("x/sibling"), "x").unwrap();
        fs::write(top.join("z/plain/file"), "x").unwrap();
        let bind = Mounted::new(Some(bound.path()), &top.join("x/bind"));
        let tmpfs = Mounted::new(None, &top.join("y/tmpfs"));
        fs::write(top.join("y/tmpfs/marker"), "tmpfs data").unwrap();

        let err = remove_tree(&top).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        let left = &MountPointsLeft::in_error(&err).unwrap().mount_points;
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.contains(&top.join("x/bind")), "{left:?}");
        assert!(left.contains(&top.join("y/tmpfs")), "{left:?}");
        assert!(err.to_string().contains("x/bind"), "{err}");

        // The mounted data survives; everything else is gone.
        assert_eq!(
            fs::read_to_string(bound.path().join("marker")).unwrap(),
            "host data"
        );
        assert!(top.join("y/tmpfs/marker").exists());
        assert!(!top.join("x/sibling").exists());
        assert!(!top.join("z").exists());

        // Unmounted, the rest goes too.
        drop((bind, tmpfs));
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert!(bound.path().join("marker").exists());
    }

    #[test]
    fn refuses_a_mount_point_at_the_top() {
        if !is_root() {
            println!("SKIP: mounting needs root");
            return;
        }
        let bound = tempfile::tempdir().unwrap();
        fs::write(bound.path().join("marker"), "x").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("mnt");
        fs::create_dir(&top).unwrap();
        let _mounted = Mounted::new(Some(bound.path()), &top);
        let err = remove_tree(&top).unwrap_err();
        assert_eq!(
            MountPointsLeft::in_error(&err).unwrap().mount_points,
            vec![top.clone()]
        );
        assert!(bound.path().join("marker").exists());
    }
}

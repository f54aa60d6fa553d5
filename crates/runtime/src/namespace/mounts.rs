//! The sandbox's filesystem view, assembled inside its fresh mount namespace
//! by the sandbox's PID 1 (still host root) before it enters its user
//! namespace and execs envd. Every mount here lives only in that namespace
//! and vanishes with it; the host sees none of them.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use super::disk;
use super::os_error;
use crate::slots::IdRange;

/// Inside the sandbox: where the host's agent dir is mounted.
pub const AGENT_MOUNT: &str = "/.envd";
/// Under [`AGENT_MOUNT`]: the per-attachment dirs of volume layers.
pub const VOLUMES_DIR: &str = "volumes";
/// Inside the sandbox: where the old root goes during pivot_root.
pub const OLD_ROOT: &str = "/.oldroot";

/// Device nodes bind-mounted from the host (all harmless character devices;
/// the device cgroup allows exactly these plus the sandbox's own ptys).
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// procfs entries hidden behind /dev/null or an empty read-only tmpfs, and
/// entries made read-only: the masks container runtimes apply (they leak
/// host kernel memory, keys and timers, or change host-wide state).
const PROC_MASKED: [&str; 9] = [
    "acpi",
    "asound",
    "kcore",
    "keys",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "scsi",
];
const PROC_READONLY: [&str; 5] = ["bus", "fs", "irq", "sys", "sysrq-trigger"];
const SYS_MASKED: [&str; 2] = ["firmware", "devices/virtual/powercap"];

/// Host paths the sandbox root is assembled from.
#[derive(Debug, Clone)]
pub struct RootLayout {
    /// The template root filesystem (owned by host ids).
    pub template: PathBuf,
    /// Mount point for the template seen through the sandbox's id mapping.
    pub lower: PathBuf,
    /// The sparse ext4 image holding the writable layer (the disk quota).
    pub disk_image: PathBuf,
    /// Mount point of that image; holds `upper/` and `work/`.
    pub disk: PathBuf,
    pub merged: PathBuf,
    pub agent: PathBuf,
    pub envd_binary: PathBuf,
    pub ids: IdRange,
}

/// Builds the sandbox root on `merged`. Runs as host root in the
/// sandbox's fresh mount namespace, which stays owned by the host's user
/// namespace: root inside the sandbox can neither undo nor add a mount.
pub fn assemble(layout: &RootLayout, userns: &OwnedFd) -> io::Result<()> {
    // Nothing we mount may propagate back to the host namespace.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;

    disk::attach_and_mount(&layout.disk_image, &layout.disk)?;
    let upper = layout.disk.join("upper");
    let work = layout.disk.join("work");
    for dir in [&upper, &work] {
        fs::create_dir_all(dir).map_err(context(format!("creating {}", dir.display())))?;
    }
    // The overlay's root directory takes the upper dir's owner: the
    // sandbox's root.
    chown(&upper, layout.ids.host_id(0))?;
    fs::set_permissions(&upper, fs::Permissions::from_mode(0o755))
        .map_err(context("chmod upper"))?;

    idmapped_bind(&layout.template, &layout.lower, userns)?;
    let merged = &layout.merged;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        layout.lower.display(),
        upper.display(),
        work.display()
    );
    // nosuid: with no_new_privs set-id bits do nothing anyway; say so twice.
    mount(
        Some(Path::new("overlay")),
        merged,
        Some("overlay"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&options),
    )?;

    let agent = merged.join(AGENT_MOUNT.trim_start_matches('/'));
    fs::create_dir_all(&agent).map_err(context("creating /.envd"))?;
    bind(&layout.agent, &agent)?;
    remount_bind(&agent, libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC)?;
    // The host creates an empty agent/envd as the mount point; the binary
    // (a private root-owned copy, never the build tree) is bound read-only
    // over it. The sandbox's root has no capability over this mount
    // namespace, so it can neither remount it writable nor unmount it.
    let envd = agent.join("envd");
    bind(&layout.envd_binary, &envd)?;
    remount_bind(&envd, libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV)?;
    // Where volume layers get their private upper dirs (on this disk, so
    // they count against its quota): host-root owned and 0700, which the
    // sandbox's root cannot enter, and a mount point it cannot remove.
    let volumes = layout.disk.join("volumes");
    fs::create_dir_all(&volumes).map_err(context("creating disk/volumes"))?;
    fs::set_permissions(&volumes, fs::Permissions::from_mode(0o700))
        .map_err(context("chmod disk/volumes"))?;
    bind(&volumes, &agent.join(VOLUMES_DIR))?;

    setup_proc(&merged.join("proc"))?;
    setup_sys(&merged.join("sys"))?;
    setup_dev(&merged.join("dev"))?;
    Ok(())
}

/// Binds `source` on `target` with every file's owner shifted into `ids`
/// (an idmapped mount: no chown, the template stays shared and pristine).
fn idmapped_bind(source: &Path, target: &Path, userns: &OwnedFd) -> io::Result<()> {
    let tree = idmapped_tree(source, userns, true)?;
    let empty = c"";
    let target_c = cstring(target)?;
    // SAFETY: move_mount of our detached tree onto a valid path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(os_error(&format!(
            "attaching the idmapped {}",
            target.display()
        )));
    }
    Ok(())
}

/// A detached copy of the mount at `source` (read-only unless `read_only`
/// is false) with ownership shifted by `userns`'s mapping. Attach it with
/// move_mount, or drop it.
pub(crate) fn idmapped_tree(
    source: &Path,
    userns: &OwnedFd,
    read_only: bool,
) -> io::Result<OwnedFd> {
    let source_c = cstring(source)?;
    // SAFETY: open_tree on a valid path; the returned fd is owned below.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source_c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(os_error(&format!("open_tree {}", source.display())));
    }
    // SAFETY: a fresh fd from open_tree.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as libc::c_int) };
    let read_only = if read_only { MOUNT_ATTR_RDONLY } else { 0 };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | read_only | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: mount_setattr on our detached tree with a valid mount_attr.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        return Err(os_error(&format!(
            "idmapping {} (needs Linux 5.12+ and a filesystem that supports idmapped mounts)",
            source.display()
        )));
    }
    Ok(tree)
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
pub(crate) const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn setup_proc(proc_dir: &Path) -> io::Result<()> {
    fs::create_dir_all(proc_dir).map_err(context("creating /proc"))?;
    mount(
        Some(Path::new("proc")),
        proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    for name in PROC_MASKED {
        mask(&proc_dir.join(name))?;
    }
    for name in PROC_READONLY {
        let path = proc_dir.join(name);
        if path.exists() {
            bind(&path, &path)?;
            remount_bind(
                &path,
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            )?;
        }
    }
    Ok(())
}

/// sysfs of the sandbox's own network namespace, read-only.
fn setup_sys(sys_dir: &Path) -> io::Result<()> {
    fs::create_dir_all(sys_dir).map_err(context("creating /sys"))?;
    mount(
        Some(Path::new("sysfs")),
        sys_dir,
        Some("sysfs"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    for name in SYS_MASKED {
        mask(&sys_dir.join(name))?;
    }
    Ok(())
}

/// Hides `path`: /dev/null over a file, an empty read-only tmpfs over a
/// directory. Absent paths need nothing.
fn mask(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(meta) if meta.is_dir() => mount(
            Some(Path::new("tmpfs")),
            path,
            Some("tmpfs"),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("size=0"),
        ),
        Ok(_) => bind(Path::new("/dev/null"), path),
    }
}

/// A minimal /dev: a `nodev` tmpfs, a few host character devices bound in,
/// the usual symlinks and a private devpts instance (so ptys are not shared
/// with the host).
fn setup_dev(dev: &Path) -> io::Result<()> {
    fs::create_dir_all(dev).map_err(context("creating /dev"))?;
    mount(
        Some(Path::new("tmpfs")),
        dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV,
        Some("mode=755,size=64k"),
    )?;
    for name in DEVICES {
        let target = dev.join(name);
        fs::File::create(&target).map_err(context(format!("creating /dev/{name}")))?;
        bind(&Path::new("/dev").join(name), &target)?;
        remount_bind(&target, libc::MS_NOSUID | libc::MS_NOEXEC)?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        symlink(target, dev.join(link)).map_err(context(format!("linking /dev/{link}")))?;
    }
    let pts = dev.join("pts");
    fs::create_dir(&pts).map_err(context("creating /dev/pts"))?;
    mount(
        Some(Path::new("devpts")),
        &pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let shm = dev.join("shm");
    fs::create_dir(&shm).map_err(context("creating /dev/shm"))?;
    mount(
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=1777,size=64m"),
    )
}

fn chown(path: &Path, id: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(id), Some(id))
        .map_err(context(format!("chown {}", path.display())))
}

/// pivot_root into `new_root`, then detach the old root so nothing of the
/// host filesystem stays reachable from the sandbox.
pub(crate) fn pivot_into(new_root: &Path) -> io::Result<()> {
    let old_root = new_root.join(OLD_ROOT.trim_start_matches('/'));
    fs::create_dir_all(&old_root).map_err(context("creating /.oldroot"))?;
    std::env::set_current_dir(new_root).map_err(context("chdir to the new root"))?;
    let dot = cstring(Path::new("."))?;
    let old = cstring(Path::new(OLD_ROOT.trim_start_matches('/')))?;
    // SAFETY: raw syscall with valid NUL-terminated paths.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old.as_ptr()) } != 0 {
        return Err(os_error("pivot_root"));
    }
    std::env::set_current_dir("/").map_err(context("chdir /"))?;
    let old_abs = cstring(Path::new(OLD_ROOT))?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(old_abs.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(os_error("detaching the old root"));
    }
    let _ = fs::remove_dir(OLD_ROOT);
    Ok(())
}

fn bind(source: &Path, target: &Path) -> io::Result<()> {
    mount(Some(source), target, None, libc::MS_BIND, None)
}

/// Sets a bind mount's flags (a bind ignores flags at creation).
fn remount_bind(target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
    )
}

/// Mounts a filesystem from a device (or a pseudo source).
pub(crate) fn mount_fs(
    source: &Path,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    mount(Some(source), target, Some(fstype), flags, data)
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source_c = source.map(cstring).transpose()?;
    let target_c = cstring(target)?;
    let fstype_c = fstype.map(|s| CString::new(s).expect("fstype has no NUL"));
    let data_c = data
        .map(|s| CString::new(s).map_err(|_| io::Error::other("mount data contains NUL")))
        .transpose()?;
    // SAFETY: all pointers are either null or valid NUL-terminated strings
    // that outlive the call.
    let rc = unsafe {
        libc::mount(
            source_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(os_error(&format!(
            "mount {} on {} (type {})",
            source.map_or("none".into(), |s| s.display().to_string()),
            target.display(),
            fstype.unwrap_or("bind/remount")
        )));
    }
    Ok(())
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other(format!("path {} contains NUL", path.display())))
}

fn context(what: impl Into<String>) -> impl FnOnce(io::Error) -> io::Error {
    let what = what.into();
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

//! The sandbox's filesystem view, assembled inside its fresh mount namespace
//! by the sandbox's PID 1 just before it execs envd. Every mount here lives
//! only in that namespace and vanishes with it; the host sees none of them.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

/// Inside the sandbox: where the host's agent dir is mounted.
pub const AGENT_MOUNT: &str = "/.envd";
/// Inside the sandbox: where the old root goes during pivot_root.
pub const OLD_ROOT: &str = "/.oldroot";

/// Device nodes bind-mounted from the host (all harmless character devices).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Host paths the sandbox root is assembled from.
#[derive(Debug, Clone)]
pub struct RootLayout {
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    pub agent: PathBuf,
    pub envd_binary: PathBuf,
}

/// Builds the sandbox root on `merged` and pivots into it.
pub fn assemble_and_pivot(layout: &RootLayout) -> io::Result<()> {
    // Nothing we mount may propagate back to the host namespace.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;

    let merged = &layout.merged;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        layout.lower.display(),
        layout.upper.display(),
        layout.work.display()
    );
    mount(
        Some(Path::new("overlay")),
        merged,
        Some("overlay"),
        0,
        Some(&options),
    )?;

    let agent = merged.join(AGENT_MOUNT.trim_start_matches('/'));
    fs::create_dir_all(&agent).map_err(context("creating /.envd"))?;
    bind(&layout.agent, &agent, libc::MS_NOSUID | libc::MS_NODEV)?;
    // The host creates an empty agent/envd as the mount point; the binary is
    // bound read-only over it so the sandbox cannot replace the host's envd.
    bind(
        &layout.envd_binary,
        &agent.join("envd"),
        libc::MS_NOSUID | libc::MS_NODEV,
    )?;
    remount_bind_readonly(&agent.join("envd"), libc::MS_NOSUID | libc::MS_NODEV)?;

    let proc_dir = merged.join("proc");
    fs::create_dir_all(&proc_dir).map_err(context("creating /proc"))?;
    mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;

    setup_dev(&merged.join("dev"))?;

    let tmp = merged.join("tmp");
    fs::create_dir_all(&tmp).map_err(context("creating /tmp"))?;
    mount(
        Some(Path::new("tmpfs")),
        &tmp,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;

    pivot_into(merged)
}

/// A minimal /dev: tmpfs, a few host character devices, the usual symlinks
/// and a private devpts instance (so ptys are not shared with the host).
fn setup_dev(dev: &Path) -> io::Result<()> {
    fs::create_dir_all(dev).map_err(context("creating /dev"))?;
    mount(
        Some(Path::new("tmpfs")),
        dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=755,size=1m"),
    )?;
    for name in DEVICES {
        let target = dev.join(name);
        fs::File::create(&target).map_err(context(format!("creating /dev/{name}")))?;
        bind(
            &Path::new("/dev").join(name),
            &target,
            libc::MS_NOSUID | libc::MS_NOEXEC,
        )?;
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
    fs::set_permissions(&shm, fs::Permissions::from_mode(0o1777))
        .map_err(context("chmod /dev/shm"))?;
    mount(
        Some(Path::new("tmpfs")),
        &shm,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )
}

/// pivot_root into `new_root`, then detach the old root so nothing of the
/// host filesystem stays reachable from the sandbox.
fn pivot_into(new_root: &Path) -> io::Result<()> {
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

fn bind(source: &Path, target: &Path, extra_flags: libc::c_ulong) -> io::Result<()> {
    mount(
        Some(source),
        target,
        None,
        libc::MS_BIND | extra_flags,
        None,
    )
}

fn remount_bind_readonly(target: &Path, extra_flags: libc::c_ulong) -> io::Result<()> {
    mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | extra_flags,
        None,
    )
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

fn os_error(what: &str) -> io::Error {
    let err = io::Error::last_os_error();
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

fn context(what: impl Into<String>) -> impl FnOnce(io::Error) -> io::Error {
    let what = what.into();
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

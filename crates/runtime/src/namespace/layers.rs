//! Volume layers in namespace sandboxes: a volume is unpacked once per node
//! into a host directory (the layer's `tree/`), then every sandbox that
//! attaches it gets an overlay with that tree as its read-only lower layer
//! and a private upper on the sandbox's own disk.
//!
//! ```text
//! build  (first sandbox):  tree ──idmapped, writable──▶ /mount/path   envd unpacks into it
//! seal   (same sandbox):   syncfs(tree); detach that mount, then ↓
//! share  (every sandbox):  tree ──idmapped, read-only──▶ /.envd/volumes/SLOT/lower
//!                          overlay(lower, SLOT/upper, SLOT/work) ──▶ /mount/path
//! ```
//!
//! The tree holds canonical ids (0..65536, like a template): the idmapped
//! mounts shift them into each sandbox's own host range, so a file the
//! first sandbox's `user` wrote is `user`'s in every sandbox, and no chown
//! walk is needed per sandbox. `/.envd/volumes` is a bind of the sandbox
//! disk's `volumes/` (see [`super::mounts::assemble`]): host-root owned and
//! 0700, so the tenant sees its files only through the overlay.
//!
//! Mounting into a running sandbox takes a fresh single-threaded process
//! (setns into a mount namespace refuses a multi-threaded caller), so the
//! server runs the launcher binary with [`LAYER_FLAG`]; it builds the
//! idmapped tree in the host's mount namespace, where the layer's path
//! resolves, then enters the sandbox's and mounts there. Nothing is ever
//! mounted in the host's namespace.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::mounts::{self, AGENT_MOUNT, VOLUMES_DIR};
use super::{os_error, userns, NamespaceRuntime};
use crate::process;
use crate::runtime::{validate_id, RuntimeError};
use crate::slots::IdRange;

/// The launcher's first argument for a layer mount helper.
pub const LAYER_FLAG: &str = "--layer-mount";

/// The layer's files, inside the layer directory the store hands us.
const TREE: &str = "tree";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerAction {
    /// Mount the (empty) tree writable on the mount path, for envd to fill.
    Build,
    /// Mount a private overlay of the tree on the mount path; with
    /// `replace`, in place of the build mount.
    Share { replace: bool },
    /// Detach whatever is mounted on the mount path (a failed build).
    Detach,
}

/// Command line of the helper (see [`LayerArgs::to_args`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerArgs {
    pub action: LayerAction,
    /// `state_dir/ID` of the sandbox: its launcher record names the mount
    /// namespace to enter.
    pub sandbox_dir: PathBuf,
    pub ids: IdRange,
    pub tree: PathBuf,
    /// Absolute path inside the sandbox.
    pub mount_path: String,
    /// Name of this attachment's dir under `/.envd/volumes`.
    pub slot: String,
}

impl LayerArgs {
    pub fn to_args(&self) -> Vec<String> {
        let action = match self.action {
            LayerAction::Build => "build",
            LayerAction::Share { replace: false } => "share",
            LayerAction::Share { replace: true } => "replace",
            LayerAction::Detach => "detach",
        };
        vec![
            LAYER_FLAG.into(),
            action.into(),
            self.sandbox_dir.display().to_string(),
            self.ids.base.to_string(),
            self.ids.count.to_string(),
            self.tree.display().to_string(),
            self.mount_path.clone(),
            self.slot.clone(),
        ]
    }

    /// Parses what follows [`LAYER_FLAG`].
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let [action, sandbox_dir, base, count, tree, mount_path, slot] = args else {
            return Err(format!(
                "usage: {LAYER_FLAG} build|share|replace|detach SANDBOX_DIR UID_BASE UID_COUNT TREE MOUNT_PATH SLOT"
            ));
        };
        let action = match action.as_str() {
            "build" => LayerAction::Build,
            "share" => LayerAction::Share { replace: false },
            "replace" => LayerAction::Share { replace: true },
            "detach" => LayerAction::Detach,
            other => return Err(format!("unknown layer action {other:?}")),
        };
        let number = |name: &str, value: &str| {
            value
                .parse::<u32>()
                .map_err(|_| format!("{name} wants a number, got {value:?}"))
        };
        validate_mount_path(mount_path)?;
        validate_id(slot).map_err(|e| e.to_string())?;
        Ok(LayerArgs {
            action,
            sandbox_dir: sandbox_dir.into(),
            ids: IdRange {
                base: number("UID_BASE", base)?,
                count: number("UID_COUNT", count)?,
            },
            tree: tree.into(),
            mount_path: mount_path.clone(),
            slot: slot.clone(),
        })
    }
}

/// Absolute, no `.`/`..`/empty components, no NUL: the API normalised it
/// already; the helper runs as host root, so it checks again.
fn validate_mount_path(path: &str) -> Result<(), String> {
    let ok = path.starts_with('/')
        && path.len() > 1
        && !path.contains('\0')
        && path[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(())
    } else {
        Err(format!("invalid mount path {path:?}"))
    }
}

/// Entry point of the helper (single-threaded, fresh exec).
pub fn layer_main(args: &[String]) -> io::Result<()> {
    let args = LayerArgs::parse(args).map_err(io::Error::other)?;
    let launcher = args.sandbox_dir.join("launcher.pid");
    let pid = process::running(&launcher)
        .ok_or_else(|| io::Error::other("the sandbox is not running"))?;
    let mount_ns = File::open(format!("/proc/{pid}/ns/mnt"))?;
    // The record still names the same process: the namespace is its.
    if process::running(&launcher) != Some(pid) {
        return Err(io::Error::other("the sandbox stopped"));
    }
    // Built on the host side, where the layer's path resolves.
    let tree = match args.action {
        LayerAction::Detach => None,
        LayerAction::Build | LayerAction::Share { .. } => {
            let userns = userns::create(args.ids)?;
            let read_only = args.action != LayerAction::Build;
            let root = File::open(&args.tree)?;
            let mount = mounts::idmapped_tree(&args.tree, &userns, read_only)?;
            Some((root, mount))
        }
    };
    // SAFETY: plain syscalls; this process is single-threaded.
    unsafe {
        if libc::setns(mount_ns.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
            return Err(os_error("entering the sandbox's mount namespace"));
        }
    }
    std::env::set_current_dir("/")?;
    match (args.action, tree) {
        (LayerAction::Detach, _) => detach(&args.mount_path),
        (LayerAction::Build, Some((root, mount))) => {
            // The tree's root takes the mount point's owner and mode (the
            // directory envd made for `user`), in canonical ids.
            let target = open_target(&args.mount_path)?;
            let meta = fstat(&target)?;
            let canonical = |id: u32| {
                id.checked_sub(args.ids.base)
                    .filter(|inside| *inside < args.ids.count)
                    .ok_or_else(|| io::Error::other("the mount point is not the sandbox's"))
            };
            std::os::unix::fs::fchown(&root, Some(canonical(meta.0)?), Some(canonical(meta.1)?))?;
            root.set_permissions(fs::Permissions::from_mode(meta.2 & 0o7777))?;
            attach(&mount, &target)
        }
        (LayerAction::Share { replace }, Some((_, lower))) => {
            if replace {
                detach(&args.mount_path)?;
            }
            share(&args, &lower)
        }
        _ => unreachable!("a tree is made for every action but detach"),
    }
}

/// The overlay: `lower` attached under this attachment's slot, a fresh
/// upper and work dir beside it, all mounted on the mount path.
fn share(args: &LayerArgs, lower: &OwnedFd) -> io::Result<()> {
    let volumes = Path::new(AGENT_MOUNT).join(VOLUMES_DIR);
    let meta = fs::symlink_metadata(&volumes)?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} is not this sandbox's private volumes dir",
            volumes.display()
        )));
    }
    let slot = volumes.join(&args.slot);
    fs::create_dir(&slot)?;
    let (lower_dir, upper, work) = (slot.join("lower"), slot.join("upper"), slot.join("work"));
    for dir in [&lower_dir, &upper, &work] {
        fs::create_dir(dir)?;
    }
    attach(lower, &open_target(&lower_dir.to_string_lossy())?)?;
    // The overlay's root directory is the upper dir: it takes the mount
    // point's owner and mode.
    let target = open_target(&args.mount_path)?;
    let (uid, gid, mode) = fstat(&target)?;
    std::os::unix::fs::chown(&upper, Some(uid), Some(gid))?;
    fs::set_permissions(&upper, fs::Permissions::from_mode(mode & 0o7777))?;
    let overlay = overlay(&lower_dir, &upper, &work)?;
    attach(&overlay, &target)
}

/// A detached overlay mount (new mount API: no path-based mount target).
fn overlay(lower: &Path, upper: &Path, work: &Path) -> io::Result<OwnedFd> {
    // SAFETY: fsopen with a valid NUL-terminated name.
    let context = unsafe { libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC) };
    if context < 0 {
        return Err(os_error("fsopen overlay"));
    }
    // SAFETY: a fresh fd from fsopen.
    let context = unsafe { OwnedFd::from_raw_fd(context as libc::c_int) };
    for (key, value) in [("lowerdir", lower), ("upperdir", upper), ("workdir", work)] {
        let key = CString::new(key).expect("no NUL");
        let value = CString::new(value.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::other("path contains NUL"))?;
        // SAFETY: fsconfig on our context with valid strings.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                context.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        };
        if rc != 0 {
            return Err(os_error(&format!("overlay option {key:?}")));
        }
    }
    // SAFETY: fsconfig/fsmount on our context.
    unsafe {
        let rc = libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        );
        if rc != 0 {
            return Err(os_error("creating the overlay"));
        }
        let mount = libc::syscall(
            libc::SYS_fsmount,
            context.as_raw_fd(),
            FSMOUNT_CLOEXEC,
            mounts::MOUNT_ATTR_NOSUID | mounts::MOUNT_ATTR_NODEV,
        );
        if mount < 0 {
            return Err(os_error("fsmount overlay"));
        }
        Ok(OwnedFd::from_raw_fd(mount as libc::c_int))
    }
}

/// Opens a directory inside the sandbox without following magic links
/// (`/proc/N/root` and the like), so a path never resolves out of it.
fn open_target(path: &str) -> io::Result<OwnedFd> {
    let path_c = CString::new(path).map_err(|_| io::Error::other("path contains NUL"))?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a valid path and open_how.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path_c.as_ptr(),
            &how,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(os_error(&format!("opening {path} in the sandbox")));
    }
    // SAFETY: a fresh fd from openat2.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn fstat(fd: &OwnedFd) -> io::Result<(u32, u32, u32)> {
    // SAFETY: fstat into a zeroed stat.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(os_error("fstat"));
    }
    Ok((stat.st_uid, stat.st_gid, stat.st_mode))
}

/// Attaches the detached mount `mount` on the directory `target`.
fn attach(mount: &OwnedFd, target: &OwnedFd) -> io::Result<()> {
    // SAFETY: move_mount between two fds we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            mounts::MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(os_error("attaching the volume mount"));
    }
    Ok(())
}

fn detach(mount_path: &str) -> io::Result<()> {
    let path = CString::new(mount_path).map_err(|_| io::Error::other("path contains NUL"))?;
    // SAFETY: umount2 with a valid path.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
        return Err(os_error(&format!("detaching {mount_path}")));
    }
    Ok(())
}

const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;

/// `struct open_how` (linux/openat2.h).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// The host side: what the runtime trait's layer calls do.
impl NamespaceRuntime {
    /// Runs the mount helper for `action` on sandbox `id`.
    pub(super) async fn run_layer_helper(
        &self,
        id: &str,
        action: LayerAction,
        layer_dir: &Path,
        mount_path: &str,
    ) -> Result<(), RuntimeError> {
        validate_id(id)?;
        let owner = self.slot_owner(id);
        let ids = self
            .slots
            .held_by(&owner)
            .ok_or_else(|| RuntimeError::InvalidSpec(format!("sandbox {id} holds no id range")))?;
        let args = LayerArgs {
            action,
            sandbox_dir: self.sandbox_dir(id),
            ids,
            tree: layer_dir.join(TREE),
            mount_path: mount_path.to_string(),
            slot: slot_name(mount_path),
        };
        let mut command = tokio::process::Command::new(&self.config.launcher.program);
        command
            .args(&self.config.launcher.args_prefix)
            .args(args.to_args())
            .stdin(std::process::Stdio::null());
        process::output_async(&mut command)
            .await
            .map_err(|e| RuntimeError::io(format!("volume layer at {mount_path}"), e.into()))?;
        Ok(())
    }

    pub(super) async fn mount_layer_for_build(
        &self,
        id: &str,
        layer_dir: &Path,
        mount_path: &str,
    ) -> Result<(), RuntimeError> {
        let tree = layer_dir.join(TREE);
        fs::create_dir_all(&tree)
            .map_err(|e| RuntimeError::io(format!("creating {}", tree.display()), e))?;
        self.run_layer_helper(id, LayerAction::Build, layer_dir, mount_path)
            .await
    }

    pub(super) async fn seal_layer(
        &self,
        id: &str,
        layer_dir: &Path,
        mount_path: &str,
    ) -> Result<(), RuntimeError> {
        let tree = layer_dir.join(TREE);
        tokio::task::spawn_blocking(move || sync_filesystem(&tree))
            .await
            .map_err(|e| RuntimeError::io("syncing the layer", io::Error::other(e)))?
            .map_err(|e| RuntimeError::io("syncing the layer", e))?;
        self.run_layer_helper(
            id,
            LayerAction::Share { replace: true },
            layer_dir,
            mount_path,
        )
        .await
    }
}

/// Per-attachment dir name: mount paths of one sandbox never overlap, so
/// a hash of the path is unique within it.
fn slot_name(mount_path: &str) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(mount_path.as_bytes());
    format!("v-{}", hex::encode(&hash[..8]))
}

/// Everything written to the layer is on disk before anyone shares it.
fn sync_filesystem(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    // SAFETY: syncfs on an fd we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(os_error("syncfs"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        for action in [
            LayerAction::Build,
            LayerAction::Share { replace: false },
            LayerAction::Share { replace: true },
            LayerAction::Detach,
        ] {
            let args = LayerArgs {
                action,
                sandbox_dir: "/state/sbx-1".into(),
                ids: IdRange {
                    base: 1_000_065_536,
                    count: 65_536,
                },
                tree: "/layers/vol-1-abc/tree".into(),
                mount_path: "/home/user/data".into(),
                slot: slot_name("/home/user/data"),
            };
            let parsed = LayerArgs::parse(&args.to_args()[1..]).unwrap();
            assert_eq!(parsed, args);
        }
    }

    #[test]
    fn mount_paths_are_checked_again() {
        for bad in ["", "/", "relative", "/a/../b", "/a/./b", "/a//b", "/a/"] {
            assert!(validate_mount_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_mount_path("/home/user/data").is_ok());
    }

    #[test]
    fn slot_names_are_path_safe() {
        let name = slot_name("/data with spaces/ü");
        assert!(validate_id(&name).is_ok(), "{name}");
        assert_ne!(name, slot_name("/data"));
    }
}

//! Safe resolution of sandbox paths under the sandbox root.
//!
//! Paths from requests are resolved one component at a time with
//! `openat(O_PATH | O_NOFOLLOW)`, starting from a descriptor of the root and
//! keeping a stack of descriptors of the directories walked through. Symlinks
//! are followed *as if the root were `/`* (like `openat2(RESOLVE_IN_ROOT)`):
//! an absolute target restarts at the root and `..` never climbs above it.
//! Because `..` pops our own descriptor stack instead of asking the kernel,
//! a directory renamed away mid-walk cannot take us outside either. The final
//! operation then uses the parent's descriptor and a single name opened with
//! `O_NOFOLLOW`, so a symlink swapped in after the walk fails instead of
//! being followed.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::sys;

/// Same limit as the kernel's.
const MAX_SYMLINKS: u32 = 40;

/// Owner given to files and directories an operation creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
}

/// How [`SandboxRoot::resolve`] treats the path.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResolveOptions {
    /// Follow a symlink in the last component (read/write/stat); remove and
    /// rename act on the link itself.
    pub follow_last: bool,
    /// Create missing intermediate directories (`mkdir -p` of the parent),
    /// owned by this owner when set.
    pub create_parents: bool,
    pub owner: Option<Ownership>,
}

/// Result of a resolution: the directory holding the last component, and
/// that component (`None` when the path names a directory reached through
/// `/`, `..` or a symlink to one, e.g. the root itself).
pub struct Resolved {
    pub dir: OwnedFd,
    pub name: Option<CString>,
}

pub struct SandboxRoot {
    root: OwnedFd,
    host_root: PathBuf,
}

impl SandboxRoot {
    pub fn new(host_root: &Path) -> io::Result<Self> {
        let host_root = host_root.canonicalize()?;
        let root = std::fs::File::open(&host_root)?;
        if !root.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "root is not a directory",
            ));
        }
        Ok(Self {
            root: root.into(),
            host_root,
        })
    }

    /// Host path of a sandbox path, lexically (`..` clamped at the root).
    /// Used for a process's working directory: processes are not chrooted
    /// by envd, so when the root is not `/` their cwd must be mapped.
    pub fn host_path(&self, sandbox_path: &str) -> PathBuf {
        let clean = clean_path(sandbox_path);
        self.host_root.join(clean.trim_start_matches('/'))
    }

    /// Walks `path` under the root, see the module docs.
    pub fn resolve(&self, path: &str, options: ResolveOptions) -> io::Result<Resolved> {
        let mut stack: Vec<OwnedFd> = vec![self.root.try_clone()?];
        let mut pending: VecDeque<Vec<u8>> = components(path.as_bytes()).collect();
        let mut symlinks_followed = 0;

        while let Some(component) = pending.pop_front() {
            if component == b"." {
                continue;
            }
            if component == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let name = sys::component(&component)?;
            let is_last = pending.is_empty();
            let top = stack.last().expect("stack holds the root").as_fd();
            match sys::openat(top, &name, libc::O_PATH | libc::O_NOFOLLOW, 0) {
                Ok(fd) => {
                    let stat = sys::fstat(fd.as_fd())?;
                    if sys::is_symlink(&stat) && (!is_last || options.follow_last) {
                        symlinks_followed += 1;
                        if symlinks_followed > MAX_SYMLINKS {
                            return Err(io::Error::from_raw_os_error(libc::ELOOP));
                        }
                        let target = sys::readlink_fd(fd.as_fd())?;
                        if target.starts_with(b"/") {
                            stack.truncate(1);
                        }
                        for part in components(&target).collect::<Vec<_>>().into_iter().rev() {
                            pending.push_front(part);
                        }
                    } else if is_last {
                        let dir = stack.pop().expect("stack holds the root");
                        return Ok(Resolved {
                            dir,
                            name: Some(name),
                        });
                    } else if sys::is_dir(&stat) {
                        stack.push(fd);
                    } else {
                        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
                    }
                }
                Err(error) if sys::errno_is(&error, libc::ENOENT) => {
                    if is_last {
                        let dir = stack.pop().expect("stack holds the root");
                        return Ok(Resolved {
                            dir,
                            name: Some(name),
                        });
                    }
                    if !options.create_parents {
                        return Err(error);
                    }
                    create_dir(top, &name, options.owner)?;
                    let fd = sys::openat(
                        top,
                        &name,
                        libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY,
                        0,
                    )?;
                    stack.push(fd);
                }
                Err(error) => return Err(error),
            }
        }
        let dir = stack.pop().expect("stack holds the root");
        Ok(Resolved { dir, name: None })
    }

    /// Opens `path` (following symlinks in-root) with `flags | O_NOFOLLOW`.
    /// A path that names a directory without a last component (e.g. `/`) is
    /// reopened from its descriptor.
    pub fn open(&self, path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
        let resolved = self.resolve(
            path,
            ResolveOptions {
                follow_last: true,
                ..Default::default()
            },
        )?;
        match resolved.name {
            Some(name) => sys::openat(resolved.dir.as_fd(), &name, flags | libc::O_NOFOLLOW, 0),
            None => sys::openat(resolved.dir.as_fd(), c".", flags, 0),
        }
    }

    /// `stat` of `path` following symlinks in-root, plus whether the last
    /// component itself is a symlink.
    pub fn stat(&self, path: &str) -> io::Result<(sys::Stat, bool)> {
        let is_symlink = {
            let resolved = self.resolve(path, ResolveOptions::default())?;
            match resolved.name {
                Some(name) => sys::is_symlink(&sys::lstatat(resolved.dir.as_fd(), &name)?),
                None => false,
            }
        };
        let resolved = self.resolve(
            path,
            ResolveOptions {
                follow_last: true,
                ..Default::default()
            },
        )?;
        let stat = match resolved.name {
            Some(name) => sys::lstatat(resolved.dir.as_fd(), &name)?,
            None => sys::fstat(resolved.dir.as_fd())?,
        };
        Ok((stat, is_symlink))
    }

    /// `mkdir -p`; returns whether the last directory was created.
    pub fn mkdir_all(&self, path: &str, owner: Option<Ownership>) -> io::Result<bool> {
        let options = ResolveOptions {
            follow_last: true,
            create_parents: true,
            owner,
        };
        let resolved = self.resolve(path, options)?;
        let Some(name) = resolved.name else {
            return Ok(false);
        };
        match create_dir(resolved.dir.as_fd(), &name, owner) {
            Ok(()) => Ok(true),
            Err(error) if sys::errno_is(&error, libc::EEXIST) => {
                if sys::is_dir(&sys::lstatat(resolved.dir.as_fd(), &name)?) {
                    Ok(false)
                } else {
                    Err(error)
                }
            }
            Err(error) => Err(error),
        }
    }

    /// Opens the directory `path` (creating it and its parents when `create`)
    /// as a readable descriptor usable as a `*at` base.
    pub fn open_dir(
        &self,
        path: &str,
        create: bool,
        owner: Option<Ownership>,
    ) -> io::Result<OwnedFd> {
        if create {
            self.mkdir_all(path, owner)?;
        }
        self.open(path, libc::O_RDONLY | libc::O_DIRECTORY)
    }
}

/// `mkdirat` + chown of the new directory (never of a symlink's target).
pub fn create_dir(dir: BorrowedFd<'_>, name: &CString, owner: Option<Ownership>) -> io::Result<()> {
    match sys::mkdirat(dir, name, 0o755) {
        Ok(()) => {
            if let Some(owner) = owner {
                sys::lchownat(dir, name, owner.uid, owner.gid)?;
            }
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Non-empty components of a slash-separated path (`.`/`..` included).
fn components(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/')
        .filter(|part| !part.is_empty())
        .map(<[u8]>::to_vec)
}

/// Lexically normalized absolute sandbox path: `/a/./b/../c/` → `/a/c`.
pub fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Last component of a clean path (`/` for the root).
pub fn file_name(clean: &str) -> String {
    match clean.rsplit('/').next() {
        Some("") | None => "/".to_string(),
        Some(name) => name.to_string(),
    }
}

/// `parent/child` for clean paths.
pub fn join(parent: &str, child: &str) -> String {
    if parent.ends_with('/') {
        format!("{parent}{child}")
    } else {
        format!("{parent}/{child}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_paths() {
        assert_eq!(clean_path("/a/./b/../c/"), "/a/c");
        assert_eq!(clean_path("../../x"), "/x");
        assert_eq!(clean_path(""), "/");
        assert_eq!(file_name("/"), "/");
        assert_eq!(file_name("/a/b"), "b");
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/a", "b"), "/a/b");
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"outside").unwrap();
        let root_dir = tempfile::tempdir().unwrap();
        let root = root_dir.path();
        std::fs::create_dir_all(root.join("home/user")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("home/user/abs")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../..", root.join("home/user/rel")).unwrap();
        std::fs::write(root.join("secret"), b"inside").unwrap();
        let sandbox = SandboxRoot::new(root).unwrap();

        // The absolute link points to the outside dir's path *inside* the root: missing.
        let error = sandbox
            .open("/home/user/abs/secret", libc::O_RDONLY)
            .unwrap_err();
        assert!(sys::errno_is(&error, libc::ENOENT), "{error}");
        // The relative link climbs to the root and stops there.
        let fd = sandbox
            .open("/home/user/rel/secret", libc::O_RDONLY)
            .unwrap();
        let content = std::io::read_to_string(std::fs::File::from(fd)).unwrap();
        assert_eq!(content, "inside");
        let fd = sandbox.open("/../../secret", libc::O_RDONLY).unwrap();
        assert_eq!(
            std::io::read_to_string(std::fs::File::from(fd)).unwrap(),
            "inside"
        );
    }
}

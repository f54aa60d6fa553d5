//! Unpacks a root filesystem that a build sandbox packed (its `/` as a
//! tar.gz) into a new, empty directory on the host: the last step of a
//! custom template build.
//!
//! The archive comes from inside a sandbox, so it is hostile. Unlike a
//! volume, a root filesystem keeps owners, modes (setuid included: `sudo`
//! inside a sandbox needs it) and symlinks, so the rules are:
//! - every entry's parent is walked component by component with
//!   `openat(O_DIRECTORY | O_NOFOLLOW)` from the destination's descriptor:
//!   a symlink the archive planted is never followed, and `..` or an
//!   absolute name is refused;
//! - symlinks are created as links with their target verbatim (it is only
//!   ever resolved inside a sandbox) and never opened here;
//! - devices, FIFOs and hard links are dropped, and an entry never replaces
//!   one made before it (`O_EXCL`);
//! - the total size and entry count are bounded by [`Limits`].
//!
//! Files keep owners and setuid bits, so the destination's parent must be
//! a directory only root can enter (the caller's job; see
//! `templates::CustomTemplates`), or a host user could run them.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use sandbox_archive::{ArchiveError, EntryKind, Gunzip, Limits, TarReader};

/// What went in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub dropped: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("the archive is invalid: {0}")]
    Archive(#[from] ArchiveError),
    #[error("entry {path:?}: {reason}")]
    Entry { path: String, reason: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn entry_error(path: &[u8], reason: impl ToString) -> UnpackError {
    UnpackError::Entry {
        path: String::from_utf8_lossy(path).into_owned(),
        reason: reason.to_string(),
    }
}

/// Unpacks the tar.gz `input` into `dest` (an existing, empty directory).
pub fn unpack_rootfs(
    input: impl Read,
    dest: &Path,
    limits: Limits,
) -> Result<Unpacked, UnpackError> {
    let root = open_dir_path(dest)?;
    let mut reader = TarReader::new(
        io::BufReader::with_capacity(256 << 10, Gunzip::new(input, &limits)),
        limits,
    );
    let mut done = Unpacked::default();
    let mut buffer = vec![0u8; 256 << 10];
    while let Some(entry) = reader.next_entry()? {
        let Some(parts) = components(&entry.path) else {
            return Err(entry_error(
                &entry.path,
                "not a relative path inside the root",
            ));
        };
        let Some((name, parents)) = parts.split_last() else {
            continue; // "./" itself: the destination exists
        };
        let parent = walk(root.as_fd(), parents).map_err(|e| entry_error(&entry.path, e))?;
        let name = CString::new(name.to_vec()).map_err(|e| entry_error(&entry.path, e))?;
        let mode = entry.mode & 0o7777;
        match entry.kind {
            EntryKind::Dir => {
                mkdirat(parent.as_fd(), &name).map_err(|e| entry_error(&entry.path, e))?;
                let dir = openat(parent.as_fd(), &name, libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .map_err(|e| entry_error(&entry.path, e))?;
                own(dir.as_fd(), entry.uid, entry.gid, mode)
                    .map_err(|e| entry_error(&entry.path, e))?;
                done.dirs += 1;
            }
            EntryKind::File => {
                let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
                let fd = openat_mode(parent.as_fd(), &name, flags, 0o600)
                    .map_err(|e| entry_error(&entry.path, e))?;
                let mut file = File::from(fd);
                loop {
                    let n = reader.read_data(&mut buffer)?;
                    if n == 0 {
                        break;
                    }
                    file.write_all(&buffer[..n])?;
                    done.bytes += n as u64;
                }
                // Owner first: chown clears setuid bits, chmod sets them.
                own(file.as_fd(), entry.uid, entry.gid, mode)
                    .map_err(|e| entry_error(&entry.path, e))?;
                done.files += 1;
            }
            EntryKind::Symlink => {
                let target = entry
                    .link_name
                    .clone()
                    .ok_or_else(|| entry_error(&entry.path, "symlink without a target"))?;
                let target = CString::new(target).map_err(|e| entry_error(&entry.path, e))?;
                // SAFETY: valid C strings and an open directory fd.
                let made =
                    unsafe { libc::symlinkat(target.as_ptr(), parent.as_raw_fd(), name.as_ptr()) };
                check(made).map_err(|e| entry_error(&entry.path, e))?;
                // SAFETY: as above; AT_SYMLINK_NOFOLLOW changes the link itself.
                let owned = unsafe {
                    libc::fchownat(
                        parent.as_raw_fd(),
                        name.as_ptr(),
                        entry.uid,
                        entry.gid,
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                check(owned).map_err(|e| entry_error(&entry.path, e))?;
                done.symlinks += 1;
            }
            _ => done.dropped += 1,
        }
    }
    Ok(done)
}

/// The non-empty components of a relative path; `None` for an absolute
/// path or one with `..`.
fn components(path: &[u8]) -> Option<Vec<&[u8]>> {
    if path.first() == Some(&b'/') {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return None,
            part => parts.push(part),
        }
    }
    Some(parts)
}

/// Opens `parents` below `root` one at a time, never following a symlink.
fn walk(root: BorrowedFd<'_>, parents: &[&[u8]]) -> io::Result<OwnedFd> {
    let mut dir = root.try_clone_to_owned()?;
    for part in parents {
        let name = CString::new(part.to_vec())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        dir = openat(dir.as_fd(), &name, libc::O_DIRECTORY | libc::O_NOFOLLOW)?;
    }
    Ok(dir)
}

fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a valid C string; the fd is checked and owned.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat(dir: BorrowedFd<'_>, name: &CString, flags: libc::c_int) -> io::Result<OwnedFd> {
    openat_mode(dir, name, flags | libc::O_RDONLY, 0)
}

fn openat_mode(
    dir: BorrowedFd<'_>,
    name: &CString,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: a valid C string and directory fd; the result is checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    check(fd)?;
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdirat(dir: BorrowedFd<'_>, name: &CString) -> io::Result<()> {
    // SAFETY: a valid C string and directory fd.
    match check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o700) }) {
        // A directory named twice (the root's own entry, say) is fine; a
        // symlink or file in its place fails at the O_DIRECTORY open.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other.map(drop),
    }
}

fn own(fd: BorrowedFd<'_>, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscalls on an fd we hold.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })?;
    Ok(())
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targz(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        let tar = builder.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(uid);
        header.set_size(size);
        header
    }

    #[test]
    fn keeps_owners_modes_and_links_and_never_follows_a_planted_link() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: keeps owners: needs root (chown)");
            return;
        }
        let outside = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let escape = outside.path().display().to_string();
        let archive = targz(|b| {
            for dir in ["usr/", "usr/bin/"] {
                b.append_data(
                    &mut header(tar::EntryType::Directory, 0o755, 0, 0),
                    dir,
                    io::empty(),
                )
                .unwrap();
            }
            let data = b"#!/bin/sh\n";
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o4755, 0, data.len() as u64),
                "usr/bin/su",
                &data[..],
            )
            .unwrap();
            // Planted link, then a file "inside" it: must not land outside.
            b.append_link(
                &mut header(tar::EntryType::Symlink, 0o777, 0, 0),
                "trap",
                &escape,
            )
            .unwrap();
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o644, 0, 1),
                "trap/owned",
                &b"x"[..],
            )
            .unwrap();
        });
        let result = unpack_rootfs(&archive[..], dest.path(), Limits::default());
        match result {
            Err(UnpackError::Entry { path, .. }) => assert_eq!(path, "trap/owned"),
            other => panic!("{other:?}"),
        }
        assert!(
            std::fs::read_dir(outside.path()).unwrap().next().is_none(),
            "nothing escaped"
        );
        use std::os::unix::fs::MetadataExt;
        let su = std::fs::metadata(dest.path().join("usr/bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755);
        assert_eq!(su.uid(), 0);
        assert_eq!(
            std::fs::read_link(dest.path().join("trap"))
                .unwrap()
                .display()
                .to_string(),
            escape
        );
    }

    #[test]
    fn refuses_parent_escapes_and_bounds_the_size() {
        let dest = tempfile::tempdir().unwrap();
        for name in ["../x", "a/../../x"] {
            let archive = targz(|b| {
                let mut h = header(tar::EntryType::Regular, 0o644, 0, 1);
                h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
                h.set_cksum();
                b.append(&h, &b"x"[..]).unwrap();
            });
            let result = unpack_rootfs(&archive[..], dest.path(), Limits::default());
            assert!(
                matches!(result, Err(UnpackError::Entry { .. })),
                "{name}: {result:?}"
            );
        }
        let big = vec![0u8; 4096];
        let archive = targz(|b| {
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o644, 0, 4096),
                "big",
                &big[..],
            )
            .unwrap();
        });
        let limits = Limits {
            max_bytes: 1024,
            ..Limits::default()
        };
        let result = unpack_rootfs(&archive[..], dest.path(), limits);
        assert!(matches!(result, Err(UnpackError::Archive(_))), "{result:?}");
    }
}

//! `POST /files/unpack`: one streamed request carrying a tar archive
//! (optionally gzipped) that is written under a destination directory.
//!
//! The archive is read with `sandbox_archive`, which bounds entries, bytes,
//! header lengths and the gzip expansion ratio and refuses sparse entries,
//! so a hostile archive cannot make envd spin or hold it in memory.
//!
//! Only regular files and directories are materialised. Symlinks, hardlinks,
//! devices, FIFOs and names containing `..` are skipped and reported; leading
//! `/` is stripped. Below the destination nothing is ever followed: each
//! directory is opened with `O_NOFOLLOW`, so a symlink planted in the sandbox
//! makes the entry skipped instead of redirecting the write.

use std::ffi::CString;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::Json;
use envd_protocol::{SkippedEntry, UnpackQuery, UnpackReport};
use sandbox_archive::{ArchiveError, EntryKind, Gunzip, Limits, TarReader};
use tokio::task::spawn_blocking;

use crate::body::{self, BodyReader};
use crate::error::{ApiError, ApiResult};
use crate::extract::QueryParams;
use crate::paths::{self, Ownership, SandboxRoot};
use crate::server::AppState;
use crate::sys;

/// Skipped entries listed by name in the report (all are counted).
const MAX_REPORTED_SKIPS: usize = 100;
/// Buffer between the body channel and the tar parser / gunzip.
const READ_BUFFER: usize = 1024 * 1024;
/// Copy buffer for file contents.
const COPY_BUFFER: usize = 1024 * 1024;

pub async fn unpack(
    State(state): State<Arc<AppState>>,
    QueryParams(query): QueryParams<UnpackQuery>,
    headers: HeaderMap,
    request_body: Body,
) -> ApiResult<Json<UnpackReport>> {
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or(""))
    {
        None | Some("identity") => false,
        Some(value) if value.eq_ignore_ascii_case("gzip") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unsupported Content-Encoding {other:?}"
            )))
        }
    };
    let dest = paths::clean_path(&query.path);
    let (sender, reader) = body::channel();
    // The caller's limits where given (it checked the archive against the
    // same ones at upload), envd's defaults otherwise.
    let defaults = Limits::default();
    let limits = Limits {
        max_bytes: query.max_bytes.unwrap_or(defaults.max_bytes),
        max_entries: query.max_entries.unwrap_or(defaults.max_entries),
        max_header_bytes: query.max_header_bytes.unwrap_or(defaults.max_header_bytes),
        max_ratio: query.max_ratio.unwrap_or(defaults.max_ratio),
        ..defaults
    };
    let worker = spawn_blocking(move || {
        let user = state.users.lookup(&state.root, &query.username)?;
        let owner = state.users.ownership(&user);
        unpack_blocking(&state.root, &query.path, owner, reader, gzip, limits)
    });
    let (_, report) = tokio::join!(body::pump(request_body, sender), worker);
    let report = report??;
    tracing::info!(
        dest = %dest,
        files = report.files,
        dirs = report.dirs,
        bytes = report.bytes,
        skipped = report.skipped,
        "unpack finished"
    );
    Ok(Json(report))
}

/// Unpacks the tar stream read from `reader` under `dest` (created if
/// missing). Runs on a blocking thread.
pub fn unpack_blocking(
    root: &SandboxRoot,
    dest: &str,
    owner: Option<Ownership>,
    reader: BodyReader,
    gzip: bool,
    limits: Limits,
) -> ApiResult<UnpackReport> {
    let clean_dest = paths::clean_path(dest);
    let dest_fd = root
        .open_dir(dest, true, owner)
        .map_err(|e| ApiError::from_io(e, &clean_dest))?;
    let buffered = BufReader::with_capacity(READ_BUFFER, reader);
    let input: Box<dyn Read> = if gzip {
        Box::new(BufReader::with_capacity(
            READ_BUFFER,
            Gunzip::new(buffered, &limits),
        ))
    } else {
        Box::new(buffered)
    };
    let mut unpacker = Unpacker::new(dest_fd, owner);
    unpacker
        .run(TarReader::new(input, limits))
        .map_err(|e| match e {
            Failure::Write(e) => ApiError::from_io(e, &clean_dest),
            Failure::Archive(ArchiveError::Io(e)) if e.raw_os_error().is_some() => {
                ApiError::from_io(e, &clean_dest)
            }
            Failure::Archive(e) => ApiError::bad_request(format!("invalid archive: {e}")),
        })?;
    Ok(unpacker.report)
}

struct Unpacker {
    dest: OwnedFd,
    owner: Option<Ownership>,
    /// Directories currently open, from the destination down: reused while
    /// consecutive entries share a prefix (archives are grouped by directory).
    open_dirs: Vec<(Vec<u8>, OwnedFd)>,
    copy_buffer: Vec<u8>,
    /// Non-root envd keeps owner permission on directories so it can fill them.
    force_owner_rwx: bool,
    report: UnpackReport,
}

/// Why an entry is not written; not an error of the whole unpack.
struct Skip(String);

enum Kind {
    File,
    Dir,
}

impl Unpacker {
    fn new(dest: OwnedFd, owner: Option<Ownership>) -> Self {
        Self {
            dest,
            owner,
            open_dirs: Vec::new(),
            copy_buffer: vec![0; COPY_BUFFER],
            // SAFETY: trivial getter.
            force_owner_rwx: unsafe { libc::geteuid() } != 0,
            report: UnpackReport::default(),
        }
    }

    fn run(&mut self, mut archive: TarReader<Box<dyn Read>>) -> Result<(), Failure> {
        while let Some(entry) = archive.next_entry().map_err(Failure::Archive)? {
            let display = String::from_utf8_lossy(&entry.path).into_owned();
            let kind = match entry.kind {
                EntryKind::File => Kind::File,
                EntryKind::Dir => Kind::Dir,
                EntryKind::Symlink => {
                    self.skip(display, "symlink");
                    continue;
                }
                EntryKind::HardLink => {
                    self.skip(display, "hardlink");
                    continue;
                }
                EntryKind::CharDevice | EntryKind::BlockDevice => {
                    self.skip(display, "device node");
                    continue;
                }
                EntryKind::Fifo => {
                    self.skip(display, "fifo");
                    continue;
                }
                EntryKind::Other(flag) => {
                    self.skip(
                        display,
                        &format!("unsupported entry type {:?}", flag as char),
                    );
                    continue;
                }
            };
            let components = match sanitize(&entry.path) {
                Ok(components) => components,
                Err(Skip(reason)) => {
                    self.skip(display, &reason);
                    continue;
                }
            };
            let mode = entry.mode;
            let result = match kind {
                Kind::Dir if components.is_empty() => Ok(()), // "./" itself
                Kind::File if components.is_empty() => Err(Skip("empty name".into()).into()),
                Kind::Dir => self.write_dir(&components, mode),
                Kind::File => self.write_file(&components, mode, &mut archive),
            };
            match result {
                Ok(()) => {}
                Err(EntryError::Skip(Skip(reason))) => self.skip(display, &reason),
                Err(EntryError::Fatal(error)) => return Err(error),
            }
        }
        Ok(())
    }

    fn skip(&mut self, name: String, reason: &str) {
        tracing::debug!(name, reason, "unpack skipped entry");
        self.report.skipped += 1;
        if self.report.skipped_entries.len() < MAX_REPORTED_SKIPS {
            self.report.skipped_entries.push(SkippedEntry {
                name,
                reason: reason.to_string(),
            });
        }
    }

    fn write_dir(&mut self, components: &[Vec<u8>], mode: u32) -> Result<(), EntryError> {
        let mut mode = mode & 0o1777;
        if self.force_owner_rwx {
            mode |= 0o700;
        }
        let dir = self.open_dir(components)?;
        sys::fchmod(dir, mode).map_err(EntryError::from_io)?;
        Ok(())
    }

    fn write_file(
        &mut self,
        components: &[Vec<u8>],
        mode: u32,
        data: &mut impl Read,
    ) -> Result<(), EntryError> {
        let (parents, last) = components.split_at(components.len() - 1);
        let name = sys::component(&last[0]).map_err(EntryError::from_io)?;
        let owner = self.owner;
        let parent = self.open_dir(parents)?;
        let (fd, fresh) = create_file(parent, &name, mode & 0o777)?;
        if !fresh {
            // An existing entry: make sure it is a plain file and reset its mode
            // (a fresh file already has the exact mode: envd runs with umask 0).
            let stat = sys::fstat(fd.as_fd()).map_err(EntryError::from_io)?;
            if !sys::is_regular(&stat) {
                return Err(Skip("existing entry is not a regular file".into()).into());
            }
            sys::fchmod(fd.as_fd(), mode & 0o777).map_err(EntryError::from_io)?;
        }
        if let Some(owner) = owner {
            sys::fchown(fd.as_fd(), owner.uid, owner.gid).map_err(EntryError::from_io)?;
        }
        let mut file = std::fs::File::from(fd);
        let mut written = 0u64;
        loop {
            let length = match data.read(&mut self.copy_buffer) {
                Ok(0) => break,
                Ok(length) => length,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                // A read error is the archive/body failing: abort the unpack.
                Err(error) => {
                    return Err(EntryError::Fatal(Failure::Archive(
                        sandbox_archive::classify(error),
                    )))
                }
            };
            file.write_all(&self.copy_buffer[..length])
                .map_err(EntryError::from_io)?;
            written += length as u64;
        }
        self.report.files += 1;
        self.report.bytes += written;
        Ok(())
    }

    /// Opens (creating as needed) the directory `components` below the
    /// destination, without following any symlink.
    fn open_dir(&mut self, components: &[Vec<u8>]) -> Result<BorrowedFd<'_>, EntryError> {
        let shared = self
            .open_dirs
            .iter()
            .zip(components)
            .take_while(|((open_name, _), wanted)| open_name == *wanted)
            .count();
        self.open_dirs.truncate(shared);
        for component in &components[shared..] {
            let name = sys::component(component).map_err(EntryError::from_io)?;
            let parent = self
                .open_dirs
                .last()
                .map(|(_, fd)| fd.as_fd())
                .unwrap_or(self.dest.as_fd());
            let fd = match open_child_dir(parent, &name) {
                Ok(fd) => fd,
                Err(error) if sys::errno_is(&error, libc::ENOENT) => {
                    match paths::create_dir(parent, &name, self.owner) {
                        Ok(()) => self.report.dirs += 1,
                        Err(error) if sys::errno_is(&error, libc::EEXIST) => {}
                        Err(error) => return Err(EntryError::from_io(error)),
                    }
                    open_child_dir(parent, &name).map_err(EntryError::from_io)?
                }
                Err(error) => return Err(EntryError::from_io(error)),
            };
            self.open_dirs.push((component.clone(), fd));
        }
        Ok(self
            .open_dirs
            .last()
            .map(|(_, fd)| fd.as_fd())
            .unwrap_or(self.dest.as_fd()))
    }
}

fn open_child_dir(parent: BorrowedFd<'_>, name: &CString) -> io::Result<OwnedFd> {
    sys::openat(
        parent,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// Creates `name` with `mode`, or truncates an existing one, without
/// following a symlink; an existing symlink is replaced by the file (as
/// `tar -x` does). Returns whether the file is new: the common case costs a
/// single `openat`. `O_NONBLOCK` keeps an existing FIFO from blocking us and is
/// harmless on regular files.
fn create_file(
    parent: BorrowedFd<'_>,
    name: &CString,
    mode: u32,
) -> Result<(OwnedFd, bool), EntryError> {
    let create =
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    match sys::openat(parent, name, create, mode) {
        Ok(fd) => return Ok((fd, true)),
        Err(error) if sys::errno_is(&error, libc::EEXIST) => {}
        Err(error) => return Err(EntryError::from_io(error)),
    }
    let truncate = libc::O_WRONLY | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    match sys::openat(parent, name, truncate, 0) {
        Ok(fd) => Ok((fd, false)),
        Err(error) if sys::errno_is(&error, libc::ELOOP) => {
            sys::unlinkat(parent, name, false).map_err(EntryError::from_io)?;
            sys::openat(parent, name, create, mode)
                .map(|fd| (fd, true))
                .map_err(EntryError::from_io)
        }
        Err(error) => Err(EntryError::from_io(error)),
    }
}

/// Entry name → components below the destination: leading `/` stripped,
/// `.` dropped, any `..` rejected.
fn sanitize(name: &[u8]) -> Result<Vec<Vec<u8>>, Skip> {
    let mut components = Vec::new();
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(Skip("name contains ..".into())),
            _ if part.contains(&0) => return Err(Skip("name contains NUL".into())),
            _ => components.push(part.to_vec()),
        }
    }
    Ok(components)
}

enum EntryError {
    Skip(Skip),
    Fatal(Failure),
}

/// Why a whole unpack stopped: the archive (malformed, over a limit, the
/// body cut off) or writing it (a full disk).
enum Failure {
    Archive(ArchiveError),
    Write(io::Error),
}

impl From<Skip> for EntryError {
    fn from(skip: Skip) -> Self {
        EntryError::Skip(skip)
    }
}

impl EntryError {
    /// A full disk or an I/O failure ends the unpack; anything else about one
    /// entry (a symlink in the way, a file where a directory should be,
    /// permissions) skips just that entry.
    fn from_io(error: io::Error) -> Self {
        match error.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EIO | libc::EROFS) => {
                EntryError::Fatal(Failure::Write(error))
            }
            Some(libc::ELOOP) => EntryError::Skip(Skip("path goes through a symlink".into())),
            Some(libc::ENOTDIR) => EntryError::Skip(Skip("a parent is not a directory".into())),
            _ => EntryError::Skip(Skip(error.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_names() {
        assert_eq!(
            sanitize(b"/abs/./x").ok().unwrap(),
            vec![b"abs".to_vec(), b"x".to_vec()]
        );
        assert!(sanitize(b"a/../b").is_err());
        assert!(sanitize(b"./").ok().unwrap().is_empty());
    }
}

//! `GET /files/archive`: a directory packed as a streamed tar.gz, the
//! agent's half of volume commit and snapshot.
//!
//! The walk uses the same descriptor-relative calls as the rest of the file
//! API: every child is opened with `O_NOFOLLOW` under its parent's fd, so a
//! symlink swapped in mid-walk is archived as a link and never followed out
//! of the tree. Only directories, regular files and symlinks are packed
//! (sockets, FIFOs and devices are not volume content), and the walk stays
//! on the starting filesystem, like `tar --one-file-system`, so packing `/`
//! never descends into `/proc` or another mount.
//!
//! A blocking thread writes the archive into a bounded channel that the
//! response body drains: memory stays flat, and a caller that goes away
//! stops the walk at its next write.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use envd_protocol::PathQuery;
use flate2::write::GzEncoder;
use flate2::Compression;
use tokio::sync::mpsc;
use tokio::task::spawn_blocking;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{ApiError, ApiResult};
use crate::extract::QueryParams;
use crate::paths;
use crate::server::AppState;
use crate::sys;

/// Bytes buffered before a chunk goes to the response.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the walker and the connection.
const DEPTH: usize = 8;
/// Directory depth past which the walk stops descending (what a tree can
/// hold is bounded by the consumer's size cap; this bounds the fds held).
const MAX_DEPTH: usize = 256;

pub async fn archive(
    State(state): State<Arc<AppState>>,
    QueryParams(query): QueryParams<PathQuery>,
) -> ApiResult<Response> {
    let clean = paths::clean_path(&query.path);
    // Opened before answering, so a missing path is a 404, not a cut stream.
    let root = {
        let (state, path) = (state.clone(), clean.clone());
        spawn_blocking(move || {
            let dir = state
                .root
                .open(&path, libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(|error| ApiError::from_io(error, &path))?;
            if is_kernel_view(dir.as_fd()) {
                return Err(ApiError::bad_request(format!(
                    "{path}: a kernel filesystem (proc, sysfs, devices), not data"
                )));
            }
            Ok(dir)
        })
        .await??
    };
    let (sender, receiver) = mpsc::channel::<io::Result<Bytes>>(DEPTH);
    spawn_blocking(move || {
        let writer = ChannelWriter {
            sender: sender.clone(),
            buffer: Vec::with_capacity(CHUNK),
        };
        if let Err(error) = pack(root, writer) {
            tracing::warn!(path = %clean, %error, "archive stopped");
            // The body then ends in an error, never in a clean (short) end.
            let _ = sender.blocking_send(Err(error));
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/gzip")],
        Body::from_stream(ReceiverStream::new(receiver)),
    )
        .into_response())
}

/// Whether `dir` is on a pseudo filesystem whose "files" are kernel state
/// (reached, say, through a symlink to `/proc`): never volume content.
fn is_kernel_view(dir: BorrowedFd<'_>) -> bool {
    const KERNEL_FS: [libc::__fsword_t; 9] = [
        libc::PROC_SUPER_MAGIC,
        libc::SYSFS_MAGIC,
        libc::DEVPTS_SUPER_MAGIC,
        libc::DEBUGFS_MAGIC,
        libc::TRACEFS_MAGIC,
        libc::CGROUP_SUPER_MAGIC,
        libc::CGROUP2_SUPER_MAGIC,
        libc::SECURITYFS_MAGIC,
        libc::BPF_FS_MAGIC,
    ];
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a zeroed out-parameter.
    if unsafe { libc::fstatfs(std::os::fd::AsRawFd::as_raw_fd(&dir), &mut fs) } != 0 {
        return false;
    }
    KERNEL_FS.contains(&fs.f_type)
}

fn pack(root: OwnedFd, writer: ChannelWriter) -> io::Result<()> {
    let device = sys::fstat(root.as_fd())?.st_dev;
    let mut builder = tar::Builder::new(GzEncoder::new(writer, Compression::fast()));
    let mut walk = Walk {
        builder: &mut builder,
        device,
    };
    walk.dir(root.as_fd(), "", 0)?;
    builder.into_inner()?.finish()?.flush()
}

struct Walk<'a> {
    builder: &'a mut tar::Builder<GzEncoder<ChannelWriter>>,
    device: libc::dev_t,
}

impl Walk<'_> {
    /// Archives the children of `dir` (whose archive path is `prefix`).
    fn dir(&mut self, dir: BorrowedFd<'_>, prefix: &str, depth: usize) -> io::Result<()> {
        let mut children = sys::read_dir(dir)?;
        children.sort_by(|a, b| a.name.cmp(&b.name));
        for child in children {
            let Ok(name) = String::from_utf8(child.name.clone()) else {
                tracing::warn!("skipping a name that is not UTF-8");
                continue;
            };
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let c_name = sys::component(&child.name)?;
            let stat = match sys::lstatat(dir, &c_name) {
                Ok(stat) => stat,
                Err(error) if sys::errno_is(&error, libc::ENOENT) => continue,
                Err(error) => return Err(error),
            };
            let mut header = tar::Header::new_gnu();
            header.set_mode(stat.st_mode & 0o7777);
            header.set_uid(stat.st_uid as u64);
            header.set_gid(stat.st_gid as u64);
            header.set_mtime(stat.st_mtime.max(0) as u64);
            if sys::is_symlink(&stat) {
                let link = sys::openat(dir, &c_name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                let target = sys::readlink_fd(link.as_fd())?;
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                let target = String::from_utf8_lossy(&target).into_owned();
                self.builder.append_link(&mut header, &path, target)?;
            } else if sys::is_dir(&stat) {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                self.builder
                    .append_data(&mut header, format!("{path}/"), io::empty())?;
                if stat.st_dev != self.device || depth >= MAX_DEPTH {
                    continue; // another filesystem: its mount point only
                }
                let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
                match sys::openat(dir, &c_name, flags, 0) {
                    Ok(child_dir) => self.dir(child_dir.as_fd(), &path, depth + 1)?,
                    Err(error) if sys::errno_is(&error, libc::ENOENT) => {}
                    Err(error) => return Err(error),
                }
            } else if sys::is_regular(&stat) {
                self.file(dir, &c_name, &path, header)?;
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &std::ffi::CStr,
        path: &str,
        mut header: tar::Header,
    ) -> io::Result<()> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let fd = match sys::openat(dir, name, flags, 0) {
            Ok(fd) => fd,
            Err(error) if sys::errno_is(&error, libc::ENOENT) => return Ok(()),
            Err(error) => return Err(error),
        };
        let stat = sys::fstat(fd.as_fd())?;
        if !sys::is_regular(&stat) {
            return Ok(()); // swapped for something else since the listing
        }
        let size = stat.st_size.max(0) as u64;
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        // A file that changes size while packed must not break the archive:
        // exactly `size` bytes go in, zero-padded if it shrank.
        let file = io::Read::take(std::fs::File::from(fd), size);
        let padded = io::Read::take(io::Read::chain(file, io::repeat(0)), size);
        self.builder.append_data(&mut header, path, padded)
    }
}

/// `Write` into the response channel, in `CHUNK`-sized pieces.
struct ChannelWriter {
    sender: mpsc::Sender<io::Result<Bytes>>,
    buffer: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(CHUNK),
        ));
        self.sender
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the caller went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

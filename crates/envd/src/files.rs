//! File endpoints: streamed write and read, list, stat, exists, mkdir -p,
//! remove and rename. Filesystem work runs on blocking threads; every path
//! goes through [`SandboxRoot`] so nothing escapes the root.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use envd_protocol::{
    Empty, EntryInfo, ExistsResponse, FileType, ListQuery, MkdirRequest, MkdirResponse, PathQuery,
    RenameRequest, WriteInfo, WriteQuery,
};
use tokio::task::spawn_blocking;
use tokio_util::io::ReaderStream;

use crate::body::{self, BodyReader};
use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, QueryParams};
use crate::paths::{self, ResolveOptions, SandboxRoot};
use crate::server::AppState;
use crate::sys;

/// Read chunk size of streamed downloads.
const READ_CHUNK: usize = 256 * 1024;
/// Upper bound of entries returned by one list call.
const MAX_LIST_ENTRIES: usize = 100_000;

/// Permission bits kept on written files: no setuid, setgid or sticky.
const FILE_MODE_MASK: u32 = 0o777;

pub async fn write(
    State(state): State<Arc<AppState>>,
    QueryParams(query): QueryParams<WriteQuery>,
    request_body: Body,
) -> ApiResult<Json<WriteInfo>> {
    let (sender, reader) = body::channel();
    let worker = spawn_blocking(move || write_blocking(&state, &query, reader));
    let (_, result) = tokio::join!(body::pump(request_body, sender), worker);
    Ok(Json(result??))
}

fn write_blocking(
    state: &AppState,
    query: &WriteQuery,
    mut reader: BodyReader,
) -> ApiResult<WriteInfo> {
    let clean = paths::clean_path(&query.path);
    let io_error = |error| ApiError::from_io(error, &clean);
    let user = state.users.lookup(&state.root, &query.username)?;
    let owner = state.users.ownership(&user);
    let options = ResolveOptions {
        follow_last: true,
        create_parents: true,
        owner,
    };
    let resolved = state.root.resolve(&query.path, options).map_err(io_error)?;
    let name = resolved
        .name
        .ok_or_else(|| ApiError::bad_request(format!("{clean}: is a directory")))?;
    // O_NONBLOCK: opening a planted FIFO must fail (ENXIO), not hang.
    let flags =
        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let fd = sys::openat(resolved.dir.as_fd(), &name, flags, 0o644).map_err(io_error)?; // umask is 0
    let stat = sys::fstat(fd.as_fd()).map_err(io_error)?;
    if !sys::is_regular(&stat) {
        return Err(ApiError::bad_request(format!(
            "{clean}: not a regular file"
        )));
    }
    sys::set_blocking(fd.as_fd()).map_err(io_error)?;
    if let Some(owner) = owner {
        sys::fchown(fd.as_fd(), owner.uid, owner.gid).map_err(io_error)?;
    }
    if let Some(mode) = query.mode {
        sys::fchmod(fd.as_fd(), mode & FILE_MODE_MASK).map_err(io_error)?;
    }
    let mut file = std::fs::File::from(fd);
    let mut size = 0u64;
    while let Some(chunk) = reader.next_chunk().map_err(io_error)? {
        file.write_all(&chunk).map_err(io_error)?;
        size += chunk.len() as u64;
    }
    tracing::debug!(path = %clean, size, "file written");
    Ok(WriteInfo { path: clean, size })
}

pub async fn read(
    State(state): State<Arc<AppState>>,
    QueryParams(query): QueryParams<PathQuery>,
) -> ApiResult<Response> {
    let clean = paths::clean_path(&query.path);
    let path = clean.clone();
    let file = spawn_blocking(move || -> ApiResult<std::fs::File> {
        let io_error = |error| ApiError::from_io(error, &path);
        let fd = state
            .root
            .open(&path, libc::O_RDONLY | libc::O_NONBLOCK)
            .map_err(io_error)?;
        let stat = sys::fstat(fd.as_fd()).map_err(io_error)?;
        if sys::is_dir(&stat) {
            return Err(ApiError::from_io(
                std::io::Error::from_raw_os_error(libc::EISDIR),
                &path,
            ));
        }
        if !sys::is_regular(&stat) {
            return Err(ApiError::bad_request(format!("{path}: not a regular file")));
        }
        sys::set_blocking(fd.as_fd()).map_err(io_error)?;
        Ok(std::fs::File::from(fd))
    })
    .await??;
    let stream = ReaderStream::with_capacity(tokio::fs::File::from_std(file), READ_CHUNK);
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    QueryParams(query): QueryParams<ListQuery>,
) -> ApiResult<Json<Vec<EntryInfo>>> {
    let entries = spawn_blocking(move || {
        let clean = paths::clean_path(&query.path);
        let io_error = |error| ApiError::from_io(error, &clean);
        let dir = state
            .root
            .open(&clean, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(io_error)?;
        let mut entries = Vec::new();
        list_into(
            &state.root,
            dir.as_fd(),
            &clean,
            query.depth.max(1),
            &mut entries,
        )
        .map_err(io_error)?;
        Ok::<_, ApiError>(entries)
    })
    .await??;
    Ok(Json(entries))
}

fn list_into(
    root: &SandboxRoot,
    dir: BorrowedFd<'_>,
    dir_path: &str,
    depth: u32,
    out: &mut Vec<EntryInfo>,
) -> std::io::Result<()> {
    let mut children = sys::read_dir(dir)?;
    children.sort_by(|a, b| a.name.cmp(&b.name));
    for child in children {
        if out.len() >= MAX_LIST_ENTRIES {
            return Ok(());
        }
        let name = String::from_utf8_lossy(&child.name).into_owned();
        let path = paths::join(dir_path, &name);
        let c_name = sys::component(&child.name)?;
        let stat = match sys::lstatat(dir, &c_name) {
            Ok(stat) => stat,
            // Removed while we were listing.
            Err(error) if sys::errno_is(&error, libc::ENOENT) => continue,
            Err(error) => return Err(error),
        };
        if sys::is_symlink(&stat) {
            // Report a link as what it points to (resolved inside the root).
            match root.stat(&path) {
                Ok((target, _)) => out.push(entry_info(name, path, &target, true)),
                Err(_) => out.push(EntryInfo {
                    size: 0,
                    ..entry_info(name, path, &stat, true)
                }),
            }
            continue;
        }
        let is_dir = sys::is_dir(&stat);
        out.push(entry_info(name, path.clone(), &stat, false));
        if is_dir && depth > 1 {
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            if let Ok(child_dir) = sys::openat(dir, &c_name, flags, 0) {
                list_into(root, child_dir.as_fd(), &path, depth - 1, out)?;
            }
        }
    }
    Ok(())
}

fn entry_info(name: String, path: String, stat: &sys::Stat, is_symlink: bool) -> EntryInfo {
    let is_dir = sys::is_dir(stat);
    EntryInfo {
        name,
        path,
        file_type: if is_dir {
            FileType::Dir
        } else {
            FileType::File
        },
        size: if is_dir { 0 } else { stat.st_size as u64 },
        mode: stat.st_mode & 0o7777,
        mtime: stat.st_mtime,
        is_symlink,
    }
}

fn stat_blocking(root: &SandboxRoot, path: &str) -> std::io::Result<EntryInfo> {
    let clean = paths::clean_path(path);
    let (stat, is_symlink) = root.stat(&clean)?;
    Ok(entry_info(
        paths::file_name(&clean),
        clean,
        &stat,
        is_symlink,
    ))
}

pub async fn stat(
    State(state): State<Arc<AppState>>,
    QueryParams(query): QueryParams<PathQuery>,
) -> ApiResult<Json<EntryInfo>> {
    let info = spawn_blocking(move || {
        stat_blocking(&state.root, &query.path)
            .map_err(|e| ApiError::from_io(e, &paths::clean_path(&query.path)))
    })
    .await??;
    Ok(Json(info))
}

pub async fn exists(
    State(state): State<Arc<AppState>>,
    QueryParams(query): QueryParams<PathQuery>,
) -> ApiResult<Json<ExistsResponse>> {
    let exists = spawn_blocking(move || match state.root.stat(&query.path) {
        Ok(_) => Ok(true),
        Err(error)
            if matches!(
                error.raw_os_error(),
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
            ) =>
        {
            Ok(false)
        }
        Err(error) => Err(ApiError::from_io(error, &paths::clean_path(&query.path))),
    })
    .await??;
    Ok(Json(ExistsResponse { exists }))
}

pub async fn mkdir(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<MkdirRequest>,
) -> ApiResult<Json<MkdirResponse>> {
    let created = spawn_blocking(move || {
        let user = state.users.lookup(&state.root, &request.username)?;
        let owner = state.users.ownership(&user);
        state
            .root
            .mkdir_all(&request.path, owner)
            .map_err(|e| ApiError::from_io(e, &paths::clean_path(&request.path)))
    })
    .await??;
    Ok(Json(MkdirResponse { created }))
}

pub async fn remove(
    State(state): State<Arc<AppState>>,
    QueryParams(query): QueryParams<PathQuery>,
) -> ApiResult<Json<Empty>> {
    spawn_blocking(move || {
        let clean = paths::clean_path(&query.path);
        let io_error = |error| ApiError::from_io(error, &clean);
        let resolved = state
            .root
            .resolve(&query.path, ResolveOptions::default())
            .map_err(io_error)?;
        let name = resolved
            .name
            .ok_or_else(|| ApiError::bad_request(format!("{clean}: refusing to remove")))?;
        remove_entry(resolved.dir.as_fd(), &name).map_err(io_error)
    })
    .await??;
    Ok(Json(Empty {}))
}

/// Removes `name` in `dir`, recursively for directories, never following
/// symlinks (a link is removed, not its target).
fn remove_entry(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> std::io::Result<()> {
    let stat = sys::lstatat(dir, name)?;
    if !sys::is_dir(&stat) {
        return sys::unlinkat(dir, name, false);
    }
    let child = sys::openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    for entry in sys::read_dir(child.as_fd())? {
        let entry_name = sys::component(&entry.name)?;
        match remove_entry(child.as_fd(), &entry_name) {
            Err(error) if sys::errno_is(&error, libc::ENOENT) => {}
            other => other?,
        }
    }
    sys::unlinkat(dir, name, true)
}

pub async fn rename(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<RenameRequest>,
) -> ApiResult<Json<EntryInfo>> {
    let info = spawn_blocking(move || {
        let old_clean = paths::clean_path(&request.old_path);
        let new_clean = paths::clean_path(&request.new_path);
        let old = state
            .root
            .resolve(&request.old_path, ResolveOptions::default())
            .map_err(|e| ApiError::from_io(e, &old_clean))?;
        let new = state
            .root
            .resolve(&request.new_path, ResolveOptions::default())
            .map_err(|e| ApiError::from_io(e, &new_clean))?;
        let (Some(old_name), Some(new_name)) = (old.name, new.name) else {
            return Err(ApiError::bad_request("cannot rename the root"));
        };
        sys::renameat(old.dir.as_fd(), &old_name, new.dir.as_fd(), &new_name)
            .map_err(|e| ApiError::from_io(e, &old_clean))?;
        stat_blocking(&state.root, &new_clean).map_err(|e| ApiError::from_io(e, &new_clean))
    })
    .await??;
    Ok(Json(info))
}

//! Paths of every envd endpoint. Query parameters are described by the
//! `*Query` types in [`crate::types`].

/// `GET` → [`crate::Health`]. The only endpoint that needs no token.
pub const HEALTH: &str = "/health";
/// `POST` [`crate::InitRequest`] → [`crate::Empty`]; no token: accepted
/// once, by an agent started without one (see [`crate::InitRequest`]).
pub const INIT: &str = "/init";
/// `PUT` (streamed write, body = raw bytes, query [`crate::WriteQuery`]) → [`crate::WriteInfo`];
/// `GET` (streamed read, query [`crate::PathQuery`]) → raw bytes;
/// `DELETE` (recursive remove, query [`crate::PathQuery`]) → [`crate::Empty`].
pub const FILES: &str = "/files";
/// `GET`, query [`crate::ListQuery`] → `Vec<`[`crate::EntryInfo`]`>`.
pub const FILES_LIST: &str = "/files/list";
/// `GET`, query [`crate::PathQuery`] → [`crate::EntryInfo`].
pub const FILES_STAT: &str = "/files/stat";
/// `GET`, query [`crate::PathQuery`] → [`crate::ExistsResponse`].
pub const FILES_EXISTS: &str = "/files/exists";
/// `POST` [`crate::MkdirRequest`] → [`crate::MkdirResponse`].
pub const FILES_MKDIR: &str = "/files/mkdir";
/// `POST` [`crate::RenameRequest`] → [`crate::EntryInfo`] of the new path.
pub const FILES_RENAME: &str = "/files/rename";
/// `POST`, query [`crate::UnpackQuery`], body = tar stream (optionally
/// `Content-Encoding: gzip`) → [`crate::UnpackReport`].
pub const FILES_UNPACK: &str = "/files/unpack";
/// `GET`, query [`crate::PathQuery`] → the directory's tree as a tar.gz
/// stream (directories, regular files and symlinks; one filesystem), as the
/// agent's root sees it (protocol 3).
pub const FILES_ARCHIVE: &str = "/files/archive";
/// `GET` → [`crate::Usage`]: what the sandbox uses, as its own kernel
/// counts it (protocol 3).
pub const USAGE: &str = "/usage";
/// `POST` [`crate::BlockMountRequest`] → [`crate::Empty`] (protocol 2).
pub const VOLUMES_BLOCK_MOUNT: &str = "/volumes/block/mount";
/// `POST` [`crate::BlockUnmountRequest`] → [`crate::Empty`] (protocol 2).
pub const VOLUMES_BLOCK_UNMOUNT: &str = "/volumes/block/unmount";
/// `PUT` [`crate::SetEnvRequest`] → [`crate::Empty`]: replaces the sandbox env
/// every later process starts with (under the request's own `envs`).
pub const ENV: &str = "/env";
/// `GET` → `Vec<`[`crate::ProcessInfo`]`>` of tracked background processes.
pub const PROCESSES: &str = "/processes";
/// `POST` [`crate::ProcessRequest`] → [`crate::RunResult`] (foreground).
pub const PROCESSES_RUN: &str = "/processes/run";
/// `POST` [`crate::ProcessRequest`] → [`crate::StartedProcess`] (background).
pub const PROCESSES_START: &str = "/processes/start";
/// `POST` [`crate::ProcessRequest`] → newline-delimited JSON
/// [`crate::ProcessEvent`]s, ending with [`crate::ProcessEvent::Exit`].
pub const PROCESSES_STREAM: &str = "/processes/stream";

/// `POST` [`crate::PtyRequest`] → [`crate::StartedProcess`] (protocol 3).
/// Input goes through [`process_stdin`], the kill through [`process`].
pub const PTY: &str = "/pty";

/// `GET /pty/{pid}/stream` → newline-delimited [`crate::PtyEvent`]s.
pub fn pty_stream(pid: u32) -> String {
    format!("/pty/{pid}/stream")
}
/// `POST /pty/{pid}/resize` [`crate::PtySize`] → [`crate::Empty`].
pub fn pty_resize(pid: u32) -> String {
    format!("/pty/{pid}/resize")
}
/// `POST /processes/{pid}/wait` → [`crate::RunResult`].
pub fn process_wait(pid: u32) -> String {
    format!("/processes/{pid}/wait")
}
/// `POST /processes/{pid}/stdin` [`crate::StdinRequest`] → [`crate::Empty`].
pub fn process_stdin(pid: u32) -> String {
    format!("/processes/{pid}/stdin")
}
/// `POST /processes/{pid}/stdin/close` → [`crate::Empty`].
pub fn process_close_stdin(pid: u32) -> String {
    format!("/processes/{pid}/stdin/close")
}
/// `DELETE /processes/{pid}` → [`crate::KillResponse`]; kills the whole
/// process group.
pub fn process(pid: u32) -> String {
    format!("/processes/{pid}")
}

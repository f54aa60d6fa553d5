//! Request and response bodies of every envd endpoint.
//!
//! Rules that keep older agents and newer hosts talking:
//! - new fields are optional (`#[serde(default)]`) and never renamed;
//! - unknown fields are ignored on both sides;
//! - `tests/snapshots/v1.json` freezes the shapes of protocol version 1.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// User every template has; files and processes default to it.
pub const DEFAULT_USER: &str = "user";
/// Default foreground/background process timeout, in seconds (0 = none).
pub const DEFAULT_PROCESS_TIMEOUT_SECS: u64 = 60;
/// Exit code reported for a process killed by its timeout (as `timeout(1)`).
pub const TIMEOUT_EXIT_CODE: i32 = 124;

fn default_user() -> String {
    DEFAULT_USER.to_string()
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always `"ok"` when the agent answers.
    pub status: String,
    pub protocol_version: u32,
    /// Version of the envd binary (crate version).
    pub version: String,
    /// False when envd runs unprivileged: every process then runs as envd's
    /// own uid whatever user was asked for, and file ownership is not changed.
    #[serde(default = "default_true")]
    pub can_switch_users: bool,
}

/// `GET /usage`: cumulative CPU time and current memory and disk use, as
/// seen from inside (a VM's own kernel; in a container, `/proc` is the
/// host's, so the host reads CPU and memory from the cgroup instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Busy CPU time of all CPUs since boot, in microseconds.
    pub cpu_busy_usec: u64,
    pub cpu_count: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// Of the filesystem holding `/`.
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
}

fn default_true() -> bool {
    true
}

/// Error body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    /// Stable machine-readable code, see [`error_code`].
    pub code: String,
}

/// Stable values of [`ErrorBody::code`] and the HTTP status each goes with.
pub mod error_code {
    /// 400
    pub const BAD_REQUEST: &str = "bad_request";
    /// 400: the named user is not in the sandbox's `/etc/passwd`.
    pub const UNKNOWN_USER: &str = "unknown_user";
    /// 400: a directory was given where a file is needed.
    pub const IS_A_DIRECTORY: &str = "is_a_directory";
    /// 400: a file was given where a directory is needed.
    pub const NOT_A_DIRECTORY: &str = "not_a_directory";
    /// 401
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// 403
    pub const PERMISSION_DENIED: &str = "permission_denied";
    /// 404: missing path or unknown pid.
    pub const NOT_FOUND: &str = "not_found";
    /// 409
    pub const CONFLICT: &str = "conflict";
    /// 507
    pub const DISK_FULL: &str = "disk_full";
    /// 500
    pub const INTERNAL: &str = "internal";
}

/// Kind of a filesystem entry. Symlinks are reported as the kind of their
/// target (a dangling link as `file`), because the public API only knows
/// these two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    File,
    Dir,
}

/// `GET /files/stat`, items of `GET /files/list`, `POST /files/rename`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    pub name: String,
    /// Absolute path inside the sandbox.
    pub path: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    /// Bytes; 0 for directories.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// True when the entry itself is a symbolic link.
    #[serde(default)]
    pub is_symlink: bool,
}

/// Query of read, remove, stat and exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathQuery {
    pub path: String,
    #[serde(default = "default_user")]
    pub username: String,
}

/// Query of `GET /files/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListQuery {
    pub path: String,
    #[serde(default = "default_user")]
    pub username: String,
    /// 1 = immediate children only (the default).
    #[serde(default = "default_depth")]
    pub depth: u32,
}

fn default_depth() -> u32 {
    1
}

/// Query of `PUT /files` (streamed write).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteQuery {
    pub path: String,
    /// Owner of the file and of any parent directory the write creates.
    #[serde(default = "default_user")]
    pub username: String,
    /// Permission bits for the file, e.g. `0o644`. Setuid/setgid are dropped.
    #[serde(default)]
    pub mode: Option<u32>,
}

/// `PUT /files` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteInfo {
    pub path: String,
    pub size: u64,
}

/// `GET /files/exists` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExistsResponse {
    pub exists: bool,
}

/// `POST /files/mkdir` (always `mkdir -p`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirRequest {
    pub path: String,
    #[serde(default = "default_user")]
    pub username: String,
}

/// `POST /files/mkdir` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirResponse {
    /// False when the directory already existed.
    pub created: bool,
}

/// `POST /files/rename`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRequest {
    pub old_path: String,
    pub new_path: String,
    #[serde(default = "default_user")]
    pub username: String,
}

/// Query of `POST /files/unpack`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackQuery {
    /// Destination directory; created (`mkdir -p`) when missing.
    pub path: String,
    /// Owner of every file and directory the unpack creates.
    #[serde(default = "default_user")]
    pub username: String,
    /// Archive limits (added in v1, all optional): each one given replaces
    /// envd's default for this unpack. Most bytes of file data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// Most entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_entries: Option<u64>,
    /// Longest name, link or PAX record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<u64>,
    /// Gunzip expansion-ratio guard; 0 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ratio: Option<u64>,
}

/// Archive limits a caller asks envd to apply to one unpack; absent ones
/// keep envd's defaults. envd guards the sandbox it runs in; the host is
/// guarded by the caller, which checked the archive at upload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackLimits {
    pub max_bytes: Option<u64>,
    pub max_entries: Option<u64>,
    pub max_header_bytes: Option<u64>,
    pub max_ratio: Option<u64>,
}

/// An archive entry that unpack did not write, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedEntry {
    pub name: String,
    pub reason: String,
}

/// `POST /files/unpack` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackReport {
    /// Regular files written.
    pub files: u64,
    /// Directories created below the destination.
    pub dirs: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Entries not written (symlinks, hardlinks, devices, fifos, `..`, ...).
    pub skipped: u64,
    /// The first skipped entries (bounded), with reasons.
    pub skipped_entries: Vec<SkippedEntry>,
}

/// `POST /volumes/block/mount` (protocol 2; VM agents only): mounts the
/// guest's block device whose virtio serial is `serial` (ext4) on `path`,
/// an existing directory. The host has just given that device new
/// content, so the agent first waits until the device shows `size_bytes`
/// and drops whatever the guest cached of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMountRequest {
    pub serial: String,
    pub path: String,
    pub size_bytes: u64,
    /// A filesystem just made on the host: its root becomes `username`'s
    /// and its `lost+found` goes, so it looks like a directory the agent
    /// made.
    #[serde(default)]
    pub fresh: bool,
    #[serde(default = "default_user")]
    pub username: String,
}

/// `POST /volumes/block/unmount` (protocol 2; VM agents only): syncs and
/// unmounts the filesystem mounted on `path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockUnmountRequest {
    pub path: String,
}

/// Empty JSON object `{}`, returned where there is nothing to say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// `PUT /env`: the sandbox-level environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetEnvRequest {
    pub envs: BTreeMap<String, String>,
}

/// Body of `POST /processes/{run,start,stream}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRequest {
    /// Run as `/bin/sh -c CMD`.
    pub cmd: String,
    #[serde(default = "default_user")]
    pub user: String,
    /// Working directory; defaults to the user's home.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Merged over the sandbox env.
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    /// Seconds; `None` = [`DEFAULT_PROCESS_TIMEOUT_SECS`], `Some(0)` = none.
    #[serde(default)]
    pub timeout: Option<u64>,
    /// Give the process a stdin pipe (`/processes/start` only); otherwise
    /// stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
}

impl ProcessRequest {
    /// A request with defaults: user `user`, home cwd, 60 s timeout.
    pub fn new(cmd: impl Into<String>) -> Self {
        Self {
            cmd: cmd.into(),
            user: default_user(),
            cwd: None,
            envs: BTreeMap::new(),
            timeout: None,
            stdin: false,
        }
    }
}

/// Foreground result (`/processes/run`) and `/processes/{pid}/wait`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    /// Lossy UTF-8 of everything captured (bounded, see `*_truncated`).
    pub stdout: String,
    pub stderr: String,
    /// Exit status; `128 + signal` for a signal; [`TIMEOUT_EXIT_CODE`] on timeout.
    pub exit_code: i32,
    #[serde(default)]
    pub timed_out: bool,
    /// The capture buffer was full and later output was dropped.
    #[serde(default)]
    pub stdout_truncated: bool,
    #[serde(default)]
    pub stderr_truncated: bool,
}

/// `/processes/start` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedProcess {
    pub pid: u32,
}

/// Item of `GET /processes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub cmd: String,
    /// Only the envs given in the request (not the inherited sandbox env).
    pub envs: BTreeMap<String, String>,
    pub user: String,
    pub cwd: String,
    /// Still running (false: exited, waiting for someone to collect it).
    pub running: bool,
}

/// `POST /processes/{pid}/stdin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdinRequest {
    pub data: String,
    /// `data` is base64 of raw bytes instead of text.
    #[serde(default)]
    pub base64: bool,
}

/// `DELETE /processes/{pid}` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillResponse {
    /// False when the pid is not tracked.
    pub killed: bool,
}

/// Terminal size of a pseudo-terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub cols: u16,
    pub rows: u16,
}

/// `POST /pty`: a login shell on a new pseudo-terminal (protocol 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyRequest {
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    pub size: PtySize,
    /// Seconds; `None` = [`DEFAULT_PROCESS_TIMEOUT_SECS`], `Some(0)` = none.
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// One line of `GET /pty/{pid}/stream` (newline-delimited JSON). Output
/// produced before the first listener attached is sent to it first (up to
/// 64 KiB); later listeners get output from the moment they attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PtyEvent {
    /// Raw terminal output, base64.
    Data {
        data: String,
    },
    Keepalive,
    /// Last event.
    Exit {
        exit_code: i32,
    },
}

/// One line of the `/processes/stream` response (newline-delimited JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProcessEvent {
    /// First event: the process started.
    Start {
        pid: u32,
    },
    /// A chunk of stdout, lossily decoded (multi-byte characters split
    /// across reads are kept whole).
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    /// Sent when there was no other event for a while (at least every 15 s).
    Keepalive,
    /// Last event.
    Exit {
        exit_code: i32,
        #[serde(default)]
        timed_out: bool,
    },
    /// The agent failed while streaming (the process may still be running).
    Error {
        message: String,
    },
}

/// `POST /init`: the one-time hand-over to an agent that started without a
/// token (a VM restored from a template snapshot: every clone wakes up with
/// the same memory, so per-sandbox state arrives here, never on a command
/// line). Accepted once; later calls get 409.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitRequest {
    /// The access token every later call must carry.
    pub token: String,
    /// Wall-clock time to set, in nanoseconds since the Unix epoch (a
    /// restored guest's clock still says when the snapshot was taken).
    #[serde(default)]
    pub unix_time_ns: Option<u64>,
    /// Fresh randomness (base64) mixed into the kernel's pool, which then
    /// reseeds, so clones of one snapshot do not share random streams.
    #[serde(default)]
    pub entropy: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
}

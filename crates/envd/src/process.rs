//! Processes: `/bin/sh -c CMD` as a sandbox user, foreground, background or
//! streamed. Every process leads its own session (setsid), so a kill or a
//! timeout takes down its whole tree. Output is captured in bounded buffers
//! (truncation is reported) and/or forwarded as events for streaming.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use envd_protocol::{
    ProcessInfo, ProcessRequest, RunResult, DEFAULT_PROCESS_TIMEOUT_SECS, TIMEOUT_EXIT_CODE,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStdin, Command};
use tokio::sync::{mpsc, watch};

use crate::error::{ApiError, ApiResult};
use crate::paths::SandboxRoot;
use crate::reaper::Reaper;
use crate::users::Users;

/// Size of one read from a child's pipe.
const PIPE_READ_CHUNK: usize = 64 * 1024;
/// After the shell exits, how long to wait for its pipes to close: a
/// daemonised grandchild may hold them open forever.
const OUTPUT_DRAIN_GRACE: Duration = Duration::from_secs(2);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A piece of output, for streaming.
pub struct OutputChunk {
    pub stream: OutputStream,
    pub data: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub exit_code: i32,
    pub timed_out: bool,
}

/// Capture buffer that stops growing at its limit and remembers it did.
struct BoundedBuffer {
    data: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl BoundedBuffer {
    fn new(limit: usize) -> Self {
        Self {
            data: Vec::new(),
            limit,
            truncated: false,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.data.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

struct Captured {
    stdout: BoundedBuffer,
    stderr: BoundedBuffer,
}

/// A process envd started and still tracks.
pub struct Tracked {
    pub pid: u32,
    cmd: String,
    envs: BTreeMap<String, String>,
    user: String,
    cwd: String,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    captured: Option<Arc<Mutex<Captured>>>,
    outcome: watch::Receiver<Option<Outcome>>,
    /// The terminal of a process started on a pseudo-terminal.
    pub pty: Option<Arc<crate::pty::Terminal>>,
}

impl Tracked {
    pub fn outcome_now(&self) -> Option<Outcome> {
        *self.outcome.borrow()
    }

    /// Resolves when the process has exited and its output is collected.
    pub async fn wait(&self) -> Outcome {
        let mut receiver = self.outcome.clone();
        loop {
            if let Some(outcome) = *receiver.borrow_and_update() {
                return outcome;
            }
            if receiver.changed().await.is_err() {
                // The waiter task is gone without a result (runtime shutdown).
                return Outcome {
                    exit_code: -1,
                    timed_out: false,
                };
            }
        }
    }

    /// Output captured so far plus `outcome`.
    pub fn result(&self, outcome: Outcome) -> RunResult {
        let (stdout, stderr, stdout_truncated, stderr_truncated) = match &self.captured {
            Some(captured) => {
                let captured = captured.lock().unwrap_or_else(|p| p.into_inner());
                (
                    String::from_utf8_lossy(&captured.stdout.data).into_owned(),
                    String::from_utf8_lossy(&captured.stderr.data).into_owned(),
                    captured.stdout.truncated,
                    captured.stderr.truncated,
                )
            }
            None => Default::default(),
        };
        RunResult {
            stdout,
            stderr,
            exit_code: outcome.exit_code,
            timed_out: outcome.timed_out,
            stdout_truncated,
            stderr_truncated,
        }
    }

    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.pid,
            cmd: self.cmd.clone(),
            envs: self.envs.clone(),
            user: self.user.clone(),
            cwd: self.cwd.clone(),
            running: self.outcome_now().is_none(),
        }
    }

    /// SIGKILL to the process group, unless the process was already reaped
    /// (its pid may belong to someone else by now).
    pub fn kill_group(&self) {
        if self.outcome_now().is_none() {
            kill_group(self.pid, libc::SIGKILL);
        }
    }

    pub async fn write_stdin(&self, data: &[u8]) -> ApiResult<()> {
        if let Some(terminal) = &self.pty {
            return terminal.write_input(data).await;
        }
        let mut stdin = self.stdin.lock().await;
        let pipe = stdin.as_mut().ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::CONFLICT,
                envd_protocol::error_code::CONFLICT,
                "stdin is closed or was not requested",
            )
        })?;
        let result = async {
            pipe.write_all(data).await?;
            pipe.flush().await
        }
        .await;
        result.map_err(|e| ApiError::from_io(e, &format!("stdin of {}", self.pid)))
    }

    pub async fn close_stdin(&self) {
        self.stdin.lock().await.take();
    }
}

fn kill_group(pid: u32, signal: libc::c_int) {
    // SAFETY: plain syscall; a negative pid addresses the process group.
    unsafe { libc::kill(-(pid as libc::pid_t), signal) };
}

/// How a process is started.
pub struct SpawnOptions {
    /// Keep output in bounded buffers (for run/wait).
    pub capture: bool,
    /// Forward output chunks here (for streaming).
    pub events: Option<mpsc::Sender<OutputChunk>>,
    /// Give the process a stdin pipe.
    pub stdin: bool,
    /// Stop tracking once it exits (foreground and streamed processes).
    pub forget_on_exit: bool,
    /// Run on a new pseudo-terminal of this size (its stdin, stdout and
    /// stderr, and its controlling terminal) instead of pipes.
    pub pty: Option<envd_protocol::PtySize>,
}

pub struct ProcessManager {
    table: Arc<Mutex<HashMap<u32, Arc<Tracked>>>>,
    sandbox_env: RwLock<BTreeMap<String, String>>,
    max_output: usize,
    reaper: Arc<Reaper>,
}

impl ProcessManager {
    pub fn new(
        sandbox_env: BTreeMap<String, String>,
        max_output: usize,
        reaper: Arc<Reaper>,
    ) -> Self {
        Self {
            table: Default::default(),
            sandbox_env: RwLock::new(sandbox_env),
            max_output,
            reaper,
        }
    }

    pub fn set_sandbox_env(&self, envs: BTreeMap<String, String>) {
        *self.sandbox_env.write().unwrap_or_else(|p| p.into_inner()) = envs;
    }

    pub fn get(&self, pid: u32) -> Option<Arc<Tracked>> {
        self.lock_table().get(&pid).cloned()
    }

    pub fn forget(&self, pid: u32) {
        self.lock_table().remove(&pid);
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut list: Vec<ProcessInfo> = self.lock_table().values().map(|t| t.info()).collect();
        list.sort_by_key(|info| info.pid);
        list
    }

    /// Kills the process group of a tracked pid and stops tracking it.
    pub fn kill(&self, pid: u32) -> bool {
        match self.lock_table().remove(&pid) {
            Some(tracked) => {
                tracked.kill_group();
                tracing::info!(pid, "process killed");
                true
            }
            None => false,
        }
    }

    fn lock_table(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Tracked>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn spawn(
        &self,
        root: &SandboxRoot,
        users: &Users,
        request: &ProcessRequest,
        options: SpawnOptions,
    ) -> ApiResult<Arc<Tracked>> {
        let user = users.lookup(root, &request.user)?;
        let cwd = request
            .cwd
            .clone()
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| user.home.clone());
        let host_cwd = root.host_path(&cwd);
        if !host_cwd.is_dir() {
            return Err(ApiError::bad_request(format!(
                "working directory {cwd} does not exist"
            )));
        }

        let mut env = self
            .sandbox_env
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        env.insert(
            "HOME".into(),
            root.host_path(&user.home).to_string_lossy().into_owned(),
        );
        env.insert("USER".into(), user.name.clone());
        env.insert("LOGNAME".into(), user.name.clone());
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.into());
        if options.pty.is_some() {
            env.insert("TERM".into(), "xterm-256color".into());
        }
        env.extend(request.envs.clone());
        let terminal = options
            .pty
            .map(crate::pty::Terminal::open)
            .transpose()
            .map_err(|e| ApiError::internal(format!("cannot open a pseudo-terminal: {e}")))?;

        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(&request.cmd)
            .current_dir(&host_cwd)
            .env_clear()
            .envs(&env);
        match &terminal {
            Some((_, secondary)) => {
                let stdio = || secondary.try_clone().map(Stdio::from);
                let clone_failed = |e| ApiError::internal(format!("pseudo-terminal: {e}"));
                command
                    .stdin(stdio().map_err(clone_failed)?)
                    .stdout(stdio().map_err(clone_failed)?)
                    .stderr(stdio().map_err(clone_failed)?);
            }
            None => {
                command
                    .stdin(if options.stdin {
                        Stdio::piped()
                    } else {
                        Stdio::null()
                    })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            }
        }
        let controlling_terminal = terminal.is_some();
        let switch_to = users
            .can_switch()
            .then(|| (user.uid, user.gid, user.groups.clone()));
        // SAFETY: the closure only makes async-signal-safe syscalls on data
        // prepared before fork.
        unsafe {
            command.pre_exec(move || {
                libc::umask(0o022);
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The new session's controlling terminal: its stdin.
                if controlling_terminal && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some((uid, gid, groups)) = &switch_to {
                    if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                        || libc::setgid(*gid) < 0
                        || libc::setuid(*uid) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }

        let mut child = {
            let mut owned = self.reaper.lock();
            let child = command
                .spawn()
                .map_err(|e| ApiError::internal(format!("cannot start /bin/sh: {e}")))?;
            if let Some(pid) = child.id() {
                owned.register(pid);
            }
            child
        };
        let pid = child
            .id()
            .ok_or_else(|| ApiError::internal("process exited before it was tracked"))?;

        let captured = options.capture.then(|| {
            Arc::new(Mutex::new(Captured {
                stdout: BoundedBuffer::new(self.max_output),
                stderr: BoundedBuffer::new(self.max_output),
            }))
        });
        // The child holds the terminal's secondary side now; ours must go,
        // or the primary never sees the end of the session.
        let terminal = terminal.map(|(terminal, secondary)| {
            drop(secondary);
            Arc::new(terminal)
        });
        let (stdout_task, stderr_task) = match &terminal {
            Some(terminal) => (
                tokio::spawn(terminal.clone().pump_output()),
                tokio::spawn(async {}),
            ),
            None => (
                tokio::spawn(pump_output(
                    child.stdout.take().expect("stdout is piped"),
                    OutputStream::Stdout,
                    captured.clone(),
                    options.events.clone(),
                )),
                tokio::spawn(pump_output(
                    child.stderr.take().expect("stderr is piped"),
                    OutputStream::Stderr,
                    captured.clone(),
                    options.events,
                )),
            ),
        };

        let (outcome_sender, outcome) = watch::channel(None);
        let tracked = Arc::new(Tracked {
            pid,
            cmd: request.cmd.clone(),
            envs: request.envs.clone(),
            user: user.name.clone(),
            cwd,
            stdin: tokio::sync::Mutex::new(child.stdin.take()),
            captured,
            outcome,
            pty: terminal,
        });
        self.lock_table().insert(pid, tracked.clone());
        tracing::info!(pid, user = %user.name, cmd = %request.cmd, "process started");

        let timeout = match request.timeout.unwrap_or(DEFAULT_PROCESS_TIMEOUT_SECS) {
            0 => None,
            seconds => Some(Duration::from_secs(seconds)),
        };
        let table = self.table.clone();
        let reaper = self.reaper.clone();
        let forget_on_exit = options.forget_on_exit;
        tokio::spawn(async move {
            let (status, timed_out) = match timeout {
                Some(limit) => tokio::select! {
                    status = child.wait() => (status, false),
                    _ = tokio::time::sleep(limit) => {
                        kill_group(pid, libc::SIGKILL);
                        (child.wait().await, true)
                    }
                },
                None => (child.wait().await, false),
            };
            reaper.forget(pid);
            let aborts = [stdout_task.abort_handle(), stderr_task.abort_handle()];
            let drained = async {
                let _ = stdout_task.await;
                let _ = stderr_task.await;
            };
            if tokio::time::timeout(OUTPUT_DRAIN_GRACE, drained)
                .await
                .is_err()
            {
                tracing::debug!(
                    pid,
                    "output still open after exit (background children); stop reading"
                );
                aborts.iter().for_each(|handle| handle.abort());
            }
            let exit_code = match (&status, timed_out) {
                (_, true) => TIMEOUT_EXIT_CODE,
                (Ok(status), false) => status
                    .code()
                    .or(status.signal().map(|s| 128 + s))
                    .unwrap_or(-1),
                (Err(_), false) => -1,
            };
            tracing::info!(pid, exit_code, timed_out, "process exited");
            let _ = outcome_sender.send(Some(Outcome {
                exit_code,
                timed_out,
            }));
            if forget_on_exit {
                table.lock().unwrap_or_else(|p| p.into_inner()).remove(&pid);
            }
        });
        Ok(tracked)
    }
}

async fn pump_output(
    mut pipe: impl AsyncRead + Unpin,
    stream: OutputStream,
    captured: Option<Arc<Mutex<Captured>>>,
    mut events: Option<mpsc::Sender<OutputChunk>>,
) {
    let mut buffer = vec![0u8; PIPE_READ_CHUNK];
    loop {
        let length = match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(length) => length,
        };
        if let Some(captured) = &captured {
            let mut captured = captured.lock().unwrap_or_else(|p| p.into_inner());
            match stream {
                OutputStream::Stdout => captured.stdout.push(&buffer[..length]),
                OutputStream::Stderr => captured.stderr.push(&buffer[..length]),
            }
        }
        if let Some(sender) = &events {
            let chunk = OutputChunk {
                stream,
                data: Bytes::copy_from_slice(&buffer[..length]),
            };
            // Waiting here is the flow control of a streamed process; a gone
            // listener just stops the forwarding.
            if sender.send(chunk).await.is_err() {
                events = None;
            }
        }
    }
}

/// Lossy UTF-8 decoding of a byte stream that keeps a multi-byte character
/// split across two chunks whole.
#[derive(Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    pub fn decode(&mut self, chunk: &[u8]) -> String {
        self.pending.extend_from_slice(chunk);
        let cut = incomplete_tail_start(&self.pending);
        let text = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
        self.pending.drain(..cut);
        text
    }

    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// Index where a trailing, incomplete UTF-8 sequence starts (or `len`).
fn incomplete_tail_start(bytes: &[u8]) -> usize {
    let length = bytes.len();
    for back in 1..=length.min(3) {
        let byte = bytes[length - back];
        if byte & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: look further back for the lead
        }
        let needed = match byte {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if needed > back { length - back } else { length };
    }
    length
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_split_characters_whole() {
        let text = "héllo €";
        let bytes = text.as_bytes();
        let mut decoder = Utf8Decoder::default();
        let mut out = String::new();
        for byte in bytes {
            out.push_str(&decoder.decode(std::slice::from_ref(byte)));
        }
        out.push_str(&decoder.finish());
        assert_eq!(out, text);
        assert_eq!(Utf8Decoder::default().decode(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn bounded_buffer_reports_truncation() {
        let mut buffer = BoundedBuffer::new(4);
        buffer.push(b"abc");
        assert!(!buffer.truncated);
        buffer.push(b"def");
        assert_eq!(buffer.data, b"abcd");
        assert!(buffer.truncated);
    }
}

//! Host processes the drivers start and find again, and the external tools
//! they run: PID records that survive a server restart, liveness, log tails,
//! cross-process file locks, and commands whose failure carries what they
//! said.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How to exec one of our own helper processes (the namespace launcher, the
/// microVM relay): the server passes its own `current_exe()` and a hidden
/// subcommand such as `["__sandbox-launcher"]`.
#[derive(Debug, Clone)]
pub struct LauncherCommand {
    pub program: PathBuf,
    pub args_prefix: Vec<String>,
}

/// Lines of a command's stderr an error carries.
const STDERR_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} failed ({status}): {output}")]
    Failed {
        program: String,
        status: ExitStatus,
        /// The end of its stderr (or of its log).
        output: String,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("process {pid} did not exit within {timeout:?}")]
    Survived { pid: i32, timeout: Duration },
}

/// A file operation that failed, and on which path.
#[derive(Debug, thiserror::Error)]
#[error("{action} {}: {source}", path.display())]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl FileError {
    /// `map_err` for `action` on `path`.
    pub fn on(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self {
            action,
            path,
            source,
        }
    }
}

impl From<ProcessError> for io::Error {
    /// Keeps the kind of an underlying i/o error (a missing program stays
    /// `NotFound`).
    fn from(error: ProcessError) -> Self {
        let kind = match &error {
            ProcessError::Spawn { source, .. } | ProcessError::File(FileError { source, .. }) => {
                source.kind()
            }
            ProcessError::Failed { .. } => io::ErrorKind::Other,
            ProcessError::Survived { .. } => io::ErrorKind::TimedOut,
        };
        io::Error::new(kind, error)
    }
}

fn file_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ProcessError {
    let error = FileError::on(action, path);
    move |source| error(source).into()
}

fn program_name(command: &Command) -> String {
    command.get_program().to_string_lossy().into_owned()
}

fn spawn_error(command: &Command) -> impl FnOnce(io::Error) -> ProcessError {
    let program = program_name(command);
    move |source| ProcessError::Spawn { program, source }
}

fn checked(command: &Command, output: Output) -> Result<Output, ProcessError> {
    if output.status.success() {
        return Ok(output);
    }
    Err(ProcessError::Failed {
        program: program_name(command),
        status: output.status,
        output: last_lines(&String::from_utf8_lossy(&output.stderr), STDERR_LINES),
    })
}

/// Runs `command` to completion, capturing its output; a non-zero exit is
/// an error carrying the end of its stderr.
pub fn output(command: &mut Command) -> Result<Output, ProcessError> {
    let output = command.output().map_err(spawn_error(command))?;
    checked(command, output)
}

/// [`output`] with `input` written to the command's stdin.
pub fn output_with_input(command: &mut Command, input: &[u8]) -> Result<Output, ProcessError> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error(command))?;
    let written = child.stdin.take().expect("piped").write_all(input);
    let output = child.wait_with_output().map_err(spawn_error(command))?;
    written.map_err(spawn_error(command))?;
    checked(command, output)
}

/// [`output`] for tokio commands.
pub async fn output_async(command: &mut tokio::process::Command) -> Result<Output, ProcessError> {
    let output = command
        .output()
        .await
        .map_err(spawn_error(command.as_std()))?;
    checked(command.as_std(), output)
}

/// Runs `command` with its stdout and stderr appended to `log` (open at
/// `log_path`); a failure carries the log's last lines.
pub fn run_logged(command: &mut Command, log: &File, log_path: &Path) -> Result<(), ProcessError> {
    let clone = || log.try_clone().map_err(file_error("sharing", log_path));
    let status = command
        .stdin(Stdio::null())
        .stdout(clone()?)
        .stderr(clone()?)
        .status()
        .map_err(spawn_error(command))?;
    if status.success() {
        return Ok(());
    }
    Err(ProcessError::Failed {
        program: program_name(command),
        status,
        output: tail(log_path, 8),
    })
}

/// The last `lines` non-blank lines of `text`, on one line.
pub fn last_lines(text: &str, lines: usize) -> String {
    let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    kept[kept.len().saturating_sub(lines)..].join(" | ")
}

/// The last `lines` non-blank lines of the file at `path` (a log or a
/// console), on one line for an error message; empty if unreadable.
pub fn tail(path: &Path, lines: usize) -> String {
    last_lines(
        &String::from_utf8_lossy(&fs::read(path).unwrap_or_default()),
        lines,
    )
}

/// The fields of `/proc/PID/stat` we need.
pub(crate) struct ProcessInfo {
    state: char,
    /// Clock ticks since boot; with the pid, identifies a process uniquely.
    pub(crate) start_time: u64,
}

impl ProcessInfo {
    pub(crate) fn read(pid: i32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // comm may contain spaces and parens: fields start after the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(Self {
            state: fields.first()?.chars().next()?,
            start_time: fields.get(19)?.parse().ok()?,
        })
    }

    pub(crate) fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Waits until `pid` has exited (a zombie counts as exited).
pub(crate) fn wait_until_gone(pid: i32, timeout: Duration) -> Result<(), ProcessError> {
    let deadline = Instant::now() + timeout;
    while ProcessInfo::read(pid).is_some_and(|p| !p.is_zombie()) {
        if Instant::now() > deadline {
            return Err(ProcessError::Survived { pid, timeout });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// SIGKILLs `pid`; callers pass only pids they verified by start time
/// ([`running`]), so a reused pid is never hit.
pub(crate) fn kill(pid: i32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Records `pid` in `path` as `PID STARTTIME`: the start time guards against
/// pid reuse when the process is found again after a server restart. A pid
/// already gone is recorded with start time 0, which no live process has.
pub(crate) fn record(path: &Path, pid: i32) -> Result<(), ProcessError> {
    let start_time = ProcessInfo::read(pid).map(|p| p.start_time).unwrap_or(0);
    record_as(path, pid, start_time)
}

/// [`record`] with a start time the caller read itself.
pub(crate) fn record_as(path: &Path, pid: i32, start_time: u64) -> Result<(), ProcessError> {
    fs::write(path, format!("{pid} {start_time}\n")).map_err(file_error("writing", path))
}

/// The process recorded in `path` by [`record`], if it is still that same
/// process (and not a zombie).
pub(crate) fn running(path: &Path) -> Option<i32> {
    let text = fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace();
    let pid: i32 = fields.next()?.parse().ok()?;
    let start_time: u64 = fields.next()?.parse().ok()?;
    let info = ProcessInfo::read(pid)?;
    (info.start_time == start_time && !info.is_zombie()).then_some(pid)
}

/// The pid in a plain pid file (one a program writes itself).
pub(crate) fn read_pid_file(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Proportional set size of a process, from `smaps_rollup`.
pub(crate) fn pss_bytes(pid: i32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// An exclusive `flock`, released when dropped: work by other processes
/// sharing a directory (builds, snapshots) waits instead of colliding.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    fn open(path: &Path) -> Result<File, ProcessError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(file_error("opening", path))
    }

    /// Takes the lock, waiting as long as another holder keeps it.
    pub fn acquire(path: &Path) -> Result<Self, ProcessError> {
        let file = Self::open(path)?;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Self { _file: file });
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(file_error("locking", path)(error));
            }
        }
    }

    /// Takes the lock if nobody holds it; `None` if someone does.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>, ProcessError> {
        let file = Self::open(path)?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(Self { _file: file }));
        }
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        Err(file_error("locking", path)(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_info_is_readable() {
        let me = ProcessInfo::read(std::process::id() as i32).unwrap();
        assert!(!me.is_zombie());
        assert!(me.start_time > 0);
    }

    #[test]
    fn records_name_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("self.pid");
        let me = std::process::id() as i32;
        record(&path, me).unwrap();
        assert_eq!(running(&path), Some(me));
        // Same pid, another start time: a reused pid, not our process.
        record_as(&path, me, 1).unwrap();
        assert_eq!(running(&path), None);
        assert_eq!(running(&dir.path().join("missing.pid")), None);
    }

    #[test]
    fn failures_carry_stderr_and_keep_the_spawn_error_kind() {
        let error = output(Command::new("sh").args(["-c", "echo one >&2; echo two >&2; exit 3"]))
            .unwrap_err();
        assert!(
            matches!(&error, ProcessError::Failed { status, output, .. }
                if status.code() == Some(3) && output == "one | two"),
            "{error:?}"
        );
        let missing = output(&mut Command::new("/nonexistent/program")).unwrap_err();
        assert!(matches!(missing, ProcessError::Spawn { .. }));
        assert_eq!(io::Error::from(missing).kind(), io::ErrorKind::NotFound);
        let echoed = output_with_input(&mut Command::new("cat"), b"in").unwrap();
        assert_eq!(echoed.stdout, b"in");
    }

    #[test]
    fn tails_skip_blank_lines() {
        assert_eq!(last_lines("a\n\nb\n  \nc\n", 2), "b | c");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn locks_exclude_other_holders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = FileLock::acquire(&path).unwrap();
        assert!(FileLock::try_acquire(&path).unwrap().is_none());
        drop(held);
        assert!(FileLock::try_acquire(&path).unwrap().is_some());
    }
}

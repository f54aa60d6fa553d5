//! Pseudo-terminals: a login shell whose stdin, stdout and stderr (and
//! controlling terminal) are the secondary side of a new pty, so `tty`,
//! job control and full-screen programs work. The primary side stays here:
//! its output goes to every listener of `GET /pty/{pid}/stream`, input
//! arrives through `/processes/{pid}/stdin`, and `/pty/{pid}/resize` sets
//! the window size (the shell gets SIGWINCH from the kernel).

use std::convert::Infallible;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use bytes::Bytes;
use envd_protocol::{Empty, ProcessRequest, PtyEvent, PtyRequest, PtySize, StartedProcess};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{ApiError, ApiResult};
use crate::extract::{JsonBody, Pid};
use crate::process::SpawnOptions;
use crate::server::AppState;

/// Output kept for the first listener, from before it attached.
const BACKLOG_LIMIT: usize = 64 * 1024;
/// Output chunks a slow listener may fall behind by before it loses some.
const LISTENER_LAG: usize = 256;
const READ_CHUNK: usize = 16 * 1024;
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
/// After the session's output ends, how long the shell may take to exit.
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// The shell a terminal runs: bash when the image has it.
const LOGIN_SHELL: &str = "if [ -x /bin/bash ]; then exec /bin/bash -l; else exec /bin/sh -l; fi";

/// The primary side of one pseudo-terminal.
pub struct Terminal {
    primary: File,
    output: broadcast::Sender<Bytes>,
    /// Output nobody listened to yet; `None` once the first listener came.
    backlog: Mutex<Option<Vec<u8>>>,
    /// Set when the primary reads end-of-session.
    closed: tokio::sync::watch::Sender<bool>,
}

impl Terminal {
    /// A new pty of `size`: the terminal, and the secondary side for the
    /// child's stdio.
    pub fn open(size: PtySize) -> io::Result<(Terminal, File)> {
        // SAFETY: plain libc calls; every returned fd is checked and owned.
        let primary = unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        let raw = primary.as_raw_fd();
        // SAFETY: `raw` is our open pty primary.
        if unsafe { libc::grantpt(raw) } != 0 || unsafe { libc::unlockpt(raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: the buffer is ours and its length is passed.
        let failed = unsafe { libc::ptsname_r(raw, name.as_mut_ptr(), name.len()) };
        if failed != 0 {
            return Err(io::Error::from_raw_os_error(failed));
        }
        // SAFETY: ptsname_r NUL-terminated the name.
        let secondary = unsafe {
            let fd = libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        let primary = File::from(primary);
        set_size(&primary, size)?;
        let (output, _) = broadcast::channel(LISTENER_LAG);
        let terminal = Terminal {
            primary,
            output,
            backlog: Mutex::new(Some(Vec::new())),
            closed: tokio::sync::watch::channel(false).0,
        };
        Ok((terminal, File::from(secondary)))
    }

    /// Reads the primary until the session ends (every holder of the
    /// secondary is gone: `EIO`), handing output to the listeners.
    pub async fn pump_output(self: Arc<Self>) {
        let Ok(mut primary) = self.primary.try_clone() else {
            self.closed.send_replace(true);
            return;
        };
        let (chunks, mut received) = mpsc::channel::<Bytes>(4);
        // A pty has no readiness-based async read here; a blocking thread
        // reads it (one per terminal, for the session's life).
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; READ_CHUNK];
            loop {
                match primary.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(n) => {
                        if chunks
                            .blocking_send(Bytes::copy_from_slice(&buffer[..n]))
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return, // EIO: the session is over
                }
            }
        });
        while let Some(chunk) = received.recv().await {
            let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
            match backlog.as_mut() {
                Some(kept) => {
                    let room = BACKLOG_LIMIT.saturating_sub(kept.len());
                    kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                None => {
                    let _ = self.output.send(chunk);
                }
            }
        }
        self.closed.send_replace(true);
    }

    /// A new listener: the backlog if it is the first, then live output.
    fn listen(&self) -> (Option<Vec<u8>>, broadcast::Receiver<Bytes>) {
        let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        (backlog.take(), self.output.subscribe())
    }

    pub async fn write_input(&self, data: &[u8]) -> ApiResult<()> {
        let mut primary = self
            .primary
            .try_clone()
            .map_err(|e| ApiError::from_io(e, "pty"))?;
        let data = data.to_vec();
        tokio::task::spawn_blocking(move || primary.write_all(&data))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::from_io(e, "pty input"))
    }
}

fn set_size(primary: &File, size: PtySize) -> io::Result<()> {
    let window = libc::winsize {
        ws_row: size.rows.max(1),
        ws_col: size.cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own.
    if unsafe { libc::ioctl(primary.as_raw_fd(), libc::TIOCSWINSZ, &window) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub async fn start(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<PtyRequest>,
) -> ApiResult<Json<StartedProcess>> {
    let process = ProcessRequest {
        cmd: LOGIN_SHELL.into(),
        user: request.user,
        cwd: request.cwd,
        envs: request.envs,
        timeout: request.timeout,
        stdin: false,
    };
    let options = SpawnOptions {
        capture: false,
        events: None,
        stdin: false,
        forget_on_exit: false,
        pty: Some(request.size),
    };
    let tracked = state
        .processes
        .spawn(&state.root, &state.users, &process, options)?;
    Ok(Json(StartedProcess { pid: tracked.pid }))
}

fn terminal_of(
    state: &AppState,
    pid: u32,
) -> ApiResult<(Arc<crate::process::Tracked>, Arc<Terminal>)> {
    let tracked = state
        .processes
        .get(pid)
        .ok_or_else(|| ApiError::not_found(format!("no terminal with pid {pid}")))?;
    let terminal = tracked
        .pty
        .clone()
        .ok_or_else(|| ApiError::bad_request(format!("process {pid} has no terminal")))?;
    Ok((tracked, terminal))
}

pub async fn resize(
    State(state): State<Arc<AppState>>,
    Pid(pid): Pid,
    JsonBody(size): JsonBody<PtySize>,
) -> ApiResult<Json<Empty>> {
    let (_, terminal) = terminal_of(&state, pid)?;
    set_size(&terminal.primary, size).map_err(|e| ApiError::from_io(e, "pty"))?;
    Ok(Json(Empty {}))
}

pub async fn stream(State(state): State<Arc<AppState>>, Pid(pid): Pid) -> ApiResult<Response> {
    let (tracked, terminal) = terminal_of(&state, pid)?;
    let (lines, body) = mpsc::channel::<Result<Bytes, Infallible>>(16);
    tokio::spawn(async move {
        let send = |event: PtyEvent| {
            let lines = lines.clone();
            async move {
                let mut line = serde_json::to_vec(&event).expect("events serialize");
                line.push(b'\n');
                lines.send(Ok(Bytes::from(line))).await.is_ok()
            }
        };
        let data = |bytes: &[u8]| PtyEvent::Data {
            data: base64::engine::general_purpose::STANDARD.encode(bytes),
        };
        let (backlog, mut output) = terminal.listen();
        if let Some(backlog) = backlog.filter(|b| !b.is_empty()) {
            if !send(data(&backlog)).await {
                return;
            }
        }
        let mut closed = terminal.closed.subscribe();
        let mut keepalive = tokio::time::interval(KEEPALIVE_EVERY);
        keepalive.tick().await;
        loop {
            let event = tokio::select! {
                chunk = output.recv() => match chunk {
                    Ok(chunk) => data(&chunk),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = async { closed.wait_for(|closed| *closed).await.map(|_| ()) } => {
                    // Whatever the reader queued before the end.
                    while let Ok(chunk) = output.try_recv() {
                        if !send(data(&chunk)).await {
                            return;
                        }
                    }
                    break;
                }
                _ = keepalive.tick() => PtyEvent::Keepalive,
            };
            if !send(event).await {
                return; // the listener left; the terminal runs on
            }
        }
        let outcome = tokio::time::timeout(EXIT_WAIT, tracked.wait()).await;
        let exit_code = outcome.map_or(-1, |o| o.exit_code);
        send(PtyEvent::Exit { exit_code }).await;
        state.processes.forget(tracked.pid);
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(ReceiverStream::new(body)),
    )
        .into_response())
}

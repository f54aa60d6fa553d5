//! The per-VM relay: holds the host side of the VM's virtio-serial port
//! (QEMU connects to `serial.sock` as it starts, before the guest opens
//! the port) and turns every connection to `agent.sock` into a session on
//! that one stream (`envd_protocol::mux`). It outlives server restarts and
//! exits when QEMU goes away.
//!
//! Run as a fresh process (the server's hidden `__vm-relay` subcommand):
//! `--serial PATH --agent PATH [--run-as UID:GID]`; it prints `READY` once
//! both are bound. With `--run-as` it then drops to that uid/gid (the
//! sandbox's own ids), without capabilities and with `no_new_privs`: it
//! only ever moves bytes between sockets it already holds.
//!
//! The server starts it with `spawn` (below).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use envd_protocol::mux::{read_frame, Frame, FrameKind, MAX_PAYLOAD};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::qemu::VmFiles;
use super::MicrovmError;
use crate::process::{self, LauncherCommand};

pub const READY_LINE: &str = "READY";
/// How long the relay waits for QEMU to connect.
const QEMU_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

type Sessions = Arc<Mutex<HashMap<u32, mpsc::Sender<Bytes>>>>;

/// Flag of a spare relay: started ahead of a boot, it reads its arguments
/// as one line on stdin when the boot comes (see [`Spare`]).
const AWAIT_CONFIG: &str = "--await-config";

pub fn relay_main(args: &[String]) -> ! {
    const USAGE: &str =
        "usage: --serial PATH --agent PATH [--run-as UID:GID] | --await-config (the same on stdin)";
    let mut line = String::new();
    let args: Vec<String> = if args.len() == 1 && args[0] == AWAIT_CONFIG {
        // The server gone before a boot took us: EOF, nothing to do.
        if std::io::stdin().read_line(&mut line).unwrap_or(0) == 0 {
            std::process::exit(0);
        }
        line.trim_end_matches('\n')
            .split('\t')
            .map(str::to_string)
            .collect()
    } else {
        args.to_vec()
    };
    let mut serial = None;
    let mut agent = None;
    let mut run_as = None;
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--serial", Some(path)) => serial = Some(PathBuf::from(path)),
            ("--agent", Some(path)) => agent = Some(PathBuf::from(path)),
            ("--run-as", Some(ids)) => run_as = parse_ids(ids),
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let (Some(serial), Some(agent)) = (serial, agent) else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(serial, agent, run_as)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("relay: {error}");
            1
        }
    };
    std::process::exit(code)
}

fn parse_ids(text: &str) -> Option<(u32, u32)> {
    let (uid, gid) = text.split_once(':')?;
    Some((uid.parse().ok()?, gid.parse().ok()?))
}

/// Becomes `uid:gid` for good: no supplementary groups, no capabilities
/// (a setuid away from root clears them), no way back (`no_new_privs`).
fn drop_privileges((uid, gid): (u32, u32)) -> std::io::Result<()> {
    // SAFETY: plain syscalls (glibc applies the set*id calls to every thread).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

async fn run(
    serial_path: PathBuf,
    agent_path: PathBuf,
    run_as: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&serial_path);
    let _ = std::fs::remove_file(&agent_path);
    let serial_listener = UnixListener::bind(&serial_path)?;
    let agent_listener = UnixListener::bind(&agent_path)?;
    if let Some(ids) = run_as {
        drop_privileges(ids)?;
    }
    {
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{READY_LINE}")?;
        stdout.flush()?;
    }
    let (serial, _) = tokio::time::timeout(QEMU_CONNECT_TIMEOUT, serial_listener.accept())
        .await
        .map_err(|_| std::io::Error::other("QEMU never connected"))??;
    drop(serial_listener);
    let _ = std::fs::remove_file(&serial_path);
    let (mut from_guest, mut to_guest) = serial.into_split();

    let (frames, mut outgoing) = mpsc::channel::<Frame>(256);
    tokio::spawn(async move {
        while let Some(frame) = outgoing.recv().await {
            if to_guest.write_all(&frame.encode()).await.is_err() {
                return;
            }
        }
    });

    let sessions: Sessions = Arc::default();
    let accept_sessions = sessions.clone();
    let accept_frames = frames.clone();
    tokio::spawn(async move {
        let mut next_id: u32 = 1;
        loop {
            let Ok((client, _)) = agent_listener.accept().await else {
                continue;
            };
            let id = next_id;
            next_id = next_id.wrapping_add(1).max(1);
            let (tx, mut rx) = mpsc::channel::<Bytes>(64);
            accept_sessions.lock().unwrap().insert(id, tx);
            if accept_frames.send(Frame::open(id)).await.is_err() {
                return;
            }
            let (mut client_read, mut client_write) = client.into_split();
            let frames = accept_frames.clone();
            let sessions = accept_sessions.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; MAX_PAYLOAD];
                loop {
                    match client_read.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let data = Bytes::copy_from_slice(&buffer[..n]);
                            if frames.send(Frame::data(id, data)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                sessions.lock().unwrap().remove(&id);
                let _ = frames.send(Frame::close(id)).await;
            });
            tokio::spawn(async move {
                while let Some(data) = rx.recv().await {
                    if client_write.write_all(&data).await.is_err() {
                        break;
                    }
                }
                let _ = client_write.shutdown().await;
            });
        }
    });

    // Guest → clients; ends (and with it the relay) when QEMU goes away.
    while let Some(frame) = read_frame(&mut from_guest).await? {
        match frame.kind {
            FrameKind::Data => {
                let sender = sessions.lock().unwrap().get(&frame.session).cloned();
                if let Some(sender) = sender {
                    let _ = sender.send(frame.payload).await;
                }
            }
            FrameKind::Close => {
                sessions.lock().unwrap().remove(&frame.session);
            }
            FrameKind::Open => {}
        }
    }
    let _ = std::fs::remove_file(&agent_path);
    Ok(())
}

/// Starts the VM's relay and waits until it listens (QEMU connects to it
/// on start-up, so it must come first).
pub(super) async fn spawn(
    relay: &LauncherCommand,
    files: &VmFiles,
    run_as: Option<(u32, u32)>,
) -> Result<(), MicrovmError> {
    Spare::start(relay)?.take_on(files, run_as).await
}

/// A relay process started ahead of a boot: exec'd and waiting for its
/// paths on stdin, so a snapshot restore does not wait for the exec.
pub(super) struct Spare {
    child: tokio::process::Child,
}

impl Spare {
    pub(super) fn start(relay: &LauncherCommand) -> Result<Spare, MicrovmError> {
        let mut command = tokio::process::Command::new(&relay.program);
        command.args(&relay.args_prefix).arg(AWAIT_CONFIG);
        command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(false);
        // Its own session: a terminal's Ctrl-C to the server must not reach it.
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = command.spawn().map_err(MicrovmError::RelaySpawn)?;
        Ok(Spare { child })
    }

    /// Hands the spare its VM and waits until it listens.
    pub(super) async fn take_on(
        self,
        files: &VmFiles,
        run_as: Option<(u32, u32)>,
    ) -> Result<(), MicrovmError> {
        let mut child = self.child;
        let pid = child.id().ok_or(MicrovmError::RelayExited)? as i32;
        let mut config = vec![
            "--serial".to_string(),
            files.serial_socket().display().to_string(),
            "--agent".to_string(),
            files.agent_socket().display().to_string(),
        ];
        if let Some((uid, gid)) = run_as {
            config.extend(["--run-as".to_string(), format!("{uid}:{gid}")]);
        }
        if config.iter().any(|item| item.contains(['\t', '\n'])) {
            let _ = child.start_kill();
            return Err(MicrovmError::SocketPathTooLong(files.agent_socket()));
        }
        let mut stdin = child.stdin.take().expect("piped");
        let line = format!("{}\n", config.join("\t"));
        if stdin.write_all(line.as_bytes()).await.is_err() {
            let _ = child.start_kill();
            return Err(MicrovmError::RelayExited);
        }
        drop(stdin);
        finish_start(child, pid, files).await
    }
}

async fn finish_start(
    mut child: tokio::process::Child,
    pid: i32,
    files: &VmFiles,
) -> Result<(), MicrovmError> {
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    let mut stdout = tokio::io::BufReader::new(stdout);
    let read = stdout.read_line(&mut line);
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Ok(Ok(_)) if line.trim() == READY_LINE => {}
        _ => {
            let _ = child.start_kill();
            return Err(MicrovmError::RelayNotReady(line));
        }
    }
    process::record(&files.relay_identity_file(), pid)?;
    // Reap it whenever it exits so it never lingers as our zombie.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(())
}

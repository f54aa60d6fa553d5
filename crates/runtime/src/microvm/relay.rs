//! The per-VM relay: holds the host side of the VM's virtio-serial port
//! (QEMU connects to `serial.sock` as it starts, before the guest opens
//! the port) and turns every connection to `agent.sock` into a session on
//! that one stream (`envd_protocol::mux`). It outlives server restarts and
//! exits when QEMU goes away.
//!
//! Run as a fresh process (the server's hidden `__vm-relay` subcommand):
//! `--serial PATH --agent PATH`; it prints `READY` once both are bound.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use envd_protocol::mux::{read_frame, Frame, FrameKind, MAX_PAYLOAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

pub const READY_LINE: &str = "READY";
/// How long the relay waits for QEMU to connect.
const QEMU_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

type Sessions = Arc<Mutex<HashMap<u32, mpsc::Sender<Bytes>>>>;

pub fn relay_main(args: &[String]) -> ! {
    let mut serial = None;
    let mut agent = None;
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--serial", Some(path)) => serial = Some(PathBuf::from(path)),
            ("--agent", Some(path)) => agent = Some(PathBuf::from(path)),
            _ => {
                eprintln!("usage: --serial PATH --agent PATH");
                std::process::exit(2);
            }
        }
    }
    let (Some(serial), Some(agent)) = (serial, agent) else {
        eprintln!("usage: --serial PATH --agent PATH");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(serial, agent)) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("relay: {error}");
            1
        }
    };
    std::process::exit(code)
}

async fn run(serial_path: PathBuf, agent_path: PathBuf) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&serial_path);
    let _ = std::fs::remove_file(&agent_path);
    let serial_listener = UnixListener::bind(&serial_path)?;
    let agent_listener = UnixListener::bind(&agent_path)?;
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

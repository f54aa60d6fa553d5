//! A minimal QMP (QEMU Machine Protocol) client: JSON lines over QEMU's
//! control socket. Enough for stop/cont, snapshot save and restore, quit,
//! and handing QEMU open files (`add-fd`) for the block layer.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {message}")]
    Command { command: String, message: String },
    #[error("QMP: timed out waiting for {0}")]
    Timeout(String),
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and leaves
    /// capabilities negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(error) => return Err(error.into()),
            }
        };
        let (read, writer) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(read),
            writer,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Err(QmpError::Protocol("QEMU closed the QMP socket".into()));
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }

    /// Runs one command and returns its `return` value (events in between
    /// are skipped).
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command, "arguments": arguments }).to_string();
        request.push('\n');
        self.writer.write_all(request.as_bytes()).await?;
        self.read_answer(command).await
    }

    async fn read_answer(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let message = self.read_message().await?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(QmpError::Command {
                    command: command.into(),
                    message: error["desc"].as_str().unwrap_or("unknown error").into(),
                });
            }
        }
    }

    /// Hands QEMU `fd` (SCM_RIGHTS with an `add-fd` command) into fd set
    /// `set`, or a new one; returns the set's id. QEMU opens
    /// `/dev/fdset/ID` by picking the set's fd with the access mode asked
    /// for, so a file QEMU may need read-write and read-only goes in twice.
    /// A QEMU that dropped root thus opens files it has no path access to.
    pub async fn add_fd(&mut self, fd: BorrowedFd<'_>, set: Option<u64>) -> Result<u64, QmpError> {
        let arguments = match set {
            Some(set) => json!({ "fdset-id": set }),
            None => json!({}),
        };
        let mut request = json!({ "execute": "add-fd", "arguments": arguments }).to_string();
        request.push('\n');
        let stream: &UnixStream = self.writer.as_ref();
        let (mut sent, bytes) = (0, request.as_bytes());
        while sent < bytes.len() {
            stream.writable().await?;
            // The fd rides on the first bytes of the command; QEMU attaches
            // it to the command those bytes belong to.
            let attach = (sent == 0).then_some(fd.as_raw_fd());
            match stream.try_io(tokio::io::Interest::WRITABLE, || {
                send_with_fd(stream.as_raw_fd(), &bytes[sent..], attach)
            }) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let answer = self.read_answer("add-fd").await?;
        answer["fdset-id"]
            .as_u64()
            .ok_or_else(|| QmpError::Protocol(format!("add-fd answered {answer}")))
    }

    /// Saves (`migrate`) or loads (`migrate-incoming`) the VM state through
    /// `path`, leaving shared RAM (the snapshot's memory file) out of it, and
    /// waits until that is done.
    pub async fn migrate_file(
        &mut self,
        command: &str,
        path: &Path,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        let ignore_shared =
            json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] });
        self.execute("migrate-set-capabilities", ignore_shared)
            .await?;
        let uri = format!("file:{}", path.display());
        self.execute(command, json!({ "uri": uri })).await?;
        self.wait_for_migration(timeout).await
    }

    /// Polls `query-migrate` until the migration (outgoing or incoming) is
    /// over; fails on `failed`/`cancelled`.
    async fn wait_for_migration(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.execute("query-migrate", json!({})).await?;
            match state["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                status @ ("failed" | "cancelled") => {
                    return Err(QmpError::Command {
                        command: "migrate".into(),
                        message: format!(
                            "{status}: {}",
                            state["error-desc"].as_str().unwrap_or("no details")
                        ),
                    })
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(QmpError::Timeout("the migration".into()));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// One `sendmsg`, with `fd` as SCM_RIGHTS when given.
fn send_with_fd(socket: i32, bytes: &[u8], fd: Option<i32>) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one cmsghdr carrying one int, suitably aligned.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer in it outlives the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_LEN are arithmetic; the control buffer
        // is large enough for one fd (checked below) and CMSG_FIRSTHDR
        // points into it.
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as usize;
            assert!(space <= std::mem::size_of_val(&control));
            message.msg_control = control.as_mut_ptr().cast();
            message.msg_controllen = space;
            let header = libc::CMSG_FIRSTHDR(&message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<i32>(), fd);
        }
    }
    // SAFETY: a valid socket fd and a fully initialised msghdr.
    let sent = unsafe { libc::sendmsg(socket, &message, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sent as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A QEMU with no machine opens an image it only got as an fd (the
    /// path is gone before it is asked to), and gets the layer trick's
    /// node graph: a qcow2 reopened with a backing node added later.
    #[tokio::test]
    async fn qemu_opens_images_it_only_got_as_fds() {
        let Some(qemu) = crate::templates::find_in_path("qemu-system-x86_64") else {
            println!("SKIP qemu_opens_images_it_only_got_as_fds: QEMU is not installed");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let mut child = tokio::process::Command::new(qemu)
            .args(["-M", "none", "-nodefaults", "-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut qmp = Qmp::connect(&socket, Duration::from_secs(10))
            .await
            .unwrap();

        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let top = dir.path().join("top.qcow2");
        super::super::qcow2::create_empty(&top, 1 << 20).unwrap();
        let (base_file, top_file) = (
            std::fs::File::open(&base).unwrap(),
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&top)
                .unwrap(),
        );
        std::fs::remove_file(&base).unwrap();
        std::fs::remove_file(&top).unwrap();

        let base_set = qmp.add_fd(base_file.as_fd(), None).await.unwrap();
        let top_set = qmp.add_fd(top_file.as_fd(), None).await.unwrap();
        assert_ne!(base_set, top_set);
        let file = |set: u64, read_only: bool| json!({ "driver": "file", "filename": format!("/dev/fdset/{set}"), "read-only": read_only });
        qmp.execute(
            "blockdev-add",
            json!({ "driver": "raw", "node-name": "base", "read-only": true, "file": file(base_set, true) }),
        )
        .await
        .unwrap();
        qmp.execute(
            "blockdev-add",
            json!({ "driver": "qcow2", "node-name": "top", "file": file(top_set, false) }),
        )
        .await
        .unwrap();
        qmp.execute(
            "blockdev-reopen",
            json!({ "options": [{ "driver": "qcow2", "node-name": "top", "file": "no-such-node", "backing": "base" }] }),
        )
        .await
        .expect_err("a wrong file child is refused");
        let nodes = qmp
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .await
            .unwrap();
        let top_file_node = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| {
                n["drv"] == "file"
                    && n["file"]
                        .as_str()
                        .is_some_and(|f| f.contains(&format!("fdset/{top_set}")))
            })
            .map(|n| n["node-name"].as_str().unwrap().to_string())
            .expect("the top's file node");
        qmp.execute(
            "blockdev-reopen",
            json!({ "options": [{ "driver": "qcow2", "node-name": "top", "file": top_file_node, "backing": "base" }] }),
        )
        .await
        .unwrap();
        let nodes = qmp
            .execute("query-named-block-nodes", json!({ "flat": true }))
            .await
            .unwrap();
        let top_node = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node-name"] == "top")
            .unwrap()
            .clone();
        assert_eq!(
            top_node["backing_file"],
            format!("/dev/fdset/{base_set}"),
            "{top_node}"
        );
        let _ = qmp.execute("quit", json!({})).await;
        let _ = child.wait().await;
    }
}

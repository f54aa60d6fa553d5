//! A minimal QMP (QEMU Machine Protocol) client: JSON lines over QEMU's
//! control socket. Enough for stop/cont, snapshot save and restore, quit.

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

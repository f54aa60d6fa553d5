//! What every black-box suite shares: the harness, pointed at the binary
//! cargo built for this test run, and the gate that keeps the suites of
//! this one binary out of each other's way.
#![allow(dead_code, unused_imports)]

pub use testkit::*;

use reqwest::{RequestBuilder, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sandbox-manager");

pub fn production() -> ServerOptions {
    ServerOptions::production(BIN)
}

pub fn embedded() -> ServerOptions {
    ServerOptions::embedded(BIN)
}

/// Who is inside the gate: the tests of one suite, or one test alone.
struct Gate {
    suite: &'static str,
    alone: bool,
    inside: usize,
}

static GATE: Mutex<Gate> = Mutex::new(Gate {
    suite: "",
    alone: false,
    inside: 0,
});
static GATE_OPENED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Held for a test's whole run (see [`suite`] and [`alone`]).
#[must_use = "the gate is held until this is dropped"]
pub struct Inside;

impl Drop for Inside {
    fn drop(&mut self) {
        GATE.lock().unwrap_or_else(PoisonError::into_inner).inside -= 1;
        GATE_OPENED.notify_waiters();
    }
}

async fn enter(suite: &'static str, alone: bool) -> Inside {
    loop {
        let opened = GATE_OPENED.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        {
            let mut gate = GATE.lock().unwrap_or_else(PoisonError::into_inner);
            let joins = !alone && !gate.alone && gate.suite == suite;
            if gate.inside == 0 || joins {
                gate.suite = suite;
                gate.alone = alone;
                gate.inside += 1;
                return Inside;
            }
        }
        opened.await;
    }
}

/// Waits until no test of another suite runs, then lets the test run
/// beside the rest of its own suite (`module_path!()`): the suites load the
/// machine and time what must stay responsive, as they did when each was a
/// test binary of its own.
pub async fn suite(module: &'static str) -> Inside {
    enter(module, false).await
}

/// Waits until no other test runs and keeps them out until dropped: for a
/// test that loads the machine on purpose (a fork bomb, a full disk) and
/// times what must stay responsive, which should measure the sandbox, not
/// its neighbours.
pub async fn alone() -> Inside {
    enter("", true).await
}

/// Sending a request and reading its JSON answer.
pub trait Reply {
    /// The status and the JSON body (`Null` when the body is not JSON).
    async fn reply(self) -> (StatusCode, Value);
    /// [`Reply::reply`], or the error of a request that got no answer.
    async fn try_reply(self) -> reqwest::Result<(StatusCode, Value)>;
    /// The JSON body, whatever the status; panics when it is not JSON.
    async fn json_reply(self) -> Value;
}

impl Reply for RequestBuilder {
    async fn reply(self) -> (StatusCode, Value) {
        self.try_reply().await.expect("send the request")
    }

    async fn try_reply(self) -> reqwest::Result<(StatusCode, Value)> {
        let response = self.send().await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    async fn json_reply(self) -> Value {
        let response = self.send().await.expect("send the request");
        response.json().await.expect("a JSON body")
    }
}

/// The API calls the suites make again and again, as the default owner.
pub trait Api {
    /// `GET path`'s JSON body.
    async fn get_json(&self, path: &str) -> Value;
    /// What `/metrics` says, in the Prometheus text format.
    async fn metrics_text(&self) -> String;
    /// Uploads `archive` as volume `name`. A refused upload says
    /// `Connection: close` (its body may be left unread).
    async fn upload_volume(&self, name: &str, archive: Vec<u8>) -> (StatusCode, Value);
    /// Uploads `archive` as volume `v`, asserting 201; returns the volume.
    async fn new_volume(&self, archive: Vec<u8>) -> Value;
    /// A volume's archive, as `/volumes/{id}/download` returns it.
    async fn download_volume(&self, id: &str) -> Vec<u8>;
    /// How many volumes `/volumes` lists.
    async fn volume_count(&self) -> usize;
    /// `POST /sandboxes` with `body`.
    async fn create_sandbox(&self, body: Value) -> (StatusCode, Value);
    /// Creates a sandbox, asserting 201; returns its id.
    async fn new_sandbox(&self, body: Value) -> String;
    /// The ids `path` (`/sandboxes`, maybe with a query) lists.
    async fn sandbox_ids(&self, path: &str) -> Vec<String>;
    /// `POST /sandboxes/{id}/commands` with `body`: a run, or with
    /// `background` a start.
    async fn command(&self, id: &str, body: Value) -> (StatusCode, Value);
    /// Runs `cmd` as `user` in the foreground, asserting 200; returns the
    /// result (`stdout`, `stderr`, `exit_code`).
    async fn run_command_as(&self, id: &str, user: &str, cmd: &str) -> Value;
    /// [`Api::run_command_as`] as `user`.
    async fn run_command(&self, id: &str, cmd: &str) -> Value;
    /// Asserts `/health` answers with success within `limit` (`after` says
    /// what the server just went through); returns how long it took.
    async fn health_within(&self, limit: Duration, after: &str) -> Duration;
}

impl Api for TestServer {
    async fn get_json(&self, path: &str) -> Value {
        self.get(path).json_reply().await
    }

    async fn metrics_text(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await;
        response
            .expect("/metrics")
            .text()
            .await
            .expect("metrics text")
    }

    async fn upload_volume(&self, name: &str, archive: Vec<u8>) -> (StatusCode, Value) {
        let response = self
            .post(&format!("/volumes?name={name}"))
            .header("content-type", "application/gzip")
            .body(archive)
            .send()
            .await
            .expect("upload");
        let status = response.status();
        if status.is_client_error() {
            let connection = response.headers().get("connection");
            assert_eq!(
                connection.map(|v| v.as_bytes()),
                Some(&b"close"[..]),
                "{status}"
            );
        }
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn new_volume(&self, archive: Vec<u8>) -> Value {
        let (status, volume) = self.upload_volume("v", archive).await;
        assert_eq!(status, StatusCode::CREATED, "{volume}");
        volume
    }

    async fn download_volume(&self, id: &str) -> Vec<u8> {
        let response = self
            .get(&format!("/volumes/{id}/download"))
            .send()
            .await
            .expect("download");
        assert_eq!(response.status(), StatusCode::OK);
        response.bytes().await.expect("the archive").to_vec()
    }

    async fn volume_count(&self) -> usize {
        let listed = self.get_json("/volumes").await;
        listed["volumes"].as_array().expect("a volume list").len()
    }

    async fn create_sandbox(&self, body: Value) -> (StatusCode, Value) {
        self.post("/sandboxes").json(&body).reply().await
    }

    async fn new_sandbox(&self, body: Value) -> String {
        let (status, sandbox) = self.create_sandbox(body).await;
        assert_eq!(status, StatusCode::CREATED, "{sandbox}");
        sandbox["sandbox_id"].as_str().unwrap().to_string()
    }

    async fn sandbox_ids(&self, path: &str) -> Vec<String> {
        let listed = self.get_json(path).await;
        listed["sandboxes"]
            .as_array()
            .expect("a sandbox list")
            .iter()
            .map(|s| s["sandbox_id"].as_str().unwrap().to_string())
            .collect()
    }

    async fn command(&self, id: &str, body: Value) -> (StatusCode, Value) {
        self.post(&format!("/sandboxes/{id}/commands"))
            .json(&body)
            .reply()
            .await
    }

    async fn run_command_as(&self, id: &str, user: &str, cmd: &str) -> Value {
        let body = json!({ "cmd": cmd, "user": user, "timeout": 120 });
        let (status, result) = self.command(id, body).await;
        assert_eq!(status, StatusCode::OK, "{cmd}: {result}");
        result
    }

    async fn run_command(&self, id: &str, cmd: &str) -> Value {
        self.run_command_as(id, "user", cmd).await
    }

    async fn health_within(&self, limit: Duration, after: &str) -> Duration {
        let started = Instant::now();
        let response = tokio::time::timeout(limit, self.get("/health").send())
            .await
            .unwrap_or_else(|_| panic!("/health did not answer within {limit:?} after {after}"))
            .expect("/health");
        assert!(response.status().is_success(), "/health after {after}");
        started.elapsed()
    }
}

/// Processes other than this test binary whose command line names
/// `needle`, as `PID: command line`.
pub fn processes_naming(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Every file below `dir` (none when it cannot be read).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// An upload of volume `name` declaring `len` bytes, in a task of its own,
/// whose body is what is sent through the returned sender, a chunk at a
/// time; the body ends when the sender is dropped.
pub fn streamed_upload(
    server: &TestServer,
    name: &str,
    len: usize,
) -> (
    tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let chunks = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let request = server
        .post(&format!("/volumes?name={name}"))
        .header("content-length", len)
        .body(reqwest::Body::wrap_stream(chunks))
        .send();
    (tx, tokio::spawn(request))
}

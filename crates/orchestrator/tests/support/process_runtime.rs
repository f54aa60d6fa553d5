//! A `Runtime` whose machines are plain envd processes, each serving a
//! private copy of the template's directory over a unix socket. Nothing
//! is isolated, so it is for tests only; it needs no namespaces, cgroups,
//! VMs or templates built with mmdebstrap, and boots in milliseconds, so
//! the orchestrator's own logic (pool, claims, deadlines, restarts,
//! hydration, the blob cache) can be tested on its own, in seconds.

use async_trait::async_trait;
use envd_protocol::client::EnvdClient;
use sandbox_runtime::{BootSpec, Booted, Runtime, RuntimeError};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct ProcessRuntime {
    state_dir: PathBuf,
    envd: PathBuf,
    /// Boots that succeeded, for tests that count machines.
    pub boots: AtomicUsize,
    /// The next this many boots fail (a driver fault, on demand).
    pub failing_boots: AtomicUsize,
}

impl ProcessRuntime {
    pub fn new(state_dir: &Path) -> Self {
        std::fs::create_dir_all(state_dir).unwrap();
        ProcessRuntime {
            state_dir: state_dir.to_path_buf(),
            envd: envd_binary(),
            boots: AtomicUsize::new(0),
            failing_boots: AtomicUsize::new(0),
        }
    }

    fn dir(&self, id: &str) -> PathBuf {
        self.state_dir.join(id)
    }

    fn pid(&self, id: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir(id).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Host path of a path inside the machine.
    pub fn host_path(&self, id: &str, path: &str) -> PathBuf {
        self.dir(id).join("root").join(path.trim_start_matches('/'))
    }

    /// Kills a machine behind the orchestrator's back (a crash).
    pub fn crash(&self, id: &str) {
        if let Some(pid) = self.pid(id) {
            kill_and_reap(pid);
        }
    }

    /// Machines present (alive or not).
    pub fn machines(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.state_dir) else {
            return Vec::new(); // the test's directory is already gone
        };
        let mut ids: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        ids.sort();
        ids
    }
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        for id in self.machines() {
            if let Some(pid) = self.pid(&id) {
                kill_and_reap(pid);
            }
        }
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn boot(&self, spec: BootSpec) -> Result<Booted, RuntimeError> {
        let failing = self
            .failing_boots
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(RuntimeError::BootFailed {
                id: spec.id,
                message: "injected boot failure".into(),
            });
        }
        let dir = self.dir(&spec.id);
        if dir.exists() {
            return Err(RuntimeError::AlreadyExists(spec.id));
        }
        let root = dir.join("root");
        copy_tree(&spec.rootfs, &root).map_err(|source| RuntimeError::Io {
            context: "copying the template".into(),
            source,
        })?;
        let socket = dir.join("envd.sock");
        let child = Command::new(&self.envd)
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--root")
            .arg(&root)
            .env("ENVD_ACCESS_TOKEN", &spec.token)
            .env("ENVD_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| RuntimeError::Launch {
                id: spec.id.clone(),
                source,
            })?;
        let pid = child.id() as i32;
        // The child is reaped by whoever kills it (`kill_and_reap`).
        std::mem::forget(child);
        std::fs::write(dir.join("pid"), pid.to_string()).map_err(|source| RuntimeError::Io {
            context: "writing the pid".into(),
            source,
        })?;
        let client = EnvdClient::unix(&socket, &spec.token);
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.health().await.is_err() {
            if Instant::now() > deadline {
                return Err(RuntimeError::BootFailed {
                    id: spec.id,
                    message: "envd did not answer".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.boots.fetch_add(1, Ordering::SeqCst);
        Ok(Booted {
            id: spec.id,
            envd_socket: socket,
        })
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(pid) = self.pid(id) {
            kill_and_reap(pid);
        }
        match std::fs::remove_dir_all(self.dir(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RuntimeError::Destroy {
                id: id.to_string(),
                message: e.to_string(),
            }),
            _ => Ok(()),
        }
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.machines())
    }

    async fn is_alive(&self, id: &str) -> bool {
        self.is_running(id)
            && EnvdClient::unix(self.envd_socket(id), "")
                .health()
                .await
                .is_ok()
    }

    fn envd_socket(&self, id: &str) -> PathBuf {
        self.dir(id).join("envd.sock")
    }

    fn is_running(&self, id: &str) -> bool {
        self.pid(id).is_some_and(|pid| {
            // A zombie (killed, not yet reaped) is not running.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit(") ")
                    .next()
                    .is_some_and(|s| !s.starts_with('Z'))
            })
        })
    }
}

fn kill_and_reap(pid: i32) {
    // SAFETY: plain syscalls on a pid we started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The envd binary of this build: beside the test's own target directory,
/// built first if it is not there yet.
fn envd_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let envd = profile_dir.join("envd");
    if !envd.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "envd"])
            .status()
            .expect("running cargo build -p envd");
        assert!(status.success(), "cargo build -p envd failed");
    }
    envd
}

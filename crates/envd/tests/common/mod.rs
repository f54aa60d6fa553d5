//! Runs the real envd binary against a temporary sandbox root.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envd_protocol::client::EnvdClient;

pub const TOKEN: &str = "test-token-0123456789";
pub const USER_UID: u32 = 1000;

pub struct Envd {
    child: Child,
    /// Stands in for the sandbox's `/`.
    pub root: tempfile::TempDir,
    pub socket: PathBuf,
    _socket_dir: tempfile::TempDir,
    pub client: EnvdClient,
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

impl Envd {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra_args: &[&str]) -> Self {
        let root = tempfile::tempdir().unwrap();
        prepare_root(root.path());
        let socket_dir = tempfile::tempdir().unwrap();
        let socket = socket_dir.path().join("envd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_envd"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--root")
            .arg(root.path())
            .args(extra_args)
            .env("ENVD_ACCESS_TOKEN", TOKEN)
            .env("ENVD_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start envd");
        let client = EnvdClient::unix(&socket, TOKEN);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if socket.exists() && client.health().await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "envd did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Envd {
            child,
            root,
            socket,
            _socket_dir: socket_dir,
            client,
        }
    }

    /// Host path of a sandbox path.
    pub fn host(&self, sandbox_path: &str) -> PathBuf {
        self.root.path().join(sandbox_path.trim_start_matches('/'))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal template: passwd/group with `root` and `user` (uid 1000) and
/// the user's home.
fn prepare_root(root: &Path) {
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("root")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nuser:x:1000:\nusers:x:100:user\n",
    )
    .unwrap();
    let home = root.join("home/user");
    std::fs::create_dir_all(&home).unwrap();
    if is_root() {
        std::os::unix::fs::chown(&home, Some(USER_UID), Some(USER_UID)).unwrap();
    }
}

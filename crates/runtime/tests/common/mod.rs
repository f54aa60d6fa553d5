//! Shared setup for the root-only integration tests: the `base` template
//! (built once into a shared, flock-protected dir), the envd binary, a
//! runtime over a private state dir, and leftover checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use sandbox_runtime::namespace::cgroups::SandboxCgroup;
use sandbox_runtime::namespace::host_mounts_under;
use sandbox_runtime::{
    BootSpec, LauncherCommand, Limits, NamespaceConfig, NamespaceRuntime, TemplateCatalog,
};

pub const DEFAULT_TEMPLATES_DIR: &str = "/var/tmp/sandbox-manager-templates";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sandbox_runtime=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Why this host cannot run the namespace tests, if it cannot.
pub fn skip_reason() -> Option<String> {
    let probe_dir = state_dir();
    if let Err(e) = runtime(probe_dir.path()).probe() {
        return Some(e.to_string());
    }
    let has_tool = ["mmdebstrap", "debootstrap"].iter().any(|tool| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain([PathBuf::from("/usr/sbin")])
            .any(|dir| dir.join(tool).is_file())
    });
    if !has_tool {
        return Some("neither mmdebstrap nor debootstrap is installed".into());
    }
    if !envd_binary().is_file() {
        return Some(format!(
            "envd binary {} missing; run `cargo build -p envd` (or set ENVD_BINARY)",
            envd_binary().display()
        ));
    }
    None
}

/// Prints a loud SKIP line and returns true when the test cannot run here.
pub fn should_skip(test: &str) -> bool {
    match skip_reason() {
        Some(reason) => {
            eprintln!("\n*** SKIP: {test}: {reason} ***\n");
            println!("SKIP: {test}: {reason}");
            true
        }
        None => false,
    }
}

pub fn envd_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ENVD_BINARY") {
        return path.into();
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target_dir.join("debug/envd")
}

pub fn templates_dir() -> PathBuf {
    std::env::var_os("SANDBOX_TEMPLATES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TEMPLATES_DIR))
}

pub fn catalog() -> TemplateCatalog {
    let definitions = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/templates");
    TemplateCatalog::load(definitions, templates_dir()).expect("template definitions load")
}

/// Builds `base` unless already built (a no-op after the first run; the
/// catalog's flock serialises concurrent test processes).
pub async fn base_rootfs() -> PathBuf {
    let started = std::time::Instant::now();
    let rootfs = catalog()
        .ensure_built("base")
        .await
        .expect("base template builds");
    eprintln!("base template ready in {:?}", started.elapsed());
    rootfs
}

pub fn runtime(state_dir: &Path) -> NamespaceRuntime {
    NamespaceRuntime::new(NamespaceConfig {
        state_dir: state_dir.to_path_buf(),
        envd_binary: envd_binary(),
        launcher: LauncherCommand {
            program: env!("CARGO_BIN_EXE_sandbox-launcher").into(),
            args_prefix: vec![],
        },
        uid_base: NamespaceConfig::DEFAULT_UID_BASE,
        uid_slots: 64,
    })
    .with_boot_timeout(Duration::from_secs(15))
}

/// A short state dir (unix socket paths are limited to 108 bytes).
pub fn state_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("smrt-")
        .tempdir_in("/tmp")
        .expect("temp state dir")
}

pub fn unique_id(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

pub fn spec(id: &str, rootfs: &Path) -> BootSpec {
    BootSpec {
        id: id.to_string(),
        rootfs: rootfs.to_path_buf(),
        token: format!("token-{id}"),
        hostname: id.to_string(),
        limits: Limits {
            vcpus: 1,
            memory_mb: 256,
            pids_max: 100,
            disk_mib: 1024,
        },
    }
}

/// Everything a destroyed sandbox must not leave behind.
pub fn leftovers(state_dir: &Path, id: &str) -> Vec<String> {
    let mut found = Vec::new();
    let dir = state_dir.join(id);
    if dir.exists() {
        found.push(format!("state dir {} exists", dir.display()));
    }
    if let Ok(cgroup) = SandboxCgroup::for_sandbox(id) {
        for d in cgroup.dirs() {
            if d.exists() {
                found.push(format!("cgroup {} exists", d.display()));
            }
        }
    }
    for mount in host_mounts_under(state_dir) {
        found.push(format!("mount {}", mount.display()));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let needle = dir.display().to_string();
    for line in mountinfo.lines().filter(|l| l.contains(&needle)) {
        found.push(format!("mountinfo mentions the sandbox: {line}"));
    }
    for pid in processes_mentioning(&needle) {
        found.push(format!("process {pid} still references {needle}"));
    }
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let backing =
            std::fs::read_to_string(entry.path().join("loop/backing_file")).unwrap_or_default();
        if backing.contains(&needle) {
            found.push(format!(
                "loop device {} still holds {}",
                entry.path().display(),
                backing.trim()
            ));
        }
    }
    if let Ok(cgroup) = SandboxCgroup::for_sandbox(id) {
        if cgroup.exists() {
            found.push(format!("a cgroup of {id} (device cgroup?) exists"));
        }
    }
    found
}

/// Pids whose command line contains `needle` (the launcher's --sandbox-dir).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                let zombie = std::fs::read_to_string(entry.path().join("stat"))
                    .map(|s| {
                        s.rsplit(')')
                            .next()
                            .unwrap_or("")
                            .trim_start()
                            .starts_with('Z')
                    })
                    .unwrap_or(false);
                if !zombie {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

/// Destroys the listed sandboxes on drop, so a failing assertion does not
/// leak running sandboxes. Declare it after the state dir's `TempDir`.
pub struct Cleanup {
    pub state_dir: PathBuf,
    pub ids: Vec<String>,
}

impl Cleanup {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_path_buf(),
            ids: Vec::new(),
        }
    }

    pub fn track(&mut self, id: &str) {
        self.ids.push(id.to_string());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let runtime = runtime(&self.state_dir);
        for id in &self.ids {
            if let Err(e) = runtime.destroy_sync(id) {
                eprintln!("cleanup of {id} failed: {e}");
            }
        }
    }
}

//! Black-box harness shared by the tests and the benchmarks: starts the real
//! `sandbox-manager` binary on port 0 against a fresh Postgres database and
//! the local Garage (or the embedded default), and hands out API keys for
//! separate owners.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub mod hostile;
mod private_postgres;
mod process;

pub use private_postgres::PrivatePostgres;
pub use process::{open_fds, rss_kib};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// S3 settings of the local Garage, started on first use by scripts/garage.sh.
pub fn garage() -> &'static HashMap<String, String> {
    static GARAGE: OnceLock<HashMap<String, String>> = OnceLock::new();
    GARAGE.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/garage.sh"))
            .arg("env")
            .output()
            .expect("run scripts/garage.sh");
        assert!(
            out.status.success(),
            "scripts/garage.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

/// Templates are built once per machine and shared by every test server.
pub fn shared_templates_dir() -> PathBuf {
    std::env::var("SANDBOX_TEMPLATES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/tmp/sandbox-manager-templates"))
}

/// Builds the built-in templates (a no-op when current; serialised across
/// processes by the builder's own lock).
pub fn ensure_templates(binary: &Path) {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        for template in ["base", "python"] {
            let status = Command::new(binary)
                .args(["templates", "build", template])
                .env(
                    "SANDBOX_MANAGER__RUNTIME__TEMPLATES_DIR",
                    shared_templates_dir(),
                )
                .env("RUST_LOG", "warn")
                .status()
                .expect("run templates build");
            assert!(status.success(), "building template {template} failed");
        }
    });
}

/// The sandbox runtime the black-box suites run on: `SANDBOX_TEST_RUNTIME`
/// (`namespace`, the default, or `microvm`). scripts/test.sh runs the
/// sandbox suites once per runtime.
pub fn test_runtime() -> String {
    std::env::var("SANDBOX_TEST_RUNTIME").unwrap_or_else(|_| "namespace".into())
}

pub fn is_microvm() -> bool {
    test_runtime() == "microvm"
}

/// The file in a sandbox's state dir holding its machine's `PID STARTTIME`.
pub fn machine_pid_file() -> &'static str {
    if is_microvm() {
        "vm.pid"
    } else {
        "launcher.pid"
    }
}

/// Kernel, images and snapshots shared by every microVM test server.
pub fn shared_images_dir() -> PathBuf {
    std::env::var("SANDBOX_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/tmp/sandbox-manager-images"))
}

/// Settings every microVM test server (and the image build) uses.
fn microvm_settings() -> Vec<(String, String)> {
    vec![
        ("SANDBOX_MANAGER__RUNTIME__KIND".into(), "microvm".into()),
        (
            "SANDBOX_MANAGER__RUNTIME__MICROVM__IMAGES_DIR".into(),
            shared_images_dir().display().to_string(),
        ),
        (
            "SANDBOX_MANAGER__RUNTIME__TEMPLATES_DIR".into(),
            shared_templates_dir().display().to_string(),
        ),
    ]
}

/// Builds the guest kernel, images and snapshots of the built-in templates
/// (cached: a no-op when current).
pub fn ensure_microvm_images(binary: &Path) {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new(binary)
            .args(["images", "build"])
            .envs(microvm_settings())
            .env("RUST_LOG", "warn")
            .status()
            .expect("run images build");
        assert!(status.success(), "building microVM images failed");
    });
}

/// Id-slot claims (`/run/sandbox-manager/*-slots/N`) held by sandboxes
/// whose state lives under `state_dir`.
pub fn slot_claims_under(state_dir: &Path) -> Vec<PathBuf> {
    let state_dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let mut found = Vec::new();
    for kind in ["uid-slots", "gid-slots"] {
        let dir = Path::new("/run/sandbox-manager").join(kind);
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let holder = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if Path::new(&holder).starts_with(&state_dir) {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Whether this machine can run sandboxes on the test runtime; prints why not.
pub fn sandboxes_supported(test: &str) -> bool {
    if is_microvm() {
        let missing = ["qemu-system-x86_64", "qemu-img", "mkfs.ext4", "debugfs"]
            .into_iter()
            .find(|tool| {
                !Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .stdout(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
        let reason = match missing {
            Some(tool) => format!("{tool} is not installed (scripts/microvm-deps.sh installs it)"),
            None if !Path::new("/usr/src/linux-source-6.1.tar.xz").exists() => {
                "no /usr/src/linux-source-6.1.tar.xz to build the guest kernel from".into()
            }
            None => String::new(),
        };
        if !reason.is_empty() {
            eprintln!("SKIP {test} (microvm): {reason}");
            return false;
        }
    }
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let tool = ["/usr/bin/mmdebstrap", "/usr/sbin/debootstrap"]
        .iter()
        .any(|p| Path::new(p).exists());
    let reason = match (root, tool) {
        (false, _) => "not running as root (the namespace runtime needs root)",
        (_, false) => "neither mmdebstrap nor debootstrap is installed (templates cannot be built)",
        _ => return true,
    };
    eprintln!("SKIP {test}: {reason}");
    false
}

/// A Garage of its own (other ports and state), for tests that stop it.
pub struct PrivateGarage {
    env: Vec<(String, String)>,
    pub s3: HashMap<String, String>,
}

impl PrivateGarage {
    pub fn start(name: &str, port_base: u16) -> PrivateGarage {
        let env = vec![
            (
                "GARAGE_DIR".to_string(),
                format!("/var/tmp/sandbox-manager-garage-{name}"),
            ),
            ("GARAGE_S3_PORT".to_string(), port_base.to_string()),
            ("GARAGE_RPC_PORT".to_string(), (port_base + 1).to_string()),
            ("GARAGE_ADMIN_PORT".to_string(), (port_base + 3).to_string()),
        ];
        let mut garage = PrivateGarage {
            env,
            s3: HashMap::new(),
        };
        let out = garage.script("env");
        garage.s3 = String::from_utf8(out)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        garage
    }

    fn script(&self, verb: &str) -> Vec<u8> {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/garage.sh"))
            .arg(verb)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run scripts/garage.sh");
        assert!(
            out.status.success(),
            "garage.sh {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn stop(&self) {
        self.script("stop");
    }

    pub fn resume(&self) {
        self.script("resume");
    }
}

impl Drop for PrivateGarage {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/garage.sh"))
            .arg("stop")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output();
    }
}

pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A new, empty database on the test Postgres; returns its URL.
pub fn fresh_postgres_database() -> String {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let status = Command::new("bash")
            .arg(repo_root().join("scripts/postgres.sh"))
            .status()
            .unwrap();
        assert!(
            status.success(),
            "scripts/postgres.sh could not start Postgres"
        );
    });
    let name = format!("api_test_{:016x}", rand::random::<u64>());
    let status = Command::new("psql")
        .args([
            &postgres_admin_url(),
            "-qc",
            &format!("CREATE DATABASE {name}"),
        ])
        .status()
        .expect("psql");
    assert!(status.success(), "could not create database {name}");
    let base = postgres_admin_url().rsplit_once('/').unwrap().0.to_string();
    format!("{base}/{name}")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    /// SQLite + local blob directory, no config beyond data_dir.
    Embedded,
    /// Postgres + Garage.
    Production,
}

pub struct ServerOptions {
    /// The `sandbox-manager` executable to run.
    pub binary: PathBuf,
    pub backend: Backend,
    /// `SANDBOX_MANAGER__…` overrides for the server process.
    pub env: Vec<(String, String)>,
    pub bucket: Option<String>,
}

impl ServerOptions {
    /// Postgres + Garage; sandboxes disabled (see [`Self::with_sandboxes`]).
    pub fn production(binary: impl Into<PathBuf>) -> Self {
        Self::new(binary.into(), Backend::Production)
    }

    /// The embedded default; sandboxes disabled (see [`Self::with_sandboxes`]).
    pub fn embedded(binary: impl Into<PathBuf>) -> Self {
        Self::new(binary.into(), Backend::Embedded)
    }

    fn new(binary: PathBuf, backend: Backend) -> Self {
        ServerOptions {
            binary,
            backend,
            env: Vec::new(),
            bucket: None,
        }
        .with_setting("runtime.kind", "disabled")
    }

    /// Sandboxes on the test runtime ([`test_runtime`]) from the shared, pre-built templates, with warm
    /// pools of `base_pool` and `python_pool`.
    pub fn with_sandboxes(mut self, base_pool: usize, python_pool: usize) -> Self {
        ensure_templates(&self.binary);
        let templates = shared_templates_dir().display().to_string();
        if is_microvm() {
            ensure_microvm_images(&self.binary);
            self.env.extend(microvm_settings());
        } else {
            self = self.with_setting("runtime.kind", "namespace");
        }
        self.with_setting("runtime.templates_dir", &templates)
            .with_setting("runtime.build_templates_on_start", "false")
            .with_setting("pool.sizes.base", &base_pool.to_string())
            .with_setting("pool.sizes.python", &python_pool.to_string())
    }

    /// Uses another S3 endpoint (e.g. a private Garage a test may stop).
    pub fn with_s3(self, s3: &HashMap<String, String>) -> Self {
        self.with_setting("blobs.s3.endpoint", &s3["S3_ENDPOINT"])
    }

    /// Overrides one config key through the environment, e.g.
    /// `with_setting("volumes.max_upload_bytes", "1024")`.
    pub fn with_setting(mut self, key: &str, value: &str) -> Self {
        let name = format!("SANDBOX_MANAGER__{}", key.replace('.', "__").to_uppercase());
        self.env.push((name, value.to_string()));
        self
    }
}

/// The config file a test server starts with (serialized, so paths and
/// secrets are quoted correctly whatever they hold); per-test settings come
/// on top through the environment ([`ServerOptions::with_setting`]).
#[derive(serde::Serialize)]
struct TestConfig {
    listen: &'static str,
    data_dir: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<DatabaseSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    blobs: Option<BlobsSection>,
}

#[derive(serde::Serialize)]
struct DatabaseSection {
    url: String,
}

#[derive(serde::Serialize)]
struct BlobsSection {
    backend: &'static str,
    s3: S3Section,
}

#[derive(serde::Serialize)]
struct S3Section {
    endpoint: String,
    region: String,
    bucket: String,
    access_key_id: String,
    secret_access_key: String,
}

pub struct TestServer {
    child: Option<Child>,
    pub base_url: String,
    pub data_dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// Key of owner `default`, created on first start.
    pub api_key: String,
    pub http: reqwest::Client,
    binary: PathBuf,
    env: Vec<(String, String)>,
}

impl TestServer {
    pub async fn start(options: ServerOptions) -> TestServer {
        let data_dir = tempfile::tempdir().unwrap();
        let config_path = data_dir.path().join("config.toml");
        let mut config = TestConfig {
            listen: "127.0.0.1:0",
            data_dir: data_dir.path().to_path_buf(),
            database: None,
            blobs: None,
        };
        if options.backend == Backend::Production {
            let g = garage();
            config.database = Some(DatabaseSection {
                url: fresh_postgres_database(),
            });
            config.blobs = Some(BlobsSection {
                backend: "s3",
                s3: S3Section {
                    endpoint: g["S3_ENDPOINT"].clone(),
                    region: g["S3_REGION"].clone(),
                    bucket: options
                        .bucket
                        .clone()
                        .unwrap_or_else(|| g["S3_BUCKET"].clone()),
                    access_key_id: g["AWS_ACCESS_KEY_ID"].clone(),
                    secret_access_key: g["AWS_SECRET_ACCESS_KEY"].clone(),
                },
            });
        }
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let mut server = TestServer {
            child: None,
            base_url: String::new(),
            config_path,
            data_dir,
            api_key: String::new(),
            http: reqwest::Client::new(),
            binary: options.binary,
            env: options.env,
        };
        server.launch().await;
        server.api_key = std::fs::read_to_string(server.data_dir.path().join("api-key"))
            .unwrap()
            .trim()
            .to_string();
        server
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.path().join("server.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts (or restarts) the process and waits for its listen line.
    pub async fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = Command::new(&self.binary)
            .args(["serve", "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "info,sandbox_manager=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn sandbox-manager");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "server did not start; log:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                )
            });
        self.base_url = format!("http://{addr}");
        self.child = Some(child);
    }

    /// SIGTERM and wait: the server's own shutdown path runs.
    pub fn stop_gracefully(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// SIGKILL: no graceful shutdown, like a crash.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// A key for another owner, through `sandbox-manager keys create`.
    pub fn create_key(&self, owner: &str) -> String {
        let out = Command::new(&self.binary)
            .args(["keys", "create", "--owner", owner, "--config"])
            .arg(&self.config_path)
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keys create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string()
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(&self.api_key)
    }
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(&self.api_key)
    }
    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.delete(self.url(path)).bearer_auth(&self.api_key)
    }
    pub fn patch(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.patch(self.url(path)).bearer_auth(&self.api_key)
    }
    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.put(self.url(path)).bearer_auth(&self.api_key)
    }

    /// `GET /health`, parsed.
    pub async fn health(&self) -> serde_json::Value {
        self.get("/health")
            .send()
            .await
            .expect("GET /health")
            .json()
            .await
            .expect("/health is JSON")
    }

    /// The sandbox runtime's state directory of this server.
    pub fn sandbox_state_dir(&self) -> PathBuf {
        self.data_dir.path().join("sandboxes")
    }

    /// The per-sandbox directories in the state dir (dot-entries hold the
    /// runtime's own bookkeeping).
    pub fn sandbox_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.sandbox_state_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .collect()
    }

    /// What destroyed sandboxes must not leave: their directories in the
    /// state dir and their host-wide claims on user/group id slots.
    pub fn sandbox_leftovers(&self) -> Vec<PathBuf> {
        let mut found = self.sandbox_dirs();
        found.extend(slot_claims_under(&self.sandbox_state_dir()));
        found
    }

    /// A counter's value in `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        self.metric_where(name, "").await
    }

    /// Waits until at least `size` warm sandboxes are ready (at most 60 s).
    pub async fn wait_for_pool(&self, size: usize) {
        for _ in 0..1200 {
            if self.metric("pool_ready").await as usize >= size {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the warm pool never reached {size}");
    }

    /// Like [`Self::metric`], only over label sets containing `label`
    /// (e.g. `result="hit"`).
    pub async fn metric_where(&self, name: &str, label: &str) -> f64 {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        let text = response.text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter(|l| l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.crash();
        // Sandboxes outlive a crashed server by design (it re-adopts them);
        // a test's server never comes back, so its machines go with it.
        kill_processes_mentioning(&self.sandbox_state_dir());
        kill_sandbox_cgroups(&self.sandbox_state_dir());
        // Custom template builds and restored snapshots live in the data
        // dir (removed with it); their microVM images live in the shared
        // images dir, keyed by the build's name: they go too.
        for build in std::fs::read_dir(self.data_dir.path().join("builds"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let images = shared_images_dir()
                .join("templates")
                .join(build.file_name());
            let _ = std::fs::remove_dir_all(images);
        }
    }
}

/// SIGKILLs what is left in the cgroups of the sandboxes under `state_dir`:
/// a namespace sandbox's envd is its PID 1 and does not name the state
/// directory, so it survives its killed launcher (reparented to init).
fn kill_sandbox_cgroups(state_dir: &Path) {
    let ids: Vec<String> = std::fs::read_dir(state_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| format!("/sandbox-manager/{}\n", e.file_name().to_string_lossy()))
        .collect();
    if ids.is_empty() {
        return;
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cgroups = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        if ids.iter().any(|id| cgroups.contains(id.as_str())) {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
    }
}

/// SIGKILLs every process whose command line names `dir` (QEMU, the VM
/// relays, namespace launchers of this server's sandboxes).
fn kill_processes_mentioning(dir: &Path) {
    let needle = dir.display().to_string();
    let me = std::process::id().to_string();
    // A second pass catches a QEMU that was daemonizing during the first.
    for _ in 0..2 {
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = entry.file_name().to_string_lossy().to_string();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = Command::new("kill").args(["-9", &pid]).status();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A gzip-compressed tar holding `files` (name, contents).
pub fn targz(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, name, data.as_slice())
            .unwrap();
    }
    let tar = builder.into_inner().unwrap();
    gzip(&tar)
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// Bytes that compress poorly, so archives reach multipart sizes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A client of the bucket named `bucket_key` in `s3` (the settings
/// `scripts/garage.sh env` prints), to look at what the server stored.
pub fn s3_store(s3: &HashMap<String, String>, bucket_key: &str) -> sandbox_blobs::S3BlobStore {
    sandbox_blobs::S3BlobStore::new(sandbox_blobs::S3Settings {
        endpoint: Some(s3["S3_ENDPOINT"].clone()),
        region: s3["S3_REGION"].clone(),
        bucket: s3[bucket_key].clone(),
        path_style: true,
        credentials: Some((
            s3["AWS_ACCESS_KEY_ID"].clone(),
            s3["AWS_SECRET_ACCESS_KEY"].clone(),
        )),
        part_size: 8 << 20,
        max_inflight_parts: 2,
    })
    .unwrap()
}

/// Polls `check` every 200 ms until it holds; panics naming `what` after `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what}: not within {within:?}");
}

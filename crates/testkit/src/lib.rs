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
    pub fn production(binary: impl Into<PathBuf>) -> Self {
        ServerOptions {
            binary: binary.into(),
            backend: Backend::Production,
            env: Vec::new(),
            bucket: None,
        }
    }
    pub fn embedded(binary: impl Into<PathBuf>) -> Self {
        ServerOptions {
            binary: binary.into(),
            backend: Backend::Embedded,
            env: Vec::new(),
            bucket: None,
        }
    }
    /// Overrides one config key through the environment, e.g.
    /// `with_setting("volumes.max_upload_bytes", "1024")`.
    pub fn with_setting(mut self, key: &str, value: &str) -> Self {
        let name = format!("SANDBOX_MANAGER__{}", key.replace('.', "__").to_uppercase());
        self.env.push((name, value.to_string()));
        self
    }
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
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            data_dir.path().display()
        );
        if options.backend == Backend::Production {
            let g = garage();
            let bucket = options
                .bucket
                .clone()
                .unwrap_or_else(|| g["S3_BUCKET"].clone());
            toml.push_str(&format!(
                "[database]\nurl = \"{}\"\n[blobs]\nbackend = \"s3\"\n[blobs.s3]\nendpoint = \"{}\"\n\
                 region = \"{}\"\nbucket = \"{bucket}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
                fresh_postgres_database(),
                g["S3_ENDPOINT"],
                g["S3_REGION"],
                g["AWS_ACCESS_KEY_ID"],
                g["AWS_SECRET_ACCESS_KEY"],
            ));
        }
        std::fs::write(&config_path, toml).unwrap();
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
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.crash();
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

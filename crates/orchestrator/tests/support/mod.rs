//! An orchestrator on real parts that need no privileges: SQLite, a local
//! blob directory, and envd processes as machines ([`ProcessRuntime`]).

#![allow(dead_code)] // each test binary uses part of it

mod process_runtime;

use async_trait::async_trait;
use bytes::Bytes;
pub use process_runtime::ProcessRuntime;
use sandbox_blobs::{BlobReader, BlobResult, BlobStore, BlobUpload, LocalBlobStore};
use sandbox_orchestrator::{
    Attachment, BlobCache, CreateSandbox, Orchestrator, OrchestratorConfig, OrchestratorError,
    UnpackLimits,
};
use sandbox_runtime::{Runtime, TemplateCatalog, TemplateDef};
use sandbox_store::{NewVolume, Owner, Sandbox, Store, Volume};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const TEMPLATE: &str = "t";

/// The real local blob store, counting reads and failing them on demand.
pub struct CountingBlobs {
    inner: LocalBlobStore,
    pub gets: AtomicUsize,
    pub down: AtomicBool,
}

#[async_trait]
impl BlobStore for CountingBlobs {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn check(&self) -> BlobResult<()> {
        self.inner.check().await
    }
    async fn begin_upload(&self, key: &str) -> BlobResult<Box<dyn BlobUpload>> {
        self.inner.begin_upload(key).await
    }
    async fn get(&self, key: &str) -> BlobResult<BlobReader> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(sandbox_blobs::BlobError::Backend(
                "object storage is down".into(),
            ));
        }
        self.inner.get(key).await
    }
    async fn delete(&self, key: &str) -> BlobResult<()> {
        self.inner.delete(key).await
    }
    async fn list_keys(&self, prefix: &str) -> BlobResult<Vec<String>> {
        self.inner.list_keys(prefix).await
    }
    async fn pending_uploads(&self, prefix: &str) -> BlobResult<Vec<String>> {
        self.inner.pending_uploads(prefix).await
    }
    async fn abort_uploads(&self, prefix: &str) -> BlobResult<usize> {
        self.inner.abort_uploads(prefix).await
    }
}

pub struct Options {
    pub pool_size: usize,
    pub max_cold_boots: usize,
    pub strict_hydrate: bool,
    pub cache_max_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pool_size: 0,
            max_cold_boots: 4,
            strict_hydrate: false,
            cache_max_bytes: 1 << 30,
        }
    }
}

pub struct Harness {
    pub orchestrator: Arc<Orchestrator>,
    pub runtime: Arc<ProcessRuntime>,
    pub store: Arc<dyn Store>,
    pub blobs: Arc<CountingBlobs>,
    pub owner: Owner,
    templates: Arc<TemplateCatalog>,
    options: Options,
    dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start(options: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = sandbox_store::connect(
            &format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("db.sqlite").display()
            ),
            4,
        )
        .await
        .unwrap();
        store.migrate().await.unwrap();
        let blobs = Arc::new(CountingBlobs {
            inner: LocalBlobStore::open(dir.path().join("blobs"))
                .await
                .unwrap(),
            gets: AtomicUsize::new(0),
            down: AtomicBool::new(false),
        });
        let templates = Arc::new(template_catalog(&dir.path().join("templates")));
        let runtime = Arc::new(ProcessRuntime::new(&dir.path().join("machines")));
        let owner = store.ensure_owner("alice").await.unwrap();
        let mut harness = Harness {
            orchestrator: Orchestrator::new(
                store.clone(),
                Arc::new(BlobCache::new(dir.path().join("cache"), 0, blobs.clone()).unwrap()),
                None,
                Err("not started".into()),
                templates.clone(),
                config(&options),
            ),
            runtime,
            store,
            blobs,
            owner,
            templates,
            options,
            dir,
        };
        harness.orchestrator = harness.new_orchestrator().await;
        harness
    }

    /// An orchestrator as a server start makes one: reconcile, then the
    /// liveness watch and the pool refill.
    async fn new_orchestrator(&self) -> Arc<Orchestrator> {
        let cache = BlobCache::new(
            self.dir.path().join("cache"),
            self.options.cache_max_bytes,
            self.blobs.clone(),
        )
        .unwrap();
        let runtime: Arc<dyn Runtime> = self.runtime.clone();
        let orchestrator = Orchestrator::new(
            self.store.clone(),
            Arc::new(cache),
            None,
            Ok(runtime),
            self.templates.clone(),
            config(&self.options),
        );
        orchestrator.reconcile().await.unwrap();
        orchestrator.start_liveness_watch();
        orchestrator.start_pool_refill();
        orchestrator
    }

    /// A server restart: the old orchestrator gives up its pool, a new one
    /// starts over the same database, blobs and machines.
    pub async fn restart(&mut self) {
        self.orchestrator.shutdown().await;
        self.orchestrator = self.new_orchestrator().await;
    }

    pub fn request(&self, volumes: &[(&Volume, &str)]) -> CreateSandbox {
        CreateSandbox {
            template: TEMPLATE.into(),
            timeout_secs: 300,
            volumes: volumes
                .iter()
                .map(|(volume, mount_path)| Attachment {
                    volume_id: volume.id.clone(),
                    mount_path: mount_path.to_string(),
                })
                .collect(),
            ..Default::default()
        }
    }

    /// A ready volume holding `bytes` as its blob (a tar.gz, or not).
    pub async fn volume_from_bytes(&self, bytes: Vec<u8>) -> Volume {
        let id = sandbox_orchestrator::new_sandbox_id().replace("sbx-", "vol-");
        let key = sandbox_blobs::volume_key(&self.owner.id, &id);
        let mut upload = self.blobs.begin_upload(&key).await.unwrap();
        upload.write(Bytes::from(bytes.clone())).await.unwrap();
        upload.complete().await.unwrap();
        let new = NewVolume {
            id: id.clone(),
            owner_id: self.owner.id.clone(),
            name: "test".into(),
            blob_key: key,
            size_bytes: bytes.len() as i64,
            sha256: hex::encode(sha2::Digest::finalize(
                <sha2::Sha256 as sha2::Digest>::new_with_prefix(&bytes),
            )),
            content_type: "application/gzip".into(),
            uncompressed_bytes: 0,
            entry_count: 0,
            metadata: BTreeMap::new(),
        };
        self.store.insert_pending_volume(&new).await.unwrap();
        self.store
            .finish_pending_volume(&new)
            .await
            .unwrap()
            .unwrap()
    }

    /// A ready volume whose archive holds `files`.
    pub async fn volume(&self, files: &[(&str, &[u8])]) -> Volume {
        self.volume_from_bytes(targz(files)).await
    }

    pub fn template_rootfs(&self) -> std::path::PathBuf {
        self.templates.rootfs_path(TEMPLATE)
    }

    pub async fn create(&self, request: CreateSandbox) -> Result<Sandbox, OrchestratorError> {
        self.orchestrator.create(&self.owner.id, request).await
    }

    /// Waits (up to 20 s) until the runtime holds `count` machines.
    pub async fn wait_for_machines(&self, count: usize) {
        let reached = eventually(Duration::from_secs(20), async || {
            self.runtime.machines().len() == count
        })
        .await;
        assert!(
            reached,
            "expected {count} machines: {:?}",
            self.runtime.machines()
        );
    }

    /// Waits (up to 10 s) until `id` is no longer a running sandbox.
    pub async fn wait_until_killed(&self, id: &str, why: &str) {
        let killed = eventually(Duration::from_secs(10), async || {
            !self.is_recorded_running(id).await
        })
        .await;
        assert!(killed, "{id}: {why}");
    }

    /// Whether the orchestrator still has a running row for `id`.
    pub async fn is_recorded_running(&self, id: &str) -> bool {
        self.store
            .get_sandbox(&self.owner.id, id)
            .await
            .unwrap()
            .is_some_and(|s| s.state == sandbox_store::SandboxState::Running)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Machines are processes: none may outlive the test.
        for id in self.runtime.machines() {
            self.runtime.crash(&id);
        }
    }
}

fn config(options: &Options) -> OrchestratorConfig {
    OrchestratorConfig {
        node_id: "test-node".into(),
        pool_sizes: BTreeMap::from([(TEMPLATE.to_string(), options.pool_size)]),
        max_cold_boots: options.max_cold_boots,
        strict_hydrate: options.strict_hydrate,
        unpack_limits: UnpackLimits::default(),
        builds: Default::default(),
        max_snapshots_per_sandbox: 16,
    }
}

/// A "built" template: a directory with what envd needs (users, a home,
/// /tmp) and the stamp that marks it ready.
fn template_catalog(dir: &Path) -> TemplateCatalog {
    let def = TemplateDef::parse(TEMPLATE, "suite = \"test\"\nmirror = \"none\"\n").unwrap();
    let catalog = TemplateCatalog::from_definitions([def.clone()], dir);
    let rootfs = catalog.rootfs_path(TEMPLATE);
    for sub in ["etc", "root", "tmp", "home/user"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    std::fs::write(dir.join(TEMPLATE).join("stamp"), def.content_hash()).unwrap();
    assert_eq!(
        catalog.status(TEMPLATE).unwrap(),
        sandbox_runtime::TemplateStatus::Ready
    );
    catalog
}

pub fn targz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// Polls `check` until it holds or `within` passes.
pub async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

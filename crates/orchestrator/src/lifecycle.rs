//! Create, kill, deadlines and restart reconciliation.

use crate::cache::BlobCache;
use crate::error::OrchestratorError;
use crate::hydrate::{
    hydrate, hydrate_layered, Attachment, HydrateStatus, LayerTarget, UnpackLimits,
};
use crate::ids::{new_sandbox_id, new_token};
use crate::layers::{LayerStats, LayerStore};
use crate::pool::{WarmPool, WarmSandbox};
use crate::timers::Deadlines;
use crate::unrecorded::Unrecorded;
use chrono::{DateTime, Utc};
use envd_protocol::client::EnvdClient;
use futures::FutureExt;
use sandbox_runtime::EgressPolicy;
use sandbox_runtime::{BootSpec, Runtime, RuntimeError, TemplateCatalog, TemplateStatus};
use sandbox_store::{Sandbox, SandboxState, Store, Volume};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

mod build;
mod pause;
mod snapshot;
mod usage;

pub use build::{BuildConfig, BuildRequest, BuildState, TRUNCATED};
pub use usage::UsageSample;

type Result<T> = std::result::Result<T, OrchestratorError>;

#[derive(Debug, Clone)]
pub struct OrchestratorConfig {
    /// This node's identity, recorded on every sandbox it runs.
    pub node_id: String,
    /// Warm sandboxes kept booted per template.
    pub pool_sizes: BTreeMap<String, usize>,
    /// Boots allowed on the request path at once when a pool is empty.
    pub max_cold_boots: usize,
    /// Fail a create whose hydration failed (default: report and go on).
    pub strict_hydrate: bool,
    /// Archive limits each hydration's unpack enforces.
    pub unpack_limits: UnpackLimits,
    /// Custom template builds.
    pub builds: BuildConfig,
    /// Snapshots one sandbox may keep.
    pub max_snapshots_per_sandbox: usize,
}

/// A validated create request.
#[derive(Debug, Clone, Default)]
pub struct CreateSandbox {
    pub template: String,
    /// 0 = no deadline.
    pub timeout_secs: u64,
    pub metadata: BTreeMap<String, String>,
    pub envs: BTreeMap<String, String>,
    /// Accepted create fields we store but do not act on (network, …).
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Validated attachments (absolute, normalised, non-overlapping).
    pub volumes: Vec<Attachment>,
    /// Per-request override of `strict_hydrate`.
    pub strict_hydrate: Option<bool>,
}

pub struct Orchestrator {
    store: Arc<dyn Store>,
    blob_cache: Arc<BlobCache>,
    /// Volume layers (`hydrate.mode = "layer"`); `None`: copy per sandbox.
    layers: Option<Arc<LayerStore>>,
    /// `None` when this host cannot run sandboxes; the reason says why.
    runtime: std::result::Result<Arc<dyn Runtime>, String>,
    templates: Arc<TemplateCatalog>,
    pool: WarmPool,
    deadlines: Deadlines,
    agents: Mutex<HashMap<String, EnvdClient>>,
    /// Machines we hold without a running row; the orphan sweep spares them.
    unrecorded: Unrecorded,
    /// Templates seen ready; a built template stays built while we run.
    ready_templates: Mutex<HashSet<String>>,
    cold_boots: Semaphore,
    /// Held by the refill loop while it boots; see `shutdown`.
    refilling: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
    /// Pauses and resumes go one at a time (they are rare and short).
    pausing: tokio::sync::Mutex<()>,
    /// Metrics samples and the last CPU reading, per sandbox.
    usage: Mutex<HashMap<String, usage::UsageHistory>>,
    /// Live logs of the template builds running here.
    builds: Mutex<HashMap<String, Arc<Mutex<build::BuildLog>>>>,
    build_slots: Semaphore,
    config: OrchestratorConfig,
    me: Weak<Orchestrator>,
}

fn volume_forbidden(volume_id: &str) -> OrchestratorError {
    OrchestratorError::Forbidden(format!(
        "volume {volume_id} cannot be attached: it does not exist, was deleted, or belongs to another owner"
    ))
}

/// `network.deny_out` with `0.0.0.0/0` and nothing allowed: how the SDKs
/// say `allow_internet_access=False`.
fn denies_all_outbound(egress: &EgressPolicy) -> bool {
    egress.allow_out.is_empty()
        && egress
            .deny_out
            .iter()
            .any(|cidr| cidr.is_ipv4() && cidr.prefix == 0)
}

const LIVENESS_INTERVAL: Duration = Duration::from_secs(2);

/// `from + timeout_secs`, or `None` for 0. A timeout too large for a date
/// (the API clamps long before) saturates instead of panicking.
fn deadline(from: DateTime<Utc>, timeout_secs: u64) -> Option<DateTime<Utc>> {
    if timeout_secs == 0 {
        return None;
    }
    let span = i64::try_from(timeout_secs)
        .ok()
        .and_then(chrono::Duration::try_seconds)
        .unwrap_or(chrono::Duration::MAX);
    Some(
        from.checked_add_signed(span)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    )
}

impl Orchestrator {
    /// `layers`: share volumes copy-on-write from this store, which the
    /// runtime accepted (`Runtime::check_layer_store`); `None` copies them.
    pub fn new(
        store: Arc<dyn Store>,
        blob_cache: Arc<BlobCache>,
        layers: Option<Arc<LayerStore>>,
        runtime: std::result::Result<Arc<dyn Runtime>, String>,
        templates: Arc<TemplateCatalog>,
        config: OrchestratorConfig,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Orchestrator {
            store,
            blob_cache,
            layers,
            runtime,
            templates,
            pool: WarmPool::new(config.pool_sizes.clone()),
            deadlines: Deadlines::default(),
            agents: Mutex::default(),
            unrecorded: Unrecorded::default(),
            ready_templates: Mutex::default(),
            cold_boots: Semaphore::new(config.max_cold_boots.max(1)),
            refilling: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            pausing: tokio::sync::Mutex::new(()),
            usage: Mutex::default(),
            builds: Mutex::default(),
            build_slots: Semaphore::new(config.builds.max_concurrent.max(1)),
            config,
            me: me.clone(),
        })
    }

    pub fn runtime_kind(&self) -> std::result::Result<&'static str, String> {
        self.runtime
            .as_ref()
            .map(|r| r.kind())
            .map_err(Clone::clone)
    }

    /// The driver's own account of itself (kind, accelerator, …).
    pub fn runtime_description(&self) -> std::result::Result<serde_json::Value, String> {
        self.runtime
            .as_ref()
            .map(|r| r.describe())
            .map_err(Clone::clone)
    }

    /// How volumes reach sandboxes here: `"layer"` (shared copy-on-write)
    /// or `"copy"` (unpacked per sandbox), with the layer store's usage.
    pub fn hydrate_mode(&self) -> (&'static str, Option<LayerStats>) {
        match &self.layers {
            Some(layers) => ("layer", Some(layers.stats())),
            None => ("copy", None),
        }
    }

    fn runtime(&self) -> Result<&Arc<dyn Runtime>> {
        self.runtime
            .as_ref()
            .map_err(|why| OrchestratorError::RuntimeUnavailable(why.clone()))
    }

    fn template_rootfs(&self, name: &str) -> Result<std::path::PathBuf> {
        if self.ready_templates.lock().unwrap().contains(name) {
            return Ok(self.templates.rootfs_path(name));
        }
        match self.templates.status(name) {
            Err(_) => Err(OrchestratorError::TemplateNotFound(name.to_string())),
            Ok(TemplateStatus::Ready) => {
                self.ready_templates
                    .lock()
                    .unwrap()
                    .insert(name.to_string());
                Ok(self.templates.rootfs_path(name))
            }
            Ok(_) => Err(OrchestratorError::TemplateNotReady(name.to_string())),
        }
    }

    /// Boots a fresh sandbox of `template` and waits for its agent.
    async fn boot(&self, template: &str) -> Result<WarmSandbox> {
        let rootfs = self.template_rootfs(template)?;
        let definition = self
            .templates
            .get(template)
            .ok_or_else(|| OrchestratorError::TemplateNotFound(template.to_string()))?;
        self.boot_rootfs(template, rootfs, definition.limits())
            .await
    }

    /// Boots a sandbox from `rootfs` (`label` names it in errors and metrics).
    async fn boot_rootfs(
        &self,
        label: &str,
        rootfs: std::path::PathBuf,
        limits: sandbox_runtime::Limits,
    ) -> Result<WarmSandbox> {
        let runtime = self.runtime()?;
        let id = new_sandbox_id();
        let held = self.unrecorded.hold(&id);
        let token = new_token();
        let started = Instant::now();
        let booted = runtime
            .boot(BootSpec {
                id: id.clone(),
                rootfs,
                token: token.clone(),
                hostname: id.clone(),
                limits,
            })
            .await
            .map_err(|e| match e {
                RuntimeError::NotReady(why) => {
                    OrchestratorError::TemplateNotReady(format!("{label}: {why}"))
                }
                e => OrchestratorError::NoCapacity(e),
            })?;
        metrics::histogram!("sandbox_boot_seconds", "template" => label.to_string())
            .record(started.elapsed().as_secs_f64());
        Ok(WarmSandbox {
            booted,
            token,
            held,
        })
    }

    /// Notices sandboxes whose machine died on its own (a crashed QEMU, an
    /// OOM-killed launcher) and records them as killed; also publishes the
    /// idle pool's memory.
    pub fn start_liveness_watch(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LIVENESS_INTERVAL).await;
                let Some(orchestrator) = me.upgrade() else {
                    return;
                };
                orchestrator.check_liveness().await;
            }
        });
    }

    async fn check_liveness(&self) {
        let Ok(runtime) = self.runtime() else { return };
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        // Listed before the holds and the rows are read: a machine whose row
        // is written in between is then still held or already has its row.
        let listed = match runtime.list().await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(error = %e, "liveness check: cannot list machines");
                return;
            }
        };
        let held = self.unrecorded.snapshot();
        let running = match self.store.running_sandboxes_on(&self.config.node_id).await {
            Ok(running) => running,
            Err(e) => {
                tracing::warn!(error = %e, "liveness check: cannot list sandboxes");
                return;
            }
        };
        let recorded: HashSet<&str> = running.iter().map(|s| s.id.as_str()).collect();
        for id in listed {
            if !held.contains(&id) && !recorded.contains(id.as_str()) {
                tracing::warn!(sandbox_id = %id, "destroying a machine with no running sandbox row");
                metrics::counter!("orphan_machines_destroyed_total").increment(1);
                self.destroy_quietly(&id).await;
            }
        }
        for sandbox in running {
            // A held machine is being replaced (a restore) right now.
            if held.contains(&sandbox.id) {
                continue;
            }
            if !runtime.is_running(&sandbox.id) {
                tracing::warn!(sandbox_id = %sandbox.id, "sandbox machine died: marking killed");
                metrics::counter!("sandboxes_died_total").increment(1);
                self.deadlines.cancel(&sandbox.id);
                self.terminate(&sandbox.id).await;
            }
        }
        let mut pss: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (template, id) in self.pool.idle_ids() {
            if let Some(bytes) = runtime.memory_pss_bytes(&id) {
                let entry = pss.entry(template).or_default();
                entry.0 += bytes;
                entry.1 += 1;
            }
        }
        for (template, (total, count)) in pss {
            metrics::gauge!("pool_idle_pss_bytes", "template" => template)
                .set(total as f64 / count as f64);
        }
    }

    /// Keeps every pool at its target size, for as long as the process runs.
    pub fn start_pool_refill(self: &Arc<Self>) {
        let orchestrator = self.clone();
        tokio::spawn(async move {
            loop {
                let short = orchestrator.refill_once().await;
                // Retry soon after a failure or an unready template.
                let pause = if short {
                    Duration::from_secs(2)
                } else {
                    Duration::from_secs(30)
                };
                let _ = tokio::time::timeout(pause, orchestrator.pool.refill.notified()).await;
            }
        });
    }

    /// Boots until every pool is full; returns true if one stayed short.
    async fn refill_once(&self) -> bool {
        // Held across boots so shutdown can wait for one in flight.
        let _refilling = self.refilling.lock().await;
        if self.runtime.is_err() || self.shutting_down.load(Ordering::SeqCst) {
            return false;
        }
        let mut short = false;
        let targets: Vec<(String, usize)> = self
            .pool
            .templates()
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        for (template, target) in targets {
            while self.pool.len(&template) < target && !self.shutting_down.load(Ordering::SeqCst) {
                match self.boot(&template).await {
                    Ok(warm) => self.pool.add(&template, warm),
                    Err(OrchestratorError::TemplateNotReady(_)) => {
                        short = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(template, error = %e, "warm pool boot failed");
                        short = true;
                        break;
                    }
                }
            }
        }
        short
    }

    /// A warm sandbox if the pool has a healthy one, else a cold boot.
    async fn claim_or_boot(&self, template: &str) -> Result<WarmSandbox> {
        while let Some(warm) = self.pool.claim(template) {
            let client = self.runtime()?.agent(&warm.booted.id, &warm.token);
            if client.health().await.is_ok() {
                return Ok(warm);
            }
            tracing::warn!(sandbox_id = %warm.booted.id, "discarding dead pool sandbox");
            self.destroy_quietly(&warm.booted.id).await;
        }
        let _permit = self.cold_boots.acquire().await.expect("never closed");
        tracing::info!(template, "pool empty: booting on the request path");
        self.boot(template).await
    }

    /// Drops a deleted volume's cached blob, and its layers once no
    /// running sandbox mounts them.
    pub async fn forget_volume(&self, volume_id: &str) {
        self.blob_cache.forget_volume(volume_id);
        if let Some(layers) = &self.layers {
            layers.forget_volume(volume_id).await;
        }
    }

    /// Drops cached blobs and (unused) layers of every volume not in
    /// `live`; returns how many of each went.
    pub async fn prune_volume_caches(&self, live: &HashSet<String>) -> (usize, usize) {
        let blobs = self.blob_cache.retain_volumes(live);
        let layers = match &self.layers {
            Some(layers) => layers.retain_volumes(live).await,
            None => 0,
        };
        (blobs, layers)
    }

    /// The caller's ready volumes, in attachment order. Unknown, deleted
    /// and foreign ids all get the same 403, so ids cannot be probed.
    async fn attached_volumes(
        &self,
        owner_id: &str,
        attachments: &[Attachment],
    ) -> Result<Vec<Volume>> {
        let mut volumes = Vec::with_capacity(attachments.len());
        for attachment in attachments {
            let volume = self
                .store
                .get_volume(owner_id, &attachment.volume_id)
                .await?;
            volumes.push(volume.ok_or_else(|| volume_forbidden(&attachment.volume_id))?);
        }
        Ok(volumes)
    }

    /// Creates a sandbox. The work runs as its own task: a caller that goes
    /// away (a disconnected client) does not abandon a claimed machine
    /// half-way, and a panic anywhere in it is an error, never a leak.
    pub async fn create(&self, owner_id: &str, request: CreateSandbox) -> Result<Sandbox> {
        let me = self.me.upgrade().ok_or(OrchestratorError::ShuttingDown)?;
        let owner_id = owner_id.to_string();
        match tokio::spawn(async move { me.create_attached(&owner_id, request).await }).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(error = %e, "sandbox create task failed");
                Err(OrchestratorError::CreateAborted)
            }
        }
    }

    async fn create_attached(&self, owner_id: &str, mut request: CreateSandbox) -> Result<Sandbox> {
        self.runtime()?;
        // Built-in names first (no alias may shadow them), then the
        // owner's own templates by alias or id.
        // `tpl-NAME` is how the SDKs spell a built-in's id.
        let builtin = [
            request.template.as_str(),
            request.template.trim_start_matches("tpl-"),
        ]
        .into_iter()
        .find(|name| self.templates.get(name).is_some())
        .map(str::to_string);
        let custom = match builtin {
            Some(name) => {
                self.template_rootfs(&name)?;
                request.template = name;
                None
            }
            None => Some(self.custom_template(owner_id, &request.template).await?),
        };
        let egress = crate::egress::policy(&request.extra).await?;
        let volumes = self.attached_volumes(owner_id, &request.volumes).await?;
        let warm = match &custom {
            None => self.claim_or_boot(&request.template).await?,
            Some(choice) => {
                // Custom templates have no warm pool: a cold boot.
                let _permit = self.cold_boots.acquire().await.expect("never closed");
                self.boot_rootfs(&choice.template_id, choice.rootfs.clone(), choice.limits)
                    .await?
            }
        };
        let mut disk_mib = None;
        if let Some(choice) = &custom {
            let mut envs = choice.recipe.envs.clone();
            envs.extend(std::mem::take(&mut request.envs));
            request.envs = envs;
            request.template = choice.template_id.clone();
            disk_mib = Some(choice.limits.disk_mib);
        }
        let id = warm.booted.id.clone();
        let finished = std::panic::AssertUnwindSafe(
            self.finish_create(owner_id, request, egress, volumes, &warm, disk_mib),
        )
        .catch_unwind()
        .await;
        match finished {
            Ok(Ok(sandbox)) => {
                if let Some(choice) = &custom {
                    self.start_template_command(&sandbox, &warm, choice).await;
                }
                Ok(sandbox)
            }
            Ok(Err(e)) => {
                self.destroy_quietly(&id).await;
                Err(e)
            }
            Err(_panic) => {
                tracing::error!(sandbox_id = %id, "create panicked: releasing its machine");
                self.destroy_quietly(&id).await;
                Err(OrchestratorError::CreateAborted)
            }
        }
    }

    async fn finish_create(
        &self,
        owner_id: &str,
        request: CreateSandbox,
        egress: EgressPolicy,
        volumes: Vec<Volume>,
        warm: &WarmSandbox,
        disk_mib: Option<u64>,
    ) -> Result<Sandbox> {
        let runtime = self.runtime()?;
        let client = runtime.agent(&warm.booted.id, &warm.token);
        // "No internet at all" is cheapest as a cut link; anything finer
        // goes to the driver's firewall.
        if denies_all_outbound(&egress) {
            runtime
                .set_network(&warm.booted.id, false)
                .await
                .map_err(OrchestratorError::runtime("cutting the network"))?;
        } else if !egress.is_empty() {
            runtime
                .set_egress(&warm.booted.id, &egress)
                .await
                .map_err(OrchestratorError::runtime("applying the network policy"))?;
        }
        if !request.envs.is_empty() {
            client.set_env(request.envs.clone()).await?;
        }
        let disk_bytes = disk_mib
            .or_else(|| {
                self.templates
                    .get(&request.template)
                    .map(|t| t.limits().disk_mib)
            })
            .map_or(u64::MAX, |mib| mib.saturating_mul(1 << 20));
        // Past the driver's mount slots (a few on microVMs), volumes are copied.
        let layer_slots = runtime.layer_slots();
        let hydrates = request.volumes.iter().zip(&volumes).enumerate().map(
            |(index, (attachment, volume))| {
                let layers = self.layers.as_ref().filter(|_| index < layer_slots);
                let (client, cache, limits) =
                    (&client, &self.blob_cache, self.config.unpack_limits);
                let mount_path = attachment.mount_path.as_str();
                async move {
                    match layers {
                        Some(layers) => {
                            let target = LayerTarget {
                                runtime: runtime.as_ref(),
                                layers,
                                sandbox_id: &warm.booted.id,
                                disk_bytes,
                            };
                            hydrate_layered(target, client, cache, volume, mount_path, limits).await
                        }
                        None => hydrate(client, cache, volume, mount_path, limits).await,
                    }
                }
            },
        );
        let statuses: Vec<HydrateStatus> = futures::future::join_all(hydrates).await;
        self.check_hydration(owner_id, &statuses, request.strict_hydrate)
            .await?;
        let started_at = Utc::now();
        let sandbox = Sandbox {
            id: warm.booted.id.clone(),
            owner_id: owner_id.to_string(),
            template: request.template,
            state: SandboxState::Running,
            node_id: self.config.node_id.clone(),
            envd_token: warm.token.clone(),
            timeout_secs: request.timeout_secs as i64,
            metadata: request.metadata,
            envs: request.envs,
            extra: request.extra,
            volumes: serde_json::to_value(&statuses).expect("statuses serialize"),
            started_at,
            end_at: deadline(started_at, request.timeout_secs),
            killed_at: None,
            paused_at: None,
        };
        self.store.insert_sandbox(&sandbox).await?;
        self.agents
            .lock()
            .unwrap()
            .insert(sandbox.id.clone(), client);
        if let Some(at) = sandbox.end_at {
            self.arm_deadline(&sandbox.id, at);
        }
        metrics::counter!("sandboxes_created_total", "template" => sandbox.template.clone())
            .increment(1);
        tracing::info!(sandbox_id = %sandbox.id, owner_id, template = %sandbox.template, "sandbox created");
        Ok(sandbox)
    }

    /// A custom template's start command, in the background for the
    /// sandbox's life; a failure to start it is logged, not fatal.
    async fn start_template_command(
        &self,
        sandbox: &Sandbox,
        warm: &WarmSandbox,
        choice: &build::CustomChoice,
    ) {
        let Some(cmd) = &choice.recipe.start_cmd else {
            return;
        };
        let Ok(runtime) = self.runtime() else { return };
        let request = envd_protocol::ProcessRequest {
            cmd: cmd.clone(),
            user: choice.recipe.user.clone(),
            cwd: choice.recipe.workdir.clone(),
            envs: BTreeMap::new(),
            timeout: Some(0),
            stdin: false,
        };
        match runtime
            .agent(&warm.booted.id, &warm.token)
            .start(&request)
            .await
        {
            Ok(pid) => {
                tracing::info!(sandbox_id = %sandbox.id, pid, "template start command started")
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %sandbox.id, error = %e, "template start command failed")
            }
        }
    }

    /// A volume deleted while we hydrated it is a 403, never half a volume
    /// reported ready; other failures fail the create only in strict mode.
    async fn check_hydration(
        &self,
        owner_id: &str,
        statuses: &[HydrateStatus],
        strict: Option<bool>,
    ) -> Result<()> {
        for status in statuses.iter().filter(|s| s.failed()) {
            let still_there = self
                .store
                .get_volume(owner_id, &status.volume_id)
                .await?
                .is_some();
            if !still_there {
                return Err(volume_forbidden(&status.volume_id));
            }
            if strict.unwrap_or(self.config.strict_hydrate) {
                return Err(OrchestratorError::HydrateFailed {
                    volume_id: status.volume_id.clone(),
                    mount_path: status.mount_path.clone(),
                    reason: status.error.clone().unwrap_or_default(),
                });
            }
        }
        Ok(())
    }

    fn arm_deadline(&self, id: &str, at: DateTime<Utc>) {
        let me = self.me.clone();
        let sandbox_id = id.to_string();
        self.deadlines.arm(id, at, async move {
            if let Some(orchestrator) = me.upgrade() {
                orchestrator.deadlines.forget(&sandbox_id);
                tracing::info!(sandbox_id, "deadline reached: killing");
                orchestrator.terminate(&sandbox_id).await;
            }
        });
    }

    pub async fn get(&self, owner_id: &str, id: &str) -> Result<Sandbox> {
        self.store
            .get_sandbox(owner_id, id)
            .await?
            .ok_or_else(|| OrchestratorError::SandboxNotFound(id.to_string()))
    }

    /// Kills an owner's sandbox; `Ok(false)` if it was already dead.
    pub async fn kill(&self, owner_id: &str, id: &str) -> Result<bool> {
        let sandbox = self.get(owner_id, id).await?;
        if sandbox.state == SandboxState::Killed {
            return Ok(false);
        }
        self.deadlines.cancel(id);
        Ok(self.terminate(id).await)
    }

    /// Like [`Self::kill`], but only the bookkeeping is awaited: the sandbox
    /// reads as killed (and refuses calls with 410) when this returns, and
    /// its teardown finishes in the background.
    pub async fn kill_in_background(&self, owner_id: &str, id: &str) -> Result<()> {
        let sandbox = self.get(owner_id, id).await?;
        if sandbox.state == SandboxState::Killed {
            return Ok(());
        }
        self.deadlines.cancel(id);
        // Held from before the row stops being "running" until the teardown
        // is done, so the orphan sweep never runs a second one beside it.
        let held = self.unrecorded.hold(id);
        if self.store.mark_sandbox_killed(id).await? {
            metrics::counter!("sandboxes_killed_total").increment(1);
        }
        self.agents.lock().unwrap().remove(id);
        self.forget_usage(id);
        let (me, id) = (self.me.clone(), id.to_string());
        tokio::spawn(async move {
            if let Some(orchestrator) = me.upgrade() {
                orchestrator.destroy_quietly(&id).await;
            }
            drop(held);
        });
        Ok(())
    }

    /// Marks killed, then tears down. Returns whether this call killed it.
    async fn terminate(&self, id: &str) -> bool {
        // See `kill_in_background`: held across the mark and the teardown.
        let _held = self.unrecorded.hold(id);
        let killed = match self.store.mark_sandbox_killed(id).await {
            Ok(killed) => killed,
            Err(e) => {
                tracing::error!(sandbox_id = id, error = %e, "could not record kill");
                false
            }
        };
        self.agents.lock().unwrap().remove(id);
        self.forget_usage(id);
        self.destroy_quietly(id).await;
        if killed {
            metrics::counter!("sandboxes_killed_total").increment(1);
        }
        killed
    }

    async fn destroy_quietly(&self, id: &str) {
        // Held while it goes, so the orphan sweep does not race the teardown.
        let _held = self.unrecorded.hold(id);
        if let Ok(runtime) = self.runtime() {
            match runtime.destroy(id).await {
                // Its mounts died with it: its layers are free.
                Ok(()) => {
                    if let Some(layers) = &self.layers {
                        layers.release(id).await;
                    }
                }
                Err(e) => tracing::error!(sandbox_id = id, error = %e, "destroy failed"),
            }
        }
    }

    pub async fn set_timeout(&self, owner_id: &str, id: &str, timeout_secs: u64) -> Result<()> {
        let sandbox = self.get(owner_id, id).await?;
        if sandbox.state == SandboxState::Killed {
            return Err(OrchestratorError::SandboxKilled(id.to_string()));
        }
        // While paused the clock is stopped at the pause: resuming then
        // moves the deadline on by the time spent paused.
        let end_at = deadline(sandbox.paused_at.unwrap_or_else(Utc::now), timeout_secs);
        if !self
            .store
            .set_sandbox_deadline(owner_id, id, timeout_secs as i64, end_at)
            .await?
        {
            return Err(OrchestratorError::SandboxKilled(id.to_string()));
        }
        match end_at {
            Some(at) if !sandbox.is_paused() => self.arm_deadline(id, at),
            _ => self.deadlines.cancel(id),
        }
        Ok(())
    }

    /// The envd client of a running sandbox of this owner.
    pub async fn agent(&self, owner_id: &str, id: &str) -> Result<EnvdClient> {
        let sandbox = self.get(owner_id, id).await?;
        if sandbox.state == SandboxState::Killed {
            return Err(OrchestratorError::SandboxKilled(id.to_string()));
        }
        if sandbox.is_paused() {
            return Err(OrchestratorError::SandboxPaused(id.to_string()));
        }
        if let Some(client) = self.agents.lock().unwrap().get(id) {
            return Ok(client.clone());
        }
        let client = self.runtime()?.agent(id, &sandbox.envd_token);
        self.agents
            .lock()
            .unwrap()
            .insert(id.to_string(), client.clone());
        Ok(client)
    }

    /// After a restart: sandboxes whose machine is gone are marked killed,
    /// machines without a row (old pool members, orphans) are destroyed,
    /// and the deadlines of the survivors are armed again.
    pub async fn reconcile(&self) -> Result<()> {
        let runtime = match self.runtime() {
            Ok(runtime) => runtime.clone(),
            Err(_) => return Ok(()),
        };
        let present: HashSet<String> = runtime
            .list()
            .await
            .map_err(OrchestratorError::runtime("listing machines"))?
            .into_iter()
            .collect();
        let mut kept = HashSet::new();
        for sandbox in self
            .store
            .running_sandboxes_on(&self.config.node_id)
            .await?
        {
            // A paused machine's agent is frozen: that it exists is all
            // there is to check, and its deadline is on hold.
            let paused = sandbox.is_paused();
            let alive = present.contains(&sandbox.id)
                && if paused {
                    runtime.is_running(&sandbox.id)
                } else {
                    runtime.is_alive(&sandbox.id).await
                };
            let expired = !paused && sandbox.end_at.is_some_and(|at| at <= Utc::now());
            if alive && !expired {
                if let Some(at) = sandbox.end_at.filter(|_| !paused) {
                    self.arm_deadline(&sandbox.id, at);
                }
                kept.insert(sandbox.id.clone());
                tracing::info!(sandbox_id = %sandbox.id, "re-adopted running sandbox");
            } else {
                tracing::info!(sandbox_id = %sandbox.id, alive, expired, "sandbox gone after restart: marking killed");
                self.terminate(&sandbox.id).await;
            }
        }
        for id in present.difference(&kept) {
            tracing::info!(sandbox_id = %id, "destroying sandbox with no record");
            self.destroy_quietly(id).await;
        }
        // Layers mounted by sandboxes that did not survive are free.
        if let Some(layers) = &self.layers {
            layers.retain_users(&kept).await;
        }
        // Build sandboxes were among the machines destroyed above.
        self.fail_interrupted_builds().await;
        Ok(())
    }

    /// Destroys the warm pool (running sandboxes stay, for re-adoption)
    /// and stops the deadlines (the next start arms them again).
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.deadlines.cancel_all();
        // A boot the refill loop started finishes into the pool first.
        let _refilling = self.refilling.lock().await;
        for warm in self.pool.drain() {
            self.destroy_quietly(&warm.booted.id).await;
        }
    }
}

//! Custom template builds. A build never runs a client's commands on the
//! host: it boots a **build sandbox** from the recipe's built-in base (with
//! the same isolation as any sandbox, its network included), runs each step
//! inside it as the step's user through its agent, then has the agent pack
//! the sandbox's `/` and unpacks that on the host with `rootfs_unpack`
//! (which treats it as the hostile archive it is) into a directory of its
//! own: `BUILDS_DIR/BUILD_ID/rootfs` (`builds.dir`). The driver then prepares it
//! like any template (a microVM image and snapshot). Each build has its own
//! directory, so a rebuild never touches what running sandboxes use.
//!
//! Builds run in the background, at most `max_concurrent` at once, each
//! within `timeout`; their log is bounded (oldest lines dropped, marked).

use super::{Orchestrator, Result};
use crate::error::OrchestratorError;
use crate::ids::{new_sandbox_id, new_token};
use crate::recipe::{BuildRecipe, BuildStep};
use chrono::Utc;
use envd_protocol::{ProcessEvent, ProcessRequest};
use futures::StreamExt;
use sandbox_runtime::rootfs_unpack::{unpack_rootfs, Unpacked};
use sandbox_runtime::templates::{copy_rootfs, install_packages};
use sandbox_runtime::{BootSpec, Limits};
use sandbox_store::{BuildStatus, CustomTemplate, TemplateBuild};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines a build log keeps; older ones are dropped and marked.
const MAX_LOG_LINES: usize = 1000;
/// Builds one owner may have queued or running on a node at once: builds
/// take turns for `max_concurrent` slots, so one owner must not be able to
/// queue everyone else out.
const MAX_BUILDS_PER_OWNER: usize = 4;
/// What the log starts with once lines were dropped (the SDKs look for it).
pub const TRUNCATED: &str = "... [earlier build output truncated]";
const MAX_LOG_LINE_BYTES: usize = 4096;

/// Bounds and pace of custom template builds.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// Where finished builds (and restored snapshots) live, one directory
    /// each; only root may enter it.
    pub dir: PathBuf,
    pub max_concurrent: usize,
    pub timeout: Duration,
    /// Largest resources a client may ask a template for.
    pub max_vcpus: u32,
    pub max_memory_mb: u64,
    pub max_disk_mb: u64,
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            dir: PathBuf::from("builds"),
            max_concurrent: 1,
            timeout: Duration::from_secs(1800),
            max_vcpus: 4,
            max_memory_mb: 4096,
            max_disk_mb: 20 << 10,
        }
    }
}

/// What a client asked for, validated at the edge.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub alias: String,
    pub recipe: BuildRecipe,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub disk_mb: Option<u64>,
}

/// A build's state as the status call reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildState {
    pub build_id: String,
    pub template_id: String,
    pub status: BuildStatus,
    pub logs: Vec<String>,
}

/// The live log of a running build.
#[derive(Default)]
pub(crate) struct BuildLog {
    owner_id: String,
    lines: VecDeque<String>,
    truncated: bool,
}

impl BuildLog {
    fn push(&mut self, line: &str) {
        let mut line = line.trim_end().to_string();
        if line.len() > MAX_LOG_LINE_BYTES {
            let mut cut = MAX_LOG_LINE_BYTES;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        if self.lines.len() == MAX_LOG_LINES {
            self.lines.pop_front();
            self.truncated = true;
        }
        self.lines.push_back(line);
    }

    fn snapshot(&self) -> Vec<String> {
        let marker = self.truncated.then(|| TRUNCATED.to_string());
        marker
            .into_iter()
            .chain(self.lines.iter().cloned())
            .collect()
    }
}

type SharedLog = Arc<Mutex<BuildLog>>;

fn log(shared: &SharedLog, line: impl AsRef<str>) {
    shared.lock().unwrap().push(line.as_ref());
}

/// A custom template resolved for a create.
#[derive(Debug, Clone)]
pub(crate) struct CustomChoice {
    pub template_id: String,
    pub rootfs: PathBuf,
    pub limits: Limits,
    pub recipe: BuildRecipe,
}

impl Orchestrator {
    pub(super) fn custom_dir(&self) -> PathBuf {
        self.config.builds.dir.clone()
    }

    /// Where build `build_id`'s root filesystem lives.
    fn build_rootfs(&self, build_id: &str) -> PathBuf {
        self.custom_dir().join(build_id).join("rootfs")
    }

    fn bounded_limits(&self, request: &BuildRequest, base: Limits) -> Result<Limits> {
        let bounds = &self.config.builds;
        let too_big = |what: &str, max: u64| {
            OrchestratorError::InvalidRequest(format!("{what} is limited to {max} here"))
        };
        let vcpus = request.vcpus.unwrap_or(base.vcpus);
        let memory_mb = request.memory_mb.unwrap_or(base.memory_mb);
        let disk_mb = request.disk_mb.unwrap_or(base.disk_mib);
        if vcpus == 0 || vcpus > bounds.max_vcpus {
            return Err(too_big("cpu_count", bounds.max_vcpus.into()));
        }
        if !(128..=bounds.max_memory_mb).contains(&memory_mb) {
            return Err(too_big("memory_mb (at least 128)", bounds.max_memory_mb));
        }
        if !(1024..=bounds.max_disk_mb).contains(&disk_mb) {
            return Err(too_big("disk_mb (at least 1024)", bounds.max_disk_mb));
        }
        Ok(Limits {
            vcpus,
            memory_mb,
            pids_max: base.pids_max,
            disk_mib: disk_mb,
        })
    }

    /// Starts building the owner's template `request.alias` (creating it,
    /// or replacing its spec); answers at once with the build id.
    pub async fn start_build(&self, owner_id: &str, request: BuildRequest) -> Result<BuildState> {
        if self.templates.get(&request.alias).is_some() {
            return Err(OrchestratorError::InvalidRequest(format!(
                "{:?} is a built-in template; pick another alias",
                request.alias
            )));
        }
        let base = self
            .templates
            .get(&request.recipe.base)
            .ok_or_else(|| OrchestratorError::TemplateNotFound(request.recipe.base.clone()))?;
        let limits = self.bounded_limits(&request, base.limits())?;
        self.runtime()?;
        let now = Utc::now();
        let template = self
            .store
            .upsert_template(&CustomTemplate {
                id: format!("tpl-{}", &new_sandbox_id()[4..]),
                owner_id: owner_id.to_string(),
                alias: request.alias.clone(),
                spec: sqlx_json(&request.recipe),
                vcpus: limits.vcpus.into(),
                memory_mb: limits.memory_mb as i64,
                disk_mb: limits.disk_mib as i64,
                ready_build: None,
                created_at: now,
                updated_at: now,
            })
            .await?;
        self.launch_build(owner_id, template, request.recipe, limits)
            .await
    }

    /// Builds the owner's template again from its stored spec.
    pub async fn rebuild(&self, owner_id: &str, template_id: &str) -> Result<BuildState> {
        let template = self
            .store
            .get_template(owner_id, template_id)
            .await?
            .ok_or_else(|| OrchestratorError::TemplateNotFound(template_id.to_string()))?;
        let recipe: BuildRecipe = serde_json::from_value(template.spec.0.clone())
            .map_err(|e| OrchestratorError::InvalidRequest(format!("stored spec: {e}")))?;
        let limits = custom_limits(
            &template,
            self.templates.get(&recipe.base).map(|d| d.limits()),
        );
        self.runtime()?;
        self.launch_build(owner_id, template, recipe, limits).await
    }

    async fn launch_build(
        &self,
        owner_id: &str,
        template: CustomTemplate,
        recipe: BuildRecipe,
        limits: Limits,
    ) -> Result<BuildState> {
        let build_id = format!("bld-{}", &new_sandbox_id()[4..]);
        let build = TemplateBuild {
            id: build_id.clone(),
            template_id: template.id.clone(),
            owner_id: owner_id.to_string(),
            status: BuildStatus::Building.as_str().into(),
            logs: sandbox_store::Json(Vec::new()),
            node_id: self.config.node_id.clone(),
            created_at: Utc::now(),
            finished_at: None,
        };
        let shared: SharedLog = Arc::new(Mutex::new(BuildLog {
            owner_id: owner_id.to_string(),
            ..Default::default()
        }));
        {
            let mut builds = self.builds.lock().unwrap();
            let mine = builds
                .values()
                .filter(|log| log.lock().unwrap().owner_id == owner_id)
                .count();
            if mine >= MAX_BUILDS_PER_OWNER {
                return Err(OrchestratorError::QuotaExceeded(format!(
                    "at most {MAX_BUILDS_PER_OWNER} template builds at once per owner; \
                     wait for one to finish"
                )));
            }
            builds.insert(build_id.clone(), shared.clone());
        }
        if let Err(e) = self.store.insert_template_build(&build).await {
            self.builds.lock().unwrap().remove(&build_id);
            return Err(e.into());
        }
        let me = self.me.upgrade().ok_or(OrchestratorError::ShuttingDown)?;
        let (id, template_id) = (build_id.clone(), template.id.clone());
        tokio::spawn(async move {
            let status = me.run_build(&id, &recipe, limits, &shared).await;
            let lines = shared.lock().unwrap().snapshot();
            if let Err(e) = me.store.finish_template_build(&id, status, &lines).await {
                tracing::error!(build_id = %id, error = %e, "could not record the build's end");
            }
            me.builds.lock().unwrap().remove(&id);
            metrics::counter!("template_builds_total", "status" => status.as_str()).increment(1);
        });
        tracing::info!(build_id, template_id = %template_id, owner_id, "template build started");
        Ok(BuildState {
            build_id,
            template_id,
            status: BuildStatus::Building,
            logs: Vec::new(),
        })
    }

    /// A build's status and log (live while it runs on this node).
    pub async fn build_state(&self, owner_id: &str, build_id: &str) -> Result<BuildState> {
        let row = self
            .store
            .get_template_build(owner_id, build_id)
            .await?
            .ok_or_else(|| OrchestratorError::TemplateNotFound(build_id.to_string()))?;
        let live = self.builds.lock().unwrap().get(build_id).cloned();
        let logs = match live {
            Some(shared) => shared.lock().unwrap().snapshot(),
            None => row.logs.0,
        };
        Ok(BuildState {
            build_id: row.id,
            template_id: row.template_id,
            status: BuildStatus::parse(&row.status),
            logs,
        })
    }

    /// After a restart: builds this node was running are failed, and
    /// what they left half-made on disk goes.
    pub(crate) async fn fail_interrupted_builds(&self) {
        let note = "build interrupted: the server restarted; start it again";
        let failed = match self
            .store
            .fail_unfinished_builds(&self.config.node_id, note)
            .await
        {
            Ok(failed) => failed,
            Err(e) => {
                tracing::warn!(error = %e, "could not fail interrupted template builds");
                return;
            }
        };
        for build_id in failed {
            tracing::warn!(build_id, "template build interrupted by a restart: failed");
            let dir = self.custom_dir().join(&build_id);
            if dir.exists() {
                let removed =
                    tokio::task::spawn_blocking(move || sandbox_runtime::remove_tree(&dir)).await;
                if let Ok(Err(e)) = removed {
                    tracing::warn!(build_id, error = %e, "could not remove an interrupted build");
                }
            }
        }
    }

    async fn run_build(
        &self,
        build_id: &str,
        recipe: &BuildRecipe,
        limits: Limits,
        shared: &SharedLog,
    ) -> BuildStatus {
        let started = Instant::now();
        let _slot = {
            let waiting = self.build_slots.available_permits() == 0;
            if waiting {
                log(shared, "waiting for a build slot");
            }
            self.build_slots.acquire().await.expect("never closed")
        };
        log(
            shared,
            format!(
                "building on {} (from {}: Debian bookworm), {} vCPU, {} MiB memory, {} MiB disk",
                recipe.base, recipe.base_image, limits.vcpus, limits.memory_mb, limits.disk_mib
            ),
        );
        let timeout = self.config.builds.timeout;
        let outcome = tokio::time::timeout(
            timeout,
            self.build_in_sandbox(build_id, recipe, limits, shared),
        )
        .await;
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(message)) => Some(message),
            Err(_) => Some(format!(
                "the build ran out of time ({} s)",
                timeout.as_secs()
            )),
        };
        match failure {
            None => {
                log(
                    shared,
                    format!("template built in {:.1} s", started.elapsed().as_secs_f64()),
                );
                BuildStatus::Completed
            }
            Some(message) => {
                log(shared, format!("build failed: {message}"));
                let dir = self.custom_dir().join(build_id);
                let _ =
                    tokio::task::spawn_blocking(move || sandbox_runtime::remove_tree(&dir)).await;
                BuildStatus::Failed
            }
        }
    }

    async fn build_in_sandbox(
        &self,
        build_id: &str,
        recipe: &BuildRecipe,
        limits: Limits,
        shared: &SharedLog,
    ) -> std::result::Result<(), String> {
        let runtime = self.runtime().map_err(|e| e.to_string())?.clone();
        let mut boot_from = self
            .template_rootfs(&recipe.base)
            .map_err(|e| e.to_string())?;
        let mut steps: Vec<&BuildStep> = recipe.steps.iter().collect();
        // Sandboxes without a network cannot fetch packages: the host
        // installs them into a private copy of the base, and the build
        // sandbox boots from that.
        let packages_root = self.custom_dir().join(build_id).join("packages-root");
        if !runtime.outbound_network() {
            if let Some(BuildStep::Packages { names }) = steps.first() {
                log(
                    shared,
                    format!(
                        "step 1/{}: apt-get install {} (on the host, into a private copy of {}: \
                         sandboxes of this runtime have no network)",
                        steps.len(),
                        names.join(" "),
                        recipe.base
                    ),
                );
                let custom = self.custom_dir();
                create_private_dir(&custom).map_err(|e| e.to_string())?;
                std::fs::create_dir_all(custom.join(build_id)).map_err(|e| e.to_string())?;
                copy_rootfs(&boot_from, &packages_root)
                    .await
                    .map_err(|e| e.to_string())?;
                let output = install_packages(&packages_root, names).await;
                let output = output.map_err(|e| format!("apt-get install failed: {e}"))?;
                output.lines().for_each(|line| log(shared, line));
                boot_from = packages_root.clone();
                steps.remove(0);
            }
        }
        let id = new_sandbox_id();
        let _held = self.unrecorded.hold(&id);
        let token = new_token();
        log(shared, format!("booting build sandbox {id}"));
        let booted = runtime
            .boot(BootSpec {
                id: id.clone(),
                rootfs: boot_from,
                token: token.clone(),
                hostname: id.clone(),
                limits,
            })
            .await;
        if let Err(e) = booted {
            self.destroy_quietly(&id).await;
            return Err(format!("the build sandbox did not start: {e}"));
        }
        let outcome = self
            .run_steps_and_capture(
                &id,
                &token,
                build_id,
                (&steps, recipe.steps.len()),
                limits,
                shared,
            )
            .await;
        self.destroy_quietly(&id).await;
        if packages_root.exists() {
            let _ =
                tokio::task::spawn_blocking(move || sandbox_runtime::remove_tree(&packages_root))
                    .await;
        }
        outcome?;
        let rootfs = self.build_rootfs(build_id);
        log(shared, "preparing the template for this runtime");
        runtime
            .prepare(&rootfs, limits)
            .await
            .map_err(|e| format!("preparing the template: {e}"))
    }

    async fn run_steps_and_capture(
        &self,
        id: &str,
        token: &str,
        build_id: &str,
        (steps, count): (&[&BuildStep], usize),
        limits: Limits,
        shared: &SharedLog,
    ) -> std::result::Result<(), String> {
        let client = self.runtime().map_err(|e| e.to_string())?.agent(id, token);
        // Numbered as in the recipe: a first package step may have run on
        // the host already.
        let done = count - steps.len();
        for (index, step) in steps.iter().enumerate() {
            let index = index + done;
            log(
                shared,
                format!("step {}/{count}: {}", index + 1, step.describe()),
            );
            let (cmd, user) = step.command();
            let (cwd, envs) = match step {
                BuildStep::Run { cwd, envs, .. } => (cwd.clone(), envs.clone()),
                BuildStep::Packages { .. } => (None, BTreeMap::new()),
            };
            let request = ProcessRequest {
                cmd,
                user: user.to_string(),
                cwd,
                envs,
                timeout: Some(self.config.builds.timeout.as_secs()),
                stdin: false,
            };
            let mut events = client
                .stream(&request)
                .await
                .map_err(|e| format!("step {}: {e}", index + 1))?;
            let mut partial = String::new();
            let mut exit = None;
            while let Some(event) = events.next().await {
                match event.map_err(|e| format!("step {}: {e}", index + 1))? {
                    ProcessEvent::Stdout { data } | ProcessEvent::Stderr { data } => {
                        partial.push_str(&data);
                        while let Some(end) = partial.find('\n') {
                            log(shared, &partial[..end]);
                            partial.drain(..=end);
                        }
                    }
                    ProcessEvent::Exit { exit_code, .. } => exit = Some(exit_code),
                    ProcessEvent::Error { message } => {
                        return Err(format!("step {}: {message}", index + 1))
                    }
                    ProcessEvent::Start { .. } | ProcessEvent::Keepalive => {}
                }
            }
            if !partial.is_empty() {
                log(shared, &partial);
            }
            match exit {
                Some(0) => {}
                Some(code) => {
                    return Err(format!(
                        "step {}/{count} ({}) exited with {code}",
                        index + 1,
                        step.describe()
                    ))
                }
                None => return Err(format!("step {} ended without an exit status", index + 1)),
            }
        }
        log(shared, "capturing the root filesystem");
        let archive = client
            .archive("/")
            .await
            .map_err(|e| format!("packing the build sandbox: {e}"))?;
        let archive = archive.map(|chunk| chunk.map_err(std::io::Error::other));
        let max_bytes = limits.disk_mib.saturating_mul(1 << 20);
        let unpacked = self
            .unpack_build_rootfs(build_id, archive, max_bytes)
            .await
            .map_err(|e| format!("unpacking the captured root filesystem: {e}"))?;
        log(
            shared,
            format!(
                "captured {} files, {} directories, {} links ({} MiB)",
                unpacked.files,
                unpacked.dirs,
                unpacked.symlinks,
                unpacked.bytes >> 20
            ),
        );
        Ok(())
    }

    /// Unpacks a sandbox's packed root filesystem (hostile: see
    /// `rootfs_unpack`) into `BUILDS_DIR/name/rootfs`, then writes the
    /// `stamp` that marks it finished; the driver keys its artefacts (a
    /// microVM image) by it. Shared by template builds and restores.
    pub(super) async fn unpack_build_rootfs<S>(
        &self,
        name: &str,
        archive: S,
        max_bytes: u64,
    ) -> std::io::Result<Unpacked>
    where
        S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Unpin + 'static,
    {
        let (custom, name) = (self.custom_dir(), name.to_string());
        let reader = tokio_util::io::StreamReader::new(archive);
        tokio::task::spawn_blocking(move || {
            create_private_dir(&custom)?;
            let dir = custom.join(&name);
            let staging = dir.join("rootfs.tmp");
            if staging.exists() {
                sandbox_runtime::remove_tree(&staging)?;
            }
            std::fs::create_dir_all(&staging)?;
            let limits = sandbox_archive::Limits {
                max_bytes,
                ..Default::default()
            };
            let unpacked =
                unpack_rootfs(tokio_util::io::SyncIoBridge::new(reader), &staging, limits)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            std::fs::rename(&staging, dir.join("rootfs"))?;
            std::fs::write(dir.join("stamp"), &name)?;
            Ok(unpacked)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// The owner's custom template named `name` (alias or id), ready.
    pub(crate) async fn custom_template(&self, owner_id: &str, name: &str) -> Result<CustomChoice> {
        let template = self
            .store
            .get_template(owner_id, name)
            .await?
            .ok_or_else(|| OrchestratorError::TemplateNotFound(name.to_string()))?;
        let build = template.ready_build.clone().ok_or_else(|| {
            OrchestratorError::TemplateNotReady(format!("{name}: no build has completed yet"))
        })?;
        let recipe: BuildRecipe = serde_json::from_value(template.spec.0.clone())
            .map_err(|e| OrchestratorError::InvalidRequest(format!("stored spec: {e}")))?;
        let limits = custom_limits(
            &template,
            self.templates.get(&recipe.base).map(|d| d.limits()),
        );
        Ok(CustomChoice {
            template_id: template.id,
            rootfs: self.build_rootfs(&build),
            limits,
            recipe,
        })
    }
}

fn custom_limits(template: &CustomTemplate, base: Option<Limits>) -> Limits {
    Limits {
        vcpus: template.vcpus as u32,
        memory_mb: template.memory_mb as u64,
        pids_max: base.map_or(512, |b| b.pids_max),
        disk_mib: template.disk_mb as u64,
    }
}

fn sqlx_json(recipe: &BuildRecipe) -> sandbox_store::Json<serde_json::Value> {
    sandbox_store::Json(serde_json::to_value(recipe).expect("recipes serialize"))
}

/// Custom template roots keep owners and setuid bits: only root may enter
/// their parent, so no host user can run what a tenant built.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_bounded_and_says_when_it_dropped_lines() {
        let mut log = BuildLog::default();
        for i in 0..MAX_LOG_LINES + 5 {
            log.push(&format!("line {i}"));
        }
        let lines = log.snapshot();
        assert_eq!(lines.len(), MAX_LOG_LINES + 1);
        assert_eq!(lines[0], TRUNCATED);
        assert_eq!(lines[1], "line 5");
        log.push(&"x".repeat(10_000));
        assert_eq!(log.snapshot().last().unwrap().len(), MAX_LOG_LINE_BYTES);
    }
}

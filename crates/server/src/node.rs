//! This node's sandbox machinery: templates, the runtime driver and the
//! orchestrator, plus their start-up duties.

use crate::config::{Config, HydrateMode, RuntimeKind};
use anyhow::Context;
use sandbox_blobs::BlobStore;
use sandbox_orchestrator::{BlobCache, LayerStore, Orchestrator, OrchestratorConfig};
use sandbox_runtime::{
    LauncherCommand, MicrovmConfig, MicrovmRuntime, NamespaceConfig, NamespaceRuntime, Runtime,
    TemplateCatalog, TemplateDef,
};
use sandbox_store::Store;
use std::sync::Arc;

/// The hidden subcommand the namespace runtime execs to set up a sandbox.
pub const LAUNCHER_SUBCOMMAND: &str = "__sandbox-launcher";
/// The hidden subcommand that relays host sessions to a microVM's envd.
pub const RELAY_SUBCOMMAND: &str = "__vm-relay";

const BUILT_IN_TEMPLATES: [(&str, &str); 2] = [
    ("base", include_str!("../../../config/templates/base.toml")),
    (
        "python",
        include_str!("../../../config/templates/python.toml"),
    ),
];

pub fn template_catalog(config: &Config) -> anyhow::Result<TemplateCatalog> {
    let mut definitions = Vec::new();
    for (name, text) in BUILT_IN_TEMPLATES {
        definitions.push(TemplateDef::parse(name, text)?);
    }
    let extra_dir = &config.runtime.template_definitions_dir;
    if !extra_dir.is_empty() {
        let extra = TemplateCatalog::load(extra_dir, config.templates_dir())
            .with_context(|| format!("loading template definitions from {extra_dir}"))?;
        for name in extra.names() {
            definitions.retain(|d: &TemplateDef| d.name != name);
            definitions.extend(extra.get(&name).cloned());
        }
    }
    Ok(TemplateCatalog::from_definitions(
        definitions,
        config.templates_dir(),
    ))
}

/// The runtime this host can run, or why it cannot run any.
pub fn runtime(config: &Config) -> Result<Arc<dyn Runtime>, String> {
    match config.runtime.kind {
        RuntimeKind::Disabled => {
            Err("sandboxes are disabled by runtime.kind = \"disabled\"".into())
        }
        RuntimeKind::Namespace => namespace_runtime(config),
        RuntimeKind::Microvm => microvm_runtime(config),
        // With hardware KVM, auto means microVMs and nothing weaker: if they
        // cannot run, no sandboxes until the operator says otherwise.
        RuntimeKind::Auto => match sandbox_runtime::microvm::accel::hardware_kvm() {
            Ok(()) => microvm_runtime(config).map_err(|why| {
                format!(
                    "runtime.kind = \"auto\" found hardware KVM but microVMs cannot run ({why}); \
                     not falling back to the shared-kernel namespace runtime: fix the microVM \
                     setup or set runtime.kind = \"namespace\" explicitly"
                )
            }),
            Err(why) => {
                tracing::warn!(
                    reason = %why,
                    "no hardware KVM: runtime.kind = auto picks the namespace runtime (shared kernel, \
                     user namespace + seccomp); set runtime.kind = \"microvm\" for VMs under TCG"
                );
                namespace_runtime_with(config, Some(format!("auto: no hardware KVM ({why})")))
            }
        },
    }
}

fn envd_binary(config: &Config) -> Result<std::path::PathBuf, String> {
    let envd = config.envd_path();
    if !envd.is_file() {
        return Err(format!(
            "envd binary not found at {} (build it with `cargo build -p envd` or set runtime.envd_path)",
            envd.display()
        ));
    }
    Ok(envd)
}

fn microvm_runtime(config: &Config) -> Result<Arc<dyn Runtime>, String> {
    let settings = &config.runtime.microvm;
    let runtime = MicrovmRuntime::new(MicrovmConfig {
        state_dir: config.state_dir(),
        images_dir: config.images_dir(),
        envd_binary: envd_binary(config)?,
        qemu_binary: settings.qemu.clone().into(),
        qemu_img_binary: settings.qemu_img.clone().into(),
        kernel_source: settings.kernel_source.clone().into(),
        accel: settings.accel,
        snapshots: settings.snapshots,
        fast_restore: settings.fast_restore,
        volume_slots: settings.volume_slots,
        disk_bytes: settings.disk_gib << 30,
        boot_timeout: std::time::Duration::from_secs(settings.boot_timeout_secs),
        vm_user: settings.vm_user.clone(),
        vm_gid_base: settings.vm_gid_base,
        vm_gid_slots: settings.vm_gid_slots,
        egress_allow: settings
            .egress_allow
            .iter()
            .map(|entry| {
                entry
                    .parse()
                    .map_err(|e| format!("runtime.microvm.egress_allow: {e}"))
            })
            .collect::<Result<_, _>>()?,
        relay: LauncherCommand {
            program: std::env::current_exe()
                .map_err(|e| format!("locating our own binary: {e}"))?,
            args_prefix: vec![RELAY_SUBCOMMAND.into()],
        },
    })
    .map_err(|e| e.to_string())?;
    Ok(Arc::new(runtime))
}

fn namespace_runtime(config: &Config) -> Result<Arc<dyn Runtime>, String> {
    namespace_runtime_with(config, None)
}

/// `selected_by`: why `auto` chose this runtime, shown in `/health`.
fn namespace_runtime_with(
    config: &Config,
    selected_by: Option<String>,
) -> Result<Arc<dyn Runtime>, String> {
    let envd = envd_binary(config)?;
    let program = std::env::current_exe().map_err(|e| format!("locating our own binary: {e}"))?;
    let runtime = NamespaceRuntime::new(NamespaceConfig {
        state_dir: config.state_dir(),
        envd_binary: envd,
        launcher: LauncherCommand {
            program,
            args_prefix: vec![LAUNCHER_SUBCOMMAND.into()],
        },
        uid_base: config.runtime.namespace.uid_base,
        uid_slots: config.runtime.namespace.uid_slots,
    })
    .with_selection_note(selected_by);
    let protections = runtime.probe().map_err(|e| e.to_string())?;
    if let Err(missing) = &protections.device_cgroup {
        tracing::warn!(reason = %missing, "namespace runtime: no device cgroup");
    }
    Ok(Arc::new(runtime))
}

pub async fn start(
    config: &Config,
    store: Arc<dyn Store>,
    blobs: Arc<dyn BlobStore>,
) -> anyhow::Result<Arc<Orchestrator>> {
    let cache_dir = config.blob_cache_dir();
    let blob_cache = BlobCache::new(cache_dir.clone(), config.hydrate.cache_max_bytes, blobs)
        .with_context(|| format!("creating blob cache {}", cache_dir.display()))?;
    let templates = Arc::new(template_catalog(config)?);
    let runtime = runtime(config);
    match &runtime {
        Ok(runtime) => {
            tracing::info!(runtime = %runtime.describe(), "sandbox runtime ready")
        }
        Err(why) => {
            tracing::warn!(reason = %why, "no sandbox runtime: sandbox calls will answer 503")
        }
    }
    let layers = match (config.hydrate.mode, &runtime) {
        (HydrateMode::Layer, Ok(runtime)) => {
            let dir = config.layers_dir();
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating the volume layer store {}", dir.display()))?;
            match runtime.check_layer_store(&dir) {
                Ok(()) => Some(
                    LayerStore::open(dir.clone(), config.hydrate.layers_max_bytes).with_context(
                        || format!("opening the volume layer store {}", dir.display()),
                    )?,
                ),
                Err(why) => {
                    tracing::info!(dir = %dir.display(), reason = %why, "hydrate.mode = \"layer\", but no layers here: volumes are copied per sandbox");
                    None
                }
            }
        }
        _ => None,
    };
    let orchestrator = Orchestrator::new(
        store,
        Arc::new(blob_cache),
        layers,
        runtime.clone(),
        templates.clone(),
        OrchestratorConfig {
            node_id: config.node_id(),
            pool_sizes: config.pool.sizes.clone(),
            max_cold_boots: config.pool.max_cold_boots,
            strict_hydrate: config.hydrate.strict,
            unpack_limits: sandbox_orchestrator::UnpackLimits {
                max_bytes: Some(config.volumes.max_uncompressed_bytes),
                max_entries: Some(config.volumes.max_entries),
                max_header_bytes: Some(config.volumes.max_header_bytes),
                max_ratio: Some(config.volumes.max_expansion_ratio),
            },
            builds: sandbox_orchestrator::BuildConfig {
                dir: config.builds_dir(),
                max_concurrent: config.builds.max_concurrent,
                timeout: std::time::Duration::from_secs(config.builds.timeout_secs),
                max_vcpus: config.builds.max_vcpus,
                max_memory_mb: config.builds.max_memory_mb,
                max_disk_mb: config.builds.max_disk_mb,
            },
            max_snapshots_per_sandbox: config.sandboxes.max_snapshots,
        },
    );
    if orchestrator.runtime_kind().is_ok() {
        orchestrator.reconcile().await?;
        if config.runtime.build_templates_on_start {
            let runtime = runtime.clone().expect("runtime_kind() is Ok");
            for name in templates.names() {
                let (templates, runtime) = (templates.clone(), runtime.clone());
                tokio::spawn(async move {
                    if let Err(e) = prepare_template(&templates, runtime.as_ref(), &name).await {
                        tracing::error!(template = %name, error = %e, "template build failed");
                    }
                });
            }
        }
        orchestrator.start_pool_refill();
        orchestrator.start_liveness_watch();
    }
    Ok(orchestrator)
}

/// Builds a template's root filesystem, then whatever the runtime boots it
/// from (for microVMs: kernel, ext4 image, snapshot).
pub async fn prepare_template(
    templates: &TemplateCatalog,
    runtime: &dyn Runtime,
    name: &str,
) -> anyhow::Result<std::path::PathBuf> {
    tracing::info!(template = %name, "ensuring template is built");
    let rootfs = templates.ensure_built(name).await?;
    let definition = templates
        .get(name)
        .with_context(|| format!("unknown template {name}"))?;
    runtime.prepare(&rootfs, definition.limits()).await?;
    tracing::info!(template = %name, rootfs = %rootfs.display(), runtime = runtime.kind(), "template ready");
    Ok(rootfs)
}

use clap::{Parser, Subcommand};
use sandbox_manager::config::Config;
use sandbox_manager::{app, auth, node, telemetry};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sandbox-manager",
    version,
    about = "Disposable, isolated Linux sandboxes over HTTP"
)]
struct Cli {
    /// Configuration file layered over the built-in defaults.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Print the API's OpenAPI 3.1 document (also served at /openapi.json).
    Openapi,
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Build and list sandbox templates (root filesystems).
    Templates {
        #[command(subcommand)]
        command: TemplatesCommand,
    },
    /// Per-owner quota overrides (defaults come from the [quotas] config).
    Quotas {
        #[command(subcommand)]
        command: QuotasCommand,
    },
    /// Build what the configured runtime boots from: for microVMs the guest
    /// kernel, each template's ext4 image and its snapshot (cached; rebuilt
    /// only when an input changes).
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// Build everything the named templates (default: all) need.
    Build { templates: Vec<String> },
}

#[derive(Subcommand)]
enum QuotasCommand {
    /// Sets an owner's limits; a limit given as -1 returns to the default.
    Set {
        #[arg(long)]
        owner: String,
        #[arg(long)]
        sandboxes: Option<i64>,
        #[arg(long)]
        volumes: Option<i64>,
        #[arg(long)]
        volume_bytes: Option<i64>,
    },
    /// Shows an owner's limits in effect and current usage.
    Show {
        #[arg(long)]
        owner: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an API key (and the owner, if new). The key is printed once,
    /// alone on the last line; only its hash is stored.
    Create {
        #[arg(long)]
        owner: String,
    },
}

#[derive(Subcommand)]
enum TemplatesCommand {
    /// Build a template (a no-op when its definition is unchanged).
    Build {
        name: String,
        /// Rebuild even if it is up to date.
        #[arg(long)]
        force: bool,
    },
    /// List templates and whether they are built.
    List,
}

fn main() -> anyhow::Result<()> {
    // The sandbox launcher must run before any thread exists (it forks), so
    // it is dispatched ahead of argument parsing and the async runtime.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(node::LAUNCHER_SUBCOMMAND) {
        sandbox_runtime::launcher_main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(node::RELAY_SUBCOMMAND) {
        sandbox_runtime::microvm::relay::relay_main(&args[2..]);
    }
    bound_large_allocations();
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    telemetry::init(config.log.format);
    let runtime = tokio::runtime::Runtime::new()?;
    let outcome = runtime.block_on(run(cli.command, config));
    // Blocking work still running (an archive walk, a file copy) must not
    // hold the process past shutdown: give it a moment, then leave.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    outcome
}

/// Upload parts (8 MiB each, a few in flight) are the big allocations. By
/// default glibc raises its mmap threshold to the size of the last large
/// block freed, after which parts come from per-thread heaps that keep the
/// memory after it is freed: a 1 GiB upload peaked at 104 MiB of RSS for
/// 40 MiB of live buffers. A fixed threshold keeps every block of 1 MiB or
/// more an mmap of its own, returned to the kernel when freed.
fn bound_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt before any thread exists; it only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => app::serve(config).await,
        Command::Openapi => {
            println!("{}", app::openapi_document().to_pretty_json()?);
            Ok(())
        }
        Command::Migrate => {
            let store = app::open_store(&config).await?;
            println!("migrations applied ({})", store.backend());
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Create { owner },
        } => {
            let store = app::open_store(&config).await?;
            let (owner, key) = auth::create_key(store.as_ref(), &owner).await?;
            println!("owner {} ({})", owner.name, owner.id);
            println!("{key}");
            Ok(())
        }
        Command::Quotas { command } => quotas(command, &config).await,
        Command::Images {
            command: ImagesCommand::Build { templates },
        } => {
            let catalog = node::template_catalog(&config)?;
            let runtime = node::runtime(&config).map_err(anyhow::Error::msg)?;
            println!("runtime: {}", runtime.describe());
            let names = if templates.is_empty() {
                catalog.names()
            } else {
                templates
            };
            for name in names {
                let started = std::time::Instant::now();
                node::prepare_template(&catalog, runtime.as_ref(), &name).await?;
                println!("{name}: ready ({:.1} s)", started.elapsed().as_secs_f64());
            }
            Ok(())
        }
        Command::Templates { command } => {
            let catalog = node::template_catalog(&config)?;
            match command {
                TemplatesCommand::Build { name, force } => {
                    let rootfs = catalog.build(&name, force).await?;
                    println!("{name}: {}", rootfs.display());
                }
                TemplatesCommand::List => {
                    for name in catalog.names() {
                        println!(
                            "{name}\t{:?}\t{}",
                            catalog.status(&name)?,
                            catalog.rootfs_path(&name).display()
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

async fn quotas(command: QuotasCommand, config: &Config) -> anyhow::Result<()> {
    use sandbox_manager::quotas::Limits;
    let store = app::open_store(config).await?;
    let owner_name = match &command {
        QuotasCommand::Set { owner, .. } | QuotasCommand::Show { owner } => owner.clone(),
    };
    let owner = store
        .owner_by_name(&owner_name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no owner named {owner_name:?}"))?;
    if let QuotasCommand::Set {
        sandboxes,
        volumes,
        volume_bytes,
        ..
    } = command
    {
        let mut quota = store.quota_override(&owner.id).await?;
        // Given: set it (negative: back to the default); absent: unchanged.
        let apply = |slot: &mut Option<i64>, value: Option<i64>| {
            if let Some(value) = value {
                *slot = (value >= 0).then_some(value);
            }
        };
        apply(&mut quota.max_running_sandboxes, sandboxes);
        apply(&mut quota.max_volumes, volumes);
        apply(&mut quota.max_volume_bytes, volume_bytes);
        store.set_quota_override(&owner.id, &quota).await?;
    }
    let limits = Limits::resolve(&config.quotas, &store.quota_override(&owner.id).await?);
    let usage = store.usage(&owner.id).await?;
    println!("owner {} ({})", owner.name, owner.id);
    println!(
        "running sandboxes\t{} of {}",
        usage.running_sandboxes, limits.max_running_sandboxes
    );
    println!("volumes\t{} of {}", usage.volumes, limits.max_volumes);
    println!(
        "volume bytes\t{} of {}",
        usage.volume_bytes, limits.max_volume_bytes
    );
    Ok(())
}
